"""
What the LAN saves this machine: the figures the status page leads with.

:class:`Savings` counts, on the byte path itself:

* ``bytes_from_peers``: NAR bytes this machine's local clients received from
  peers (relayed), instead of downloading them from the internet, including
  the bytes another node fetched from an upstream for the LAN and streamed
  here (this node's own upstream downloads save nothing);
* ``bytes_to_peers``: NAR bytes sent to peers: of this machine's store, and
  of NARs staged here for the LAN (on the fetch route and the normal routes);
* how local clients' narinfo requests were answered: ``local`` (this store),
  ``peer`` (a LAN peer), ``upstream`` (fetched through the LAN from an
  upstream, by this node or by the path's fetcher: ``X-Peernix-Source:
  upstream URL [via FETCHER]``) or ``miss``;
* the most requested store paths (NAR downloads, bounded).

It keeps totals since :attr:`Savings.since`, per calendar day (local time;
"today" and "this week", the last seven days) and per hour for the last 24
hours (the chart).  All of it survives restarts in a small JSON state file
(:class:`SavingsStateFile`, written by :class:`SavingsService`): written
atomically (a temporary file, fsync, rename), every minute and at stop.  A
missing or corrupt file is a warning and a fresh start, an unwritable one a
warning (the daemon keeps running and counting in memory).

Pure book-keeping on the reactor thread: every method is a few dict updates.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sized
from typing import Any, Final, TypeVar

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger(namespace="peernix.savings")

#: The counters of one period, in a fixed order.
FIELDS: Final = ("bytes_from_peers", "bytes_to_peers", "local", "peer", "upstream", "miss")
#: The request outcomes of the hit ratio (a subset of :data:`FIELDS`).
OUTCOMES: Final = ("local", "peer", "upstream", "miss")
#: Hours the chart shows.
CHART_HOURS: Final = 24
#: Days kept (this week and a day of slack).
KEEP_DAYS: Final = 8
#: Store paths tracked for the "most requested" table at most; past it the
#: least requested give way (so a flood of distinct paths costs a bounded
#: amount of memory and state file).
TOP_TRACKED: Final = 256
#: How many of the least requested give way at once when the table is full:
#: one sort per this many new paths, where a scan of the whole table per new
#: path cost about 20 microseconds of every NAR request once it was full.
EVICT_BATCH: Final = TOP_TRACKED // 8
#: Rows of the "most requested" table.
TOP_SHOWN: Final = 10
#: The state file's format version.
STATE_VERSION: Final = 1
#: The state file's name under ``--state-dir``.
STATE_FILE_NAME: Final = "savings.json"
#: Seconds between state file writes.
SAVE_INTERVAL: Final = 60.0
#: A state file larger than this is not read (it cannot be ours).
MAX_STATE_BYTES: Final = 4 * 1024 * 1024


def _zero() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)


def _day_of(t: float) -> str:
    """:returns: the local calendar day of unix time ``t``, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.localtime(t))


def _drop_least_requested(paths: dict[str, list[int]], count: int) -> None:
    """
    Remove the ``count`` least requested entries of ``paths`` (name ->
    ``[requests, bytes]``); among equals the oldest (first inserted) go
    first.
    """
    # sorted() is stable: equals stay in the dict's insertion order.
    for name in sorted(paths, key=lambda p: paths[p][0])[:count]:
        del paths[name]


def _hour_of(t: float) -> int:
    """:returns: the start of the hour holding unix time ``t`` (unix seconds)."""
    return int(t // 3600) * 3600


@frozen
class PathCount:
    """One row of the most requested paths: NAR downloads of a store path."""

    path: str
    requests: int
    bytes: int


@frozen
class SavingsSnapshot:
    """
    The figures at one moment, as plain data (for the status page).

    :ivar since: unix time the counting started (kept across restarts).
    :ivar now: unix time of the snapshot.
    :ivar total: counters since :attr:`since`, keyed by :data:`FIELDS`.
    :ivar today: counters of the current local calendar day.
    :ivar week: counters of the last seven calendar days, today included.
    :ivar hours: ``(hour start, counters)`` for the last
        :data:`CHART_HOURS` hours, oldest first, every hour present.
    :ivar top: the most requested paths, most first.
    """

    since: float
    now: float
    total: Mapping[str, int]
    today: Mapping[str, int]
    week: Mapping[str, int]
    hours: tuple[tuple[int, Mapping[str, int]], ...]
    top: tuple[PathCount, ...]

    def document(self) -> dict[str, object]:
        """:returns: the ``savings`` object of ``/status.json``."""

        def period(counts: Mapping[str, int]) -> dict[str, object]:
            out: dict[str, object] = {name: counts.get(name, 0) for name in FIELDS}
            out["hit_ratio"] = hit_ratio(counts)
            return out

        return {
            "since": _iso(self.since),
            "since_unix": round(self.since, 3),
            "bytes_from_peers": self.total.get("bytes_from_peers", 0),
            "bytes_to_peers": self.total.get("bytes_to_peers", 0),
            "requests": {name: self.total.get(name, 0) for name in OUTCOMES},
            "hit_ratio": hit_ratio(self.total),
            "today": period(self.today),
            "week": period(self.week),
            "total": period(self.total),
            "last_24h": [
                {"hour": _iso(float(start)), **{name: counts.get(name, 0) for name in FIELDS}}
                for start, counts in self.hours
            ],
            "top_paths": [{"path": p.path, "requests": p.requests, "bytes": p.bytes} for p in self.top],
        }


def hit_ratio(counts: Mapping[str, int]) -> dict[str, float | None]:
    """
    :returns: each outcome's share of local clients' requests (0 to 1,
        rounded), ``None`` for every outcome when there were none.
    """
    total = sum(counts.get(name, 0) for name in OUTCOMES)
    return {name: (round(counts.get(name, 0) / total, 4) if total else None) for name in OUTCOMES}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@define
class Savings:
    """
    The counters.  See the module documentation.

    :param clock: the time source (``seconds()`` must be unix time: periods
        are calendar days and hours).
    """

    clock: IReactorTime
    since: float = field(default=-1.0)
    total: dict[str, int] = field(factory=_zero)
    days: dict[str, dict[str, int]] = field(factory=dict)
    hours: dict[int, dict[str, int]] = field(factory=dict)
    #: store path basename -> [requests, bytes]
    paths: dict[str, list[int]] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.since < 0:
            self.since = self.clock.seconds()

    # -- counting ------------------------------------------------------------

    def _add(self, name: str, amount: int) -> None:
        if amount <= 0:
            return
        now = self.clock.seconds()
        self.total[name] += amount
        day = _day_of(now)
        counts = self.days.get(day)
        if counts is None:
            counts = self.days[day] = _zero()
            self._prune(now)
        counts[name] += amount
        hour = _hour_of(now)
        counts = self.hours.get(hour)
        if counts is None:
            counts = self.hours[hour] = _zero()
            self._prune(now)
        counts[name] += amount

    def _prune(self, now: float) -> None:
        oldest_hour = _hour_of(now) - (CHART_HOURS - 1) * 3600
        for hour in [h for h in self.hours if h < oldest_hour]:
            del self.hours[hour]
        keep = {_day_of(now - 86400 * n) for n in range(KEEP_DAYS)}
        for day in [d for d in self.days if d not in keep]:
            del self.days[day]

    def add_from_peers(self, nbytes: int) -> None:
        """``nbytes`` NAR bytes from a peer were written to a local client."""
        self._add("bytes_from_peers", nbytes)

    def add_to_peers(self, nbytes: int) -> None:
        """``nbytes`` NAR bytes of the local store were sent to a peer."""
        self._add("bytes_to_peers", nbytes)

    def count_request(self, outcome: str) -> None:
        """
        A local client's narinfo request was answered from ``outcome``: one
        of :data:`OUTCOMES`.

        :raises ValueError: for another outcome.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._add(outcome, 1)

    def count_path(self, store_path: str, nbytes: int) -> None:
        """A NAR of ``store_path`` (a basename or full path) was requested; ``nbytes`` its NAR size."""
        name = store_path.rsplit("/", 1)[-1]
        entry = self.paths.get(name)
        if entry is None:
            if len(self.paths) >= TOP_TRACKED:
                _drop_least_requested(self.paths, len(self.paths) - TOP_TRACKED + EVICT_BATCH)
            entry = self.paths[name] = [0, 0]
        entry[0] += 1
        entry[1] += max(0, nbytes)

    # -- reading -------------------------------------------------------------

    def snapshot(self) -> SavingsSnapshot:
        """:returns: the figures now."""
        now = self.clock.seconds()
        today = _day_of(now)
        week_days = {_day_of(now - 86400 * n) for n in range(7)}
        week = _zero()
        for day, counts in self.days.items():
            if day in week_days:
                for name in FIELDS:
                    week[name] += counts.get(name, 0)
        current = _hour_of(now)
        hours = tuple(
            (start, dict(self.hours.get(start) or _zero()))
            for start in range(current - (CHART_HOURS - 1) * 3600, current + 1, 3600)
        )
        top = sorted(self.paths.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:TOP_SHOWN]
        return SavingsSnapshot(
            since=self.since,
            now=now,
            total=dict(self.total),
            today=dict(self.days.get(today) or _zero()),
            week=week,
            hours=hours,
            top=tuple(PathCount(path, count, nbytes) for path, (count, nbytes) in top),
        )

    # -- the state file's content -------------------------------------------

    def state(self) -> dict[str, Any]:
        """:returns: everything to keep across a restart, as JSON-able data."""
        return {
            "version": STATE_VERSION,
            "since": self.since,
            "total": dict(self.total),
            "days": {day: dict(counts) for day, counts in self.days.items()},
            "hours": {str(hour): dict(counts) for hour, counts in self.hours.items()},
            "paths": {path: list(entry) for path, entry in self.paths.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """
        Take over the counts of a previous run (:meth:`state`'s output).

        :raises ValueError: ``state`` is not a state of this version (nothing
            is changed then).
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError("not a peernix savings state of version %d" % STATE_VERSION)
        since = state.get("since")
        if not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since):
            raise ValueError("bad 'since'")
        total = _counts(state.get("total"))
        days = {str(day): _counts(counts) for day, counts in _mapping(state.get("days")).items()}
        hours: dict[int, dict[str, int]] = {}
        for hour, counts in _mapping(state.get("hours")).items():
            try:
                hours[int(hour)] = _counts(counts)
            except (TypeError, ValueError):
                raise ValueError(f"bad hour {hour!r}") from None
        paths: dict[str, list[int]] = {}
        for path, entry in _mapping(state.get("paths")).items():
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry)
            ):
                raise ValueError(f"bad path entry {path!r}")
            paths[str(path)[:256]] = [int(entry[0]), int(entry[1])]
        if len(paths) > TOP_TRACKED:
            _drop_least_requested(paths, len(paths) - TOP_TRACKED)
        self.since = float(min(since, self.clock.seconds()))
        self.total = total
        self.days = days
        self.hours = hours
        self.paths = paths
        self._prune(self.clock.seconds())


def _mapping(value: object) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("expected an object")
    return value


def _counts(value: object) -> dict[str, int]:
    counts = _zero()
    for name, n in _mapping(value).items():
        if name not in counts:
            continue
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"bad count {name!r}")
        counts[name] = n
    return counts


class SavingsStateFile:
    """
    The savings' state file, ``<state dir>/savings.json``.

    :param directory: ``--state-dir``; created (mode 0755) on first write.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE_NAME)
        # The last save failed: the next failure is not logged again (a
        # read-only directory must not fill the log every minute).
        self._failing = False

    def load(self, savings: Savings) -> bool:
        """
        Restore ``savings`` from the file.  Blocking (one small read).

        :returns: whether it was restored; a missing, unreadable or corrupt
            file is a warning (counting then starts afresh, and the next
            write replaces a bad file), never an error.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            _log.warn("No savings state at {path} (first start, or --state-dir changed?); counting from now",
                      path=self.path)
            return False
        except OSError as e:
            _log.warn("Cannot read the savings state {path}: {error}; counting from now",
                      path=self.path, error=str(e))
            return False
        try:
            if len(data) > MAX_STATE_BYTES:
                raise ValueError("file too large")
            savings.restore(json.loads(data))
        except (ValueError, RecursionError) as e:
            _log.warn("The savings state {path} is unusable ({error}); counting from now",
                      path=self.path, error=str(e))
            return False
        return True

    def save(self, savings: Savings) -> bool:
        """
        Write ``savings`` atomically: a temporary file in the same
        directory, flushed to disk, renamed over the old one.  Blocking
        (a few KB).

        :returns: whether it was written; a failure (read-only or missing
            permissions) is logged as a warning (once, until a write works
            again), never raised.
        """
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            data = json.dumps(savings.state(), separators=(",", ":"), sort_keys=True).encode("utf-8")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._failing:
                _log.warn("Cannot write the savings state {path}: {error} (choose a writable --state-dir);"
                          " the figures are kept in memory only", path=self.path, error=str(e))
            self._failing = True
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        if self._failing:
            _log.info("The savings state {path} is written again", path=self.path)
            self._failing = False
        return True


class SavingsService(Service):
    """
    Loads the savings at start, writes them every ``interval`` seconds and
    at stop.

    :param savings: the counters.
    :param state_file: where they are kept.
    :param clock: drives the periodic write.
    """

    name = "savings"

    def __init__(self, savings: Savings, state_file: SavingsStateFile, clock: IReactorTime,
                 interval: float = SAVE_INTERVAL) -> None:
        self.savings = savings
        self.state_file = state_file
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.state_file.load(self.savings)
        self._loop = LoopingCall(self.state_file.save, self.savings)
        self._loop.clock = self._clock
        # Stopped in stopService; save() never raises, so the loop never dies.
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.state_file.save(self.savings)


_Sized = TypeVar("_Sized", bound=Sized)


def counting(chunks: Iterator[_Sized], into: list[int]) -> Iterator[_Sized]:
    """
    Pass ``chunks`` through, adding their lengths to ``into[0]`` (which may be
    read once the iteration is over or stopped; one thread iterates at a time).
    """
    for chunk in chunks:
        into[0] += len(chunk)
        yield chunk


#: ``(value, unit)`` steps of :func:`format_bytes`.
_UNITS: Final = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def format_bytes(n: int | float) -> str:
    """:returns: ``n`` bytes for people: ``1.5 GiB``, ``12 B``."""
    for size, unit in _UNITS:
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"

