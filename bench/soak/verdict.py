"""
Judging the soak: classify every worker record against the timeline of
disruptions, sum them per daemon and minute, check that RSS and descriptors
stay flat, and render the minute lines, the verdict table and the JSON.

Classification (:func:`classify`):

- a 5xx, a wrong narinfo (or a 200 for a miss) and a NAR with wrong bytes
  are errors whatever happened: every worker is a local client;
- no answer, or a NAR cut short, is *excused* when the asked daemon (or, for
  a path held by a peer, that peer) was stopped or frozen during the request
  (give or take :data:`CONN_GRACE`), and an error otherwise;
- a 404 for a path the asked daemon holds is an error; a 404 for a path a
  peer holds is excused when that peer was disrupted during the request or
  in the :data:`PEER_RECOVERY` seconds before it (the asked daemon's
  negative cache and the peer's backoff outlive the disruption), or when the
  asked daemon itself was frozen or restarted during the request (its peer
  timeout elapses while it is frozen), and is a *lost peer hit* otherwise.

Latency (p99) is over narinfo operations (hits and misses) that did not
overlap a disruption of the asked daemon itself: a NAR's time depends on its
size, and a frozen daemon's own answers say nothing about its speed.  A
request slowed down by a frozen *peer* does count.

Flatness (:func:`flatness`): per process (daemon and incarnation), the
samples after a warm-up are cut in thirds; RSS is flat when the mean of the
last third exceeds the mean of the first by at most
``max(RSS_TOL_KIB, RSS_TOL_SHARE x first)``, descriptors likewise with
``max(FD_TOL, FD_TOL_SHARE x first)``.  Processes with fewer than
:data:`MIN_SAMPLES` samples after their warm-up (short-lived incarnations
between two restarts) are not judged; the daemon that is never stopped
always is, on runs of 3 minutes and more.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections.abc import Sequence

from attrs import frozen

from bench.soak import client
from bench.soak.cluster import NAMES, Sample, Timeline

#: Seconds around a disruption of the asked daemon in which no answer is excused.
CONN_GRACE = 1.0
#: Seconds after a peer's disruption in which a 404 for its paths is excused:
#: the negative TTL (10 s) plus a health-check round (5 s) plus a margin.
PEER_RECOVERY = 20.0
#: Allowed growth of mean RSS (last third minus first third), KiB and share.
RSS_TOL_KIB = 5 * 1024
RSS_TOL_SHARE = 0.05
#: Allowed growth of mean open descriptors, count and share.
FD_TOL = 5.0
FD_TOL_SHARE = 0.10
#: Samples a process needs after its warm-up to be judged.
MIN_SAMPLES = 9
#: Allowed lost peer hits, as a share of the peer hits asked.
LOST_PEER_HIT_SHARE = 0.01

#: Categories of a classified record.
C_OK = "ok"
C_5XX = "5xx"
C_WRONG = "wrong"
C_WRONG_BYTES = "wrong-bytes"
C_UNEXPECTED = "unexpected"
C_EXCUSED = "excused"
C_LOST = "lost-peer-hit"
CATEGORIES = (C_OK, C_5XX, C_WRONG, C_WRONG_BYTES, C_UNEXPECTED, C_EXCUSED, C_LOST)
#: The categories that count as errors in the minute lines.
ERRORS = (C_5XX, C_WRONG, C_WRONG_BYTES, C_UNEXPECTED)


def classify(rec: client.Record, timeline: Timeline) -> str:
    """:returns: the category of one worker record (see the module docstring)."""
    start, end, daemon, op, holder, outcome, _, _, _ = rec
    if outcome == client.OK:
        return C_OK
    if outcome == client.SERVER_ERROR:
        return C_5XX
    if outcome == client.WRONG:
        return C_WRONG
    if outcome == client.WRONG_BYTES:
        return C_WRONG_BYTES
    involved = [daemon] if holder in (-1, daemon) else [daemon, holder]
    if outcome in (client.CONN, client.TRUNCATED):
        if timeline.overlaps(involved, start - CONN_GRACE, end, after=CONN_GRACE):
            return C_EXCUSED
        return C_UNEXPECTED
    if outcome == client.NOT_FOUND:
        if holder in (-1, daemon):
            return C_UNEXPECTED
        if timeline.overlaps([holder], start, end, after=PEER_RECOVERY):
            return C_EXCUSED
        # A daemon thawed after its request's peer timeout elapsed (frozen)
        # gives up on its peers at once: a 404 is the right answer then.
        if timeline.overlaps([daemon], start - CONN_GRACE, end, after=CONN_GRACE):
            return C_EXCUSED
        return C_LOST
    return C_UNEXPECTED


class Tally:
    """Counts, latencies and error examples per daemon and minute."""

    def __init__(self, t0: float, daemons: int) -> None:
        self.t0 = t0
        self.daemons = daemons
        #: (minute, daemon) -> category -> count.
        self.counts: dict[tuple[int, int], dict[str, int]] = {}
        #: (minute, daemon) -> latencies (seconds) of narinfo requests the daemon itself was not disrupted during.
        self.latency: dict[tuple[int, int], list[float]] = {}
        #: op -> category -> count, over the whole run.
        self.by_op: dict[str, dict[str, int]] = {op: dict.fromkeys(CATEGORIES, 0) for op in client.OPS}
        self.wrong_bytes = 0
        self.nar_bytes = 0
        self.examples: list[dict[str, object]] = []

    def minute_of(self, t: float) -> int:
        """:returns: the run minute (from 0) of monotonic time ``t``."""
        return max(0, int((t - self.t0) // 60))

    def add(self, rec: client.Record, timeline: Timeline) -> None:
        """Classify and count one record."""
        start, end, daemon, op, holder, outcome, status, nbytes, detail = rec
        cat = classify(rec, timeline)
        key = (self.minute_of(end), daemon)
        self.counts.setdefault(key, dict.fromkeys(CATEGORIES, 0))[cat] += 1
        self.by_op[op][cat] += 1
        if cat == C_OK and op in (client.NAR_LOCAL, client.NAR_PEER):
            self.nar_bytes += nbytes
        if cat == C_WRONG_BYTES:
            self.wrong_bytes += nbytes
        if op in (client.HIT_LOCAL, client.HIT_PEER, client.MISS) and not timeline.overlaps([daemon], start, end):
            self.latency.setdefault(key, []).append(end - start)
        if cat not in (C_OK, C_EXCUSED) and len(self.examples) < 100:
            self.examples.append({"t": round(end - self.t0, 3), "daemon": NAMES[daemon], "op": op,
                                  "holder": NAMES[holder] if holder >= 0 else None, "category": cat,
                                  "outcome": outcome, "status": status, "detail": detail})

    def minute_counts(self, minute: int, daemon: int) -> dict[str, int]:
        """:returns: category counts of one daemon in one minute."""
        return self.counts.get((minute, daemon), dict.fromkeys(CATEGORIES, 0))

    def total(self, daemon: int | None = None) -> dict[str, int]:
        """:returns: category counts over the run, of one daemon or all."""
        out = dict.fromkeys(CATEGORIES, 0)
        for (_, d), counts in self.counts.items():
            if daemon is None or d == daemon:
                for k, v in counts.items():
                    out[k] += v
        return out

    def p99_ms(self, daemon: int, minute: int | None = None) -> float | None:
        """:returns: the p99 latency in ms of a daemon, in one minute or over the run."""
        values = [x for (m, d), xs in self.latency.items() if d == daemon and (minute is None or m == minute)
                  for x in xs]
        if not values:
            return None
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@frozen
class Flatness:
    """
    The flatness check of one process.

    :ivar daemon: its name.
    :ivar incarnation: which start of it (0 = the first).
    :ivar samples: samples judged (after its warm-up).
    :ivar seconds: the time they span.
    :ivar rss_first_mib: mean RSS of the first third, MiB.
    :ivar rss_last_mib: mean RSS of the last third, MiB.
    :ivar rss_slope_mib_per_min: least-squares slope over the judged samples.
    :ivar rss_ok: whether the growth is within the tolerance.
    :ivar fds_first: mean descriptors of the first third.
    :ivar fds_last: mean descriptors of the last third.
    :ivar fds_slope_per_min: least-squares slope.
    :ivar fds_ok: whether the growth is within the tolerance.
    """

    daemon: str
    incarnation: int
    samples: int
    seconds: float
    rss_first_mib: float
    rss_last_mib: float
    rss_slope_mib_per_min: float
    rss_ok: bool
    fds_first: float
    fds_last: float
    fds_slope_per_min: float
    fds_ok: bool


def _slope_per_min(ts: Sequence[float], ys: Sequence[float]) -> float:
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den


def flatness(samples: Sequence[Sample], warmup: float) -> list[Flatness]:
    """
    :param warmup: seconds after a process's first sample that are not judged.
    :returns: the check of every process with at least :data:`MIN_SAMPLES`
        samples after its warm-up.
    """
    by_proc: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        by_proc.setdefault((s[1], s[2]), []).append(s)
    out = []
    for (daemon, inc), ss in sorted(by_proc.items()):
        first_t = ss[0][0]
        judged = [s for s in ss if s[0] >= first_t + warmup]
        if len(judged) < MIN_SAMPLES:
            continue
        third = len(judged) // 3
        head, tail = judged[:third], judged[-third:]
        rss0 = statistics.fmean(s[3] for s in head)
        rss1 = statistics.fmean(s[3] for s in tail)
        fd0 = statistics.fmean(s[4] for s in head)
        fd1 = statistics.fmean(s[4] for s in tail)
        ts = [s[0] for s in judged]
        out.append(Flatness(
            daemon=NAMES[daemon], incarnation=inc, samples=len(judged), seconds=ts[-1] - ts[0],
            rss_first_mib=rss0 / 1024, rss_last_mib=rss1 / 1024,
            rss_slope_mib_per_min=_slope_per_min(ts, [s[3] / 1024 for s in judged]),
            rss_ok=rss1 - rss0 <= max(RSS_TOL_KIB, RSS_TOL_SHARE * rss0),
            fds_first=fd0, fds_last=fd1, fds_slope_per_min=_slope_per_min(ts, [float(s[4]) for s in judged]),
            fds_ok=fd1 - fd0 <= max(FD_TOL, FD_TOL_SHARE * fd0)))
    return out


def minute_lines(tally: Tally, minute: int, samples: Sequence[Sample], events: dict[int, list[str]]) -> str:
    """:returns: the report of one minute: a line per daemon."""
    lines = [f"-- minute {minute + 1}"]
    for d in range(tally.daemons):
        c = tally.minute_counts(minute, d)
        requests = sum(c.values())
        errors = sum(c[k] for k in ERRORS)
        p99 = tally.p99_ms(d, minute)
        last = [s for s in samples if s[1] == d and tally.minute_of(s[0]) == minute]
        rss = f"{last[-1][3] / 1024:6.1f} MiB" if last else "      n/a"
        fds = f"{last[-1][4]:4d}" if last else " n/a"
        p99_text = f"{p99:7.1f} ms" if p99 is not None else "    n/a   "
        lines.append(f"   {NAMES[d]}: {requests:5d} req  errors {errors:3d}  excused {c[C_EXCUSED]:3d}  "
                     f"lost peer hits {c[C_LOST]:3d}  p99 {p99_text}  RSS {rss}  fds {fds}  "
                     f"{' '.join(events.get(d, []))}")
    return "\n".join(lines)


@frozen
class Check:
    """One row of the verdict: what, the measured value, the rule, pass or not."""

    what: str
    value: str
    rule: str
    ok: bool


def checks(tally: Tally, flat: Sequence[Flatness], chaos_failures: Sequence[str], killed: int,
           anchor_judged: bool) -> list[Check]:
    """:returns: every pass/fail rule of the soak, evaluated."""
    total = tally.total()
    peer_hits = sum(sum(tally.by_op[op].values()) for op in (client.HIT_PEER, client.NAR_PEER))
    lost_limit = LOST_PEER_HIT_SHARE * peer_hits
    rows = [
        Check("wrong NAR bytes", f"{tally.wrong_bytes} B in {total[C_WRONG_BYTES]} NARs", "= 0",
              total[C_WRONG_BYTES] == 0),
        Check("wrong answers (narinfo, 200 for a miss)", str(total[C_WRONG]), "= 0", total[C_WRONG] == 0),
        Check("5xx to local clients", str(total[C_5XX]), "= 0", total[C_5XX] == 0),
        Check("unexpected errors (no disruption explains them)", str(total[C_UNEXPECTED]), "= 0",
              total[C_UNEXPECTED] == 0),
        Check("lost peer hits (404, holder not disrupted)", f"{total[C_LOST]} of {peer_hits}",
              f"<= {LOST_PEER_HIT_SHARE:.0%} ({lost_limit:.0f})", total[C_LOST] <= lost_limit),
        Check("every operation kind succeeded", ", ".join(f"{op} {tally.by_op[op][C_OK]}" for op in client.OPS),
              "> 0 each", all(tally.by_op[op][C_OK] > 0 for op in client.OPS)),
        Check("restarts that failed", str(len(chaos_failures)), "= 0", not chaos_failures),
        Check("stops needing SIGKILL", str(killed), "= 0", killed == 0),
        Check("RSS flat (never-stopped daemon judged)" if anchor_judged else "RSS flat (never-stopped daemon NOT judged)",
              "; ".join(f"{f.daemon}#{f.incarnation} {f.rss_first_mib:.1f}->{f.rss_last_mib:.1f} MiB" for f in flat)
              or "nothing judged",
              f"last-third mean - first-third <= max({RSS_TOL_KIB // 1024} MiB, {RSS_TOL_SHARE:.0%})",
              anchor_judged and all(f.rss_ok for f in flat)),
        Check("fds flat", "; ".join(f"{f.daemon}#{f.incarnation} {f.fds_first:.1f}->{f.fds_last:.1f}" for f in flat)
              or "nothing judged",
              f"last-third mean - first-third <= max({FD_TOL:g}, {FD_TOL_SHARE:.0%})",
              anchor_judged and all(f.fds_ok for f in flat)),
    ]
    return rows


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """:returns: a plain-text table."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*b) for b in body)])


def verdict_table(rows: Sequence[Check]) -> str:
    """:returns: the verdict as a table."""
    return table(("check", "value", "rule", "result"),
                 [(r.what, r.value, r.rule, "pass" if r.ok else "FAIL") for r in rows])


def daemon_table(tally: Tally, flat: Sequence[Flatness], restarts: dict[int, int], freezes: dict[int, int]) -> str:
    """:returns: one row per daemon over the whole run."""
    body = []
    for d in range(tally.daemons):
        c = tally.total(d)
        p99 = tally.p99_ms(d)
        fl = [f for f in flat if f.daemon == NAMES[d]]
        body.append((NAMES[d], str(sum(c.values())), str(sum(c[k] for k in ERRORS)), str(c[C_EXCUSED]),
                     str(c[C_LOST]), "n/a" if p99 is None else f"{p99:.1f}",
                     " ".join(f"{f.rss_first_mib:.1f}->{f.rss_last_mib:.1f}" for f in fl) or "-",
                     " ".join(f"{f.fds_first:.0f}->{f.fds_last:.0f}" for f in fl) or "-",
                     str(restarts.get(d, 0)), str(freezes.get(d, 0))))
    return table(("daemon", "requests", "errors", "excused", "lost peer hits", "p99 ms", "RSS MiB (judged)",
                  "fds (judged)", "restarts", "freezes"), body)


def write_json(out_dir: str, payload: dict[str, object]) -> str:
    """
    Write ``payload`` to ``out_dir/soak-<date>-<host>.json`` (``-2``,
    ``-3``... appended when the name is taken).

    :returns: the file written.
    """
    os.makedirs(out_dir, exist_ok=True)
    stem = f"soak-{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    path = os.path.join(out_dir, stem + ".json")
    n = 2
    while os.path.exists(path):
        path = os.path.join(out_dir, f"{stem}-{n}.json")
        n += 1
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    return path
