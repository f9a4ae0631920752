"""
``python -m bench [--quick] [--out DIR]``: the peernix benchmark suite.

Builds (or reuses) the fixture store, starts the references (nginx over a
``file://`` copy, a minimal ``twisted.web`` server) and peernix daemons on
127.0.0.1, measures every figure of the issue's table, prints one table and
writes ``<out>/<date>-<host>.json``.  See ``bench/README.rst``.

Exit status: 0 when every figure with a target passes, 1 when one fails or
could not be measured, 2 when a required tool is missing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from types import FrameType

from attrs import asdict, frozen

from bench import digests, dnssd, fixtures, lan, load, report, servers, upstream
from bench.fixtures import Fixture, hash_part
from peernix.test.nixenv import NIX_2_8, NIX_2_24, NixInstall, remove_tree


@frozen
class Profile:
    """How long and how often each measurement runs."""

    name: str
    params: fixtures.FixtureParams
    repetitions: int
    wrk_seconds: float
    conns: int
    conns_seconds: float
    e2e_small: int
    fanout_peers: tuple[int, ...]
    misses: int
    miss_budget: float
    small_zstd_sample: int
    #: Store digests: cluster sizes, paths a node, misses and hits a repetition.
    digest_nodes: tuple[int, ...] = (4, 16)
    digest_paths: int = 500
    digest_misses: int = 1000
    digest_hits: int = 500
    #: Fetching for the LAN (:mod:`bench.upstream`): node counts, small
    #: paths, the big path's MiB, whether to run the direct reference and
    #: the run with the big path's fetcher killed (at the largest N).
    upstream_nodes: tuple[int, ...] = (1, 4, 8)
    upstream_paths: int = 300
    upstream_big_mb: int = 200
    upstream_reference: bool = True


FULL = Profile("full", fixtures.FULL, repetitions=3, wrk_seconds=5, conns=1000, conns_seconds=10,
               e2e_small=500, fanout_peers=(1, 3, 10), misses=300, miss_budget=60, small_zstd_sample=200)
QUICK = Profile("quick", fixtures.QUICK, repetitions=1, wrk_seconds=1, conns=1000, conns_seconds=3,
                e2e_small=100, fanout_peers=(1, 3), misses=40, miss_budget=8, small_zstd_sample=30,
               digest_nodes=(4,), digest_paths=50, digest_misses=200, digest_hits=60,
                upstream_nodes=(1, 2), upstream_paths=30, upstream_big_mb=8, upstream_reference=False)


class Results:
    """Samples per figure key, and the error of every measurement that failed."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.errors: dict[str, str] = {}

    def add(self, key: str, value: float) -> None:
        """Record one repetition's ``value`` of figure ``key``."""
        self.samples.setdefault(key, []).append(value)

    def add_all(self, prefix: str, values: dict[str, float]) -> None:
        """Record ``prefix.<name>`` for every ``name`` in ``values``."""
        for k, v in values.items():
            self.add(f"{prefix}.{k}", v)

    def attempt(self, what: str, fn: Callable[[], None]) -> bool:
        """
        Run ``fn``; on a failure record ``what``'s error, print it and carry on.

        :returns: whether ``fn`` succeeded.
        """
        try:
            fn()
            return True
        except (load.MeasureError, servers.Unavailable, fixtures.FixtureError, OSError,
                ValueError, KeyError, TimeoutError) as e:
            msg = f"{type(e).__name__}: {e}"
            self.errors.setdefault(what, msg)
            log(f"  {what}: not available: {msg[:600]}")
            return False


def log(msg: str) -> None:
    """Print a progress line with the elapsed time."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {msg}", flush=True)


_STARTED = time.monotonic()


def _narinfo_paths_file(workdir: str, fx: Fixture) -> str:
    path = os.path.join(workdir, "narinfo-paths.txt")
    with open(path, "w") as f:
        for p in fx.all_paths:
            f.write(f"/nix-cache/{hash_part(p)}.narinfo\n")
    return path


def bench_narinfo(res: Results, prof: Profile, paths_file: str, targets: dict[str, servers.Server]) -> None:
    """narinfo GET req/s and latency at concurrency 1, 16, 64 (wrk), per target."""
    for rep in range(prof.repetitions):
        for c in (1, 16, 64):
            for name, server in targets.items():
                log(f"narinfo c{c} {name} (repetition {rep + 1})")
                res.attempt(f"narinfo.{name}",
                            lambda: res.add_all(f"narinfo.c{c}.{name}",
                                                load.wrk_narinfo(server.port, paths_file, c, prof.wrk_seconds)))


def bench_nar(res: Results, prof: Profile, fx: Fixture, nginx: servers.Server | None,
              peernix: servers.Server | None, workdir: str) -> None:
    """NAR download throughput (raw and zstd, 1 and 4 streams), the references and zstd wire ratios."""
    nar_file = os.path.join(fx.file_cache, fx.nar_url_in_file_cache(fx.big))
    peer_url: list[str] = []
    if peernix is not None:
        res.attempt("nar.peernix", lambda: peer_url.append(load.nar_url(peernix.cache_url, fx.big)[0]))
        if peer_url:  # warm the page cache and the daemon
            res.attempt("nar.peernix", lambda: res.add("nar.peernix.warmup_mbps", load.nar_throughput(
                peer_url[0], fx.big_nar_size, 1, False)["mbps"]))
    for rep in range(prof.repetitions):
        log(f"NAR downloads (repetition {rep + 1})")
        res.attempt("nar.dump", lambda: res.add("nar.dump.mbps", load.dump_throughput(
            fx.store, fx.big, fx.big_nar_size, os.path.join(workdir, "dump-env"))))
        res.attempt("nar.nixstoredump", lambda: res.add("nar.nixstoredump.mbps", load.nix_store_dump_throughput(
            os.path.join(fx.store, fx.big.lstrip("/")), fx.big_nar_size, os.path.join(workdir, "dump-env"))))
        res.attempt("nar.zstdcli", lambda: res.add_all("nar.zstdcli", load.zstd_cli(nar_file)))
        if nginx is not None:
            url = nginx.cache_url + "/" + fx.nar_url_in_file_cache(fx.big)
            for streams in (1, 4):
                res.attempt("nar.nginx", lambda: res.add_all(
                    f"nar.nginx.raw{streams}", load.nar_throughput(url, fx.big_nar_size, streams, False)))
        if peer_url:
            for streams in (1, 4):
                for zstd in (False, True):
                    kind = f"{'zstd' if zstd else 'raw'}{streams}"
                    res.attempt(f"nar.peernix.{kind}", lambda: res.add_all(
                        f"nar.peernix.{kind}", load.nar_throughput(peer_url[0], fx.big_nar_size, streams, zstd)))
    if peernix is not None:
        sample = fx.small[:prof.small_zstd_sample]
        res.attempt("nar.peernix.small_zstd", lambda: res.add(
            "nar.peernix.small_zstd_ratio", load.small_paths_zstd_ratio(peernix.cache_url, sample)))


def bench_rss(res: Results, prof: Profile, fx: Fixture, peernix: servers.Server) -> None:
    """Peak RSS of peernix during 8 concurrent downloads of the big NAR."""
    def once() -> None:
        url, _ = load.nar_url(peernix.cache_url, fx.big)
        res.add_all("rss.peernix", load.peak_rss_during(peernix.process.pid, url, 8))
    for rep in range(prof.repetitions):
        log(f"peak RSS, 8 downloads (repetition {rep + 1})")
        res.attempt("rss.peernix", once)


#: The modern client's e2e rows: Nix 2.24 substituting 16 paths at once.
MODERN_JOBS = 16


def bench_e2e(res: Results, prof: Profile, fx: Fixture, sources: dict[str, servers.Server],
              serving: servers.Server | None, workdir: str) -> None:
    """
    ``nix-store -r`` into an empty tmpfs store from each source, with Nix 2.8
    and (small paths and the chain) Nix 2.24 with ``max-substitution-jobs =
    16``.  The chain through a proxy is also measured through a proxy started
    just before each repetition ("fresh proxy": its first requests count).
    """
    workloads = {"small": list(fx.small[:prof.e2e_small]), "chain": [fx.chain_top], "big": [fx.big]}
    modern = NIX_2_24.missing is None
    if not modern:
        res.errors["e2e.nix224"] = str(NIX_2_24.missing)
        log(f"  Nix 2.24 rows not measured: {NIX_2_24.missing}")

    def fresh_proxy(key: str, nix: NixInstall = NIX_2_8, jobs: int | None = None) -> None:
        assert serving is not None
        proxy = servers.spawn_peernix("fresh-proxy", fx.empty_store, workdir, peers=[servers.base_url(serving)],
                                      trusted_public_keys=[fx.public_key])
        try:
            servers.wait_peernix(proxy)
            res.add(key, load.nix_realise(proxy.cache_url, fx.public_key, [fx.chain_top], nix=nix,
                                             substitution_jobs=jobs))
        finally:
            proxy.stop()

    for rep in range(prof.repetitions):
        for wname, paths in workloads.items():
            for sname, server in sources.items():
                log(f"e2e {wname} from {sname} (repetition {rep + 1})")
                res.attempt(f"e2e.{sname}", lambda: res.add(
                    f"e2e.{wname}.{sname}", load.nix_realise(server.cache_url, fx.public_key, paths)))
            if modern and wname != "big":
                for sname, server in sources.items():
                    if sname == "proxy":
                        continue
                    log(f"e2e {wname} from {sname}, Nix 2.24 (repetition {rep + 1})")
                    res.attempt(f"e2e224.{sname}", lambda: res.add(
                        f"e2e224.{wname}.{sname}", load.nix_realise(
                            server.cache_url, fx.public_key, paths, nix=NIX_2_24,
                            substitution_jobs=MODERN_JOBS)))
            if wname == "chain" and serving is not None:
                log(f"e2e chain through a fresh proxy (repetition {rep + 1})")
                res.attempt("e2e.freshproxy", lambda: fresh_proxy("e2e.chain.freshproxy"))
                if modern:
                    log(f"e2e chain through a fresh proxy, Nix 2.24 (repetition {rep + 1})")
                    res.attempt("e2e224.freshproxy", lambda: fresh_proxy(
                        "e2e224.chain.freshproxy", NIX_2_24, MODERN_JOBS))


#: The shaped-link rows: (tc rate, figure key, which fixture path).
LAN_LINKS = (("1gbit", "lan1g", "big"), ("100mbit", "lan100m", "compressible"))


def bench_dnssd(res: Results, prof: Profile, workdir: str) -> None:
    """
    Peers across two subnets through DNS-SD (see :mod:`bench.dnssd`): once
    in ``--quick``, else ``prof.repetitions`` times.
    """
    for _ in range(prof.repetitions):
        def once() -> None:
            try:
                res.add_all("dnssd", dnssd.measure(workdir))
            except (dnssd.Unavailable, RuntimeError, OSError) as e:
                raise load.MeasureError(str(e)) from None
        res.attempt("dnssd", once)


def bench_upstream(res: Results, prof: Profile, workdir: str) -> None:
    """
    Fetching for the LAN (see :mod:`bench.upstream`): all N clients at once
    behind N nodes and a shaped upstream, once per N of
    ``prof.upstream_nodes`` (and, in the full profile, the same clients
    going to the upstream directly, and the run with the big path's
    fetcher killed at the largest N).  One run each: a run is minutes of
    wall time on a small machine.
    """
    problem = upstream.unavailable()
    if problem is not None:
        res.errors["upstream"] = problem
        log(f"  fetching for the LAN not measured: {problem}")
        return
    work = tempfile.mkdtemp(prefix="upstream-", dir=workdir)
    built: list[tuple[str, str, list[str], int]] = []

    def build() -> None:
        log(f"upstream cache: {prof.upstream_paths} small paths and one of {prof.upstream_big_mb} MiB, xz")
        built.append(upstream.build_cache(work, prof.upstream_paths, prof.upstream_big_mb))

    if not res.attempt("upstream", build):
        return
    cache, key, paths, unique = built[0]
    for n in prof.upstream_nodes:
        for direct in (True, False) if prof.upstream_reference else (False,):
            mode = "direct" if direct else "peernix"
            log(f"fetch for the LAN: N = {n}, {mode}")

            def once(n: int = n, direct: bool = direct, mode: str = mode) -> None:
                row = upstream.measure(n, cache, key, paths, upstream.DEFAULT_RATE, work, direct=direct)
                if row["exit_codes"] != [0] * n:
                    raise load.MeasureError(f"N = {n} {mode}: clients exited with {row['exit_codes']}")
                res.add(f"upstream.{mode}.{n}.seconds", row["seconds"])
                res.add(f"upstream.{mode}.{n}.over_unique", row["upstream_nar_bytes"] / unique)
                res.add(f"upstream.{mode}.{n}.busy_cpu", row["busy_cpu_seconds"])
                res.add(f"upstream.{mode}.{n}.client_floor", row["client_cpu_seconds"] / row["cores"])
                if "daemon_cpu_seconds" in row:
                    res.add(f"upstream.{mode}.{n}.daemon_cpu_per_node", row["daemon_cpu_seconds"] / n)
            res.attempt(f"upstream.{mode}.{n}", once)
    kill_n = max(prof.upstream_nodes)
    if prof.upstream_reference and kill_n > 1:
        log(f"fetch for the LAN: N = {kill_n}, the big path's fetcher killed")

        def killed() -> None:
            row = upstream.measure(kill_n, cache, key, paths, upstream.DEFAULT_RATE, work, direct=False,
                                   kill_big=prof.upstream_big_mb * 1024 * 1024)
            victim = row.get("killed_node")
            if victim is None:
                raise load.MeasureError("no node was seen fetching the big path from the upstream")
            survivors = [c for i, c in enumerate(row["exit_codes"]) if i != victim]
            res.add("upstream.kill.survivors_ok", 1.0 if survivors == [0] * len(survivors) else 0.0)
            res.add("upstream.kill.over_unique", row["upstream_nar_bytes"] / unique)
        res.attempt("upstream.kill", killed)
    remove_tree(work)


def bench_lan(res: Results, prof: Profile, fx: Fixture, workdir: str) -> None:
    """
    A peer across a shaped veth: ``nix-store -r`` (in the local namespace)
    of the big path at 1 Gbit/s and of the compressible path at 100 Mbit/s,
    through a local peernix (c) started fresh for each repetition, beside
    nginx serving the same file cache across the same link.
    """
    why = lan.link_unavailable()
    if why is not None:
        for _, key, _ in LAN_LINKS:
            res.errors[f"lan.{key}"] = f"skipped: {why}"
        log(f"shaped-link rows skipped: {why}")
        return
    for rate, key, which in LAN_LINKS:
        path = fx.big if which == "big" else fx.compressible

        def measure() -> None:
            link = lan.ShapedLink(rate)
            started: list[servers.Server] = []
            try:
                log(f"shaped link {rate}: starting the peer's peernix and nginx")
                peer = servers.spawn_peernix(f"{key}-peer", fx.store, workdir, secret_key_file=fx.secret_key_file,
                                             netns=link.peer, host=link.peer_ip)
                started.append(peer)
                servers.wait_peernix(peer, timeout=60)
                started.append(servers.start_nginx(fx, workdir, netns=link.peer, listen=link.peer_ip))
                nginx = started[-1]
                client = link.wrap(link.local)
                for rep in range(prof.repetitions):
                    log(f"shaped link {rate}: {which} path from nginx across the link (repetition {rep + 1})")
                    res.add(f"lan.{key}.nginx", load.nix_realise(nginx.cache_url, fx.public_key, [path], wrap=client))
                    local = servers.spawn_peernix(f"{key}-local", fx.empty_store, workdir,
                                                  peers=[servers.base_url(peer)],
                                                  trusted_public_keys=[fx.public_key], netns=link.local)
                    try:
                        servers.wait_peernix(local)
                        log(f"shaped link {rate}: {which} path through a local peernix (repetition {rep + 1})")
                        res.add(f"lan.{key}.peernix", load.nix_realise(local.cache_url, fx.public_key, [path],
                                                                       wrap=client))
                    finally:
                        local.stop()
            finally:
                for server in started:
                    server.stop()
                link.destroy()
        res.attempt(f"lan.{key}", measure)


def bench_conns(res: Results, prof: Profile, fx: Fixture, targets: dict[str, servers.Server]) -> None:
    """Many concurrent keep-alive connections asking narinfos (hits and misses)."""
    for rep in range(prof.repetitions):
        for name, server in targets.items():
            log(f"{prof.conns} connections for {prof.conns_seconds:g} s to {name} (repetition {rep + 1})")
            res.attempt(f"conns.{name}", lambda: res.add_all(
                f"conns.{name}", load.many_connections(server.port, fx.all_paths, prof.conns, prof.conns_seconds)))


def bench_fanout(res: Results, prof: Profile, fx: Fixture, nginx: servers.Server | None, workdir: str) -> None:
    """Miss latency through a client peernix with 1, 3, 10 empty peers, and with one peer frozen."""
    if nginx is not None:
        def ref() -> None:
            lat = load.miss_latencies(nginx.port, prof.misses, 30)
            res.add_all("fanout.nginx", load.summarize_ms(lat))
        for _ in range(prof.repetitions):
            res.attempt("fanout.nginx", ref)
    peers: list[servers.Server] = []
    most = max(prof.fanout_peers)

    def start_peers() -> None:
        log(f"starting {most} empty peers")
        for i in range(most):
            # Trusting bench-1 (which signed the canary) lets them share it
            # with peers under the default --share trusted.
            peers.append(servers.spawn_peernix(f"peer{i}", fx.canary_store, workdir,
                                               trusted_public_keys=[fx.public_key]))
        for p in peers:
            servers.wait_peernix(p, timeout=60)

    if not res.attempt("fanout", start_peers):
        return

    def client(n: int) -> servers.Server:
        c = servers.spawn_peernix(f"client{n}", fx.empty_store, workdir,
                                  peers=[servers.base_url(p) for p in peers[:n]],
                                  trusted_public_keys=[fx.public_key])
        servers.wait_peernix(c)
        # Only the peers have the canary: a 404 means the client does not fan out.
        status = servers.http_status(f"{c.cache_url}/{hash_part(fx.canary)}.narinfo", timeout=30)
        if status != 200:
            c.stop()
            raise load.MeasureError(f"a client peernix with {n} peer(s) answered {status} for a path "
                                    "its peers have: it does not ask its peers")
        load.miss_latencies(c.port, 5, 30)  # warm up connections to the peers
        return c

    try:
        for n in prof.fanout_peers:
            def measure() -> None:
                c = client(n)
                try:
                    for rep in range(prof.repetitions):
                        log(f"fan-out misses, {n} peers (repetition {rep + 1})")
                        res.add_all(f"fanout.{n}", load.summarize_ms(load.miss_latencies(c.port, prof.misses,
                                                                                  prof.miss_budget)))
                finally:
                    c.stop()
            res.attempt(f"fanout.{n}", measure)

        frozen_n = 3 if most >= 3 else most

        def frozen() -> None:
            c = client(frozen_n)
            try:
                log(f"fan-out misses, {frozen_n} peers, freezing one (SIGSTOP)")
                peers[0].freeze()
                frozen_at = time.monotonic()
                # Right after the freeze: as many misses as fit in 6 s.
                res.add_all("fanout.frozen_now", load.summarize_ms(load.miss_latencies(c.port, prof.misses, 6)))
                time.sleep(max(0.0, frozen_at + 10 - time.monotonic()))
                log("fan-out misses, 10 s after the freeze")
                res.add_all("fanout.frozen_10s", load.summarize_ms(load.miss_latencies(c.port, prof.misses,
                                                                                      prof.miss_budget)))
            finally:
                peers[0].thaw()
                c.stop()
        res.attempt("fanout.frozen", frozen)
    finally:
        for p in peers:
            p.stop()


def bench_digests(res: Results, prof: Profile, workdir: str) -> None:
    """
    Store digests at each size of ``prof.digest_nodes``: requests per miss and
    per hit, miss latency, digest size and memory (see :mod:`bench.digests`).
    The largest size measured is also recorded as ``digests.max``, the row
    the targets apply to (N = 16; 4 in quick mode).
    """
    for n in prof.digest_nodes:
        def once() -> None:
            try:
                figures = digests.measure(n, prof.digest_paths, prof.digest_misses, prof.digest_hits,
                                          prof.repetitions, workdir, log)
            except (digests.Unavailable, RuntimeError, AssertionError) as e:
                raise load.MeasureError(str(e)) from None
            for values in figures:
                res.add_all(f"digests.{n}", values)
                if n == max(prof.digest_nodes):
                    res.add_all("digests.max", values)
        res.attempt(f"digests.{n}", once)


def start_peernix_pair(res: Results, fx: Fixture, workdir: str) -> tuple[servers.Server | None, servers.Server | None]:
    """
    Start peernix serving the fixture store, and a proxying peernix with an
    empty store that has the first as its only peer.

    :returns: ``(serving, proxy)``; either is ``None`` when it did not start.
    """
    serving: list[servers.Server] = []
    proxy: list[servers.Server] = []

    def start_serving() -> None:
        serving.append(servers.wait_peernix(servers.spawn_peernix(
            "serve", fx.store, workdir, secret_key_file=fx.secret_key_file)))

    def start_proxy() -> None:
        proxy.append(servers.wait_peernix(servers.spawn_peernix(
            "proxy", fx.empty_store, workdir, peers=[servers.base_url(serving[0])],
            trusted_public_keys=[fx.public_key])))

    def check_proxy() -> None:
        status = servers.http_status(f"{proxy[0].cache_url}/{hash_part(fx.chain_top)}.narinfo", timeout=30)
        if status != 200:
            proxy.pop().stop()
            raise load.MeasureError(f"the proxying peernix answered {status} for a path its peer has: "
                                    "it does not ask its peer")

    log("starting peernix (serving the fixture store)")
    if res.attempt("peernix", start_serving):
        log("starting peernix (empty store, proxying from the first)")
        if res.attempt("peernix.proxy", start_proxy):
            res.attempt("peernix.proxy", check_proxy)
    return (serving[0] if serving else None, proxy[0] if proxy else None)


def run(prof: Profile, out_dir: str) -> int:
    """Run the whole suite with ``prof``. :returns: the exit status."""
    missing = fixtures.check_tools() + servers.check_tools()
    if missing:
        print("The benchmark needs tools that are missing:\n  " + "\n  ".join(missing)
              + "\nInstall them with: apt-get install -y nix-bin busybox-static nginx-light wrk curl zstd",
              file=sys.stderr)
        return 2
    res = Results()
    log(f"profile {prof.name}; fixture {prof.params.key}")
    fx = fixtures.build(prof.params)
    workdir = tempfile.mkdtemp(prefix="peernix-bench-")
    log(f"logs in {workdir}")
    try:
        refs: dict[str, servers.Server] = {}
        log("starting nginx and the minimal twisted.web server")
        res.attempt("nginx", lambda: refs.__setitem__("nginx", servers.start_nginx(fx, workdir)))
        res.attempt("minimal", lambda: refs.__setitem__("minimal", servers.start_minimal_web(workdir)))
        serving, proxy = start_peernix_pair(res, fx, workdir)
        nginx = refs.get("nginx")

        paths_file = _narinfo_paths_file(workdir, fx)
        bench_narinfo(res, prof, paths_file, {**refs, **({"peernix": serving} if serving else {})})
        bench_nar(res, prof, fx, nginx, serving, workdir)
        if serving is not None:
            bench_rss(res, prof, fx, serving)
        sources = {k: v for k, v in (("nginx", nginx), ("peernix", serving), ("proxy", proxy)) if v is not None}
        bench_e2e(res, prof, fx, sources, serving, workdir)
        bench_conns(res, prof, fx, {k: v for k, v in (("nginx", nginx), ("peernix", serving)) if v is not None})
        if proxy is not None:
            proxy.stop()
        if serving is not None:
            serving.stop()
        bench_fanout(res, prof, fx, nginx, workdir)
        bench_digests(res, prof, workdir)
        bench_dnssd(res, prof, workdir)
        bench_lan(res, prof, fx, workdir)
        bench_upstream(res, prof, workdir)
    finally:
        servers.stop_all()

    rows = report.evaluate(res.samples)
    print()
    print(report.table(rows))
    machine = report.machine()
    print(f"\nmachine: {machine['host']}, {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['memory_gb']} GB, Linux {machine['kernel']}, {machine['nix']}, Python {machine['python']}")
    if res.errors:
        print("\nnot measured:")
        for what, err in res.errors.items():
            print(f"  {what}: {err[:300]}")
    failed = [r for r in rows if r["verdict"] in ("FAIL", "n/a")]
    payload: dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "profile": asdict(prof), "machine": machine,
        "fixture": {"root": fx.root, "paths": len(fx.all_paths), "big_nar_size": fx.big_nar_size,
                    "build_seconds": fx.build_seconds},
        "rows": rows, "samples": res.samples, "errors": res.errors, "logs": workdir,
        "elapsed_seconds": time.monotonic() - _STARTED,
    }
    path = report.write_json(out_dir, payload)
    print(f"\nresults: {path}\nserver logs: {workdir}\nelapsed: {time.monotonic() - _STARTED:.0f} s; "
          f"{len(failed)} targeted figure(s) failed or not measured")
    return 1 if failed else 0


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # One clean-up path (see main) for every way of being stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the suite. :returns: the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1]
                                     if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="small fixture, short runs, 1 repetition (under 2 minutes): checks the suite runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="directory for <date>-<host>.json (default: bench/results)")
    parser.add_argument("--repetitions", type=int, default=None, help="override the number of repetitions")
    args = parser.parse_args(argv)
    prof = QUICK if args.quick else FULL
    if args.repetitions is not None:
        prof = Profile(**{**asdict(prof, recurse=False), "repetitions": max(1, args.repetitions)})
    # Ctrl-C, SIGTERM and a closed terminal all stop every server we started
    # (SIGINT explicitly: a shell starting us in the background ignores it).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return run(prof, args.out)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        return 130
    except fixtures.FixtureError as e:
        print(f"building the fixture failed: {e}", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        servers.stop_all()


if __name__ == "__main__":
    sys.exit(main())
