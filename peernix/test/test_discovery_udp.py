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

from peernix.discovery.datagrams import HasPathQuery, HasPathWithNarHashQuery, render_datagram
from peernix.discovery.nodeinfo import NodeInfo
from peernix.discovery.udp import UdpDiscoveryService, UdpLimits
from peernix.interfaces import IDiscovery, IPeerRegistry, IStore
from peernix.nix.hashes import Hash
from peernix.nix.pathinfo import PathInfo
from peernix.test.discoveryfakes import DictStore, FakeRegistry, FakeUDPPort, MemoryUDPReactor
from peernix.test.test_discovery_datagrams import GO_ANNOUNCE_SIGNED, GO_ANNOUNCE_UNSIGNED, MALFORMED, PUBKEY

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


class _Fixture:
    def __init__(self, broadcast: bool = True, limits: UdpLimits = UdpLimits(), udp_port: int = 9999) -> None:
        self.reactor = MemoryUDPReactor()
        self.registry = FakeRegistry()
        self.store = DictStore({HASH: INFO})
        self.metrics = CollectorRegistry()
        self.service = UdpDiscoveryService(
            udp=self.reactor,
            clock=self.reactor,
            registry=self.registry,
            store=self.store,
            node=NODE,
            http_port=9999,
            udp_port=udp_port,
            broadcast=broadcast,
            announce_interval=30.0,
            broadcast_addresses=lambda: list(BROADCASTS),
            metrics=self.metrics,
            limits=limits,
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
        f.receive(announce(public_key=PUBKEY))
        self.assertEqual(f.registry.adds(), [("add", "http://192.0.2.7:8080", "udp", PUBKEY)])
        [(data, addr)] = port.take()
        self.assertEqual(addr, PEER)
        obj = json.loads(data)
        self.assertEqual((obj["reply"], obj["node_id"], obj["port"]), (True, "ourid", 9999))

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

    def test_go_ping_pong_loop_ends(self) -> None:
        """Against a Go node that answers every announce, the exchange stops after one answer."""
        f = _Fixture()
        port = f.start()
        # Go's server answering our broadcast: no node id, no reply flag.
        f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 9999))
        self.assertEqual(len(port.take()), 1)
        # Go answers our reply again, at once.
        f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 9999))
        self.assertEqual(port.take(), [])

    def test_go_announce(self) -> None:
        """A Go announce adds the peer with its key; its broadcast's ephemeral source port gets the answer."""
        f = _Fixture()
        port = f.start()
        f.receive(GO_ANNOUNCE_SIGNED, ("192.0.2.8", 53211))
        f.receive(GO_ANNOUNCE_UNSIGNED, ("192.0.2.9", 53212))
        self.assertEqual(
            f.registry.adds(),
            [("add", "http://192.0.2.8:9999", "udp", PUBKEY), ("add", "http://192.0.2.9:9999", "udp", None)],
        )
        self.assertEqual([addr for _, addr in port.take()], [("192.0.2.8", 53211), ("192.0.2.9", 53212)])

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
