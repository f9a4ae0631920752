"""
The local Nix's upstream: first *trusted* answer across all peers.

:class:`Fanout` implements :class:`~peernix.interfaces.IUpstream`:

- ``lookup``: positive cache, negative cache, then one coalesced fan-out per
  hash part: every healthy peer that may hold the path (:meth:`Fanout.candidates`:
  its store digest may contain the hash part, or it publishes no digest)
  is asked at once and the first answer that
  parses, names exactly the asked path and is trusted wins (``race`` cancels
  the rest).  Answers failing the filter are counted against their peer and
  ignored while the others continue, so a fast liar cannot starve honest
  peers.  Winners' references are prefetched in the background, and so is
  a small NAR whose narinfo a client was just given (:mod:`peernix.peers.prefetch`).
- ``relay_nar``: streams the NAR from a peer known to hold exactly the
  NarHash (see :mod:`peernix.peers.relay`), trying the next peer when one
  fails before any byte reached the client.

Every request to a peer (narinfo fan-out, prefetch, offers and NAR opens)
takes a slot of :class:`PeerSlots` first: at most ``per_peer_concurrency``
requests in flight to one peer and ``total_concurrency`` to all, the rest
queued.  A lookup waiting for a slot still ends at its ``lookup_timeout``.
A peer that went into backoff while a request waited (its other answers
were bad, or it failed) is skipped when the slot comes, so a peer flooding
us with bad answers is asked less and less: the registry's backoff grows
exponentially with every bad answer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from attrs import frozen
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, FailureGroup, TimeoutError, race, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.interfaces import IPeerDigests, IPeerRegistry, IUpstream
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo
from peernix.nix.storepath import StorePathError, is_hash_part, parse_store_path
from peernix.peers.client import PeerClient
from peernix.peers.errors import NarClientGone, NarRelayInterrupted, NarUnavailable, NarVerificationFailed, PeerError
from peernix.peers.linkspeed import LinkSpeeds
from peernix.peers.metrics import PeerMetrics
from peernix.peers.prefetch import NarPrefetch
from peernix.peers.registry import Peer
from peernix.peers.relay import HOLD_BACK_BYTES, SUPPORTED_COMPRESSIONS, NarRelay
from peernix.peers.trust import TrustPolicy
from peernix.sources import Found, peer_source

log = Logger()


@frozen
class PeerOffer:
    """What one peer said it has: a path with a NarHash, at a URL, compressed so."""

    peer_url: str
    nar_hash: Hash
    url: str
    compression: str


class _Rejected(Exception):
    """A peer's answer did not qualify (absent, lying or untrusted)."""


class PeersBusy(Exception):
    """Too many requests are queued for peers already; this one was not queued."""


class PeerSlots:
    """
    Bounded concurrency of requests to peers: at most ``per_peer`` in flight
    to one peer and ``total`` to all of them; up to ``max_waiting`` more wait
    in a queue, served first come first served (a waiter for a peer at its
    own cap does not hold up waiters for other peers).

    :param per_peer: requests in flight to one peer at most (at least 1).
    :param total: requests in flight to all peers at most (at least 1).
    :param max_waiting: queued requests at most; past it :meth:`acquire`
        fails at once with :class:`PeersBusy`.
    """

    def __init__(self, per_peer: int = 16, total: int = 64, max_waiting: int = 4096) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError("per_peer and total must be at least 1")
        self.per_peer = per_peer
        self.total = total
        self.max_waiting = max_waiting
        self._in_flight: dict[str, int] = {}
        self._total_in_flight = 0
        self._waiting: deque[tuple[str, Deferred[None]]] = deque()

    def in_flight(self, key: str | None = None) -> int:
        """:returns: the slots held for peer ``key``, or for all peers when ``None``."""
        if key is None:
            return self._total_in_flight
        return self._in_flight.get(key, 0)

    @property
    def waiting(self) -> int:
        """:returns: how many requests wait for a slot."""
        return len(self._waiting)

    def _free(self, key: str) -> bool:
        return self._total_in_flight < self.total and self._in_flight.get(key, 0) < self.per_peer

    def _take(self, key: str) -> None:
        self._total_in_flight += 1
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def acquire(self, key: str) -> Deferred[None]:
        """
        Take a slot for a request to peer ``key``; give it back with
        :meth:`release` exactly once.

        :returns: a Deferred firing once the slot is taken (at once when
            one is free).  Cancelling it while it waits leaves the queue
            (no slot is taken); it fails with :class:`PeersBusy` when the
            queue is full.
        """
        if self._free(key):
            # Whoever waits is held by their own peer's cap (a free total
            # would have been handed to them already), so this does not
            # jump ahead of anyone who could run.
            self._take(key)
            return succeed(None)
        if len(self._waiting) >= self.max_waiting:
            busy: Deferred[None] = Deferred()
            busy.errback(PeersBusy(f"{len(self._waiting)} requests to peers queued already"))
            return busy

        def leave(d: Deferred[None]) -> None:
            # The waiter gave up (lookup deadline, client gone): no slot.
            try:
                self._waiting.remove((key, d))
            except ValueError:
                pass

        waiter: Deferred[None] = Deferred(leave)
        self._waiting.append((key, waiter))
        return waiter

    def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`acquire` and hand it to the first waiter that may have it."""
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        self._total_in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._total_in_flight < self.total:
            for index, (key, waiter) in enumerate(self._waiting):
                if self._in_flight.get(key, 0) < self.per_peer:
                    break
            else:
                return
            del self._waiting[index]
            self._take(key)
            # May run the waiter's request (and even a release) right here;
            # the loop re-reads the state afterwards.
            waiter.callback(None)


class _Shared:
    """One fan-out in flight and the callers waiting for it, each with its own Deferred."""

    def __init__(self) -> None:
        self.waiters: list[Deferred[Found | None]] = []
        self.done = False
        self.result: Found | None = None
        self.op: Deferred[None] | None = None

    def wait(self) -> Deferred[Found | None]:
        if self.done:
            return succeed(self.result)

        def cancel(d: Deferred[Found | None]) -> None:
            # Only this caller stops waiting; the shared fan-out runs on
            # (bounded by lookup_timeout) and its result fills the cache.
            if d in self.waiters:
                self.waiters.remove(d)

        d: Deferred[Found | None] = Deferred(cancel)
        self.waiters.append(d)
        return d

    def settle(self, result: Found | None) -> None:
        self.done = True
        self.result = result
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(result)


@implementer(IUpstream)
class Fanout:
    """
    :param registry: the peer table (healthy peers, failure accounting).
    :param client: HTTP to peers.
    :param trust: which narinfos may be passed on.
    :param clock: time source for caches and deadlines.
    :param negative_ttl: seconds a miss is remembered (dropped when a new
        peer appears).
    :param lookup_timeout: deadline of a whole fan-out; past it the lookup
        is a miss.
    :param prefetch_concurrency: at most this many background lookups of
        references at once.
    :param positive_ttl: seconds a won narinfo is served from memory.
    :param cache_size: entries kept in each of the positive, negative and
        offer caches (least recently used dropped first).
    :param prefetch_queue: references waiting for prefetch, at most.
    :param per_peer_concurrency: requests in flight to one peer at most
        (narinfos, offers, NAR opens; see :class:`PeerSlots`).
    :param total_concurrency: requests in flight to all peers at most.
    :param relay_hold_back: NARs up to this size are verified whole before
        the client gets a byte, so a bad peer is replaced by the next one
        without the client noticing (see :class:`NarRelay`).
    :param nar_silence_timeout: seconds a peer may stay silent mid-NAR
        (while the client is not the slow side).
    :param metrics_registry: where to register metrics (a private registry
        when ``None``; never the global one).
    :param digests: peers' store digests: only peers that may hold a path
        are asked for it (``None``: every healthy peer).  A newer digest
        that may hold a hash part clears its cached miss.
    :param nar_prefetch_max: the NAR of a path found for a caller of
        :meth:`find` (a local client's narinfo) is fetched into memory at
        once when its NarSize is at most this, so the client's NAR request
        that follows is answered without a second round trip (see
        :class:`~peernix.peers.prefetch.NarPrefetch`); ``0``: never.
    """

    def __init__(
        self,
        registry: IPeerRegistry,
        client: PeerClient,
        trust: TrustPolicy,
        clock: IReactorTime,
        *,
        negative_ttl: float = 10.0,
        lookup_timeout: float = 3.0,
        prefetch_concurrency: int = 4,
        positive_ttl: float = 60.0,
        cache_size: int = 4096,
        prefetch_queue: int = 256,
        per_peer_concurrency: int = 16,
        total_concurrency: int = 64,
        nar_silence_timeout: float = 30.0,
        relay_hold_back: int = HOLD_BACK_BYTES,
        metrics_registry: CollectorRegistry | None = None,
        digests: IPeerDigests | None = None,
        link_speeds: LinkSpeeds | None = None,
        nar_prefetch_max: int = 0,
    ) -> None:
        self._registry = registry
        self._digests = digests
        self._client = client
        self._trust = trust
        self._clock = clock
        self._negative_ttl = negative_ttl
        self._lookup_timeout = lookup_timeout
        self._prefetch_concurrency = max(0, prefetch_concurrency)
        self._positive_ttl = positive_ttl
        self._cache_size = cache_size
        self._prefetch_queue_max = prefetch_queue
        self._nar_silence_timeout = nar_silence_timeout
        self._relay_hold_back = relay_hold_back
        #: Chooses raw or zstd NARs per peer from measured throughput
        #: (``None``: the client's default, zstd unless on loopback).
        self.link_speeds = link_speeds
        self.metrics = PeerMetrics(metrics_registry, lambda: len(registry.peers()))
        self._positive: OrderedDict[str, tuple[Found, float]] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._offers: OrderedDict[str, dict[str, PeerOffer]] = OrderedDict()
        self._inflight: dict[str, _Shared] = {}
        self._prefetch_waiting: deque[str] = deque()
        self._prefetch_running = 0
        self.slots = PeerSlots(per_peer_concurrency, total_concurrency)
        self.nar_prefetch: NarPrefetch | None = None
        if nar_prefetch_max > 0:
            self.nar_prefetch = NarPrefetch(
                self._fetch_nar, clock, self.metrics.nar_prefetches, max_size=nar_prefetch_max
            )
        registry.subscribe(self._on_new_peer)
        if digests is not None:
            digests.subscribe(self._on_new_digest)

    # -- caches ----------------------------------------------------------

    def _on_new_peer(self, peer: Peer) -> None:
        # A new peer may have what everybody else lacked.
        self._negative.clear()

    def _on_new_digest(self, peer: Peer, contains: Callable[[str], bool]) -> None:
        # The peer's store grew (or we learnt it for the first time): a miss
        # cached for a path it now may hold must not hide it until the
        # negative TTL passes.
        for hash_part in [h for h in self._negative if contains(h)]:
            del self._negative[hash_part]

    def candidates(self, hash_part: str) -> list[Peer]:
        """
        :returns: the peers to ask for ``hash_part``, best first: healthy
            peers whose digest may hold it, and healthy peers without a
            digest.  Empty when no peer may have it (then no request is made).
        """
        peers = self._registry.healthy_peers()
        if self._digests is None or not peers:
            return peers
        return self._digests.candidates(peers, hash_part)

    def _cached(self, hash_part: str) -> tuple[bool, Found | None]:
        """:returns: ``(True, answer)`` when the caches know the answer."""
        now = self._clock.seconds()
        hit = self._positive.get(hash_part)
        if hit is not None:
            if hit[1] > now:
                self._positive.move_to_end(hash_part)
                return True, hit[0]
            del self._positive[hash_part]
        expiry = self._negative.get(hash_part)
        if expiry is not None:
            if expiry > now:
                return True, None
            del self._negative[hash_part]
        return False, None

    def _store(self, hash_part: str, info: Found | None) -> None:
        now = self._clock.seconds()
        if info is None:
            self._negative[hash_part] = now + self._negative_ttl
            self._negative.move_to_end(hash_part)
            _trim(self._negative, self._cache_size)
        else:
            self._negative.pop(hash_part, None)
            self._positive[hash_part] = (info, now + self._positive_ttl)
            self._positive.move_to_end(hash_part)
            _trim(self._positive, self._cache_size)

    def _remember_offer(self, hash_part: str, peer: Peer, info: NarInfo) -> None:
        offers = self._offers.setdefault(hash_part, {})
        offers[peer.url] = PeerOffer(peer.url, info.nar_hash, info.url, info.compression)
        self._offers.move_to_end(hash_part)
        _trim(self._offers, self._cache_size)

    def _forget_offer(self, hash_part: str, peer: Peer) -> None:
        offers = self._offers.get(hash_part)
        if offers is not None:
            offers.pop(peer.url, None)

    # -- lookup ----------------------------------------------------------

    def lookup(self, hash_part: str) -> Deferred[NarInfo | None]:
        """See :meth:`IUpstream.lookup`.  An invalid hash part is a miss."""
        # Cancelling the returned Deferred cancels find()'s: it is the same one.
        return self.find(hash_part).addCallback(_info_of)

    def find(self, hash_part: str) -> Deferred[Found | None]:
        """
        See :meth:`IUpstream.find`.  An invalid hash part is a miss.  A
        found path's NAR is prefetched when it is small (``nar_prefetch_max``):
        the caller is a local client's narinfo request, and its NAR request
        comes next.
        """
        d = self._find(hash_part)
        if self.nar_prefetch is not None:
            d.addCallback(self._expect_nar, hash_part)
        return d

    def _expect_nar(self, found: Found | None, hash_part: str) -> Found | None:
        if found is not None and self.nar_prefetch is not None:
            self.nar_prefetch.expect(hash_part, found.info)
        return found

    def _find(self, hash_part: str) -> Deferred[Found | None]:
        """:meth:`find` without prefetching the NAR (lookups of references)."""
        if not isinstance(hash_part, str) or not is_hash_part(hash_part):
            return succeed(None)
        known, answer = self._cached(hash_part)
        if known:
            return succeed(answer)
        shared = self._inflight.get(hash_part)
        if shared is None:
            shared = _Shared()
            self._inflight[hash_part] = shared
            # Runs to completion (bounded by lookup_timeout) even when every
            # waiter went away, so its answer fills the cache; only close()
            # cancels it.
            op = Deferred.fromCoroutine(self._fan_out(hash_part))
            op.addErrback(self._fan_out_failed, hash_part)
            shared.op = op.addCallback(self._settle, hash_part, shared)
        return shared.wait()

    def close(self) -> None:
        """
        Cancel every fan-out in flight (their waiters get a miss) and drop
        queued prefetches.  For service shutdown: afterwards no request or
        timer of this object is left.
        """
        self._prefetch_waiting.clear()
        if self.nar_prefetch is not None:
            self.nar_prefetch.close()
        for shared in list(self._inflight.values()):
            if shared.op is not None:
                shared.op.cancel()

    def _fan_out_failed(self, failure: Failure, hash_part: str) -> None:
        # _fan_out catches everything it expects; anything else is a bug,
        # which must still end as a miss for the client (never a 5xx).
        if not isinstance(failure.value, CancelledError):
            log.failure("fan-out for {hash_part} failed", failure, hash_part=hash_part)
        return None

    def _settle(self, result: Found | None, hash_part: str, shared: _Shared) -> None:
        if self._inflight.get(hash_part) is shared:
            del self._inflight[hash_part]
        self._store(hash_part, result)
        shared.settle(result)
        if result is not None:
            self._schedule_prefetch(result.info)

    async def _fan_out(self, hash_part: str) -> Found | None:
        peers = self.candidates(hash_part)
        if not peers:
            # race() never fires on an empty list.
            self.metrics.fanout_misses.inc()
            return None
        start = self._clock.seconds()
        attempts = [Deferred.fromCoroutine(self._ask(peer, hash_part)) for peer in peers]
        raced = race(attempts)
        # On the deadline addTimeout cancels the race, which cancels every
        # attempt (and so every peer request); it cancels its own timer when
        # the race ends first.
        raced.addTimeout(self._lookup_timeout, self._clock)
        try:
            _index, (peer, info) = await raced
        except (FailureGroup, TimeoutError):
            self.metrics.fanout_misses.inc()
            return None
        finally:
            self.metrics.fanout_seconds.observe(self._clock.seconds() - start)
        self.metrics.peer_hits.inc()
        log.debug("{hash_part} found on {peer}", hash_part=hash_part, peer=peer.url)
        return Found(info, peer_source(peer.url))

    # -- slots ---------------------------------------------------------

    async def _slot(self, peer: Peer, *, skip_backed_off: bool = True) -> None:
        """
        Wait for a slot for a request to ``peer`` (release it with
        ``self.slots.release(peer.url)``), at most ``lookup_timeout``.

        :param skip_backed_off: give up when the peer is in backoff once the
            slot comes (lookups; a NAR relay still asks the peer that
            offered the NAR, which may be its only holder).
        :raises _Rejected: when the queue is full, the wait timed out, or
            the peer is backed off (no slot is held then).
        """
        d = self.slots.acquire(peer.url)
        if not d.called:
            # Cancels the wait (leaving the queue) at the deadline; the
            # timer is cancelled when the slot comes first.
            d.addTimeout(self._lookup_timeout, self._clock)
        try:
            await d
        except (PeersBusy, TimeoutError) as e:
            raise _Rejected(f"no slot for a request to {peer.url}: {e}") from None
        if skip_backed_off and peer.backoff_until > self._clock.seconds():
            # It failed or lied while we waited: spare it (and us) the request.
            self.slots.release(peer.url)
            raise _Rejected(f"{peer.url} is backed off")

    # -- asking one peer -------------------------------------------------

    async def _ask(self, peer: Peer, hash_part: str) -> tuple[Peer, NarInfo]:
        """
        Ask one peer.  :returns: the peer and its narinfo when it qualifies.
        :raises _Rejected: or :class:`PeerError` otherwise (race keeps
            waiting for the others).
        """
        await self._slot(peer)
        try:
            return await self._judge(peer, hash_part)
        finally:
            # Released only once the answer was judged, so a request queued
            # for this peer sees the backoff a bad answer just caused.
            self.slots.release(peer.url)

    async def _judge(self, peer: Peer, hash_part: str) -> tuple[Peer, NarInfo]:
        """Ask ``peer`` (holding a slot) and judge its answer; see :meth:`_ask`."""
        start = self._clock.seconds()
        try:
            info = await self._fetch_narinfo(peer, hash_part)
        except PeerError as e:
            self._registry.record_failure(peer, e.kind)
            self.metrics.peer_requests.labels(e.kind).inc()
            raise
        latency = self._clock.seconds() - start
        if info is None:
            self._registry.record_success(peer, latency)
            self.metrics.peer_requests.labels("miss").inc()
            if self._digests is not None:
                self._digests.record_miss(peer, hash_part)
            raise _Rejected("not found")
        reason = self._disqualify(info, hash_part)
        if reason is not None:
            log.info(
                "ignoring {peer}'s narinfo for {hash_part}: {reason}",
                peer=peer.url,
                hash_part=hash_part,
                reason=reason,
            )
            self._registry.record_failure(peer, "untrusted")
            self.metrics.peer_requests.labels("untrusted").inc()
            raise _Rejected(reason)
        self._registry.record_success(peer, latency)
        self.metrics.peer_requests.labels("hit").inc()
        self._remember_offer(hash_part, peer, info)
        return peer, info

    def _disqualify(self, info: NarInfo, hash_part: str) -> str | None:
        """:returns: why ``info`` may not answer a lookup of ``hash_part``, or ``None``."""
        try:
            path = parse_store_path(info.store_path)
        except StorePathError:
            return "invalid StorePath"
        if path.hash_part != hash_part:
            return f"asked for {hash_part} but got {info.store_path}"
        if not self._trust.is_trusted(info):
            return "no signature by a trusted key and no valid CA"
        return None

    # -- prefetch --------------------------------------------------------

    def _schedule_prefetch(self, info: NarInfo) -> None:
        own = info.store_path.rsplit("/", 1)[-1]
        for ref in info.references:
            if ref == own:
                continue
            hash_part = ref[:32]
            if (
                not is_hash_part(hash_part)
                or hash_part in self._inflight
                or hash_part in self._prefetch_waiting
                or self._cached(hash_part)[0]
            ):
                continue
            if len(self._prefetch_waiting) >= self._prefetch_queue_max:
                break
            self._prefetch_waiting.append(hash_part)
        self._pump_prefetch()

    def _pump_prefetch(self) -> None:
        while self._prefetch_waiting and self._prefetch_running < self._prefetch_concurrency:
            hash_part = self._prefetch_waiting.popleft()
            if hash_part in self._inflight or self._cached(hash_part)[0]:
                continue
            self._prefetch_running += 1
            self._find(hash_part).addBoth(self._prefetch_done)

    def _prefetch_done(self, _result: object) -> None:
        self._prefetch_running -= 1
        self._pump_prefetch()

    # -- NAR relay -------------------------------------------------------

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """
        See :meth:`IUpstream.relay_nar`.  ``consumer`` must provide
        ``IConsumer``; ``on_peer``, when not ``None``, be callable.
        """
        if on_peer is not None and not callable(on_peer):
            raise TypeError("on_peer must be callable")
        return Deferred.fromCoroutine(self._relay(info, IConsumer(consumer), on_peer))

    async def _relay(self, info: NarInfo, consumer: IConsumer, on_peer: Callable[[str], object] | None) -> None:
        try:
            hash_part = parse_store_path(info.store_path).hash_part
        except StorePathError:
            raise NarUnavailable(f"invalid store path {info.store_path!r}") from None
        if self.nar_prefetch is not None:
            prefetched = await self.nar_prefetch.take(hash_part, info)
            if prefetched is not None:
                nar, peer_url = prefetched
                if on_peer is not None and peer_url is not None:
                    on_peer(peer_url)
                consumer.write(nar)
                return
        await self._relay_from_peers(hash_part, info, consumer, on_peer)

    def _fetch_nar(self, info: NarInfo, consumer: IConsumer, on_peer: Callable[[str], object]) -> Deferred[None]:
        """Relay ``info``'s NAR from the peers into ``consumer`` (the prefetcher's download)."""
        hash_part = parse_store_path(info.store_path).hash_part
        return Deferred.fromCoroutine(self._relay_from_peers(hash_part, info, consumer, on_peer))

    async def _relay_from_peers(
        self, hash_part: str, info: NarInfo, consumer: IConsumer, on_peer: Callable[[str], object] | None
    ) -> None:
        tried: set[str] = set()
        known = [
            (peer, offer)
            for offer in self._offers.get(hash_part, {}).values()
            if offer.nar_hash == info.nar_hash
            for peer in [self._peer(offer.peer_url)]
            if peer is not None and peer.serving
        ]
        known.sort(key=lambda po: -po[0].score)
        for peer, offer in known:
            if await self._try_relay(peer, offer, info, consumer, tried, on_peer):
                return
        for peer, offer in await self._find_offers(hash_part, info, tried):
            if await self._try_relay(peer, offer, info, consumer, tried, on_peer):
                return
        raise NarUnavailable(f"no peer could send the NAR of {info.store_path}")

    def _fetch_narinfo(self, peer: Peer, hash_part: str) -> Deferred[NarInfo | None]:
        """Ask ``peer`` for a narinfo, for a raw or zstd NAR as :attr:`link_speeds` chooses."""
        if self.link_speeds is None:
            return self._client.fetch_narinfo(peer, hash_part)
        return self._client.fetch_narinfo(peer, hash_part, prefer_zstd=self.link_speeds.prefer_zstd(peer))

    def _peer(self, url: str) -> Peer | None:
        for peer in self._registry.peers():
            if peer.url == url:
                return peer
        return None

    async def _find_offers(self, hash_part: str, info: NarInfo, tried: set[str]) -> list[tuple[Peer, PeerOffer]]:
        """Ask every healthy untried peer at once whether it has exactly ``info.nar_hash``."""
        candidates = [p for p in self.candidates(hash_part) if p.url not in tried]
        pending = [Deferred.fromCoroutine(self._offer_from(peer, hash_part, info)) for peer in candidates]
        found: list[tuple[Peer, PeerOffer]] = []
        try:
            for d in pending:
                offer = await d
                if offer is not None:
                    found.append(offer)
        finally:
            # Cancelled while waiting: stop the remaining requests too.
            for d in pending:
                d.cancel()
        # zstd between peernix nodes first, then the best-scored peer.
        found.sort(key=lambda po: (po[1].compression != "zstd", -po[0].score))
        return found

    async def _offer_from(self, peer: Peer, hash_part: str, info: NarInfo) -> tuple[Peer, PeerOffer] | None:
        try:
            await self._slot(peer)
        except _Rejected:
            return None
        try:
            theirs = await self._fetch_narinfo(peer, hash_part)
        except PeerError as e:
            self._registry.record_failure(peer, e.kind)
            return None
        finally:
            self.slots.release(peer.url)
        # Trust comes from ``info`` (already checked) and the NAR is verified
        # against it, so the peer's narinfo only has to name the same content.
        if theirs is None or theirs.store_path != info.store_path or theirs.nar_hash != info.nar_hash:
            return None
        self._remember_offer(hash_part, peer, theirs)
        return peer, PeerOffer(peer.url, theirs.nar_hash, theirs.url, theirs.compression)

    async def _try_relay(
        self,
        peer: Peer,
        offer: PeerOffer,
        info: NarInfo,
        consumer: IConsumer,
        tried: set[str],
        on_peer: Callable[[str], object] | None = None,
    ) -> bool:
        """
        :returns: ``True`` when the NAR was relayed and verified; ``False``
            when this peer failed before any byte reached the client.
        :raises NarVerificationFailed: or :class:`NarRelayInterrupted` when
            bytes were written already (or the client went away).
        """
        if peer.url in tried:
            return False
        tried.add(peer.url)
        if offer.compression not in SUPPORTED_COMPRESSIONS:
            return False
        try:
            await self._slot(peer, skip_backed_off=False)
        except _Rejected:
            return False
        start = self._clock.seconds()
        try:
            # The slot covers the open (up to the response headers); the
            # body's pace is the client's, bounded by the relay's timers.
            response = await self._client.open_nar(peer, offer.url)
        except PeerError as e:
            self._registry.record_failure(peer, e.kind)
            return False
        finally:
            self.slots.release(peer.url)
        self._registry.record_success(peer, self._clock.seconds() - start)
        relay = NarRelay(
            consumer,
            info.nar_hash,
            info.nar_size,
            offer.compression,
            self._clock,
            silence=self._nar_silence_timeout,
            hold_back=self._relay_hold_back,
            on_bytes=self.metrics.proxied_bytes.inc,
        )
        if on_peer is not None:
            # Before deliverBody: no byte of this peer's NAR is written yet.
            on_peer(peer.url)
        response.deliverBody(relay)  # type: ignore[no-untyped-call]
        hash_part = info.store_path.rsplit("/", 1)[-1][:32]
        try:
            await relay.done
        except NarClientGone:
            # The client left: nothing to hold against the peer, and the web
            # layer logs the one line this deserves.
            raise
        except (NarVerificationFailed, NarRelayInterrupted) as e:
            log.warn("relaying {path} from {peer} failed: {error}", path=info.store_path, peer=peer.url, error=str(e))
            if relay.failure_kind is not None:
                self._registry.record_failure(peer, relay.failure_kind)
            if relay.failure_kind == "verification":
                self.metrics.verification_failures.inc()
                self._forget_offer(hash_part, peer)
            if relay.wrote_any or relay.failure_kind is None:
                raise
            return False
        if self.link_speeds is not None:
            self.link_speeds.record(peer.url, info.nar_size, self._clock.seconds() - start,
                                    offer.compression == "zstd")
        return True


def _info_of(found: Found | None) -> NarInfo | None:
    return None if found is None else found.info


def _trim(cache: OrderedDict[str, Any], size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)

