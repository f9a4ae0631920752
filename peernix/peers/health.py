"""
Periodic health checks of every known peer.

A :class:`HealthChecker` probes each peer's ``nix-cache-info`` every
``interval`` seconds, records latency or failure in the registry (which
drives backoff and scores) and whether the peer serves peers (a
``--serve-peers no`` node says so in that answer, so static peers learn it
too), then drops expired discovered peers.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from peernix.interfaces import IPeerRegistry
from peernix.peers.client import PeerClient
from peernix.peers.errors import PeerError
from peernix.peers.registry import Peer

log = Logger()


class HealthChecker(Service):
    """
    :param registry: the peer table to probe and update.
    :param client: sends the probes (each bounded by the client's timeout).
    :param clock: drives the ``LoopingCall``.
    :param interval: seconds between rounds; a round still running when the
        next is due delays it (``LoopingCall`` waits for the Deferred).
    :param concurrency: at most this many probes in flight at once.
    """

    name = "peer-health"

    def __init__(
        self,
        registry: IPeerRegistry,
        client: PeerClient,
        clock: IReactorTime,
        *,
        interval: float = 5.0,
        concurrency: int = 16,
    ) -> None:
        self._registry = registry
        self._client = client
        self._clock = clock
        self._interval = interval
        self._semaphore = DeferredSemaphore(max(1, concurrency))
        self._loop: LoopingCall | None = None
        self._round: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = self._clock
        # Stopped in stopService; the loop's errback only logs (check_all
        # never fails), so the loop cannot die silently.
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("peer health loop failed", f)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._round is not None:
            # Cancels every probe still in flight (and their timers).
            self._round.cancel()
        return None

    def check_all(self) -> Deferred[None]:
        """
        Probe every known peer once, concurrently (bounded), then expire.

        :returns: a Deferred firing when the round is over; it never fails.
        """
        probes = [self._semaphore.run(self._probe_one, peer) for peer in self._registry.peers()]
        d: Deferred[None] = gatherResults(probes, consumeErrors=True).addBoth(self._round_done)
        self._round = d if not d.called else None
        return d

    def _round_done(self, _result: object) -> None:
        self._round = None
        self._registry.expire()

    def _probe_one(self, peer: Peer) -> Deferred[None]:
        return Deferred.fromCoroutine(self._probe(peer))

    async def _probe(self, peer: Peer) -> None:
        try:
            probe = await self._client.check(peer)
        except PeerError as e:
            self._registry.record_failure(peer, e.kind)
            return
        self._registry.record_success(peer, probe.latency)
        self._registry.record_serving(peer, probe.serving)
