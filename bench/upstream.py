"""
``python -m bench.upstream``: fetching for the LAN, measured in network namespaces.

An upstream host (nginx serving a ``nix copy --to file://...?compression=xz``
cache signed by a bench key, its uplink shaped with ``tc ... tbf`` as an
internet connection) and N peernix nodes on one bridge, each with a Nix
client using only its local peernix.  For each N, all N clients start
``nix-store -r`` of the same closure at the same moment; then the same with
every client going to the upstream directly (the reference).  Reported per
N: upstream bytes / unique closure bytes (target 1.00 with peernix), wall
time for all N to finish / wall time for one (target <= 1.3), and the
reference's figures.  Beside them, the CPU-seconds spent while the clients
ran: the machine's busy time, the Nix clients' and the daemons'.  The Nix
clients' CPU-seconds over the machine's cores is a floor no LAN cache can
beat on this machine: N clients that each unpack and hash the whole
closure need that much wall time even if everything else were free.
Needs root, ``ip``, ``tc``, nginx, Nix 2.8 (and Nix
2.24 at /opt/nix-modern for every second client, when installed).

Every address is inside namespaces the run creates and removes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from peernix.test.daemon import Daemon, http_get
from peernix.test.netns import Host, TestNetwork, netns_unavailable
from peernix.test.nixenv import ChrootStore, generate_key, remove_tree, run_nix
from peernix.test.test_e2e_upstream import MODERN_NIX_STORE, PORT, Nginx, _Client

KEY_NAME = "bench-upstream-1"

#: The upstream's uplink, as ``tc tbf`` reads it.
DEFAULT_RATE = "200mbit"


def unavailable() -> str | None:
    """:returns: why the measurement cannot run here (root, ``ip``, nginx or ``tc`` missing), or ``None``."""
    problem = netns_unavailable()
    if problem is not None:
        return problem
    if shutil.which("nginx") is None or shutil.which("tc") is None:
        return "nginx and tc are needed"
    return None


def build_cache(work: str, paths: int, big_mb: int) -> tuple[str, str, list[str], int]:
    """
    :returns: ``(cache dir, public key, store paths, unique NAR file bytes)``:
        ``paths`` small text paths and one ``big_mb`` MiB incompressible
        path, signed, copied xz-compressed into a file cache.
    """
    sk, _, pk = generate_key(os.path.join(work, "keys"), KEY_NAME)
    store = ChrootStore(os.path.join(work, "origin"))
    files = os.path.join(work, "files")
    os.makedirs(files)
    rng = random.Random(7)
    names = []
    for i in range(paths):
        name = os.path.join(files, f"bench-small-{i}")
        with open(name, "wb") as f:
            f.write(rng.randbytes(rng.randrange(200, 20_000)))
        names.append(name)
    added: list[str] = []
    for start in range(0, len(names), 200):
        done = run_nix(["nix-store", "--store", store.root, "--add", *names[start:start + 200]], store.env)
        added += done.stdout.decode().split()
    added.append(store.make_big_path(big_mb * 1024 * 1024, name="bench-big", seed=3))
    store.sign(added, sk)
    cache = os.path.join(work, "cache")
    run_nix(["nix", "--extra-experimental-features", "nix-command", "copy", "--store", store.root,
             "--to", f"file://{cache}?compression=xz", *added], store.env)
    unique = sum(os.path.getsize(os.path.join(cache, "nar", n)) for n in os.listdir(os.path.join(cache, "nar")))
    return cache, pk, added, unique


def upstream_bytes(access_log: str) -> int:
    """:returns: the body bytes nginx sent for NAR files, from its access log (combined format)."""
    total = 0
    with open(access_log) as f:
        for line in f:
            parts = line.split('"')
            if len(parts) > 2 and "/nar/" in parts[1]:
                fields = parts[2].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    total += int(fields[1])
    return total


def run_clients(jobs: Sequence[tuple[_Client, Host]], paths: Sequence[str], substituters: Sequence[str],
                key: str, during: Callable[[], object] | None = None) -> tuple[float, list[int]]:
    """
    Start every client at the same moment; ``during()``, when given, runs
    meanwhile on this thread.  :returns: (seconds until the last finished,
    exit codes).
    """
    codes = [0] * len(jobs)
    barrier = threading.Barrier(len(jobs) + 1)

    def run(i: int, client: _Client, host: Host) -> None:
        barrier.wait()
        extra = [] if client.modern else ["--option", "max-jobs", "8"]
        codes[i] = client.substitute(host, paths, substituters[i], key, extra).returncode

    threads = [threading.Thread(target=run, args=(i, c, h)) for i, (c, h) in enumerate(jobs)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.monotonic()
    if during is not None:
        during()
    for t in threads:
        t.join()
    return time.monotonic() - started, codes


def busy_cpu_seconds() -> float:
    """
    :returns: CPU-seconds the whole machine has spent busy since boot: user,
        nice, system, irq and softirq time (not idle, I/O wait, or time a
        hypervisor took for other guests: ``steal``).
    """
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """:returns: user + system CPU-seconds of the live processes among ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children_cpu_seconds() -> float:
    """:returns: user + system CPU-seconds of this process's children reaped so far (the Nix clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_big_fetcher(daemons: Sequence[Daemon], hosts: Sequence[Host], upstream_url: str, big_size: int,
                     timeout: float = 300) -> int | None:
    """
    Wait until a node downloads the big NAR from the upstream (an active
    fetch of it with an eighth received), then SIGKILL that node.

    :returns: its index, or ``None`` when none was seen in ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, host in enumerate(hosts):
            if daemons[i].process.poll() is not None:
                continue
            try:
                code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=host)
            except OSError:
                continue
            if code != 200:
                continue
            for fetch in (json.loads(body).get("upstream") or {}).get("active_fetches", []):
                if (fetch["source"].startswith(upstream_url) and fetch["nar_size"] >= big_size
                        and fetch["received"] > big_size // 8):
                    daemons[i].process.kill()
                    return i
        time.sleep(0.05)
    return None


def measure(n: int, cache: str, key: str, paths: list[str], rate: str, work: str, *, direct: bool,
            kill_big: int | None = None) -> dict[str, Any]:
    """
    One run with ``n`` nodes (peernix) or ``n`` plain clients (``direct``).
    ``kill_big``: the big path's NAR size; its fetcher is killed mid-download
    (its own client's result is reported, not counted).

    :returns: the row: ``seconds`` (until the last client finished),
        ``exit_codes``, ``upstream_nar_bytes``, ``cores``, and the CPU-seconds
        spent meanwhile: ``busy_cpu_seconds`` (the machine),
        ``client_cpu_seconds`` (the Nix clients; in the kill run also the
        status probes) and, for a peernix run without a kill,
        ``daemon_cpu_seconds`` (all nodes together).
    """
    mode = "direct" if direct else ("peernix-kill" if kill_big else "peernix")
    run_dir = tempfile.mkdtemp(prefix=f"n{n}-{mode}-", dir=work)
    network = TestNetwork(n + 1)
    daemons: list[Daemon] = []
    nginx = None
    try:
        u, *hosts = network.hosts
        subprocess.run(u.command(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate,
                                  "burst", "512kb", "latency", "50ms"]), check=True)
        nginx = Nginx(u, cache, run_dir)
        if not direct:
            for i, host in enumerate(hosts):
                store = ChrootStore(os.path.join(run_dir, f"store-{i}"))
                daemon = Daemon(["--store-root", store.root, "--no-mdns", "--udp-port", str(PORT),
                                 "--announce-interval", "2", "--trusted-public-key", key,
                                 "--upstream", nginx.url, "--staging-dir", os.path.join(run_dir, f"staging-{i}")],
                                os.path.join(run_dir, f"node-{i}.log"), port=PORT, host=host)
                daemons.append(daemon)
            for daemon in daemons:
                daemon.wait_ready()
            deadline = time.monotonic() + 60
            while n > 1:
                counts = []
                for host in hosts:
                    code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=host)
                    counts.append(len(json.loads(body)["upstream"]["fetching_peers"]) if code == 200 else 0)
                if all(c == n - 1 for c in counts):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("nodes did not find each other")
                time.sleep(0.2)
        modern = os.access(MODERN_NIX_STORE, os.X_OK)
        clients = [_Client(os.path.join(run_dir, f"client-{i}"), modern=modern and i % 2 == 1) for i in range(n)]
        subs = [nginx.url if direct else f"http://127.0.0.1:{PORT}/nix-cache" for _ in hosts]
        killed: list[int | None] = []
        upstream_url = nginx.url

        def kill() -> None:
            assert kill_big is not None
            killed.append(kill_big_fetcher(daemons, hosts, upstream_url, kill_big))

        pids = [d.process.pid for d in daemons]
        cpu_before = (busy_cpu_seconds(), children_cpu_seconds(), process_cpu_seconds(pids))
        seconds, codes = run_clients(list(zip(clients, hosts)), paths, subs, key,
                                     during=kill if kill_big and not direct else None)
        cpu_after = (busy_cpu_seconds(), children_cpu_seconds(), process_cpu_seconds(pids))
        row: dict[str, Any] = {"nodes": n, "mode": mode, "seconds": round(seconds, 2),
                               "exit_codes": codes, "upstream_nar_bytes": upstream_bytes(nginx.access_log),
                               "cores": os.cpu_count() or 1,
                               "busy_cpu_seconds": round(cpu_after[0] - cpu_before[0], 2),
                               "client_cpu_seconds": round(cpu_after[1] - cpu_before[1], 2)}
        if not kill_big and not direct:
            row["daemon_cpu_seconds"] = round(cpu_after[2] - cpu_before[2], 2)
        if killed:
            row["killed_node"] = killed[0]
        return row
    finally:
        for daemon in daemons:
            daemon.stop()
        if nginx is not None:
            nginx.stop()
        network.destroy()


def _uptime() -> str:
    """:returns: the load averages now (the machine is shared: noted beside each row)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,4,8", help="comma-separated node counts (default 1,4,8)")
    parser.add_argument("--paths", type=int, default=300, help="small paths in the closure (default 300)")
    parser.add_argument("--big-mb", type=int, default=200, help="size of the big path, MiB (default 200)")
    parser.add_argument("--rate", default=DEFAULT_RATE, help="the upstream's uplink (tc tbf rate, default 200mbit)")
    parser.add_argument("--kill-nodes", type=int, default=None,
                        help="nodes of the run whose big-path fetcher is killed mid-download "
                             "(default: the largest of --nodes; 0: no such run)")
    parser.add_argument("--only-kill", action="store_true", help="only the run with the fetcher killed")
    parser.add_argument("--no-direct", action="store_true", help="skip the clients-to-upstream reference runs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    problem = unavailable()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="peernix-bench-upstream-")
    try:
        cache, key, paths, unique = build_cache(work, args.paths, args.big_mb)
        rows = []
        counts = [int(x) for x in args.nodes.split(",")]
        for n in [] if args.only_kill else counts:
            for direct in (False,) if args.no_direct else (True, False):
                row = measure(n, cache, key, paths, args.rate, work, direct=direct)
                row["upstream_over_unique"] = round(row["upstream_nar_bytes"] / unique, 2)
                row["uptime"] = _uptime()
                rows.append(row)
                print(json.dumps(row), flush=True)
        kill_nodes = max(counts) if args.kill_nodes is None else args.kill_nodes
        if kill_nodes > 1:
            big_size = args.big_mb * 1024 * 1024
            row = measure(kill_nodes, cache, key, paths, args.rate, work, direct=False, kill_big=big_size)
            row["upstream_over_unique"] = round(row["upstream_nar_bytes"] / unique, 2)
            row["uptime"] = _uptime()
            rows.append(row)
            print(json.dumps(row), flush=True)
        one = {r["mode"]: r["seconds"] for r in rows if r["nodes"] == 1}
        for row in rows:
            if row["mode"] in one and one[row["mode"]]:
                row["seconds_over_one"] = round(row["seconds"] / one[row["mode"]], 2)
        print(f"\n{'N':>3} {'mode':12} {'s':>8} {'s/one':>6} {'upstream/unique':>16} {'busy':>6} {'nix':>6} "
              f"{'nodes':>6} {'floor':>6}  {'load':16} exit codes")
        for r in rows:
            floor = round(r["client_cpu_seconds"] / r["cores"], 2)
            print(f"{r['nodes']:>3} {r['mode']:12} {r['seconds']:>8} {r.get('seconds_over_one', ''):>6} "
                  f"{r['upstream_over_unique']:>16} {r['busy_cpu_seconds']:>6} {r['client_cpu_seconds']:>6} "
                  f"{r.get('daemon_cpu_seconds', ''):>6} {floor:>6}  {r['uptime']:16} {r['exit_codes']}"
                  + (f" (node {r['killed_node']} killed)" if "killed_node" in r else ""))
        os.makedirs(args.out, exist_ok=True)
        name = time.strftime("upstream-%Y-%m-%d") + f"-{platform.node() or 'host'}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"params": vars(args), "unique_nar_bytes": unique, "paths": len(paths), "rows": rows}, f,
                      indent=2)
        ok = all(r["exit_codes"] == [0] * r["nodes"] for r in rows if r["mode"] != "peernix-kill")
        ok = ok and all(r["upstream_over_unique"] <= 1.0 for r in rows if r["mode"] == "peernix")
        for r in rows:
            if r["mode"] == "peernix-kill":
                survivors = [c for i, c in enumerate(r["exit_codes"]) if i != r.get("killed_node")]
                ok = ok and r.get("killed_node") is not None and survivors == [0] * len(survivors)
                ok = ok and r["upstream_over_unique"] <= 2.0
        return 0 if ok else 1
    finally:
        remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
