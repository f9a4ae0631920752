"""
UDP discovery and queries, wire-compatible with the Go predecessor.

:class:`DiscoveryProtocol` translates datagrams (:mod:`.datagrams`) into
registry updates and store lookups; :class:`UdpDiscoveryService` listens,
broadcasts our announce on a schedule, and stops everything cleanly.

Loops: an announce we send as an answer carries ``"reply": true`` and is
never answered.  We answer one source (address and node id) at most once per
``answer_holdoff`` seconds, which also collapses the copies of one broadcast
that arrive through the directed and the limited broadcast address.

Announces of the Go predecessor (zw3rk/peernix; recognised by having no
``node_id``) are never answered.  Read from its ``main.go`` (commit
e74df7c): it broadcasts its announce from a fresh socket *connected* to
``255.255.255.255:9999``, so the kernel drops every unicast answer to it; and
it sends from port 9999 only in answer to a datagram it received there, i.e.
to our broadcast, whose every field (``public_key``, ``platform``,
``features``, ...) it has just recorded.  Its server overwrites *every*
field of a known peer with each announce it receives and answers each one,
so an answer from us could at best repeat that record and at worst replace
it with whatever fits under the amplification bound below (its announces
are 150-250 bytes, often shorter than our full answer), and would start
another round of the exchange.  A Go
node therefore learns of us, with all our fields, from our broadcasts (at
start-up, 2.5 s later and every ``announce_interval``) and from our mDNS
TXT records; we learn of it from its broadcasts and its answers.

No amplification: no datagram we send in answer is longer than the datagram
that caused it (the source address of a UDP request may be spoofed, and an
answer must not let anyone multiply traffic towards a victim).  ``pong`` and
query answers are shorter than any request of their kind.  An announce is
answered with the most informative of our announce's forms that fits
(:meth:`DiscoveryProtocol.reply_for`): the full one, signed when we have a
key; a compact one that keeps only what a receiver needs to add us
(``peernix_version``, ``port``, ``reply``; and ``public_key``, ``ts``,
``sig`` when signed); the same unsigned.  When even the compact form is
longer than the announce, we do not answer at all.  The trade-off: a node
whose announce is tiny (shorter than about 70 bytes) learns of us from our
next periodic broadcast instead of at once.  A peernix node loses nothing
by a compact answer: the registry never clears a known key for an announce
without one.  (Go nodes, which would, get no answer at all: see above.)

Everything is rate-limited per source address (every datagram, and
announces) and in total (announces, replies of every kind, signature
checks); store lookups in flight are bounded.

Signed announces (:mod:`.signed`): with a secret key, everything we
announce is signed with a fresh ``ts``; a received announce that verifies
against a trusted key marks its peer verified in the registry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import attrs

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from peernix.discovery.addresses import ipv4_broadcast_addresses, peer_url
from peernix.discovery.datagrams import (
    MAX_DATAGRAM,
    GO_MAX_DATAGRAM,
    Announce,
    Answer,
    DatagramError,
    HasPathQuery,
    HasPathWithNarHashQuery,
    Ping,
    Pong,
    Query,
    QueryAnswer,
    parse_datagram,
    render_datagram,
    sign_announce,
)
from peernix.discovery.digesttag import MAX_DIGEST_TAG, DigestHooks
from peernix.discovery.nodeinfo import NodeInfo
from peernix.discovery.ratelimit import KeyedRateLimiter
from peernix.discovery.signed import REPLAY_WINDOW, AnnounceKeys, AnnounceVerifier, Verdict
from peernix.interfaces import IDiscovery, IPeerRegistry, IStore

#: The registry source name of UDP discovery.
SOURCE = "udp"

Address = tuple[str, int]


@frozen
class UdpLimits:
    """
    Bounds on what hostile or chatty senders can make us do.

    :ivar datagram_rate: datagrams per second accepted per source address.
    :ivar datagram_burst: burst of datagrams accepted per source address.
    :ivar announce_rate: announces per second accepted per source address.
    :ivar announce_burst: burst of announces per source address.
    :ivar total_announce_rate: announces per second accepted in total (a
        flood from many spoofed addresses cannot churn the registry faster).
    :ivar total_announce_burst: burst of announces in total.
    :ivar reply_rate: pongs and store lookups (query answers) per second in
        total.
    :ivar reply_burst: burst of pongs and store lookups in total.
    :ivar verify_rate: signature checks per second in total.
    :ivar verify_burst: burst of signature checks in total.
    :ivar replay_window: accepted ``|now - ts|`` of a signed announce, seconds.
    :ivar answer_rate: announce answers per second we send in total.
    :ivar answer_burst: burst of announce answers in total.
    :ivar answer_holdoff: seconds during which one source (address and node
        id) is not answered again.
    :ivar max_pending_queries: store lookups in flight at most; more queries
        are dropped.
    :ivar query_timeout: seconds a store lookup may take before the query is
        dropped unanswered.
    :ivar max_sources: source addresses remembered by the rate limiters.
    """

    datagram_rate: float = 200.0
    datagram_burst: float = 400.0
    announce_rate: float = 0.5
    announce_burst: float = 10.0
    total_announce_rate: float = 50.0
    total_announce_burst: float = 200.0
    reply_rate: float = 200.0
    reply_burst: float = 400.0
    verify_rate: float = 20.0
    verify_burst: float = 50.0
    replay_window: float = REPLAY_WINDOW
    answer_rate: float = 20.0
    answer_burst: float = 50.0
    answer_holdoff: float = 2.0
    max_pending_queries: int = 64
    query_timeout: float = 2.0
    max_sources: int = 1024


class UdpMetrics:
    """Prometheus counters of UDP discovery, in the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "peernix_udp_datagrams_received",
            "UDP datagrams received and parsed, by kind",
            ["kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "peernix_udp_datagrams_dropped",
            "UDP datagrams dropped, by reason",
            ["reason"],
            registry=registry,
        )
        self.answers = Counter(
            "peernix_udp_query_answers",
            "has_path queries answered, by answer",
            ["answer"],
            registry=registry,
        )
        self.sent = Counter(
            "peernix_udp_datagrams_sent",
            "UDP datagrams sent, by kind",
            ["kind"],
            registry=registry,
        )
        self.send_errors = Counter(
            "peernix_udp_send_errors", "UDP datagrams that could not be sent", registry=registry
        )
        self.signatures = Counter(
            "peernix_udp_announce_signatures",
            "Announces by what their signature says (unsigned, verified, stale, bad_signature, ...)",
            ["result"],
            registry=registry,
        )


def _kind(datagram: object) -> str:
    return {
        Announce: "announce",
        Ping: "ping",
        Pong: "pong",
        HasPathQuery: "has_path",
        HasPathWithNarHashQuery: "has_path_with_narhash",
        QueryAnswer: "answer",
    }.get(type(datagram), "other")


class DiscoveryProtocol(DatagramProtocol):
    """
    Answers announces, pings and queries; feeds the registry.

    Store lookups run through ``store.query_path_info`` (a Deferred), so the
    reactor never waits on the store.  :meth:`stop` cancels those in flight.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: IPeerRegistry,
        store: IStore,
        node: NodeInfo,
        http_port: int,
        metrics: UdpMetrics,
        limits: UdpLimits = UdpLimits(),
        keys: AnnounceKeys = AnnounceKeys(),
        digest: DigestHooks | None = None,
        on_fetch_offer: Callable[[str, str | None, bool], None] | None = None,
    ) -> None:
        """
        :param on_fetch_offer: told ``(peer URL, node id, fetch_for_lan)``
            of every full announce (one with a ``node_id``; compact replies
            say nothing about fetching), for the fetcher table.
        :param clock: time for rate limits, query timeouts and the ``ts`` of
            signed announces (the reactor: wall-clock seconds).
        :param registry: where discovered peers go (source ``"udp"``).
        :param store: the local store that answers queries.
        :param node: our self-description.
        :param http_port: our HTTP port (announced); also the port assumed for
            an announce without one (the Go predecessor assumes every node
            uses its own port).
        :param metrics: counters to update.
        :param limits: rate and size bounds.
        :param keys: our secret key (announces are signed when set; the
            announced ``public_key`` is then its public key, whatever
            ``node`` says) and the trusted keys that verify others.
        :param digest: our digest's version for our announces (full forms
            only), and where others' announced versions go; ``None``: no
            ``digest`` field either way.
        :raises DatagramError: if our announce would be too large for Go.
        """
        self._clock = clock
        self._digest = digest
        self._rendered_tag: str | None = None
        self._registry = registry
        self._store = store
        self._node = node
        self._http_port = http_port
        self._metrics = metrics
        self._limits = limits
        self._secret_key = keys.secret_key
        self._on_fetch_offer = on_fetch_offer
        self._datagram_limiter = KeyedRateLimiter(
            clock, limits.datagram_rate, limits.datagram_burst, limits.max_sources
        )
        self._announce_limiter = KeyedRateLimiter(
            clock, limits.announce_rate, limits.announce_burst, limits.max_sources
        )
        self._total_announce_limiter = KeyedRateLimiter(clock, limits.total_announce_rate, limits.total_announce_burst, 1)
        self._reply_limiter = KeyedRateLimiter(clock, limits.reply_rate, limits.reply_burst, 1)
        self._answer_limiter = KeyedRateLimiter(clock, limits.answer_rate, limits.answer_burst, 1)
        self._verifier = AnnounceVerifier(
            clock,
            keys.trusted,
            window=limits.replay_window,
            budget=KeyedRateLimiter(clock, limits.verify_rate, limits.verify_burst, 1),
        )
        self._answered: OrderedDict[tuple[str, str | None], float] = OrderedDict()
        self._pending: set[Deferred[None]] = set()
        public_key = keys.secret_key.public_key.to_string() if keys.secret_key is not None else node.public_key
        full = Announce(
            peernix_version=node.peernix_version,
            nix_version=node.nix_version,
            platform=node.platform,
            features=node.features,
            public_key=public_key,
            port=http_port,
            node_id=node.node_id,
            fetch_for_lan=node.fetch_for_lan,
            serve_peers=node.serve_peers,
            max_upload_rate=node.max_upload_rate,
        )
        full_reply = attrs.evolve(full, reply=True)
        # Only what a receiver needs to add us: where (port), that it is a
        # reply (never answered), and the key a signature is checked with.
        compact = Announce(peernix_version=node.peernix_version, public_key=public_key, port=http_port, reply=True,
                           serve_peers=node.serve_peers)
        compact_unsigned = attrs.evolve(compact, public_key="")
        self._broadcast_form = full
        # Most informative first; reply_for() sends the first that fits.
        if keys.secret_key is not None:
            self._reply_forms: list[tuple[Announce, bool]] = [
                (full_reply, True),
                (compact, True),
                (full_reply, False),
                (compact_unsigned, False),
            ]
        else:
            self._reply_forms = [(full_reply, False), (compact_unsigned, False)]
        #: Forms that carry our digest's version (the compact ones stay small).
        self._with_digest = {-1} | {i for i, (form, _) in enumerate(self._reply_forms) if form is full_reply}
        # Rendered now so that a too-large announce fails at construction,
        # not at the first broadcast; signed forms with the longest ts we
        # could ever put in them, and the longest digest version.
        longest_tag = "x" * MAX_DIGEST_TAG if digest is not None else None
        for form, signed in [(full, True), *self._reply_forms]:
            with_tag = form is full or form is full_reply
            self._render(attrs.evolve(form, digest=longest_tag) if with_tag else form, signed, 10**11 - 1)
        self._rendered: dict[int, bytes] = {}
        self._rendered_ts: int | None = None

    def _render(self, announce: Announce, signed: bool, ts: int) -> bytes:
        if signed and self._secret_key is not None:
            announce = sign_announce(announce, self._secret_key, ts)
        return render_datagram(announce)

    def _current(self, index: int, announce: Announce, signed: bool) -> bytes:
        """
        :param index: identifies the form (``announce``, ``signed``) in the cache.
        :returns: ``announce`` rendered (and signed with the current ``ts``), cached for the current second.
        """
        ts = int(self._clock.seconds())
        tag = self._digest.tag() if self._digest is not None else None
        if ts != self._rendered_ts or tag != self._rendered_tag:
            # Signatures are deterministic per (form, ts): one per second is enough.
            self._rendered.clear()
            self._rendered_ts = ts
            self._rendered_tag = tag
        data = self._rendered.get(index)
        if data is None:
            if tag is not None and index in self._with_digest:
                announce = attrs.evolve(announce, digest=tag)
            data = self._rendered[index] = self._render(announce, signed, ts)
        return data

    @property
    def announce_datagram(self) -> bytes:
        """:returns: the announce we broadcast now (signed with the current ``ts`` when we have a key)."""
        return self._current(-1, self._broadcast_form, True)

    def reply_for(self, request_size: int) -> bytes | None:
        """
        :param request_size: length of the announce being answered.
        :returns: the most informative form of our announce, as a reply, that
            is not longer than ``request_size``; ``None`` when none is.
        """
        for index, (form, signed) in enumerate(self._reply_forms):
            data = self._current(index, form, signed)
            if len(data) <= request_size:
                return data
        return None

    @property
    def pending_queries(self) -> int:
        """:returns: store lookups in flight."""
        return len(self._pending)

    def _send(self, data: bytes, addr: Address, kind: str) -> bool:
        if self.transport is None:
            return False
        try:
            self.transport.write(data, addr)
        except (OSError, MessageLengthError) as e:
            # Broadcast to an interface that just went down, unreachable
            # networks: nothing to do but count and go on.
            self._metrics.send_errors.inc()
            self.log.debug("UDP send of {kind} to {addr} failed: {error}", kind=kind, addr=addr, error=str(e))
            return False
        self._metrics.sent.labels(kind).inc()
        return True

    def _drop(self, reason: str, addr: Address, error: str = "") -> None:
        self._metrics.dropped.labels(reason).inc()
        self.log.debug(
            "Dropped UDP datagram from {source}: {reason} {error}",
            source=addr,
            reason=reason,
            error=error,
        )

    def announce(self, addresses: list[str], port: int) -> int:
        """
        Send our announce to every address.

        :param addresses: broadcast (or unicast) addresses.
        :param port: the UDP port to send to.
        :returns: how many were sent.
        """
        data = self.announce_datagram
        return sum(self._send(data, (address, port), "announce") for address in addresses)

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:  # type: ignore[override]
        """Handle one datagram; never raises."""
        host = addr[0]
        if not self._datagram_limiter.allow(host):
            self._drop("rate_limited", addr)
            return
        try:
            parsed = parse_datagram(datagram)
        except DatagramError as e:
            self._drop(e.reason, addr, str(e))
            return
        self._metrics.received.labels(_kind(parsed)).inc()
        if isinstance(parsed, Announce):
            self._on_announce(parsed, addr, len(datagram))
        elif isinstance(parsed, Ping):
            if not self._reply_limiter.allow(None):
                self._drop("rate_limited_total", addr)
                return
            self._reply(b"pong", addr, len(datagram), "pong")
        elif isinstance(parsed, (HasPathQuery, HasPathWithNarHashQuery)):
            self._on_query(parsed, addr, len(datagram))
        else:
            # Pong and query answers only make sense to a node that asked;
            # we ask over HTTP.
            self._drop("unsolicited", addr)

    def _reply(self, data: bytes, addr: Address, request_size: int, kind: str) -> None:
        """Send an answer to a request of ``request_size`` bytes, unless it is longer (the one place answers go out)."""
        if len(data) > request_size or len(data) > GO_MAX_DATAGRAM:
            # Never amplify.
            self._drop("amplification", addr)
            return
        self._send(data, addr, kind)

    def _on_announce(self, announce: Announce, addr: Address, request_size: int) -> None:
        host = addr[0]
        if announce.node_id == self._node.node_id:
            self._drop("own", addr)
            return
        if not self._announce_limiter.allow(host):
            self._drop("rate_limited", addr)
            return
        if not self._total_announce_limiter.allow(None):
            self._drop("rate_limited_total", addr)
            return
        try:
            url = peer_url(host, announce.port if announce.port is not None else self._http_port)
        except ValueError as e:
            self._drop("address", addr, str(e))
            return
        verdict = self._verifier.check(announce, host)
        self._metrics.signatures.labels(verdict.value).inc()
        if verdict not in (Verdict.UNSIGNED, Verdict.VERIFIED, Verdict.DUPLICATE):
            self.log.debug(
                "Announce from {source} treated as unsigned: {verdict}", source=addr, verdict=verdict.value
            )
        peer = self._registry.add(url, SOURCE, announce.public_key or None, verified=verdict is Verdict.VERIFIED)
        if peer is not None:
            # A consume-only node (serve_peers false) is kept but never asked.
            self._registry.record_serving(peer, announce.serve_peers)
        if peer is not None and announce.digest is not None and self._digest is not None:
            self._digest.announced(url, announce.digest)
        if self._on_fetch_offer is not None and announce.node_id is not None:
            self._on_fetch_offer(url, announce.node_id, announce.fetch_for_lan)
        if announce.node_id is None:
            # The Go predecessor: never answered (see the module docstring).
            self.log.debug("Announce from {source} without node_id (zw3rk/peernix): not answered", source=addr)
            return
        if announce.reply or not self._should_answer(host, announce.node_id):
            return
        reply = self.reply_for(request_size)
        if reply is None:
            # Even our compact announce is longer than this one; our next
            # periodic broadcast announces us instead.
            self._drop("amplification", addr)
            return
        self._reply(reply, addr, request_size, "announce_reply")

    def _should_answer(self, host: str, node_id: str | None) -> bool:
        now = self._clock.seconds()
        key = (host, node_id)
        last = self._answered.get(key)
        if last is not None and now - last < self._limits.answer_holdoff:
            return False
        if not self._answer_limiter.allow(None):
            return False
        self._answered[key] = now
        self._answered.move_to_end(key)
        while len(self._answered) > self._limits.max_sources:
            self._answered.popitem(last=False)
        return True

    def _on_query(self, query: Query, addr: Address, request_size: int) -> None:
        if len(self._pending) >= self._limits.max_pending_queries:
            self._drop("busy", addr)
            return
        # Spent before the lookup: the store work is what a flood costs us.
        if not self._reply_limiter.allow(None):
            self._drop("rate_limited_total", addr)
            return
        d = Deferred.fromCoroutine(self._answer_query(query, addr, request_size))
        # Kept until it fires; stop() cancels what is left.
        self._pending.add(d)
        d.addBoth(self._forget, d)

    def _forget(self, result: object, d: Deferred[None]) -> None:
        self._pending.discard(d)

    async def _answer_query(self, query: Query, addr: Address, request_size: int) -> None:
        lookup = self._store.query_path_info(query.hash_part)
        # addTimeout cancels the lookup; stop() cancels it via this coroutine.
        lookup.addTimeout(self._limits.query_timeout, self._clock)
        try:
            info = await lookup
        except CancelledError:
            raise
        except TimeoutError:
            self._drop("store_timeout", addr)
            return
        except Exception as e:
            # The store contract says misses are None, so this is a store
            # bug or an I/O error: log it and leave the query unanswered.
            self.log.failure("Store lookup for UDP query from {source} failed", source=addr)
            self._drop("store_error", addr, str(e))
            return
        if info is None:
            answer = Answer.NOT_FOUND
        elif isinstance(query, HasPathWithNarHashQuery) and info.nar_hash != query.nar_hash:
            answer = Answer.NARHASH_MISMATCH
        else:
            answer = Answer.YES
        self._metrics.answers.labels(answer.value).inc()
        self._reply(render_datagram(QueryAnswer(answer)), addr, request_size, "answer")

    def stop(self) -> None:
        """Cancel every store lookup in flight."""
        for d in list(self._pending):
            d.cancel()


@implementer(IDiscovery)
class UdpDiscoveryService(Service):
    """
    Listen on UDP, announce ourselves by broadcast, answer others.

    Schedule: an announce at start-up, one more after ``second_announce``
    seconds (a peer that started at the same moment may have missed the
    first), then one every ``announce_interval`` seconds; each periodic tick
    also calls ``registry.expire()``.  Everything scheduled is cancelled by
    :meth:`stopService`.
    """

    name = SOURCE

    def __init__(
        self,
        udp: IReactorUDP,
        clock: IReactorTime,
        registry: IPeerRegistry,
        store: IStore,
        node: NodeInfo,
        http_port: int,
        udp_port: int,
        broadcast: bool = True,
        announce_interval: float = 30.0,
        broadcast_addresses: Callable[[], list[str]] = ipv4_broadcast_addresses,
        interface: str = "0.0.0.0",
        second_announce: float = 2.5,
        metrics: CollectorRegistry | None = None,
        limits: UdpLimits = UdpLimits(),
        keys: AnnounceKeys = AnnounceKeys(),
        digest: DigestHooks | None = None,
        extra_announce_gap: float = 1.0,
        on_fetch_offer: Callable[[str, str | None, bool], None] | None = None,
    ) -> None:
        """
        :param on_fetch_offer: see :class:`DiscoveryProtocol`.
        :param udp: the reactor to listen with.
        :param clock: the reactor's time (the same reactor in production).
        :param registry: where peers go.
        :param store: answers ``has_path`` queries.
        :param node: our self-description.
        :param http_port: our HTTP port, announced.
        :param udp_port: the UDP port we listen on and broadcast to (0 picks
            a free port to listen on, for tests; then broadcasts go to the
            port actually bound).
        :param broadcast: whether to broadcast announces at all (we still
            answer announces and queries when off).
        :param announce_interval: seconds between periodic announces.
        :param broadcast_addresses: returns where to broadcast, called at
            every announce (interfaces come and go).
        :param interface: the IPv4 address to bind; broadcasts are only
            received on ``0.0.0.0``.
        :param second_announce: seconds after start of the second announce.
        :param metrics: registry for the counters; a private one if ``None``.
        :param limits: rate and size bounds.
        :param keys: our secret key (sign our announces) and the trusted keys
            (verify others'); by default neither.
        :param digest: see :class:`DiscoveryProtocol`.
        :param extra_announce_gap: :meth:`announce_soon` announces at most
            once in this many seconds.
        :raises DatagramError: if our announce would be too large for Go.
        """
        self._udp = udp
        self._extra_gap = extra_announce_gap
        self._last_announce = float("-inf")
        self._soon: IDelayedCall | None = None
        self._clock = clock
        self._registry = registry
        self._udp_port = udp_port
        self._broadcast = broadcast
        self._interval = announce_interval
        self._broadcast_addresses = broadcast_addresses
        self._interface = interface
        self._second_announce = second_announce
        self.metrics = UdpMetrics(metrics if metrics is not None else CollectorRegistry())
        self.protocol = DiscoveryProtocol(clock, registry, store, node, http_port, self.metrics, limits, keys, digest,
                                          on_fetch_offer=on_fetch_offer)
        self._port: IListeningPort | None = None
        self._loop: LoopingCall | None = None
        self._second: IDelayedCall | None = None

    @property
    def listening_port(self) -> int:
        """:returns: the UDP port actually bound (after start)."""
        if self._port is None:
            raise RuntimeError("not listening")
        host = self._port.getHost()
        if not isinstance(host, IPv4Address):
            raise RuntimeError(f"unexpected UDP address {host!r}")
        return host.port

    def startService(self) -> None:
        """
        Listen and start announcing.

        :raises twisted.internet.error.CannotListenError: if the port is taken.
        """
        self._port = self._udp.listenUDP(
            self._udp_port, self.protocol, interface=self._interface, maxPacketSize=MAX_DATAGRAM + 1
        )
        # Needed to send to broadcast addresses at all (SO_BROADCAST).
        IUDPTransport(self._port).setBroadcastAllowed(True)
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        # Started with now=True: the first tick is the start-up announce.
        # Stopped in stopService.
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.protocol.log.failure("UDP announce loop failed", f)
        )
        # Cancelled in stopService if it has not run.
        self._second = self._clock.callLater(self._second_announce, self._announce)

    def announce_soon(self) -> None:
        """
        Announce now, out of schedule (our digest changed), or as soon as
        ``extra_announce_gap`` seconds have passed since the last
        announcement: a burst of changes costs one announcement a gap.
        """
        if not self.running or not self._broadcast or (self._soon is not None and self._soon.active()):
            return
        wait = self._last_announce + self._extra_gap - self._clock.seconds()
        if wait <= 0:
            self._announce()
        else:
            # Cancelled in stopService if it has not run.
            self._soon = self._clock.callLater(wait, self._announce)

    def _announce(self) -> None:
        if not self._broadcast:
            return
        self._last_announce = self._clock.seconds()
        try:
            addresses = self._broadcast_addresses()
        except OSError as e:
            self.protocol.log.warn("Cannot list broadcast addresses: {error}", error=str(e))
            return
        self.protocol.announce(addresses, self.listening_port if self._udp_port == 0 else self._udp_port)

    def _tick(self) -> None:
        self._announce()
        self._registry.expire()

    def stopService(self) -> Deferred[None]:
        """Stop announcing, cancel lookups, stop listening."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for call in (self._second, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._second = self._soon = None
        self.protocol.stop()
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening).addCallback(lambda _: None)
