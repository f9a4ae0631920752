"""
The benchmark's figures, their targets (the issue's target table), the
printed table and the JSON results file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence

from attrs import frozen


@frozen
class Target:
    """
    A pass/fail rule.

    :ivar on: ``"ratio"`` (peernix / reference) or ``"value"`` (peernix alone).
    :ivar op: ``">="`` or ``"<="``.
    :ivar limit: the bound.
    """

    on: str
    op: str
    limit: float

    def describe(self, unit: str) -> str:
        """:returns: e.g. ``ratio >= 0.5`` or ``<= 80 MB``."""
        if self.on == "ratio":
            return f"ratio {self.op} {self.limit:g}"
        return f"{self.op} {self.limit:g} {unit}".strip()

    def check(self, value: float, ratio: float | None) -> bool | None:
        """:returns: whether the figure meets the target, ``None`` when it cannot be told."""
        x = ratio if self.on == "ratio" else value
        if x is None or math.isnan(x):
            return None
        return x >= self.limit if self.op == ">=" else x <= self.limit


@frozen
class Figure:
    """
    One row of the table.

    :ivar label: what is measured.
    :ivar key: the sample key of the peernix figure.
    :ivar ref_key: the sample key of the reference (``None``: no reference).
    :ivar ref_label: the reference's name.
    :ivar unit: the unit of both figures.
    :ivar target: the issue's target, if it sets one for this row.
    :ivar optional: leave the row out when its figure was not measured at
        all (a node count one profile runs and the other does not).
    """

    label: str
    key: str
    ref_key: str | None
    ref_label: str
    unit: str
    target: Target | None = None
    optional: bool = False


def _narinfo_figures() -> list[Figure]:
    out = []
    for c in (1, 16, 64):
        out.append(Figure(f"narinfo req/s c{c}", f"narinfo.c{c}.peernix.rps", f"narinfo.c{c}.minimal.rps",
                          "twisted.web minimal", "req/s",
                          Target("ratio", ">=", 0.5) if c == 16 else None))
        out.append(Figure(f"narinfo req/s c{c} vs nginx", f"narinfo.c{c}.peernix.rps", f"narinfo.c{c}.nginx.rps",
                          "nginx", "req/s"))
        out.append(Figure(f"narinfo p50 c{c}", f"narinfo.c{c}.peernix.p50_ms", f"narinfo.c{c}.nginx.p50_ms",
                          "nginx", "ms", Target("value", "<=", 0.3) if c == 1 else None))
        out.append(Figure(f"narinfo p99 c{c}", f"narinfo.c{c}.peernix.p99_ms", f"narinfo.c{c}.nginx.p99_ms",
                          "nginx", "ms", Target("value", "<=", 10.0) if c == 64 else None))
        out.append(Figure(f"narinfo errors c{c}", f"narinfo.c{c}.peernix.errors", f"narinfo.c{c}.nginx.errors",
                          "nginx", "", Target("value", "<=", 0)))
    return out


def _digest_figures() -> list[Figure]:
    # Store digests in namespaces: "max" is the largest N measured (16; 4 in
    # quick mode), the one the targets apply to.
    out = []
    for n, tag in (("4", "N=4"), ("max", "N=16 [quick 4]")):
        out += [
            Figure(f"digests {tag}: narinfo requests per miss", f"digests.{n}.miss_requests", None, "", "",
                   Target("value", "<=", 0.2) if n == "max" else None),
            Figure(f"digests {tag}: UDP queries per miss", f"digests.{n}.miss_udp", None, "", ""),
            Figure(f"digests {tag}: narinfo requests per hit", f"digests.{n}.hit_requests", None, "", "",
                   Target("value", "<=", 1.2) if n == "max" else None),
            Figure(f"digests {tag}: UDP queries per hit", f"digests.{n}.hit_udp", None, "", ""),
            Figure(f"digests {tag}: miss p50", f"digests.{n}.miss_p50_ms", None, "", "ms",
                   Target("value", "<=", 1.0) if n == "max" else None),
            Figure(f"digests {tag}: miss p99", f"digests.{n}.miss_p99_ms", None, "", "ms"),
            Figure(f"digests {tag}: hit p50", f"digests.{n}.hit_p50_ms", None, "", "ms"),
            Figure(f"digests {tag}: digest size a node", f"digests.{n}.digest_bytes", None, "", "bytes"),
            Figure(f"digests {tag}: RSS a node, max", f"digests.{n}.rss_mb_max", None, "", "MB"),
            Figure(f"digests {tag}: digests exchanged after", f"digests.{n}.converge_s", None, "", "s"),
        ]
    return out


def _dnssd_figures() -> list[Figure]:
    # Two subnets joined by a router, peers found only through DNS-SD
    # (interval 2 s): within one interval, and a path across the subnets.
    return [
        Figure("dns-sd: every node knows every other after", "dnssd.know_all_s", None, "", "s",
               Target("value", "<=", 2.0)),
        Figure("dns-sd: a node gone from the zone dropped after", "dnssd.dropped_s", None, "", "s",
               Target("value", "<=", 2.0 + 2.0)),
        Figure("dns-sd: a path only the other subnet has, substituted", "dnssd.across_ok", None, "", "",
               Target("value", ">=", 1.0)),
    ]


def _upstream_figures() -> list[Figure]:
    # Fetching for the LAN (issue 13): N nodes, all clients at once; the
    # reference of "wall time / one" is the same mode's N = 1 run.  The
    # quick profile measures N = 1 and 2, the full one 1, 4 and 8.
    out = []
    for n in (2, 4, 8):
        out += [
            Figure(f"fetch for the LAN N={n}: upstream bytes / unique", f"upstream.peernix.{n}.over_unique",
                   f"upstream.direct.{n}.over_unique", "clients direct to the upstream", "",
                   Target("value", "<=", 1.0), optional=True),
            Figure(f"fetch for the LAN N={n}: wall time, all", f"upstream.peernix.{n}.seconds",
                   "upstream.peernix.1.seconds", "one node alone", "s", Target("ratio", "<=", 1.3), optional=True),
            Figure(f"clients direct to the upstream N={n}: wall time, all", f"upstream.direct.{n}.seconds",
                   "upstream.direct.1.seconds", "one client alone", "s", optional=True),
            # What the machine allows: N Nix clients' own CPU-seconds over
            # its cores, against one node alone; no LAN cache gets "wall
            # time, all" below this floor here.
            Figure(f"fetch for the LAN N={n}: floor, Nix clients' CPU / cores", f"upstream.peernix.{n}.client_floor",
                   "upstream.peernix.1.seconds", "one node alone", "s", optional=True),
            Figure(f"fetch for the LAN N={n}: CPU busy while the clients ran", f"upstream.peernix.{n}.busy_cpu",
                   None, "", "s", optional=True),
            Figure(f"fetch for the LAN N={n}: peernix CPU per node", f"upstream.peernix.{n}.daemon_cpu_per_node",
                   "upstream.peernix.1.daemon_cpu_per_node", "one node alone", "s", optional=True),
        ]
    out += [
        Figure("fetch for the LAN, fetcher killed: others succeeded", "upstream.kill.survivors_ok", None, "", "",
               Target("value", ">=", 1.0), optional=True),
        Figure("fetch for the LAN, fetcher killed: upstream bytes / unique", "upstream.kill.over_unique", None,
               "", "", Target("value", "<=", 2.0), optional=True),
    ]
    return out


FIGURES: list[Figure] = [
    *_narinfo_figures(),
    Figure("NAR 1 stream identity", "nar.peernix.raw1.mbps", "nar.nixstoredump.mbps",
           "nix-store --dump >/dev/null", "MB/s", Target("ratio", ">=", 1.0)),
    Figure("NAR 1 stream identity vs dump-path", "nar.peernix.raw1.mbps", "nar.dump.mbps", "nix store dump-path",
           "MB/s"),
    Figure("NAR 1 stream raw vs nginx", "nar.peernix.raw1.mbps", "nar.nginx.raw1.mbps", "nginx", "MB/s"),
    Figure("NAR 4 streams raw", "nar.peernix.raw4.mbps", "nar.nginx.raw4.mbps", "nginx", "MB/s"),
    Figure("NAR 1 stream zstd (NAR MB/s)", "nar.peernix.zstd1.mbps", "nar.zstdcli.mbps", "zstd -1 -T1", "MB/s"),
    Figure("NAR 4 streams zstd (NAR MB/s)", "nar.peernix.zstd4.mbps", "nar.zstdcli.mbps", "zstd -1 -T1", "MB/s",
           Target("value", ">=", 250)),
    Figure("NAR 4 streams zstd (wire MB/s)", "nar.peernix.zstd4.wire_mbps", None, "", "MB/s"),
    Figure("zstd wire ratio, big path", "nar.peernix.zstd1.wire_ratio", "nar.zstdcli.ratio", "zstd -1 -T1", ""),
    Figure("zstd wire ratio, small paths", "nar.peernix.small_zstd_ratio", None, "", ""),
    Figure("RSS before the 8 downloads", "rss.peernix.before_mb", None, "", "MB"),
    Figure("peak RSS, 8 big NAR downloads", "rss.peernix.peak_mb", None, "", "MB", Target("value", "<=", 80)),
    Figure("e2e small paths (b) [500; quick 100]", "e2e.small.peernix", "e2e.small.nginx", "nginx (a)", "s",
           Target("ratio", "<=", 1.1)),
    Figure("e2e small paths (c) proxy", "e2e.small.proxy", "e2e.small.nginx", "nginx (a)", "s"),
    Figure("e2e chain (b)", "e2e.chain.peernix", "e2e.chain.nginx", "nginx (a)", "s", Target("ratio", "<=", 1.2)),
    Figure("e2e chain (c) fresh proxy", "e2e.chain.freshproxy", "e2e.chain.nginx", "nginx (a)", "s",
           Target("ratio", "<=", 1.5)),
    Figure("e2e chain (c) proxy, warm", "e2e.chain.proxy", "e2e.chain.nginx", "nginx (a)", "s"),
    Figure("e2e big path (b)", "e2e.big.peernix", "e2e.big.nginx", "nginx (a)", "s", Target("ratio", "<=", 1.1)),
    Figure("e2e big path (c) proxy", "e2e.big.proxy", "e2e.big.nginx", "nginx (a)", "s", Target("ratio", "<=", 1.2)),
    Figure("Nix 2.24 j16: small paths (b)", "e2e224.small.peernix", "e2e224.small.nginx", "nginx (a), 2.24", "s",
           Target("ratio", "<=", 1.1)),
    Figure("Nix 2.24 j16: chain (b)", "e2e224.chain.peernix", "e2e224.chain.nginx", "nginx (a), 2.24", "s",
           Target("ratio", "<=", 1.2)),
    Figure("Nix 2.24 j16: chain (c) fresh proxy", "e2e224.chain.freshproxy", "e2e224.chain.nginx",
           "nginx (a), 2.24", "s", Target("ratio", "<=", 1.5)),
    Figure("LAN 1 Gbit/s: big path (c)", "lan.lan1g.peernix", "lan.lan1g.nginx", "nginx over the link", "s",
           Target("ratio", "<=", 0.8)),
    Figure("LAN 100 Mbit/s: compressible path (c)", "lan.lan100m.peernix", "lan.lan100m.nginx",
           "nginx over the link", "s", Target("ratio", "<=", 0.4)),
    Figure("many conns: wrong+errors+dropped", "conns.peernix.bad", "conns.nginx.bad", "nginx", "",
           Target("value", "<=", 0)),
    Figure("many conns: most open at once", "conns.peernix.max_open", "conns.nginx.max_open", "nginx", ""),
    Figure("many conns: requests/s", "conns.peernix.rps", "conns.nginx.rps", "nginx", "req/s"),
    Figure("many conns: p99", "conns.peernix.p99_ms", "conns.nginx.p99_ms", "nginx", "ms"),
    Figure("miss p50, 1 peer", "fanout.1.p50_ms", "fanout.nginx.p50_ms", "nginx 404", "ms"),
    Figure("miss p99, 1 peer", "fanout.1.p99_ms", "fanout.nginx.p99_ms", "nginx 404", "ms"),
    Figure("miss p50, 3 peers", "fanout.3.p50_ms", "fanout.nginx.p50_ms", "nginx 404", "ms",
           Target("value", "<=", 5)),
    Figure("miss p99, 3 peers", "fanout.3.p99_ms", "fanout.nginx.p99_ms", "nginx 404", "ms"),
    Figure("miss p50, 10 peers", "fanout.10.p50_ms", "fanout.nginx.p50_ms", "nginx 404", "ms"),
    Figure("miss p99, 10 peers", "fanout.10.p99_ms", "fanout.nginx.p99_ms", "nginx 404", "ms"),
    Figure("miss p50, 3 peers, 1 just frozen", "fanout.frozen_now.p50_ms", None, "", "ms"),
    Figure("miss p99, 3 peers, 1 just frozen", "fanout.frozen_now.p99_ms", None, "", "ms"),
    Figure("miss p99, 3 peers, 10 s after freeze", "fanout.frozen_10s.p99_ms", "fanout.nginx.p99_ms", "nginx 404",
           "ms", Target("value", "<=", 20)),
    *_digest_figures(),
    *_dnssd_figures(),
    *_upstream_figures(),
]
"""Every row of the table, in order."""


@frozen
class Stat:
    """Median, minimum and maximum of a figure's repetitions."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat | None:
        """:returns: the statistics, ``None`` for no samples."""
        if not samples:
            return None
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def show(self) -> str:
        """:returns: ``median [min-max]`` (just the median for one sample or no spread)."""
        if self.n == 1 or self.low == self.high:
            return _num(self.median)
        return f"{_num(self.median)} [{_num(self.low)}-{_num(self.high)}]"


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def evaluate(samples: dict[str, list[float]]) -> list[dict[str, object]]:
    """:returns: one dict per :data:`FIGURES` row: values, ratio, target and verdict (pass/FAIL/n/a)."""
    rows: list[dict[str, object]] = []
    for fig in FIGURES:
        mine = Stat.of(samples.get(fig.key, []))
        if mine is None and fig.optional:
            continue
        ref = Stat.of(samples.get(fig.ref_key, [])) if fig.ref_key else None
        ratio = None
        if mine is not None and ref is not None and ref.median not in (0, 0.0):
            ratio = mine.median / ref.median
        verdict = "-"
        if fig.target is not None:
            ok = fig.target.check(mine.median, ratio) if mine is not None else None
            verdict = "n/a" if ok is None else ("pass" if ok else "FAIL")
        rows.append({
            "figure": fig.label, "unit": fig.unit,
            "peernix": None if mine is None else mine.median,
            "peernix_min": None if mine is None else mine.low,
            "peernix_max": None if mine is None else mine.high,
            "peernix_text": "n/a" if mine is None else mine.show(),
            "reference_name": fig.ref_label,
            "reference": None if ref is None else ref.median,
            "reference_text": "" if fig.ref_key is None else ("n/a" if ref is None else ref.show()),
            "ratio": ratio,
            "target": "" if fig.target is None else fig.target.describe(fig.unit),
            "verdict": verdict,
        })
    return rows


def table(rows: Sequence[dict[str, object]]) -> str:
    """:returns: the rows as a plain-text table."""
    head = ("figure", "unit", "peernix median [min-max]", "reference", "ref median [min-max]", "ratio",
            "target", "result")
    body = [(str(r["figure"]), str(r["unit"]), str(r["peernix_text"]), str(r["reference_name"]),
             str(r["reference_text"]), "" if r["ratio"] is None else f"{r['ratio']:.2f}",
             str(r["target"]), str(r["verdict"])) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), line, *(fmt.format(*b) for b in body)])


def machine() -> dict[str, object]:
    """:returns: what the run ran on (host, CPU, cores, memory, kernel, Nix and Python versions)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except OSError:
        mem_kb = 0
    try:
        nix = subprocess.run(["nix", "--version"], capture_output=True, timeout=10).stdout.decode().strip()
    except OSError:
        nix = "not found"
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), "nix": nix}


def write_json(out_dir: str, payload: dict[str, object]) -> str:
    """
    Write ``payload`` to ``out_dir/<date>-<host>.json`` (``-2``, ``-3``...
    appended when a file of that name exists).

    :returns: the file written.
    """
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    path = os.path.join(out_dir, stem + ".json")
    n = 2
    while os.path.exists(path):
        path = os.path.join(out_dir, f"{stem}-{n}.json")
        n += 1
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    return path
