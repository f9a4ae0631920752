"""
The three daemons, the timeline of what the chaos loop did to them, the
chaos loop itself and the RSS/fd sampler.

Daemons are :class:`bench.servers.Server` processes (so
:func:`bench.servers.stop_all` cleans them up, thawing frozen ones first),
each on a fixed port so a restarted daemon is found again by its peers'
``--peer`` URLs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from attrs import frozen

from bench import servers

#: Daemon names, by index.
NAMES = ("a", "b", "c")

#: How long a daemon may take to exit on SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


@frozen
class Disruption:
    """
    One thing the chaos loop did to a daemon.

    :ivar daemon: its index.
    :ivar kind: ``"stop"`` (SIGTERM, down, restarted) or ``"freeze"`` (SIGSTOP, SIGCONT).
    :ivar start: ``time.monotonic()`` just before the signal.
    :ivar end: when it was serving again (restarted and answering, or
        thawed); ``None`` while it lasts.
    """

    daemon: int
    kind: str
    start: float
    end: float | None


class Timeline:
    """
    Every disruption, for the classification of errors (thread-safe).  A
    disruption is recorded *before* its signal is sent, so a worker's record
    of an error it caused always finds it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Disruption] = []
        self._open: dict[int, int] = {}

    def begin(self, daemon: int, kind: str) -> None:
        """Record that ``daemon`` is about to be disrupted."""
        with self._lock:
            self._open[daemon] = len(self._items)
            self._items.append(Disruption(daemon, kind, time.monotonic(), None))

    def end(self, daemon: int) -> None:
        """Record that ``daemon`` serves again."""
        with self._lock:
            i = self._open.pop(daemon, None)
            if i is not None:
                d = self._items[i]
                self._items[i] = Disruption(d.daemon, d.kind, d.start, time.monotonic())

    def items(self) -> list[Disruption]:
        """:returns: a copy of every disruption so far."""
        with self._lock:
            return list(self._items)

    def overlaps(self, daemons: Sequence[int], start: float, end: float, after: float = 0.0) -> bool:
        """
        :returns: whether one of ``daemons`` was disrupted at some time in
            ``[start, end]``, counting each disruption as lasting ``after``
            seconds longer than it did (for effects that outlive it).
        """
        with self._lock:
            for d in self._items:
                if d.daemon in daemons and d.start <= end and (d.end is None or d.end + after >= start):
                    return True
        return False


class Daemon:
    """
    One peernix of the soak, restartable on its port.

    :ivar index: 0, 1 or 2.
    :ivar port: its HTTP port (fixed for the whole run).
    :ivar incarnation: how many times it was (re)started, from 0.
    :ivar server: the running process, ``None`` while stopped.
    """

    def __init__(self, index: int, store_root: str, port: int, udp_port: int, peers: Sequence[int],
                 public_key: str, workdir: str) -> None:
        self.index = index
        self.name = NAMES[index]
        self.port = port
        self.argv = [sys.executable, "-m", "twisted", "peernix", "--port", str(port), "--interface", "127.0.0.1",
                     "--store-root", store_root, "--no-broadcast", "--no-mdns", "--udp-port", str(udp_port),
                     "--trusted-public-key", public_key, "--upstream", "none"]
        for p in peers:
            self.argv += ["--peer", f"http://127.0.0.1:{p}"]
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = servers.REPO_ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        self.log_path = os.path.join(workdir, f"peernix-{self.name}.log")
        self.incarnation = -1
        self.server: servers.Server | None = None
        self.started_at = 0.0
        #: Stops that needed SIGKILL after :data:`STOP_TIMEOUT`.
        self.killed = 0

    @property
    def pid(self) -> int | None:
        """:returns: the serving process's pid, ``None`` while stopped."""
        if self.server is None or self.server.process.poll() is not None:
            return None
        return self.server.process.pid

    def start(self, timeout: float = 60.0) -> None:
        """
        Start it and wait until it answers ``nix-cache-info``.

        :raises bench.servers.Unavailable: when it exits or does not answer in time.
        """
        self.server = servers.Server(f"peernix {self.name}", self.argv, self.port, self.log_path,
                                     env=self.env, cwd=servers.REPO_ROOT)
        self.incarnation += 1
        self.started_at = time.monotonic()
        servers.wait_peernix(self.server, timeout=timeout)

    def stop(self) -> float:
        """
        SIGTERM it (after SIGCONT, in case it is frozen) and wait for it to
        exit; SIGKILL after :data:`STOP_TIMEOUT` (counted in :attr:`killed`).

        :returns: how long it took to exit, seconds.
        """
        server, self.server = self.server, None
        if server is None:
            return 0.0
        began = time.monotonic()
        proc = server.process
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed += 1
            except ProcessLookupError:
                pass
        server.stop()  # SIGKILL if still running; closes the log and forgets it
        return time.monotonic() - began

    def freeze(self) -> None:
        """SIGSTOP it."""
        if self.server is not None:
            self.server.freeze()

    def thaw(self) -> None:
        """SIGCONT it."""
        if self.server is not None:
            self.server.thaw()


def read_usage(pid: int) -> tuple[int, int] | None:
    """
    :returns: ``(VmRSS in KiB, open descriptors)`` of ``pid`` from
        ``/proc``; ``None`` when it is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if rss is None:
        return None
    return rss, fds


Sample = tuple[float, int, int, int, int]
"""One RSS/fd sample: ``(time, daemon, incarnation, rss KiB, fds)``."""


class Sampler(threading.Thread):
    """Samples every daemon's RSS and descriptors every ``interval`` seconds."""

    def __init__(self, daemons: Sequence[Daemon], interval: float, stop: threading.Event) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self._daemons = daemons
        self._interval = interval
        self._stop_event = stop
        self._lock = threading.Lock()
        self._samples: list[Sample] = []

    def samples(self) -> list[Sample]:
        """:returns: a copy of the samples so far."""
        with self._lock:
            return list(self._samples)

    def sample_once(self) -> None:
        """Take one sample of every running daemon."""
        now = time.monotonic()
        for d in self._daemons:
            pid = d.pid
            usage = read_usage(pid) if pid is not None else None
            if usage is not None:
                with self._lock:
                    self._samples.append((now, d.index, d.incarnation, usage[0], usage[1]))

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            self.sample_once()


@frozen
class ChaosSettings:
    """
    :ivar gap: (min, max) seconds between two disruptions.
    :ivar duration: (min, max) seconds a daemon stays down or frozen.
    :ivar stoppable: daemon indexes the loop may stop and restart (the
        others are only frozen, so one process lives through the whole run
        and a slow leak has the whole run to show).
    :ivar stop_share: the share of disruptions that are stops.
    """

    gap: tuple[float, float] = (10.0, 30.0)
    duration: tuple[float, float] = (2.0, 8.0)
    stoppable: tuple[int, ...] = (1, 2)
    stop_share: float = 0.5


class Chaos(threading.Thread):
    """
    Disrupts one daemon at a time, at random intervals: stop (SIGTERM),
    wait, restart on the same port; or freeze (SIGSTOP), wait, thaw
    (SIGCONT).  Failures to restart are kept in :attr:`failures`.
    """

    def __init__(self, daemons: Sequence[Daemon], timeline: Timeline, settings: ChaosSettings,
                 rng: random.Random, stop: threading.Event) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self._daemons = daemons
        self._timeline = timeline
        self._settings = settings
        self._rng = rng
        self._stop_event = stop
        self.failures: list[str] = []
        self.stop_seconds: list[float] = []
        self.restart_seconds: list[float] = []

    def run(self) -> None:
        s = self._settings
        while not self._stop_event.wait(self._rng.uniform(*s.gap)):
            if self._rng.random() < s.stop_share and s.stoppable:
                self._stop_restart(self._daemons[self._rng.choice(s.stoppable)])
            else:
                self._freeze(self._daemons[self._rng.randrange(len(self._daemons))])

    def _stop_restart(self, d: Daemon) -> None:
        self._timeline.begin(d.index, "stop")
        try:
            self.stop_seconds.append(d.stop())
            # Restarted even when the run is ending (the wait then returns at
            # once): the last samples and the clean-up expect all three.
            self._stop_event.wait(self._rng.uniform(*self._settings.duration))
            began = time.monotonic()
            for attempt in range(3):
                try:
                    d.start()
                    break
                except servers.Unavailable as e:
                    self.failures.append(f"restart of {d.name} (attempt {attempt + 1}): {str(e)[-1500:]}")
                    d.server = None
            else:
                self.failures.append(f"{d.name} could not be restarted")
                return
            self.restart_seconds.append(time.monotonic() - began)
        finally:
            self._timeline.end(d.index)

    def _freeze(self, d: Daemon) -> None:
        self._timeline.begin(d.index, "freeze")
        try:
            d.freeze()
            self._stop_event.wait(self._rng.uniform(*self._settings.duration))
        finally:
            d.thaw()
            self._timeline.end(d.index)
