"""
Load generators and probes.  Each function measures one figure once against
one server and returns plain numbers; :mod:`bench.__main__` repeats them
and compares.  All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from bench.fixtures import hash_part, remove_tree
from peernix.test.nixenv import NIX_2_8, NixInstall, isolated_env

_HERE = os.path.dirname(os.path.abspath(__file__))
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
#: 1 MB = 10**6 bytes in every throughput figure.
MB = 1_000_000
#: The header peernix puts on its requests to peers; a request carrying it
#: is answered as a peer's (transport compression included).
PEER_HEADER = "X-Peernix-Peer"


class MeasureError(Exception):
    """A measurement could not be made (a tool failed, a server answered wrongly)."""


def random_hash() -> str:
    """:returns: a random 32-character nix32 hash part (almost surely in no store)."""
    return "".join(random.choice(_NIX32) for _ in range(32))


def percentile(values: Sequence[float], q: float) -> float:
    """:returns: the ``q``-th percentile (0-100, nearest rank) of ``values``."""
    if not values:
        raise MeasureError("no samples")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


# -- narinfo throughput (wrk) -------------------------------------------------

def wrk_narinfo(port: int, paths_file: str, connections: int, seconds: float) -> dict[str, float]:
    """
    Run wrk with ``bench/narinfo.lua`` over the request paths in ``paths_file``.

    :returns: ``rps``, ``p50_ms``, ``p99_ms``, ``errors`` (socket errors,
        timeouts and HTTP statuses >= 400).
    :raises MeasureError: when wrk fails or prints no result.
    """
    threads = 1 if connections < 2 else 2
    env = dict(os.environ, BENCH_PATHS=paths_file)
    done = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(seconds))}s",
         "--timeout", "10s", "-s", os.path.join(_HERE, "narinfo.lua"), f"http://127.0.0.1:{port}"],
        capture_output=True, env=env, timeout=seconds + 60)
    out = done.stdout.decode(errors="replace")
    match = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if done.returncode != 0 or match is None:
        raise MeasureError(f"wrk failed ({done.returncode}): {out[-500:]} {done.stderr.decode(errors='replace')[-500:]}")
    r = json.loads(match.group(1))
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": float(errors),
    }


# -- NAR downloads (curl) -------------------------------------------------------

def nar_url(cache_url: str, store_path: str, timeout: float = 10) -> tuple[str, int]:
    """
    Look ``store_path`` up in the cache at ``cache_url``.

    :returns: the absolute NAR URL and the NarSize.
    :raises MeasureError: when the narinfo is missing or lacks URL/NarSize.
    """
    status, body, _ = http_get(cache_url + "/" + hash_part(store_path) + ".narinfo", timeout=timeout)
    if status != 200:
        raise MeasureError(f"{cache_url}: narinfo of {store_path} answered {status}")
    fields = dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)
    if "URL" not in fields or "NarSize" not in fields:
        raise MeasureError(f"{cache_url}: narinfo of {store_path} lacks URL or NarSize")
    return cache_url + "/" + fields["URL"], int(fields["NarSize"])


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    """
    GET ``url`` (127.0.0.1 only) without decoding any Content-Encoding.

    :returns: ``(status, body, lower-cased headers)``.
    """
    m = re.match(r"http://([^/:]+):(\d+)(/.*)$", url)
    if m is None:
        raise MeasureError(f"bad URL {url}")
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.request("GET", m.group(3), headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def curl_downloads(url: str, streams: int, zstd: bool) -> tuple[int, float]:
    """
    Download ``url`` with ``streams`` concurrent curl processes, writing to
    /dev/null without decoding (so byte counts are wire bytes).

    :returns: ``(total wire bytes, wall seconds)``.
    :raises MeasureError: when a download fails or is not 200.
    """
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", "600", "-w", "%{http_code} %{size_download}"]
    if zstd:
        # Transport compression is for peers only (local clients always get
        # the identity NAR): ask as a peer does.
        argv += ["-H", "Accept-Encoding: zstd", "-H", f"{PEER_HEADER}: 1"]
    start = time.monotonic()
    procs = [subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(streams)]
    outs = [p.communicate(timeout=700) for p in procs]
    wall = time.monotonic() - start
    total = 0
    for p, (out, err) in zip(procs, outs):
        fields = out.decode().split()
        if p.returncode != 0 or len(fields) != 2 or fields[0] != "200":
            raise MeasureError(f"curl {url}: exit {p.returncode}, {out.decode()} {err.decode()[-300:]}")
        total += int(fields[1])
    return total, wall


def nar_throughput(url: str, nar_size: int, streams: int, zstd: bool) -> dict[str, float]:
    """
    :returns: ``mbps`` (NAR bytes delivered per second, in MB/s, whatever the
        encoding), ``wire_mbps`` and ``wire_ratio`` (wire bytes / NAR bytes).
    """
    wire, wall = curl_downloads(url, streams, zstd)
    return {
        "mbps": nar_size * streams / wall / MB,
        "wire_mbps": wire / wall / MB,
        "wire_ratio": wire / (nar_size * streams),
    }


def dump_throughput(store_root: str, store_path: str, nar_size: int, env_dir: str) -> float:
    """
    :returns: the MB/s of ``nix store dump-path`` (what ``nix-store --dump``
        does, for a chroot store) into /dev/null.
    """
    env = isolated_env(env_dir)
    start = time.monotonic()
    with open(os.devnull, "wb") as null:
        done = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "store", "dump-path",
                               "--store", store_root, store_path], stdout=null, stderr=subprocess.PIPE, env=env)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise MeasureError(f"nix store dump-path failed: {done.stderr.decode(errors='replace')[-500:]}")
    return nar_size / wall / MB


def nix_store_dump_throughput(real_path: str, nar_size: int, env_dir: str) -> float:
    """
    :param real_path: the path's directory or file on disk (in the chroot
        store, ``<root>/nix/store/<name>``).
    :returns: the MB/s of ``nix-store --dump REAL_PATH`` into /dev/null.
    :raises MeasureError: when it fails.
    """
    env = isolated_env(env_dir)
    start = time.monotonic()
    with open(os.devnull, "wb") as null:
        done = subprocess.run(["nix-store", "--dump", real_path], stdout=null, stderr=subprocess.PIPE, env=env)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise MeasureError(f"nix-store --dump {real_path}: {done.stderr.decode(errors='replace')[-500:]}")
    return nar_size / wall / MB


def zstd_cli(nar_file: str) -> dict[str, float]:
    """
    :returns: ``mbps`` (input MB/s) and ``ratio`` of ``zstd -1`` in one thread on ``nar_file``.
    :raises MeasureError: when the zstd command is missing or fails.
    """
    if shutil.which("zstd") is None:
        raise MeasureError("zstd not found (Debian: apt-get install zstd)")
    size = os.path.getsize(nar_file)
    start = time.monotonic()
    done = subprocess.run(["zstd", "-1", "-T1", "-c", nar_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise MeasureError(f"zstd failed: {done.stderr.decode(errors='replace')}")
    return {"mbps": size / wall / MB, "ratio": len(done.stdout) / size}


def small_paths_zstd_ratio(cache_url: str, paths: Sequence[str]) -> float:
    """
    Fetch each path's NAR with ``Accept-Encoding: zstd`` as a peer does
    (``X-Peernix-Peer: 1``: local clients never get transport compression),
    raw bytes kept.

    :returns: total wire bytes / total NAR bytes.
    """
    wire = nar = 0
    for p in paths:
        url, size = nar_url(cache_url, p)
        status, body, _ = http_get(url, {"Accept-Encoding": "zstd", PEER_HEADER: "1"})
        if status != 200:
            raise MeasureError(f"{url} answered {status}")
        wire += len(body)
        nar += size
    return wire / nar


# -- memory --------------------------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MeasureError(f"no {field} for pid {pid}")


def _descendants(pid: int) -> list[int]:
    """:returns: ``pid``'s child processes, recursively (from ``/proc/*/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_rss_kb(pid: int) -> int:
    """:returns: the summed VmRSS of ``pid`` and its descendants, in KiB (gone processes count 0)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            total += _status_kb(p, "VmRSS")
        except (OSError, MeasureError):
            continue
    return total


def peak_rss_during(pid: int, url: str, streams: int) -> dict[str, float]:
    """
    Reset ``pid``'s peak RSS (``/proc/PID/clear_refs`` = 5), run ``streams``
    concurrent downloads of ``url`` and sample the RSS of ``pid`` and its
    child processes every 20 ms.

    :returns: ``peak_mb``: the peak RSS in MB, the larger of the main
        process's VmHWM and the largest sampled sum over the process tree;
        ``before_mb``: the tree's RSS just before the downloads.
    """
    before = tree_rss_kb(pid)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # older kernels: VmHWM then includes earlier peaks (an upper bound)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kb(pid))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        curl_downloads(url, streams, zstd=False)
    finally:
        stop.set()
        t.join()
    return {"peak_mb": max(peak[0], _status_kb(pid, "VmHWM")) * 1024 / MB, "before_mb": before * 1024 / MB}


# -- end to end with a real Nix client -------------------------------------------

def nix_realise(cache_url: str, public_key: str, paths: Sequence[str], *, nix: NixInstall = NIX_2_8,
                substitution_jobs: int | None = None, wrap: Sequence[str] = ()) -> float:
    """
    ``nix-store -r`` ``paths`` into a new empty chroot store on tmpfs
    (``/dev/shm``), substituting only from ``cache_url`` and trusting only
    ``public_key``, with a fresh Nix configuration and narinfo disk cache.

    :param nix: the Nix client generation (Debian's 2.8 or 2.24).
    :param substitution_jobs: ``max-substitution-jobs`` (Nix 2.16 and later;
        ``None``: the client's default).
    :param wrap: a command prefix, e.g. ``ip netns exec NS`` to run the
        client in a network namespace.
    :returns: the wall-clock seconds of the ``nix-store -r`` call.
    :raises MeasureError: when Nix fails.
    """
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    base = tempfile.mkdtemp(prefix="peernix-bench-client-", dir=shm)
    try:
        env = isolated_env(os.path.join(base, "env"))
        store = os.path.join(base, "store")
        subprocess.run([nix.tool("nix-store"), "--store", store, "--init"], env=env, check=True,
                       capture_output=True)
        argv = [*wrap, nix.tool("nix-store"), "--store", store, "-r", *paths,
                "--option", "substituters", cache_url,
                "--option", "trusted-public-keys", public_key,
                "--option", "require-sigs", "true"]
        if substitution_jobs is not None:
            argv += ["--option", "max-substitution-jobs", str(substitution_jobs)]
        start = time.monotonic()
        done = subprocess.run(argv, env=env, capture_output=True, timeout=900)
        wall = time.monotonic() - start
        if done.returncode != 0:
            raise MeasureError(f"{nix.name} nix-store -r from {cache_url} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-800:]}")
        return wall
    finally:
        remove_tree(base)


# -- many concurrent connections ----------------------------------------------------

def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted``. :returns: the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = max(soft, min(wanted, hard)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    close = headers.get("connection", "").lower() == "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read(1 << 20)
        close = True
    return status, body, close


async def _connections(port: int, hits: Sequence[str], connections: int, seconds: float,
                       miss_fraction: float) -> dict[str, float]:
    latencies: list[float] = []
    counts = {"requests": 0, "wrong": 0, "errors": 0, "dropped": 0, "connect_failures": 0,
              "connections": 0, "open": 0, "max_open": 0}
    deadline = time.monotonic() + seconds

    async def one(n: int) -> None:
        rng = random.Random(n)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while time.monotonic() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 15)
                except (OSError, asyncio.TimeoutError):
                    counts["connect_failures"] += 1
                    await asyncio.sleep(0.1)
                    continue
                counts["connections"] += 1
                counts["open"] += 1
                counts["max_open"] = max(counts["max_open"], counts["open"])
            assert reader is not None and writer is not None
            miss = rng.random() < miss_fraction
            h = random_hash() if miss else hash_part(rng.choice(hits))
            start = time.monotonic()
            try:
                writer.write(f"GET /nix-cache/{h}.narinfo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                status, body, close = await asyncio.wait_for(_read_response(reader), 10)
            except asyncio.TimeoutError:
                counts["errors"] += 1
                counts["open"] -= 1
                writer.close()
                writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                counts["dropped"] += 1
                counts["open"] -= 1
                writer.close()
                writer = None
                continue
            latencies.append(time.monotonic() - start)
            counts["requests"] += 1
            if status >= 500:
                counts["errors"] += 1
            elif miss and status != 404:
                counts["wrong"] += 1
            elif not miss and (status != 200 or f"StorePath: /nix/store/{h}".encode() not in body):
                counts["wrong"] += 1
            if close:
                counts["open"] -= 1
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one(n) for n in range(connections)))
    del counts["open"]
    result: dict[str, float] = {k: float(v) for k, v in counts.items()}
    result["rps"] = counts["requests"] / seconds
    result["p50_ms"] = percentile(latencies, 50) * 1000 if latencies else float("nan")
    result["p99_ms"] = percentile(latencies, 99) * 1000 if latencies else float("nan")
    result["bad"] = float(counts["wrong"] + counts["errors"] + counts["dropped"] + counts["connect_failures"])
    return result


def many_connections(port: int, hits: Sequence[str], connections: int, seconds: float,
                     miss_fraction: float = 0.3) -> dict[str, float]:
    """
    Hold ``connections`` keep-alive connections to 127.0.0.1:``port`` for
    ``seconds``, each asking narinfos one after the other (hits from
    ``hits``, a ``miss_fraction`` of random misses).  A hit must be 200 with
    the right ``StorePath``, a miss 404.

    :returns: ``requests``, ``rps``, ``wrong``, ``errors`` (5xx and 10 s
        timeouts), ``dropped`` (connections closed or reset under a request),
        ``connect_failures``, ``bad`` (their sum), ``connections`` (made in
        all), ``max_open`` (most open at once), ``p50_ms``, ``p99_ms``.
    """
    raise_fd_limit(connections * 2 + 256)
    return asyncio.run(_connections(port, hits, connections, seconds, miss_fraction))


# -- miss latency (fan-out) ----------------------------------------------------------

def miss_latencies(port: int, count: int, budget_seconds: float, timeout: float = 30) -> list[float]:
    """
    Ask ``count`` random, absent narinfos one after the other over one
    keep-alive connection, stopping early after ``budget_seconds``.

    :param timeout: the limit per request (at most ``budget_seconds + 5``).
    :returns: the latencies in ms of the requests made.
    :raises MeasureError: when an answer is not 404.
    :raises OSError: when a request times out or the connection fails.
    """
    # A hung fan-out must not hold the run far beyond its budget.
    timeout = min(timeout, budget_seconds + 5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    out: list[float] = []
    end = time.monotonic() + budget_seconds
    try:
        for _ in range(count):
            if time.monotonic() > end:
                break
            start = time.monotonic()
            conn.request("GET", f"/nix-cache/{random_hash()}.narinfo")
            r = conn.getresponse()
            r.read()
            out.append((time.monotonic() - start) * 1000)
            if r.status != 404:
                raise MeasureError(f"a miss answered {r.status}, not 404")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    finally:
        conn.close()
    return out


def summarize_ms(latencies: Sequence[float]) -> dict[str, float]:
    """:returns: ``p50_ms``, ``p99_ms``, ``mean_ms`` and ``n`` of ``latencies`` (ms)."""
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "mean_ms": statistics.fmean(latencies), "n": float(len(latencies))}
