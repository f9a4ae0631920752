"""
``python -m bench.soak [--minutes 30]``: the peernix soak test.

Starts three peernix daemons on 127.0.0.1 (stores a, b and an empty c, each
daemon the others' static peer, all trusting the ``soak-1`` key), puts a
moderate mixed load on them from worker processes, stops/restarts and
freezes/thaws them at random, reports per daemon every minute and judges the
run at the end.  See ``bench/README.rst`` ("Soak").

Exit status: 0 when every check passes, 1 when one fails (or the set-up
fails), 2 when a tool is missing, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from types import FrameType

from attrs import asdict

from bench import fixtures, report, servers
from bench.load import http_get
from bench.soak import client, cluster, fixture, verdict

_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def log(t0: float, msg: str) -> None:
    """Print a progress line with the elapsed time."""
    print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """:returns: the parsed command line."""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description="peernix soak test (not in CI).")
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    p.add_argument("--workers", type=int, default=4, help="client worker processes (default 4)")
    p.add_argument("--rate", type=float, default=15.0, help="requests per second per worker (default 15)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--chaos-gap", type=float, nargs=2, default=(10.0, 30.0), metavar=("MIN", "MAX"),
                   help="seconds between two disruptions (default 10 30)")
    p.add_argument("--chaos-duration", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"),
                   help="seconds a daemon stays stopped or frozen (default 2 8)")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between RSS/fd samples (default 5)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of each process's life not judged for flatness (default min(120, run/3))")
    p.add_argument("--out", default=_DEFAULT_OUT, help="directory for soak-<date>-<host>.json (default bench/results)")
    return p.parse_args(argv)


def wait_fan_out(daemons: list[cluster.Daemon], fx: fixture.SoakFixture, timeout: float = 60.0) -> None:
    """
    Check that every daemon answers a path only another daemon holds (it
    asks its peers) before the load starts.

    :raises servers.Unavailable: when one does not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    for d in daemons:
        target = next(p for p in fx.paths if p.holder != d.index)
        url = f"http://127.0.0.1:{d.port}/nix-cache/{target.hash_part}.narinfo"
        while True:
            try:
                status = http_get(url, timeout=10)[0]
            except OSError:
                status = 0
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise servers.Unavailable(f"daemon {d.name} answers {status} for {target.path}, which its "
                                          f"peer holds: it does not ask its peers")
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    """Run the soak. :returns: the exit status."""
    t0 = time.monotonic()
    missing = fixtures.check_tools()
    if missing:
        print("The soak needs tools that are missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(time.time())
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, duration / 3)
    log(t0, f"soak for {args.minutes:g} min, {args.workers} workers x {args.rate:g} req/s, seed {seed}")
    fx = fixture.build()
    workdir = tempfile.mkdtemp(prefix="peernix-soak-")
    log(t0, f"daemon logs in {workdir}")

    ports = [servers.free_port() for _ in range(3)]
    udp_ports = [servers.free_port() for _ in range(3)]
    daemons = [cluster.Daemon(i, fx.stores[i], ports[i], udp_ports[i], [p for j, p in enumerate(ports) if j != i],
                              fx.public_key, workdir) for i in range(3)]
    for d in daemons:
        log(t0, f"starting daemon {d.name} on 127.0.0.1:{d.port}")
        d.start()
    wait_fan_out(daemons, fx)
    log(t0, "every daemon answers its peers' paths")

    plan = client.Plan(
        ports=tuple(ports), public_key=fx.public_key, rate=args.rate,
        targets=tuple(client.Target(p.hash_part, p.path, p.nar_hash, p.nar_size, p.holder) for p in fx.paths))
    ctx = multiprocessing.get_context("spawn")
    records: multiprocessing.queues.Queue[list[client.Record]] = ctx.Queue()
    stop_workers = ctx.Event()
    workers = [ctx.Process(target=client.worker_main, args=(i, plan, seed, records, stop_workers),
                           name=f"soak-worker-{i}", daemon=True) for i in range(args.workers)]
    stop_threads = threading.Event()
    timeline = cluster.Timeline()
    sampler = cluster.Sampler(daemons, args.sample_interval, stop_threads)
    chaos = cluster.Chaos(daemons, timeline,
                          cluster.ChaosSettings(gap=(args.chaos_gap[0], args.chaos_gap[1]),
                                                duration=(args.chaos_duration[0], args.chaos_duration[1])),
                          random.Random(seed), stop_threads)
    try:
        for w in workers:
            w.start()
        start = time.monotonic()
        tally = verdict.Tally(start, len(daemons))
        sampler.sample_once()
        sampler.start()
        chaos.start()
        log(t0, f"load and chaos started; minute reports follow (warm-up {warmup:.0f} s)")
        reported = 0

        def drain(wait: float) -> None:
            try:
                batch = records.get(timeout=wait)
            except queue.Empty:
                return
            for rec in batch:
                tally.add(rec, timeline)

        end_at = start + duration
        while time.monotonic() < end_at:
            drain(0.5)
            # A minute is printed 3 s after it ends, so late batches are in.
            while reported < int(duration // 60) and time.monotonic() >= start + 60 * (reported + 1) + 3:
                print(verdict.minute_lines(tally, reported, sampler.samples(),
                                           _events(timeline, tally, reported)), flush=True)
                reported += 1
            if any(not w.is_alive() for w in workers):
                raise RuntimeError("a worker process died: "
                                   + ", ".join(f"{w.name} exit {w.exitcode}" for w in workers if not w.is_alive()))
        log(t0, "time is up: stopping the load and the chaos")
        stop_workers.set()
        stop_threads.set()
        grace = time.monotonic() + plan.nar_deadline + plan.timeout + 5
        # Drain while the workers finish: a worker cannot exit before its queue is flushed.
        while any(w.is_alive() for w in workers) and time.monotonic() < grace:
            drain(0.2)
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join(5)
        while True:
            try:
                batch = records.get(timeout=0.5)
            except queue.Empty:
                break
            for rec in batch:
                tally.add(rec, timeline)
        chaos.join(3 * 60 + 30)
        sampler.join(args.sample_interval + 5)
        sampler.sample_once()
        while reported < int(-(-duration // 60)):
            print(verdict.minute_lines(tally, reported, sampler.samples(), _events(timeline, tally, reported)))
            reported += 1
        return _finish(args, seed, duration, warmup, fx, daemons, tally, sampler, chaos, timeline, workdir, t0)
    finally:
        stop_workers.set()
        stop_threads.set()
        for w in workers:
            if w.is_alive():
                w.terminate()
        if chaos.is_alive():
            chaos.join(30)
        servers.stop_all()


def _events(timeline: cluster.Timeline, tally: verdict.Tally, minute: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for d in timeline.items():
        if tally.minute_of(d.start) == minute:
            length = f" {d.end - d.start:.1f}s" if d.end is not None else ""
            out.setdefault(d.daemon, []).append(f"[{d.kind}{length}]")
    return out


def _finish(args: argparse.Namespace, seed: int, duration: float, warmup: float, fx: fixture.SoakFixture,
            daemons: list[cluster.Daemon], tally: verdict.Tally, sampler: cluster.Sampler, chaos: cluster.Chaos,
            timeline: cluster.Timeline, workdir: str, t0: float) -> int:
    samples = sampler.samples()
    flat = verdict.flatness(samples, warmup)
    anchor_judged = any(f.daemon == cluster.NAMES[0] and f.incarnation == 0 for f in flat)
    killed = sum(d.killed for d in daemons)
    rows = verdict.checks(tally, flat, chaos.failures, killed, anchor_judged)
    items = timeline.items()
    restarts = {i: sum(1 for x in items if x.daemon == i and x.kind == "stop") for i in range(3)}
    freezes = {i: sum(1 for x in items if x.daemon == i and x.kind == "freeze") for i in range(3)}
    print()
    print(verdict.daemon_table(tally, flat, restarts, freezes))
    print()
    print(verdict.verdict_table(rows))
    passed = all(r.ok for r in rows)
    total = tally.total()
    machine = report.machine()
    payload: dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "passed": passed, "seed": seed,
        "settings": {"minutes": args.minutes, "workers": args.workers, "rate": args.rate,
                     "chaos_gap": list(args.chaos_gap), "chaos_duration": list(args.chaos_duration),
                     "sample_interval": args.sample_interval, "warmup": warmup,
                     "stoppable": [cluster.NAMES[i] for i in cluster.ChaosSettings().stoppable],
                     "conn_grace": verdict.CONN_GRACE, "peer_recovery": verdict.PEER_RECOVERY,
                     "rss_tolerance": [verdict.RSS_TOL_KIB, verdict.RSS_TOL_SHARE],
                     "fd_tolerance": [verdict.FD_TOL, verdict.FD_TOL_SHARE]},
        "fixture": {"root": fx.root, "paths": len(fx.paths),
                    "mb_paths": sum(1 for p in fx.paths if p.nar_size >= 1 << 20),
                    "build_seconds": fx.build_seconds},
        "checks": [asdict(r) for r in rows],
        "totals": total, "by_op": tally.by_op, "nar_bytes_verified": tally.nar_bytes,
        "wrong_bytes": tally.wrong_bytes,
        "per_daemon": {cluster.NAMES[d]: {"counts": tally.total(d), "p99_ms": tally.p99_ms(d),
                                          "restarts": restarts[d], "freezes": freezes[d]} for d in range(3)},
        "minutes": [{"minute": m + 1, **{cluster.NAMES[d]: {
            "counts": tally.minute_counts(m, d), "p99_ms": tally.p99_ms(d, m),
            "rss_kib": _last(samples, tally, m, d, 3), "fds": _last(samples, tally, m, d, 4)} for d in range(3)}}
            for m in range(int(-(-duration // 60)))],
        "flatness": [asdict(f) for f in flat],
        "samples": [list(s[1:]) + [round(s[0] - tally.t0, 2)] for s in samples],
        "samples_columns": ["daemon", "incarnation", "rss_kib", "fds", "t"],
        "disruptions": [{"daemon": cluster.NAMES[x.daemon], "kind": x.kind, "start": round(x.start - tally.t0, 2),
                         "seconds": None if x.end is None else round(x.end - x.start, 2)} for x in items],
        "stop_seconds": chaos.stop_seconds, "restart_seconds": chaos.restart_seconds,
        "chaos_failures": chaos.failures, "examples": tally.examples, "logs": workdir,
        "elapsed_seconds": time.monotonic() - t0,
    }
    path = verdict.write_json(args.out, payload)
    requests = sum(total.values())
    print(f"\n{requests} requests, {tally.nar_bytes / 1e6:.0f} MB of NARs verified, "
          f"{sum(restarts.values())} restarts, {sum(freezes.values())} freezes")
    print(f"results: {path}\ndaemon logs: {workdir}\nverdict: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def _last(samples: list[cluster.Sample], tally: verdict.Tally, minute: int, daemon: int, col: int) -> int | None:
    values = [int(s[col]) for s in samples if s[1] == daemon and tally.minute_of(s[0]) == minute]
    return values[-1] if values else None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # One clean-up path (run's finally) for every way of being stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the soak. :returns: the exit status."""
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the workers and daemons", file=sys.stderr)
        return 130
    except servers.Unavailable as e:
        print(f"set-up failed: {e}", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        servers.stop_all()


if __name__ == "__main__":
    sys.exit(main())
