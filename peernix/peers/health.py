"""
Periodic health checks of every known peer.

A :class:`HealthChecker` probes each peer's ``nix-cache-info`` every
``interval`` seconds, records latency or failure in the registry (which
drives backoff and scores), then drops expired discovered peers.

Recovery: a peer known to be down (its health probe failed in a round and
it has not answered since) is skipped by fan-outs while its backoff runs
(up to a minute), and a full round comes only every ``interval``.  So such
peers alone are also probed every ``recovery_interval`` seconds (half a
second by default), at most one probe per peer in flight: a static peer
that comes back is asked again within about a second of answering, not at
the next round or the end of its backoff.  These probes are cheap (one
small GET on the persistent pool, refused at once by a host that is up
without its daemon) and their failures are not recorded again (the peer
is already known to be down; the rounds keep counting); a success is
recorded, which ends the liveness backoff.  A peer that answers its
health probe but fails fan-out requests (slow narinfos) is not "down" and
is not probed more often than before.

The probe's answer also says whether the peer serves peers (a
``--serve-peers no`` node says so in it, so static peers learn it too).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from peernix.interfaces import IPeerRegistry
from peernix.peers.client import PeerClient
from peernix.peers.errors import PeerError
from peernix.peers.peer import Peer

log = Logger()


class HealthChecker(Service):
    """
    :param registry: the peer table to probe and update.
    :param client: sends the probes (each bounded by the client's timeout).
    :param clock: drives the ``LoopingCall``.
    :param interval: seconds between rounds; a round still running when the
        next is due delays it (``LoopingCall`` waits for the Deferred).
    :param concurrency: at most this many probes in flight at once (in
        rounds; and, separately, in recovery probes).
    :param recovery_interval: seconds between recovery probes of a peer
        known to be down (see the module docstring).
    :param recovery_timeout: the longest a recovery probe may take (at most
        the client's own timeout applies too); one cut short is started
        afresh at the next tick, so a connection attempt made while the
        peer was unreachable does not hold up the first one after it is
        back.
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
        recovery_interval: float = 0.5,
        recovery_timeout: float = 1.0,
    ) -> None:
        self._registry = registry
        self._client = client
        self._clock = clock
        self._interval = interval
        self._concurrency = max(1, concurrency)
        self._semaphore = DeferredSemaphore(self._concurrency)
        self._recovery_interval = recovery_interval
        self._recovery_timeout = recovery_timeout
        self._loop: LoopingCall | None = None
        self._recovery_loop: LoopingCall | None = None
        self._round: Deferred[None] | None = None
        #: Recovery probes in flight, by peer (identity).
        self._recovering: dict[Peer, Deferred[None]] = {}
        #: Peers whose round probe failed and that have not answered since.
        self._down: set[Peer] = set()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = self._clock
        # Stopped in stopService; the loop's errback only logs (check_all
        # never fails), so the loop cannot die silently.
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("peer health loop failed", f)
        )
        self._recovery_loop = LoopingCall(self.probe_down_peers)
        self._recovery_loop.clock = self._clock
        # Stopped in stopService; probe_down_peers never raises.
        self._recovery_loop.start(self._recovery_interval, now=False).addErrback(
            lambda f: log.failure("peer recovery loop failed", f)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._recovery_loop is not None and self._recovery_loop.running:
            self._recovery_loop.stop()
        self._recovery_loop = None
        if self._round is not None:
            # Cancels every probe still in flight (and their timers).
            self._round.cancel()
        for d in list(self._recovering.values()):
            d.cancel()
        self._recovering.clear()
        self._down.clear()
        return None

    def probe_down_peers(self) -> None:
        """
        Start a recovery probe of every peer known to be down that has none
        in flight (at most ``concurrency`` in flight in all).  Never raises.
        """
        peers = self._registry.peers()
        # Forget peers the registry dropped, and those that answered since.
        self._down &= {p for p in peers if p.consecutive_failures > 0}
        for peer in peers:
            if len(self._recovering) >= self._concurrency:
                break
            if peer not in self._down or peer in self._recovering:
                continue
            d = Deferred.fromCoroutine(self._recover(peer))
            if not d.called:
                self._recovering[peer] = d
            d.addBoth(self._recovered, peer)

    def _recovered(self, result: object, peer: Peer) -> None:
        self._recovering.pop(peer, None)
        if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
            log.failure("recovery probe of {url} failed", result, url=peer.url)

    async def _recover(self, peer: Peer) -> None:
        check = self._client.check(peer)
        # Cancels the probe (and its connection attempt) at the deadline.
        check.addTimeout(self._recovery_timeout, self._clock)
        try:
            probe = await check
        except (PeerError, TimeoutError):
            # Still down: already recorded; the next round records again.
            return
        self._down.discard(peer)
        log.info("peer {url} answers again", url=peer.url)
        self._registry.record_success(peer, probe.latency)
        self._registry.record_serving(peer, probe.serving)

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
            self._down.add(peer)
            return
        self._down.discard(peer)
        self._registry.record_success(peer, probe.latency)
        self._registry.record_serving(peer, probe.serving)
