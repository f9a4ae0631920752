"""
Whether to ask a peer for zstd-compressed NARs, chosen from what was
measured on the link to it.

Compression between peers pays only when the link is slower than the
compressor: on a fast LAN (or when sender, receiver and client share a few
cores) a raw NAR arrives sooner than one the peer must compress first; on
Wi-Fi a compressed one arrives several times sooner.  Neither is known in
advance, and both change (the link, the load on either machine), so
:class:`LinkSpeeds` keeps, per peer and per mode (raw or zstd), the NAR
bytes per second of its recent big NAR downloads and asks in the mode that
delivered more, trying the other mode now and then so a changed link is
noticed.  NAR bytes per second is what the client gains, whatever the
bottleneck (link, compressor, either machine's load).
"""

from __future__ import annotations

import statistics
from collections import deque

from twisted.internet.interfaces import IReactorTime

from peernix.peers.peer import Peer

#: NAR downloads smaller than this are latency, not throughput: not measured.
MIN_MEASURED_BYTES = 1024 * 1024
#: How many recent downloads per peer and mode count.
HISTORY = 4
#: How old a measurement may be before it no longer counts (seconds).
MAX_AGE = 600.0
#: One narinfo request in this many to a measured peer asks in the other
#: mode, so the rate of the mode not chosen stays known.
EXPLORE_EVERY = 8


class LinkSpeeds:
    """
    Per peer, the NAR throughput of recent raw and zstd downloads, and the
    choice of mode for the next narinfo request (see the module's text).

    Until a peer's first big download is measured, it is asked for zstd
    (a LAN peer; peers on loopback are never asked for zstd: compressing
    there only costs both sides CPU).  Once only one mode is measured, the
    other is tried on the next request, then every :data:`EXPLORE_EVERY`
    requests; the mode with the higher median throughput wins.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        min_bytes: int = MIN_MEASURED_BYTES,
        history: int = HISTORY,
        max_age: float = MAX_AGE,
        explore_every: int = EXPLORE_EVERY,
    ) -> None:
        if history <= 0 or explore_every <= 1:
            raise ValueError("history must be positive and explore_every above 1")
        self._clock = clock
        self._min_bytes = min_bytes
        self._history = history
        self._max_age = max_age
        self._explore_every = explore_every
        # (peer URL, compressed) -> recent (time, NAR bytes per second)
        self._rates: dict[tuple[str, bool], deque[tuple[float, float]]] = {}
        self._asks: dict[str, int] = {}

    def record(self, peer_url: str, nar_bytes: int, seconds: float, compressed: bool) -> None:
        """A NAR of ``nar_bytes`` came from ``peer_url`` in ``seconds`` (raw, or zstd when ``compressed``)."""
        if nar_bytes < self._min_bytes or seconds <= 0:
            return
        rates = self._rates.setdefault((peer_url, compressed), deque(maxlen=self._history))
        rates.append((self._clock.seconds(), nar_bytes / seconds))

    def rate(self, peer_url: str, compressed: bool) -> float | None:
        """:returns: the median NAR bytes per second of recent downloads in that mode, or ``None``."""
        rates = self._rates.get((peer_url, compressed))
        if not rates:
            return None
        now = self._clock.seconds()
        while rates and now - rates[0][0] > self._max_age:
            rates.popleft()
        if not rates:
            return None
        return statistics.median(r for _, r in rates)

    def prefer_zstd(self, peer: Peer) -> bool:
        """:returns: whether the next narinfo request to ``peer`` asks for ``?compression=zstd``."""
        if peer.on_loopback:
            return False
        raw, zst = self.rate(peer.url, False), self.rate(peer.url, True)
        if raw is None and zst is None:
            return True
        asks = self._asks.get(peer.url, 0) + 1
        self._asks[peer.url] = asks
        if raw is None or zst is None:
            # One mode measured: the other is tried at once, then now and then.
            measured_zstd = zst is not None
            explore = asks == 1 or asks % self._explore_every == 0
            return not measured_zstd if explore else measured_zstd
        best_zstd = zst >= raw
        return (not best_zstd) if asks % self._explore_every == 0 else best_zstd

    def forget(self, peer_url: str) -> None:
        """Drop what was measured for ``peer_url`` (e.g. it went away)."""
        self._rates.pop((peer_url, False), None)
        self._rates.pop((peer_url, True), None)
        self._asks.pop(peer_url, None)
