"""Tests for :mod:`peernix.discovery.udp` with an in-memory UDP reactor, and one real loopback exchange."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorUDP, IUDPTransport
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from peernix.discovery.datagrams import (
    Announce,
    HasPathQuery,
    HasPathWithNarHashQuery,
    parse_datagram,
    render_datagram,
    sign_announce,
)
from peernix.discovery.nodeinfo import NodeInfo
from peernix.discovery.signed import AnnounceKeys
from peernix.discovery.udp import UdpDiscoveryService, UdpLimits
from peernix.interfaces import IDiscovery, IPeerRegistry, IStore
from peernix.nix.hashes import Hash
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import SecretKey
from peernix.test.discoveryfakes import DictStore, FakeRegistry, FakeUDPPort, MemoryUDPReactor
from peernix.test.test_discovery_datagrams import (
    GO_ANNOUNCE_SIGNED,
    GO_ANNOUNCE_UNSIGNED,
    MALFORMED,
    PUBKEY,
    go_accepts_announce,
    go_record_after,
)

HASH = "0c0ys3hg8kn9jbm6dl9g2rkq1l8ywyna"
OTHER_HASH = "1c0ys3hg8kn9jbm6dl9g2rkq1l8ywyna"
NARHASH = Hash.sha256_of(b"nar")
INFO = PathInfo(path=f"/nix/store/{HASH}-hello", nar_hash=NARHASH, nar_size=3)
NODE = NodeInfo("0.1.0", "2.8.0", "x86_64-linux", ("compression",), PUBKEY, "ourid")
BROADCASTS = ["192.0.2.255", "255.255.255.255"]
PEER = ("192.0.2.7", 9999)


def announce(**fields: Any) -> bytes:
    obj: dict[str, Any] = {"cmd": "announce", "peernix_version": "0.1.0", "port": 8080, "node_id": "peer1"}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


#: Our key and a peer's (made from fixed seeds: test keys, nothing secret).
OUR_KEY = SecretKey("peer-a-1", bytes(range(32)))
PEER_KEY = SecretKey("peer-b-1", bytes(range(1, 33)))
#: Wall-clock time the fixtures start at (signed announces carry unix time).
NOW = 1_700_000_000.0


class _Fixture:
    def __init__(
        self,
        broadcast: bool = True,
        limits: UdpLimits = UdpLimits(),
        udp_port: int = 9999,
        keys: AnnounceKeys = AnnounceKeys(),
        node: NodeInfo = NODE,
        start_at: float = 0.0,
    ) -> None:
        self.reactor = MemoryUDPReactor()
        self.reactor.advance(start_at)
        self.registry = FakeRegistry()
        self.store = DictStore({HASH: INFO})
        self.metrics = CollectorRegistry()
        self.service = UdpDiscoveryService(
            udp=self.reactor,
            clock=self.reactor,
            registry=self.registry,
            store=self.store,
            node=node,
            http_port=9999,
            udp_port=udp_port,
            broadcast=broadcast,
            announce_interval=30.0,
            broadcast_addresses=lambda: list(BROADCASTS),
            metrics=self.metrics,
            limits=limits,
            keys=keys,
        )

    def start(self) -> FakeUDPPort:
        self.service.startService()
        port = self.reactor.udp_ports[-1]
        port.take()
        return port

    def receive(self, data: bytes, addr: tuple[str, int] = PEER) -> None:
        self.service.protocol.datagramReceived(data, addr)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


class FakesTests(SynchronousTestCase):
    """The test doubles implement the interfaces they stand for."""

    def test_verify(self) -> None:
        """Every fake provides its interface and the service provides IDiscovery."""
        f = _Fixture()
        f.service.startService()
        port = f.reactor.udp_ports[0]
        self.assertTrue(verifyObject(IReactorUDP, f.reactor))
        self.assertTrue(verifyObject(IUDPTransport, port))
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertTrue(verifyObject(IPeerRegistry, f.registry))
        self.assertTrue(verifyObject(IStore, f.store))
        self.assertTrue(verifyObject(IDiscovery, f.service))
        self.assertEqual(f.service.name, "udp")
        f.service.stopService()


class ScheduleTests(SynchronousTestCase):
    """Listening and the announce schedule."""

    def test_listens_with_broadcast(self) -> None:
        """startService listens on udp_port on 0.0.0.0 with SO_BROADCAST allowed."""
        f = _Fixture()
        f.service.startService()
        (port,) = f.reactor.udp_ports
        self.assertEqual((port.port, port.interface, port.broadcast_allowed, port.listening), (9999, "0.0.0.0", True, True))
        self.assertGreater(port.max_packet_size, 2048)
        f.service.stopService()

    def test_announce_schedule(self) -> None:
        """Announce to every broadcast address at start, after 2.5 s, then every interval."""
        f = _Fixture()
        f.service.startService()
        port = f.reactor.udp_ports[0]
        expected = [(f.service.protocol.announce_datagram, (a, 9999)) for a in BROADCASTS]
        self.assertEqual(port.take(), expected)
        f.reactor.advance(2.4)
        self.assertEqual(port.take(), [])
        f.reactor.advance(0.1)
        self.assertEqual(port.take(), expected)
        f.reactor.advance(27.4)
        self.assertEqual(port.take(), [])
        f.reactor.advance(0.1)
        self.assertEqual(port.take(), expected)
        f.reactor.pump([30.0] * 3)
        self.assertEqual(port.take(), expected * 3)
        f.service.stopService()

    def test_announce_content(self) -> None:
        """Our announce carries our node info, HTTP port and node id, not marked as a reply."""
        f = _Fixture()
        obj = json.loads(f.service.protocol.announce_datagram)
        self.assertEqual(
            obj,
            {"cmd": "announce", "peernix_version": "0.1.0", "nix_version": "2.8.0", "platform": "x86_64-linux",
             "features": ["compression"], "public_key": PUBKEY, "port": 9999, "node_id": "ourid"},
        )

    def test_expire_each_tick(self) -> None:
        """Each periodic tick calls registry.expire()."""
        f = _Fixture()
        f.service.startService()
        f.reactor.pump([30.0] * 2)
        self.assertEqual(f.registry.calls.count(("expire",)), 3)
        f.service.stopService()

    def test_no_broadcast(self) -> None:
        """With broadcast off nothing is sent unprompted, but announces are still answered."""
        f = _Fixture(broadcast=False)
        f.service.startService()
        port = f.reactor.udp_ports[0]
        f.reactor.pump([2.5, 30.0, 30.0])
        self.assertEqual(port.take(), [])
        self.assertEqual(f.registry.calls.count(("expire",)), 3)
        f.receive(announce())
        self.assertEqual(len(port.take()), 1)
        f.service.stopService()

    def test_stop_cleans_up(self) -> None:
        """stopService stops listening and leaves no delayed calls."""
        f = _Fixture()
        f.service.startService()
        port = f.reactor.udp_ports[0]
        d = f.service.stopService()
        self.successResultOf(d)
        self.assertFalse(port.listening)
        self.assertEqual(f.reactor.getDelayedCalls(), [])
        self.assertIsNone(f.service.protocol.transport)

    def test_stop_after_second_announce(self) -> None:
        """Stopping after every timer ran once still leaves no delayed calls."""
        f = _Fixture()
        f.service.startService()
        f.reactor.pump([2.5, 30.0])
        self.successResultOf(f.service.stopService())
        self.assertEqual(f.reactor.getDelayedCalls(), [])

    def test_broadcast_addresses_error(self) -> None:
        """An OSError listing interfaces is logged and the next tick tries again."""
        f = _Fixture()
        calls: list[int] = []

        def failing() -> list[str]:
            calls.append(1)
            raise OSError("no interfaces")

        f.service._broadcast_addresses = failing
        with capturedLogs() as events:
            f.service.startService()
        self.assertEqual(len(calls), 1)
        self.assertTrue(any(e.get("log_level") == LogLevel.warn for e in events))
        f.reactor.advance(2.5)
        self.assertEqual(len(calls), 2)
        f.service.stopService()

    def test_send_error(self) -> None:
        """A failing send is counted, not raised."""
        f = _Fixture()
        f.service.startService()
        port = f.reactor.udp_ports[0]
        port.write_error = OSError("network unreachable")
        f.reactor.advance(2.5)
        self.assertEqual(f.sample("peernix_udp_send_errors_total"), 2.0)
        f.service.stopService()


class AnnounceTests(SynchronousTestCase):
    """Handling announces from others."""

    def test_adds_and_answers(self) -> None:
        """An announce adds http://host:port with its key and is answered unicast with reply: true."""
        f = _Fixture()
        port = f.start()
        f.receive(
            announce(public_key=PUBKEY, nix_version="2.18.1", platform="x86_64-linux", features=["compression", "parallel", "health"])
        )
        self.assertEqual(f.registry.adds(), [("add", "http://192.0.2.7:8080", "udp", PUBKEY)])
        [(data, addr)] = port.take()
        self.assertEqual(addr, PEER)
        obj = json.loads(data)
        self.assertEqual((obj["reply"], obj["node_id"], obj["port"]), (True, "ourid", 9999))

    def test_small_announce_compact_answer(self) -> None:
        """An announce shorter than our full one is answered with the compact form: version, port, reply."""
        f = _Fixture()
        port = f.start()
        request = announce()
        f.receive(request)
        [(data, _)] = port.take()
        self.assertLessEqual(len(data), len(request))
        self.assertEqual(json.loads(data), {"cmd": "announce", "peernix_version": "0.1.0", "port": 9999, "reply": True})

    def test_reply_not_answered(self) -> None:
        """An announce marked as a reply adds the peer but is never answered."""
        f = _Fixture()
        port = f.start()
        f.receive(announce(reply=True))
        self.assertEqual(len(f.registry.adds()), 1)
        self.assertEqual(port.take(), [])

    def test_own_ignored(self) -> None:
        """Our own announce (our node id) is ignored."""
        f = _Fixture()
        port = f.start()
        f.receive(f.service.protocol.announce_datagram, ("192.0.2.1", 9999))
        self.assertEqual(f.registry.adds(), [])
        self.assertEqual(port.take(), [])
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="own"), 1.0)

    def test_holdoff(self) -> None:
        """A source is answered once per holdoff; the same host with a new node id (a restart) is answered at once."""
        f = _Fixture()
        port = f.start()
        f.receive(announce())
        f.receive(announce())
        self.assertEqual(len(port.take()), 1)
        self.assertEqual(len(f.registry.adds()), 2)
        f.receive(announce(node_id="peer1-restarted"))
        self.assertEqual(len(port.take()), 1)
        f.reactor.advance(2.0)
        f.receive(announce())
        self.assertEqual(len(port.take()), 1)

    def test_go_answer_to_our_broadcast_not_answered(self) -> None:
        """Go's server answering our broadcast (from port 9999, no node id) adds it and is not answered, now or later."""
        f = _Fixture()
        port = f.start()
        for _ in range(2):
            f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 9999))
            self.assertEqual([to for _, to in port.take() if to[0] not in BROADCASTS], [])
            f.reactor.advance(5.0)
        self.assertEqual(f.registry.adds(), [("add", "http://192.0.2.8:9999", "udp", PUBKEY)] * 2)

    def test_go_broadcast_not_answered(self) -> None:
        """A Go broadcast (ephemeral source port of a socket connected to 255.255.255.255) adds the peer; no answer, Go's kernel would drop it."""
        f = _Fixture()
        port = f.start()
        f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 53211))
        f.receive(GO_ANNOUNCE_UNSIGNED, ("192.0.2.9", 53212))
        self.assertEqual(
            f.registry.adds(),
            [("add", "http://192.0.2.8:9999", "udp", PUBKEY), ("add", "http://192.0.2.9:9999", "udp", None)],
        )
        self.assertEqual(port.take(), [])

    def test_announce_without_port(self) -> None:
        """An announce without a port means our own HTTP port, as Go assumes."""
        f = _Fixture()
        f.start()
        f.receive(announce(port=None))
        self.assertEqual(f.registry.adds()[0][1], "http://192.0.2.7:9999")

    def test_ipv6_source(self) -> None:
        """An announce from an IPv6 address gets a bracketed URL."""
        f = _Fixture()
        f.start()
        f.receive(announce(), ("fe80::1%eth0", 9999))
        self.assertEqual(f.registry.adds()[0][1], "http://[fe80::1%eth0]:8080")

    def test_announce_rate_limit(self) -> None:
        """Announces beyond the per-source burst are dropped until tokens refill; other sources are unaffected."""
        f = _Fixture(limits=UdpLimits(announce_rate=0.5, announce_burst=3))
        f.start()
        for _ in range(5):
            f.receive(announce(reply=True))
        self.assertEqual(len(f.registry.adds()), 3)
        f.receive(announce(reply=True), ("192.0.2.50", 9999))
        self.assertEqual(len(f.registry.adds()), 4)
        f.reactor.advance(2.0)
        f.receive(announce(reply=True))
        self.assertEqual(len(f.registry.adds()), 5)
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="rate_limited"), 2.0)

    def test_total_answer_limit(self) -> None:
        """Answers to announces are capped in total, whatever the number of sources."""
        f = _Fixture(limits=UdpLimits(answer_rate=1.0, answer_burst=5))
        port = f.start()
        for i in range(20):
            f.receive(announce(), (f"192.0.2.{i + 10}", 9999))
        self.assertEqual(len(port.take()), 5)
        self.assertEqual(len(f.registry.adds()), 20)


class QueryTests(SynchronousTestCase):
    """ping and has_path queries."""

    def test_ping(self) -> None:
        """ping is answered pong, unicast."""
        f = _Fixture()
        port = f.start()
        f.receive(b"ping")
        self.assertEqual(port.take(), [(b"pong", PEER)])

    def test_unsolicited_answers_ignored(self) -> None:
        """pong and query answers are not answered and change nothing."""
        f = _Fixture()
        port = f.start()
        for data in (b"pong", b"yes", b"not_found"):
            f.receive(data)
        self.assertEqual(port.take(), [])
        self.assertEqual(f.registry.calls, [("expire",)])

    def test_has_path(self) -> None:
        """has_path? is answered yes or not_found from the store."""
        f = _Fixture()
        port = f.start()
        f.receive(render_datagram(HasPathQuery(HASH)))
        f.receive(render_datagram(HasPathQuery(OTHER_HASH)))
        self.assertEqual(port.take(), [(b"yes", PEER), (b"not_found", PEER)])
        self.assertEqual(f.store.queries, [HASH, OTHER_HASH])

    def test_has_path_with_narhash(self) -> None:
        """has_path_with_narhash? is answered yes, narhash_mismatch or not_found."""
        f = _Fixture()
        port = f.start()
        f.receive(render_datagram(HasPathWithNarHashQuery(HASH, NARHASH)))
        f.receive(render_datagram(HasPathWithNarHashQuery(HASH, Hash.sha256_of(b"other"))))
        f.receive(render_datagram(HasPathWithNarHashQuery(OTHER_HASH, NARHASH)))
        self.assertEqual(port.take(), [(b"yes", PEER), (b"narhash_mismatch", PEER), (b"not_found", PEER)])
        self.assertEqual(f.sample("peernix_udp_query_answers_total", answer="yes"), 1.0)

    def test_no_amplification(self) -> None:
        """No answer is longer than its query."""
        f = _Fixture()
        port = f.start()
        queries = [render_datagram(HasPathQuery(HASH)), render_datagram(HasPathWithNarHashQuery(HASH, Hash.sha256_of(b"x"))), b"ping"]
        for q in queries:
            f.receive(q)
        for q, (answer, _) in zip(queries, port.take()):
            self.assertLessEqual(len(answer), len(q))

    def test_store_is_asynchronous(self) -> None:
        """The answer is sent when the store's Deferred fires, not before."""
        f = _Fixture()
        port = f.start()
        f.store.hold = True
        f.receive(render_datagram(HasPathQuery(HASH)))
        self.assertEqual(port.take(), [])
        f.store.held[0].callback(INFO)
        self.assertEqual(port.take(), [(b"yes", PEER)])

    def test_pending_bounded(self) -> None:
        """Queries beyond max_pending_queries in flight are dropped without a store lookup."""
        f = _Fixture(limits=UdpLimits(max_pending_queries=2))
        f.start()
        f.store.hold = True
        for _ in range(4):
            f.receive(render_datagram(HasPathQuery(HASH)))
        self.assertEqual(len(f.store.held), 2)
        self.assertEqual(f.service.protocol.pending_queries, 2)
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="busy"), 2.0)

    def test_query_timeout(self) -> None:
        """A store lookup slower than query_timeout is cancelled and the query left unanswered."""
        f = _Fixture(limits=UdpLimits(query_timeout=2.0))
        port = f.start()
        f.store.hold = True
        f.receive(render_datagram(HasPathQuery(HASH)))
        f.reactor.advance(2.0)
        self.assertEqual(port.take(), [])
        self.assertEqual(f.service.protocol.pending_queries, 0)
        self.assertEqual(f.store.cancelled, [HASH])
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="store_timeout"), 1.0)

    def test_store_error(self) -> None:
        """A failing store lookup is logged and not answered."""
        f = _Fixture()
        port = f.start()
        f.store.error = OSError("database locked")
        with capturedLogs() as events:
            f.receive(render_datagram(HasPathQuery(HASH)))
        self.assertEqual(port.take(), [])
        self.assertTrue(any(e.get("log_failure") is not None for e in events))
        self.flushLoggedErrors(OSError)

    def test_stop_cancels_lookups(self) -> None:
        """stopService cancels store lookups in flight and leaves no delayed calls."""
        f = _Fixture()
        port = f.start()
        f.store.hold = True
        f.receive(render_datagram(HasPathQuery(HASH)))
        self.successResultOf(f.service.stopService())
        self.assertEqual(f.store.cancelled, [HASH])
        self.assertEqual(f.service.protocol.pending_queries, 0)
        self.assertEqual(f.reactor.getDelayedCalls(), [])
        self.assertEqual(port.take(), [])


class HostileInputTests(SynchronousTestCase):
    """Malformed and flooding input."""

    def test_malformed_dropped(self) -> None:
        """Every malformed datagram is dropped, counted by reason, logged at debug, and changes nothing."""
        f = _Fixture()
        port = f.start()
        with capturedLogs() as events:
            for data, _ in MALFORMED.values():
                f.receive(data)
        self.assertEqual(port.take(), [])
        self.assertEqual(f.registry.calls, [("expire",)])
        self.assertEqual(f.store.queries, [])
        for reason in {r for _, r in MALFORMED.values()}:
            self.assertGreater(f.sample("peernix_udp_datagrams_dropped_total", reason=reason), 0.0, reason)
        drops = [e for e in events if e.get("reason") is not None]
        self.assertEqual(len(drops), len(MALFORMED))
        self.assertTrue(all(e["log_level"] == LogLevel.debug and e["source"] == PEER for e in drops))

    def test_datagram_rate_limit(self) -> None:
        """A source flooding datagrams is cut off after its burst and recovers with time; others are served."""
        f = _Fixture(limits=UdpLimits(datagram_rate=10.0, datagram_burst=5))
        port = f.start()
        for _ in range(8):
            f.receive(b"ping")
        self.assertEqual(len(port.take()), 5)
        f.receive(b"ping", ("192.0.2.99", 1))
        self.assertEqual(port.take(), [(b"pong", ("192.0.2.99", 1))])
        f.reactor.advance(0.1)
        f.receive(b"ping")
        self.assertEqual(len(port.take()), 1)

    def test_limiter_memory_bounded(self) -> None:
        """Spoofed source addresses do not grow the rate limiters beyond max_sources."""
        f = _Fixture(limits=UdpLimits(max_sources=16))
        f.start()
        for i in range(100):
            f.receive(announce(), (f"10.0.{i // 256}.{i % 256}", 9999))
        protocol = f.service.protocol
        self.assertLessEqual(len(protocol._datagram_limiter), 16)
        self.assertLessEqual(len(protocol._announce_limiter), 16)
        self.assertLessEqual(len(protocol._answered), 16)


def signed_peer_announce(ts: float = NOW, key: SecretKey = PEER_KEY, **fields: Any) -> bytes:
    """:returns: a peer's full announce signed by ``key`` at ``ts``, as our nodes send it."""
    base: dict[str, Any] = dict(
        peernix_version="0.1.0",
        nix_version="2.8.0",
        platform="x86_64-linux",
        features=("compression", "parallel", "health", "signing"),
        public_key=key.public_key.to_string(),
        port=8080,
        node_id="peer1",
    )
    base.update(fields)
    return render_datagram(sign_announce(Announce(**base), key, int(ts)))


def signed_fixture(**kwargs: Any) -> _Fixture:
    """:returns: a fixture that signs with OUR_KEY and trusts PEER_KEY."""
    return _Fixture(
        keys=AnnounceKeys(OUR_KEY, [PEER_KEY.public_key]),
        node=NodeInfo("0.1.0", "2.8.0", "x86_64-linux", ("compression", "signing"), OUR_KEY.public_key.to_string(), "ourid"),
        start_at=NOW,
        **kwargs,
    )


class AmplificationTests(SynchronousTestCase):
    """No datagram we send in answer is longer than the datagram that caused it."""

    def exchange(self, f: _Fixture, port: FakeUDPPort, request: bytes, addr: tuple[str, int]) -> list[bytes]:
        f.receive(request, addr)
        # Past the answer holdoff, so every announce is answered if it can be.
        f.reactor.advance(5.0)
        return [data for data, to in port.take() if to == addr]

    def test_every_kind(self) -> None:
        """For every datagram kind, signed or not, each answer is at most as long as its request."""
        for keys in (AnnounceKeys(), AnnounceKeys(OUR_KEY, [PEER_KEY.public_key])):
            f = _Fixture(keys=keys, start_at=NOW)
            port = f.start()
            requests = [
                b"ping",
                b"ping\n",
                b"pong",
                render_datagram(HasPathQuery(HASH)),
                render_datagram(HasPathQuery(OTHER_HASH)),
                render_datagram(HasPathWithNarHashQuery(HASH, NARHASH)),
                render_datagram(HasPathWithNarHashQuery(HASH, Hash.sha256_of(b"x"))),
                b"yes",
                b"narhash_mismatch",
                GO_ANNOUNCE_SIGNED,
                GO_ANNOUNCE_UNSIGNED,
                b'{"cmd":"announce","peernix_version":"1"}',
                b'{"cmd":"announce","peernix_version":"1","node_id":"x"}',
                announce(),
                announce(reply=True),
                signed_peer_announce(ts=f.reactor.seconds()),
                *(data for data, _ in MALFORMED.values()),
            ]
            answered = 0
            for i, request in enumerate(requests):
                answers = self.exchange(f, port, request, (f"192.0.2.{i + 10}", 9999))
                answered += len(answers)
                for answer in answers:
                    self.assertLessEqual(len(answer), len(request), (request, answer))
            # Not answered: pong, query answers, Go announces (no node id),
            # tiny ones, replies, malformed ones.
            self.assertEqual(answered, 8)

    def test_go_node_keeps_our_fields(self) -> None:
        """
        The exchange with a Go node, datagram by datagram, through a model of
        its peer table: our broadcast gives it every field; its answer (and
        its own broadcasts) get nothing back, so nothing overwrites them.
        """
        for keys in (AnnounceKeys(), AnnounceKeys(OUR_KEY, [PEER_KEY.public_key])):
            f = _Fixture(keys=keys, start_at=NOW)
            f.service.startService()
            port = f.reactor.udp_ports[-1]
            broadcasts = port.take()
            self.assertEqual([to for _, to in broadcasts], [(b, 9999) for b in BROADCASTS])
            record: dict[str, Any] = {}
            for data, _ in broadcasts:
                record = go_record_after(record, data)
            expected_key = OUR_KEY.public_key.to_string() if keys.secret_key is not None else PUBKEY
            self.assertEqual(
                record,
                {
                    "peernix_version": "0.1.0",
                    "nix_version": "2.8.0",
                    "platform": "x86_64-linux",
                    "features": ["compression"],
                    "public_key": expected_key,
                },
            )
            # Go's server answers the broadcast from port 9999; Go's own
            # periodic broadcasts come from ephemeral ports.
            for source in (("192.0.2.8", 9999), ("192.0.2.8", 40000)):
                for request in (GO_ANNOUNCE_SIGNED, GO_ANNOUNCE_UNSIGNED):
                    f.receive(request, source)
                    f.reactor.advance(3.0)
            for data, _ in port.take():
                # Only our own periodic broadcasts, if any.
                record = go_record_after(record, data)
            self.assertEqual(record["public_key"], expected_key)
            self.assertEqual(record["platform"], "x86_64-linux")
            self.assertEqual(record["features"], ["compression"])

    def test_compact_reply_would_empty_go_record(self) -> None:
        """Why Go announces get no answer: the answer that fits their size would clear Go's record of us."""
        for f, request in ((signed_fixture(), GO_ANNOUNCE_UNSIGNED), (_Fixture(), GO_ANNOUNCE_UNSIGNED)):
            record = go_record_after({}, f.service.protocol.announce_datagram)
            self.assertTrue(record["public_key"] and record["platform"] and record["features"])
            reply = f.service.protocol.reply_for(len(request))
            assert reply is not None
            after = go_record_after(record, reply)
            self.assertEqual((after["platform"], after["features"], after["nix_version"]), ("", [], ""))

    def test_tiny_announce_not_answered(self) -> None:
        """An announce shorter than our compact reply adds the peer but is not answered; the drop is counted."""
        f = _Fixture()
        port = f.start()
        f.receive(b'{"cmd":"announce","peernix_version":"1","node_id":"x"}')
        self.assertEqual(port.take(), [])
        self.assertEqual(f.registry.urls(), {"http://192.0.2.7:9999"})
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="amplification"), 1.0)

    def test_signed_peer_gets_signed_answer(self) -> None:
        """A peer's full signed announce is long enough for a signed reply, which verifies."""
        f = signed_fixture()
        port = f.start()
        request = signed_peer_announce(ts=f.reactor.seconds())
        f.receive(request)
        [(data, _)] = port.take()
        self.assertLessEqual(len(data), len(request))
        parsed = parse_datagram(data)
        assert isinstance(parsed, Announce) and parsed.sig is not None and parsed.signed_payload is not None
        self.assertTrue(OUR_KEY.public_key.verify(parsed.signed_payload, parsed.sig))
        self.assertEqual((parsed.reply, parsed.ts, parsed.public_key), (True, int(NOW), OUR_KEY.public_key.to_string()))

    def test_largest_form_that_fits(self) -> None:
        """reply_for picks the full signed reply, then the compact signed, then unsigned ones, as the request allows."""
        f = signed_fixture()
        protocol = f.service.protocol
        sizes = [len(protocol.reply_for(n) or b"") for n in (2000, 300, 100, 60)]
        full, compact_signed, compact = sizes[:3]
        self.assertGreater(full, compact_signed)
        self.assertGreater(compact_signed, compact)
        self.assertLessEqual(compact_signed, 300)
        self.assertEqual(sizes[3], 0)
        self.assertIsNone(protocol.reply_for(compact - 1))
        self.assertEqual(len(protocol.reply_for(compact) or b""), compact)


class SignedAnnounceTests(SynchronousTestCase):
    """Signing our announces and verifying others'."""

    def test_broadcast_signed(self) -> None:
        """With a key, our broadcast carries ts (clock time) and a sig over its canonical JSON by our key."""
        f = signed_fixture()
        f.service.startService()
        port = f.reactor.udp_ports[0]
        [(data, _), _] = port.take()
        parsed = parse_datagram(data)
        assert isinstance(parsed, Announce) and parsed.sig is not None and parsed.signed_payload is not None
        self.assertEqual(parsed.ts, int(NOW))
        self.assertEqual(parsed.public_key, OUR_KEY.public_key.to_string())
        self.assertTrue(OUR_KEY.public_key.verify(parsed.signed_payload, parsed.sig))
        self.assertTrue(go_accepts_announce(data))
        f.reactor.advance(30.0)
        later = parse_datagram(port.take()[-1][0])
        assert isinstance(later, Announce)
        self.assertEqual(later.ts, int(NOW) + 30)

    def test_unsigned_without_key(self) -> None:
        """Without a key our announce has neither ts nor sig."""
        obj = json.loads(_Fixture().service.protocol.announce_datagram)
        self.assertNotIn("ts", obj)
        self.assertNotIn("sig", obj)

    def test_trusted_signed_announce_verifies(self) -> None:
        """A fresh announce signed by a trusted key naming that key marks the peer verified."""
        f = signed_fixture()
        f.start()
        f.receive(signed_peer_announce(ts=NOW - 3))
        self.assertEqual(f.registry.verified, ["http://192.0.2.7:8080"])
        self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result="verified"), 1.0)

    def test_our_own_nodes_verify_each_other(self) -> None:
        """Two nodes that trust each other's keys verify each other's broadcast."""
        a = _Fixture(keys=AnnounceKeys(OUR_KEY, [PEER_KEY.public_key]), node=NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", "a"), start_at=NOW)
        b = _Fixture(keys=AnnounceKeys(PEER_KEY, [OUR_KEY.public_key]), node=NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", "b"), start_at=NOW)
        a_port, b_port = a.start(), b.start()
        b.receive(a.service.protocol.announce_datagram, ("192.0.2.1", 9999))
        [(reply, _)] = b_port.take()
        a.receive(reply, ("192.0.2.2", 9999))
        self.assertEqual(b.registry.verified, ["http://192.0.2.1:9999"])
        self.assertEqual(a.registry.verified, ["http://192.0.2.2:9999"])
        self.assertEqual(a_port.take(), [])

    def test_unverified_cases(self) -> None:
        """Untrusted key, stale or future ts, tampering, a key mismatch or half a signature: added, not verified, counted."""
        stranger = SecretKey("stranger-1", bytes(32))
        tampered = json.loads(signed_peer_announce())
        tampered["port"] = 8081
        missing_sig = json.loads(signed_peer_announce())
        del missing_sig["sig"]
        cases = {
            "untrusted_key": signed_peer_announce(key=stranger),
            "stale": signed_peer_announce(ts=NOW - 11),
            "stale ": signed_peer_announce(ts=NOW + 11),
            "bad_signature": json.dumps(tampered).encode(),
            "key_mismatch": signed_peer_announce(public_key=PUBKEY),
            "incomplete": json.dumps(missing_sig).encode(),
        }
        for result, data in cases.items():
            with self.subTest(result):
                f = signed_fixture()
                f.start()
                f.receive(data)
                self.assertEqual(len(f.registry.adds()), 1)
                self.assertEqual(f.registry.verified, [])
                self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result=result.strip()), 1.0)

    def test_replay_and_duplicate(self) -> None:
        """A verified announce repeated from another address is a replay (unverified); from the same address, a duplicate."""
        f = signed_fixture()
        f.start()
        data = signed_peer_announce()
        f.receive(data)
        f.receive(data)
        f.receive(data, ("192.0.2.66", 9999))
        self.assertEqual(f.registry.verified, ["http://192.0.2.7:8080"])
        self.assertEqual(f.registry.urls(), {"http://192.0.2.7:8080", "http://192.0.2.66:8080"})
        self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result="duplicate"), 1.0)
        self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result="replay"), 1.0)

    def test_go_announces_stay_unsigned(self) -> None:
        """The Go predecessor's announces are added unverified and counted as unsigned."""
        f = signed_fixture()
        f.start()
        f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 9999))
        f.receive(GO_ANNOUNCE_UNSIGNED, ("192.0.2.9", 9999))
        self.assertEqual(f.registry.urls(), {"http://192.0.2.8:9999", "http://192.0.2.9:9999"})
        self.assertEqual(f.registry.verified, [])
        self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result="unsigned"), 2.0)

    def test_verification_budget(self) -> None:
        """Signature checks beyond the global budget are skipped (unverified, counted)."""
        f = signed_fixture(limits=UdpLimits(verify_rate=1.0, verify_burst=2))
        f.start()
        for i in range(4):
            f.receive(signed_peer_announce(node_id=f"n{i}"), (f"192.0.2.{i + 10}", 9999))
        self.assertEqual(len(f.registry.verified), 2)
        self.assertEqual(len(f.registry.adds()), 4)
        self.assertEqual(f.sample("peernix_udp_announce_signatures_total", result="rate_limited"), 2.0)


class GlobalLimitTests(SynchronousTestCase):
    """Caps in total, whatever the number of (spoofed) source addresses."""

    def test_total_announces(self) -> None:
        """Announces beyond the total burst are dropped until tokens refill."""
        f = _Fixture(limits=UdpLimits(total_announce_rate=1.0, total_announce_burst=5))
        f.start()
        for i in range(20):
            f.receive(announce(reply=True), (f"10.0.0.{i}", 9999))
        self.assertEqual(len(f.registry.adds()), 5)
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="rate_limited_total"), 15.0)
        f.reactor.advance(1.0)
        f.receive(announce(reply=True), ("10.0.1.1", 9999))
        self.assertEqual(len(f.registry.adds()), 6)

    def test_total_replies(self) -> None:
        """Pongs and store lookups share one total budget."""
        f = _Fixture(limits=UdpLimits(reply_rate=1.0, reply_burst=4))
        port = f.start()
        for i in range(4):
            f.receive(b"ping", (f"10.0.0.{i}", 9999))
            f.receive(render_datagram(HasPathQuery(HASH)), (f"10.0.1.{i}", 9999))
        self.assertEqual(len(port.take()), 4)
        self.assertEqual(len(f.store.queries), 2)
        self.assertEqual(f.sample("peernix_udp_datagrams_dropped_total", reason="rate_limited_total"), 4.0)


class LoopbackTests(TestCase):
    """Two services exchange announces over real UDP sockets on 127.0.0.1."""

    def test_exchange(self) -> Deferred[None]:
        """A unicast announce from A makes B add A, and B's answer makes A add B."""
        # trial runs this test on the global reactor; real sockets need it.
        from twisted.internet import reactor

        services: list[UdpDiscoveryService] = []
        registries: list[FakeRegistry] = []
        for node_id in ("node-a", "node-b"):
            registry = FakeRegistry()
            service = UdpDiscoveryService(
                udp=reactor,  # type: ignore[arg-type]
                clock=reactor,  # type: ignore[arg-type]
                registry=registry,
                store=DictStore(),
                node=NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", node_id),
                http_port=8000 + len(services),
                udp_port=0,
                broadcast=False,
                interface="127.0.0.1",
            )
            service.startService()
            self.addCleanup(service.stopService)
            services.append(service)
            registries.append(registry)
        a, b = services
        a.protocol.announce(["127.0.0.1"], b.listening_port)

        async def wait() -> None:
            for _ in range(100):
                if registries[0].urls("udp") and registries[1].urls("udp"):
                    break
                await deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
            self.assertEqual(registries[1].urls("udp"), {"http://127.0.0.1:8000"})
            self.assertEqual(registries[0].urls("udp"), {"http://127.0.0.1:8001"})

        return Deferred.fromCoroutine(wait())
