"""
Tests for peers' store digests: :mod:`peernix.peers.digests` (fetching and
keeping them), the fan-out's peer choice with and without digests, the
negative-cache clearing, the score penalty, and the ``digest`` field of UDP
announcements.  No sockets: a fake LAN behind one resource, a ``Clock``.
"""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.discovery.datagrams import DatagramError, parse_datagram
from peernix.discovery.digesttag import DigestHooks
from peernix.discovery.udp import UdpDiscoveryService
from peernix.interfaces import IPeerDigests
from peernix.nix.pathinfo import PathInfo
from peernix.peers.client import PeerClient
from peernix.peers.digests import MIN_FALSE_CLAIMS, PeerDigests
from peernix.peers.fanout import Fanout
from peernix.peers.registry import Peer
from peernix.peers.trust import TrustPolicy
from peernix.store.digest import DIGEST_CONTENT_TYPE, DigestPublisher, digest_key, new_digest
from peernix.test.discoveryfakes import DictStore, MemoryUDPReactor
from peernix.test.discoveryfakes import FakeRegistry as UdpFakeRegistry
from peernix.test.peerfakes import (
    FakeLan,
    FakeRegistry,
    file_nar,
    hash_part_of,
    lan_client,
    make_info,
    store_path_for,
)
from peernix.test.test_discovery_udp import BROADCASTS, NODE, PEER, announce
from peernix.test.test_store_digest import FakeScanner, random_hash_parts, shared
from peernix.test.test_store_share import info
from peernix.web.digest import DigestResource
from peernix.nix.signing import SecretKey

TRUSTED = SecretKey("trusted-1", b"\x11" * 32)

A, B, C = "a:9999", "b:9999", "c:9999"


class Node:
    """A fake peer's store digest: a publisher over a fake scanner, served by the fake LAN."""

    def __init__(self, clock: Clock) -> None:
        self.scanner = FakeScanner()
        self.publisher = DigestPublisher(self.scanner, lambda i: True, clock)
        self.resource = DigestResource(self.publisher)

    def add(self, *infos: PathInfo) -> None:
        self.scanner.add(*infos)
        self.publisher.update()


class _Lan:
    """Peers on a fake LAN, a registry and a PeerDigests over a real PeerClient."""

    def __init__(self, hosts: list[str], static_answered: bool = True, **kw: Any) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        self.http, self.agent = lan_client(self.lan)
        self.registry = FakeRegistry()
        self.nodes: dict[str, Node] = {}
        for host in hosts:
            self.lan.peer(host)
            peer = self.registry.add(f"http://{host}", "static")
            if static_answered and peer is not None:
                # As after its first health probe.
                peer.successes += 1
        self.client = PeerClient(self.http, self.clock)
        self.metrics = CollectorRegistry()
        self.digests = PeerDigests(self.registry, self.client, self.clock, metrics_registry=self.metrics, **kw)

    def node(self, host: str) -> Node:
        node = self.nodes[host] = Node(self.clock)
        self.lan.peer(host).digest = node.resource
        return node

    def peers(self) -> list[Peer]:
        return self.registry.healthy_peers()

    def peer(self, host: str) -> Peer:
        [peer] = [p for p in self.registry.peers() if p.url == f"http://{host}"]
        return peer

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.agent.flush()

    def chosen(self, hash_part: str) -> list[str]:
        return [p.url.removeprefix("http://") for p in self.digests.candidates(self.peers(), hash_part)]

    def digest_requests(self, host: str) -> list[str]:
        return [
            p for h, p, _ in self.lan.requests if h == host and p == "/peernix/digest"
        ]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


class PeerDigestsTests(SynchronousTestCase):
    """Fetching, keeping and using peers' digests."""

    def test_interface(self) -> None:
        """PeerDigests provides IPeerDigests."""
        verifyObject(IPeerDigests, _Lan([A]).digests)

    def test_not_fetched_yet_asked(self) -> None:
        """Before a digest is fetched, every peer is a candidate."""
        f = _Lan([A, B])
        f.node(A).add(shared("x"))
        self.assertEqual(f.chosen(info("y").hash_part), [A, B])

    def test_choice_with_and_without_digests(self) -> None:
        """Peers whose digest lacks the path are left out; peers publishing none (404) are always asked."""
        f = _Lan([A, B, C])
        f.node(A).add(shared("x"))
        f.node(C).add(shared("z"))
        f.digests.start()
        f.tick()
        self.assertEqual(f.digests.get("http://a:9999").state, "ok")  # type: ignore[union-attr]
        self.assertEqual(f.digests.get("http://b:9999").state, "none")  # type: ignore[union-attr]
        self.assertEqual(f.chosen(info("x").hash_part), [A, B])
        self.assertEqual(f.chosen(info("z").hash_part), [B, C])
        self.assertEqual(f.chosen(info("nowhere").hash_part), [B])
        self.assertEqual(f.metric("peernix_digest_requests_avoided_total"), 4)
        self.assertEqual(f.metric("peernix_digest_lookups_skipped_total"), 0)
        doc = f.digests.document()
        self.assertEqual(doc["http://a:9999"]["paths"], 1)  # type: ignore[index]
        f.digests.stop()
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_no_digest_matches(self) -> None:
        """When every peer has a digest and none holds the path, no peer is a candidate (a counted skip)."""
        f = _Lan([A, C])
        f.node(A).add(shared("x"))
        f.node(C).add(shared("z"))
        f.digests.start()
        f.tick()
        self.assertEqual(f.chosen(info("nowhere").hash_part), [])
        self.assertEqual(f.metric("peernix_digest_lookups_skipped_total"), 1)
        f.digests.stop()

    def test_consume_only_peer_not_asked(self) -> None:
        """A peer that serves no peers (--serve-peers no) is never asked for its digest, not even when it announces one."""
        f = _Lan([A, B])
        f.node(A).add(shared("x"))
        f.node(B).add(shared("y"))
        f.registry.record_serving(f.peer(B), False)
        f.digests.start()
        f.tick()
        f.digests.announced("http://b:9999", "1-1")
        f.tick(60)
        self.assertEqual(f.digest_requests(B), [])
        self.assertNotEqual(f.digest_requests(A), [])
        f.digests.stop()

    def test_static_peer_waits_for_first_answer(self) -> None:
        """A static peer's digest is fetched only once it answered (its health probe says whether it serves peers)."""
        f = _Lan([A], static_answered=False)
        f.node(A).add(shared("x"))
        f.digests.start()
        f.tick(60)
        self.assertEqual(f.digest_requests(A), [])
        f.registry.record_success(f.peer(A), 0.001)
        f.tick(60)
        self.assertNotEqual(f.digest_requests(A), [])
        f.digests.stop()

    def test_announcement_fetches_delta(self) -> None:
        """An announced new version is fetched at once as a delta, and the new path is found."""
        f = _Lan([A])
        node = f.node(A)
        node.add(*[shared(f"p{i}") for i in range(40)])
        f.digests.start()
        f.tick()
        self.assertEqual(f.chosen(info("new").hash_part), [])
        changes: list[tuple[str, bool]] = []
        f.digests.subscribe(lambda peer, contains: changes.append((peer.url, contains(info("new").hash_part))))
        node.add(shared("new"))
        f.tick(0.5)
        # Not yet: within min_gap of the first fetch.
        f.digests.announced("http://a:9999", node.publisher.tag or "")
        f.tick(0.5)
        self.assertEqual(f.chosen(info("new").hash_part), [A])
        requests = [(p, h) for host, p, h in f.lan.requests if host == A and p == "/peernix/digest"]
        self.assertEqual(len(requests), 2)
        self.assertEqual(f.metric("peernix_digest_fetches_total", result="delta"), 1)
        self.assertEqual(changes, [("http://a:9999", True)])
        held = f.digests.get("http://a:9999")
        assert held is not None
        self.assertEqual(held.tag, node.publisher.tag)
        self.assertEqual(held.deltas, 1)
        # The delta left exactly the peer's digest.
        self.assertEqual(held.bloom.save_bytes(), node.publisher.digest_bytes())  # type: ignore[union-attr]
        f.digests.stop()

    def test_announcement_of_held_version_ignored(self) -> None:
        """An announcement naming the version already held fetches nothing; unknown URLs are ignored."""
        f = _Lan([A])
        node = f.node(A)
        node.add(shared("x"))
        f.digests.start()
        f.tick(0.5)
        f.digests.announced("http://a:9999", node.publisher.tag or "")
        f.digests.announced("http://unknown:9999", "x-1")
        f.digests.announced("not a url", "x-1")
        f.tick(1.5)
        self.assertEqual(len(f.digest_requests(A)), 1)
        f.digests.stop()

    def test_interval_refresh(self) -> None:
        """A peer heard announcing is refreshed every interval anyway (304 when unchanged), a change picked up."""
        f = _Lan([A], interval=30.0)
        node = f.node(A)
        node.add(shared("x"))
        f.digests.start()
        f.tick()
        for _ in range(4):
            # Its periodic announcements name the version we hold.
            f.digests.announced("http://a:9999", node.publisher.tag or "")
            f.tick(10)
        self.assertEqual(len(f.digest_requests(A)), 2)
        self.assertEqual(f.metric("peernix_digest_fetches_total", result="unchanged"), 1)
        node.add(shared("later"))
        for _ in range(3):
            f.tick(10)
        self.assertEqual(f.chosen(info("later").hash_part), [A])
        f.digests.stop()

    def test_quiet_peer_revalidated_often(self) -> None:
        """A peer publishing a digest but never heard announcing (a static peer) is revalidated every quiet_interval."""
        f = _Lan([A], interval=30.0, quiet_interval=2.0)
        node = f.node(A)
        node.add(shared("x"))
        f.digests.start()
        f.tick()
        for _ in range(8):
            f.tick(0.5)
        self.assertEqual(len(f.digest_requests(A)), 3)
        node.add(shared("later"))
        for _ in range(4):
            f.tick(0.5)
        self.assertEqual(f.chosen(info("later").hash_part), [A])
        # A peer without a digest (404) is not polled that often.
        g = _Lan([B], interval=30.0, quiet_interval=2.0)
        g.digests.start()
        g.tick()
        for _ in range(20):
            g.tick(0.5)
        self.assertEqual(len(g.digest_requests(B)), 1)
        f.digests.stop()
        g.digests.stop()

    def test_full_refetch_after_rebuild(self) -> None:
        """After a peer's full rebuild (paths deleted), the whole new digest replaces the old one."""
        f = _Lan([A])
        node = f.node(A)
        node.add(shared("x"), shared("y"))
        f.digests.start()
        f.tick()
        node.scanner.delete(info("x").path)
        node.publisher.update()
        f.digests.announced("http://a:9999", node.publisher.tag or "")
        f.tick(1)
        self.assertEqual(f.chosen(info("x").hash_part), [])
        self.assertEqual(f.chosen(info("y").hash_part), [A])
        self.assertEqual(f.metric("peernix_digest_fetches_total", result="full"), 2)
        f.digests.stop()

    def test_unusable_digest_means_asked(self) -> None:
        """A malformed digest is ignored: the peer is asked for everything (a digest is only a hint)."""
        f = _Lan([A])

        class Garbage(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                request.setHeader(b"Content-Type", DIGEST_CONTENT_TYPE)
                return (10**9).to_bytes(8, "little") + b"\xff" * 100

        f.lan.peer(A).digest = Garbage()
        f.digests.start()
        f.tick()
        self.assertEqual(f.digests.get("http://a:9999").state, "error")  # type: ignore[union-attr]
        self.assertEqual(f.chosen(info("x").hash_part), [A])
        self.assertEqual(f.metric("peernix_digest_fetches_total", result="invalid"), 1)
        f.digests.stop()

    def test_oversized_digest_refused(self) -> None:
        """A digest larger than max_bytes is cut off and the peer is asked for everything."""
        f = _Lan([A], max_bytes=64)
        f.node(A).add(*[shared(f"p{i}") for i in range(100)])
        f.digests.start()
        f.tick()
        self.assertEqual(f.digests.get("http://a:9999").state, "error")  # type: ignore[union-attr]
        self.assertEqual(f.chosen(info("x").hash_part), [A])
        f.digests.stop()

    def test_forgotten_peers_dropped(self) -> None:
        """A peer gone from the registry loses its digest at the next tick."""
        f = _Lan([A])
        f.node(A).add(shared("x"))
        f.digests.start()
        f.tick()
        f.registry.remove("http://a:9999", "static")
        f.tick(0.25)
        self.assertIsNone(f.digests.get("http://a:9999"))
        f.digests.stop()

    def test_false_claims_cost_score(self) -> None:
        """A digest claiming every path (a liar) costs its peer a "digest" failure; an honest one's false positives do not."""
        f = _Lan([A, B])
        f.node(A).add(*[shared(f"p{i}") for i in range(200)])
        liar = new_digest(10, 0.5)
        liar.update(range(-(2**20), 2**20, 7))  # nearly every bit set
        payload = liar.save_bytes()

        class Liar(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                request.setHeader(b"Content-Type", DIGEST_CONTENT_TYPE)
                return payload

        f.lan.peer(B).digest = Liar()
        f.digests.start()
        f.tick()
        for hash_part in random_hash_parts(2000, seed=5):
            for peer in f.digests.candidates(f.peers(), hash_part):
                # Neither holds any of these: each answers 404.
                f.digests.record_miss(peer, hash_part)
        self.assertEqual(f.registry.failure_kinds("http://a:9999"), [])
        self.assertGreaterEqual(f.registry.failure_kinds("http://b:9999").count("digest"), 10)
        self.assertGreater(f.metric("peernix_digest_false_claims_total"), MIN_FALSE_CLAIMS)
        f.digests.stop()

    def test_failing_fetch_keeps_old_digest(self) -> None:
        """A fetch that fails keeps the digest held (state "error") and is retried."""
        f = _Lan([A], interval=5.0)
        f.node(A).add(shared("x"))
        f.digests.start()
        f.tick()
        f.lan.peer(A).mode = "error"
        f.tick(5)
        held = f.digests.get("http://a:9999")
        assert held is not None
        self.assertEqual(held.state, "error")
        self.assertEqual(f.chosen(info("x").hash_part), [A])
        self.assertEqual(f.chosen(info("y").hash_part), [])
        f.digests.stop()


@implementer(IPeerDigests)
class FakePeerDigests:
    """Digests as sets of hash parts per peer URL; peers not in :attr:`holds` have none."""

    def __init__(self) -> None:
        self.holds: dict[str, set[str]] = {}
        self.misses: list[tuple[str, str]] = []
        self.subscribers: list[Callable[[Peer, Callable[[str], bool]], object]] = []

    def candidates(self, peers: list[Peer], hash_part: str) -> list[Peer]:
        return [p for p in peers if p.url not in self.holds or hash_part in self.holds[p.url]]

    def record_miss(self, peer: Peer, hash_part: str) -> None:
        self.misses.append((peer.url, hash_part))

    def subscribe(self, callback: object) -> None:
        assert callable(callback)
        self.subscribers.append(callback)

    def publish(self, peer: Peer, *hash_parts: str) -> None:
        """``peer``'s digest now holds ``hash_parts`` too; subscribers hear of it."""
        held = self.holds.setdefault(peer.url, set())
        held.update(hash_parts)
        for callback in self.subscribers:
            callback(peer, held.__contains__)


class FanoutDigestTests(SynchronousTestCase):
    """The fan-out asks only peers that may hold a path."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        http, self.agent = lan_client(self.lan)
        self.registry = FakeRegistry()
        for host in (A, B, C):
            self.lan.peer(host)
            self.registry.add(f"http://{host}", "static")
        self.digests = FakePeerDigests()
        self.metrics = CollectorRegistry()
        self.fanout = Fanout(
            self.registry, PeerClient(http, self.clock), TrustPolicy([TRUSTED.public_key]), self.clock,
            negative_ttl=10.0, prefetch_concurrency=0, metrics_registry=self.metrics, digests=self.digests,
        )
        self.nar = file_nar(b"hi\n")
        self.info = make_info(store_path_for("hi"), self.nar, key=TRUSTED)
        self.h = hash_part_of(self.info.store_path)

    def test_fake_interface(self) -> None:
        """The fake provides IPeerDigests."""
        verifyObject(IPeerDigests, self.digests)

    def peer(self, host: str) -> Peer:
        [peer] = [p for p in self.registry.peers() if p.url == f"http://{host}"]
        return peer

    def lookup(self) -> Any:
        d = self.fanout.lookup(self.h)
        self.agent.flush()
        return self.successResultOf(d)

    def narinfo_requests(self) -> dict[str, int]:
        return {host: self.lan.count(host, ".narinfo") for host in (A, B, C)}

    def test_without_digests_everyone_asked(self) -> None:
        """Peers without digests are all asked."""
        self.assertIsNone(self.lookup())
        self.assertEqual(self.narinfo_requests(), {A: 1, B: 1, C: 1})

    def test_only_holders_and_digestless_asked(self) -> None:
        """Only the peer whose digest holds the path and the peer without a digest are asked."""
        self.lan.peer(B).serve(self.info, self.nar)
        self.digests.holds = {"http://a:9999": set(), "http://b:9999": {self.h}}
        self.assertEqual(self.lookup(), self.info)
        self.assertEqual(self.narinfo_requests(), {A: 0, B: 1, C: 1})
        self.assertEqual(self.fanout.candidates(self.h), [self.peer(B), self.peer(C)])

    def test_no_digest_matches_no_request(self) -> None:
        """When every peer has a digest and none holds the path, the lookup is a miss at once, with no request."""
        self.digests.holds = {f"http://{h}": set() for h in (A, B, C)}
        d = self.fanout.lookup(self.h)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.lan.requests, [])
        self.assertEqual(self.metrics.get_sample_value("peernix_fanout_misses_total"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_false_claim_reported(self) -> None:
        """A 404 from a peer the digests chose is reported to them (they judge the claim)."""
        self.digests.holds = {f"http://{h}": set() for h in (A, B, C)}
        self.digests.holds["http://a:9999"].add(self.h)
        self.assertIsNone(self.lookup())
        self.assertEqual(self.digests.misses, [("http://a:9999", self.h)])

    def test_newer_digest_clears_cached_miss(self) -> None:
        """A miss is cached; a newer digest holding the path clears it, so the path is found before the negative TTL."""
        self.digests.holds = {f"http://{h}": set() for h in (A, B, C)}
        self.assertIsNone(self.lookup())
        self.lan.peer(B).serve(self.info, self.nar)
        self.assertIsNone(self.lookup())  # still cached
        other = hash_part_of(store_path_for("other"))
        self.assertIsNone(self.successResultOf(self.fanout.lookup(other)))
        self.digests.publish(self.peer(B), self.h)
        self.assertEqual(self.lookup(), self.info)
        self.assertEqual(self.narinfo_requests(), {A: 0, B: 1, C: 0})
        # A miss the new digest does not hold stays cached.
        self.assertEqual(self.fanout._cached(other), (True, None))

    def test_relay_offers_use_candidates(self) -> None:
        """Finding NAR offers asks only the candidates too."""
        self.digests.holds = {"http://a:9999": set(), "http://b:9999": {self.h}, "http://c:9999": set()}
        self.lan.peer(B).serve(self.info, self.nar)
        self.assertEqual(self.lookup(), self.info)
        self.assertEqual(self.narinfo_requests(), {A: 0, B: 1, C: 0})


class UdpDigestFieldTests(SynchronousTestCase):
    """The ``digest`` field of UDP announcements."""

    def make(self, tag: str | None = "abcd1234-3") -> None:
        self.reactor = MemoryUDPReactor()
        self.registry = UdpFakeRegistry()
        self.tag = tag
        self.heard: list[tuple[str, str]] = []
        self.service = UdpDiscoveryService(
            udp=self.reactor, clock=self.reactor, registry=self.registry, store=DictStore({}), node=NODE,
            http_port=9999, udp_port=9999, broadcast_addresses=lambda: list(BROADCASTS),
            digest=DigestHooks(tag=lambda: self.tag, announced=lambda url, tag: self.heard.append((url, tag))),
        )
        self.service.startService()
        self.port = self.reactor.udp_ports[-1]

    def sent(self) -> list[dict[str, Any]]:
        return [json.loads(data) for data, _ in self.port.take() if data.startswith(b"{")]

    def test_announce_carries_digest(self) -> None:
        """Our announcements name our digest's version; a new version is in the next one."""
        self.make()
        self.assertEqual({m.get("digest") for m in self.sent()}, {"abcd1234-3"})
        self.tag = "abcd1234-4"
        self.reactor.advance(3)
        self.assertEqual({m.get("digest") for m in self.sent()}, {"abcd1234-4"})
        self.service.stopService()

    def test_no_digest_before_build(self) -> None:
        """Before our digest is built, announcements carry no digest field."""
        self.make(tag=None)
        self.assertTrue(all("digest" not in m for m in self.sent()))
        self.service.stopService()

    def test_received_digest_reported(self) -> None:
        """A peer's announced version goes to the digests; a Go announce (no field) reports nothing."""
        self.make()
        self.service.protocol.datagramReceived(announce(digest="ffff0000-12"), PEER)
        self.service.protocol.datagramReceived(announce(node_id="go"), ("192.0.2.8", 9999))
        self.assertEqual(self.heard, [("http://192.0.2.7:8080", "ffff0000-12")])
        self.service.stopService()

    def test_malformed_digest_dropped(self) -> None:
        """A digest field that is not a short token makes the datagram malformed."""
        for bad in ("x" * 65, "", 5, "a b", "é"):
            self.assertRaises(DatagramError, parse_datagram, announce(digest=bad))

    def test_announce_soon_rate_limited(self) -> None:
        """A changed digest is announced at once, then at most once a gap; stop cancels a pending one."""
        self.make()
        self.port.take()
        self.reactor.pump([1.0] * 5)
        self.port.take()
        self.service.announce_soon()
        self.assertEqual(len(self.sent()), len(BROADCASTS))
        self.service.announce_soon()
        self.service.announce_soon()
        self.assertEqual(self.sent(), [])
        self.reactor.advance(1.0)
        self.assertEqual(len(self.sent()), len(BROADCASTS))
        self.service.announce_soon()
        self.service.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class DigestKeyUseTests(SynchronousTestCase):
    """The fetched digest answers as the publisher's own."""

    def test_same_answers(self) -> None:
        """Every path in the publisher's digest is in the fetched copy."""
        f = _Lan([A])
        node = f.node(A)
        parts = random_hash_parts(300, seed=9)
        node.scanner.rows = []
        node.add(*[shared(f"q{i}") for i in range(300)])
        f.digests.start()
        f.tick()
        held = f.digests.get("http://a:9999")
        assert held is not None and held.bloom is not None
        for i in range(300):
            self.assertIn(digest_key(info(f"q{i}").hash_part), held.bloom)
        misses = sum(digest_key(h) in held.bloom for h in parts)
        self.assertLess(misses, 15)
        f.digests.stop()


class MdnsDigestTxtTests(SynchronousTestCase):
    """The ``digest=`` TXT record of mDNS."""

    def make(self) -> None:
        from peernix.discovery.mdns import MdnsDiscoveryService
        from peernix.test.discoveryfakes import FakeZeroconf, call_now
        from peernix.test.fakes import run_synchronously

        self.clock = Clock()
        self.registry = UdpFakeRegistry()
        self.zc = FakeZeroconf()
        self.tag: str | None = "abcd1234-1"
        self.heard: list[tuple[str, str]] = []
        self.service = MdnsDiscoveryService(
            registry=self.registry, node=NODE, http_port=9999, clock=self.clock,
            zeroconf_factory=lambda: self.zc, defer_to_thread=run_synchronously, call_from_thread=call_now,
            addresses=lambda: ["192.0.2.1"], hostname="myhost",
            digest=DigestHooks(tag=lambda: self.tag, announced=lambda url, tag: self.heard.append((url, tag))),
        )
        self.service.startService()

    def txt(self) -> bytes | None:
        [info] = self.zc.registered
        value: bytes | None = info.properties.get(b"digest")
        return value

    def test_published_and_updated(self) -> None:
        """Our TXT record carries our digest's version; a change updates it, at most once per gap."""
        self.make()
        self.assertEqual(self.txt(), b"abcd1234-1")
        self.tag = "abcd1234-2"
        self.service.digest_changed()
        # Within the gap of the registration: later, with the version current then.
        self.assertEqual(self.txt(), b"abcd1234-1")
        self.tag = "abcd1234-3"
        self.service.digest_changed()
        self.clock.advance(5)
        self.assertEqual(self.txt(), b"abcd1234-3")
        self.assertEqual([c for c in self.zc.calls if c[0] == "update_service"], [("update_service", self.zc.registered[0].name)])
        self.clock.advance(10)
        self.tag = "abcd1234-4"
        self.service.digest_changed()
        self.assertEqual(self.txt(), b"abcd1234-4")
        self.tag = "abcd1234-5"
        self.service.digest_changed()
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peer_versions_reported(self) -> None:
        """A peer's TXT digest goes to the digests with its URL; a malformed one, or none (Go), does not."""
        from peernix.discovery.mdns import SERVICE_TYPE
        from zeroconf import ServiceInfo

        self.make()
        for name, address, txt in (
            ("a", "192.0.2.5", {"digest": "ffff0000-7"}),
            ("b", "192.0.2.6", {"digest": "bad tag!"}),
            ("go", "192.0.2.7", {}),
        ):
            full = f"{name}-9999-x.{SERVICE_TYPE}"
            self.zc.infos[full] = ServiceInfo(
                SERVICE_TYPE, full, port=9999, server=f"{name}.local.", parsed_addresses=[address],
                properties={"version": "0.1.0", "id": f"id-{name}", **txt},
            )
            self.zc.fire("add_service", SERVICE_TYPE, full)
        self.assertEqual(self.heard, [("http://192.0.2.5:9999", "ffff0000-7")])
        self.service.stopService()


class DigestWiringTests(SynchronousTestCase):
    """build_service wires digests: published, announced, used by the fan-out, shown on /status.json."""

    def build(self, **changes: Any) -> Any:
        import os

        from peernix.interfaces import IStoreScanner
        from peernix.test.fakes import MemoryStore
        from peernix.test.test_service import build, quiet

        root = self.mktemp()
        os.makedirs(root)
        scanner = FakeScanner()
        scanner.add(shared("x"), info("private"))

        @implementer(IStoreScanner)
        class ScannableStore(MemoryStore):
            def database_state(self) -> Any:
                return scanner.database_state()

            def scan_paths(self, after_id: int, accept: Any) -> Any:
                return scanner.scan_paths(after_id, accept)

        from peernix.test.test_store_share import UPSTREAM

        config = quiet(trusted_public_keys=(UPSTREAM.public_key.to_string(),), **changes)
        service, reactor = build(self, config, store=ScannableStore(root))
        return service

    def get(self, service: Any, path: str) -> tuple[int, bytes]:
        from treq.testing import StubTreq

        http = StubTreq(service.app.resource())
        response = self.successResultOf(http.get(f"http://127.0.0.1{path}"))  # type: ignore[attr-defined]
        return response.code, self.successResultOf(response.content())

    def test_wired(self) -> None:
        """By default the digest of the shared paths is published, announced, and peers' digests feed the fan-out."""
        service = self.build()
        self.assertIn("digests", [c.name for c in service])
        self.assertIs(service.upstream._digests, service.peer_digests)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.digest.paths, 1)
        self.assertTrue(service.digest.contains(info("x").hash_part))
        self.assertFalse(service.digest.contains(info("private").hash_part))
        code, body = self.get(service, "/peernix/digest")
        self.assertEqual((code, body), (200, service.digest.digest_bytes()))
        code, body = self.get(service, "/metrics")
        self.assertIn(b"peernix_digest_paths 1.0", body)
        self.assertIn(f"peernix_digest_bytes {float(len(service.digest.digest_bytes()))}".encode(), body)
        code, body = self.get(service, "/status.json")
        digests = json.loads(body)["digests"]
        self.assertEqual(digests["own"]["paths"], 1)
        self.assertEqual(digests["peers"], {})
        self.assertIn(b'"digest":"' + service.digest.tag.encode(), service.udp.protocol.announce_datagram)

    def test_no_digest(self) -> None:
        """With --no-digest nothing is published or fetched and every peer is asked, as before."""
        service = self.build(digest=False)
        self.assertNotIn("digests", [c.name for c in service])
        self.assertIsNone(service.digest)
        self.assertIsNone(service.peer_digests)
        self.assertIsNone(service.upstream._digests)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.get(service, "/peernix/digest")[0], 404)
        self.assertIsNone(json.loads(self.get(service, "/status.json")[1])["digests"])
        self.assertNotIn(b'"digest"', service.udp.protocol.announce_datagram)

    def test_options(self) -> None:
        """--digest-fp-rate and --digest-interval reach the publisher and the peers' digests; bad rates are refused."""
        from twisted.python.usage import UsageError

        from peernix.options import parse_args

        config = parse_args(["--digest-fp-rate", "0.001", "--digest-interval", "5"])
        self.assertEqual((config.digest_fp_rate, config.digest_interval, config.digest), (0.001, 5.0, True))
        self.assertFalse(parse_args(["--no-digest"]).digest)
        for bad in ("0", "0.6", "-1", "nan", "x"):
            self.assertRaises(UsageError, parse_args, ["--digest-fp-rate", bad])
        service = self.build(digest_fp_rate=0.001, digest_interval=5.0)
        self.assertEqual(service.digest.fp_rate, 0.001)
        self.assertEqual(service.peer_digests._interval, 5.0)

    def test_config_file(self) -> None:
        """The options are TOML keys too."""
        from peernix.options import read_config_file

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("digest = false\ndigest_fp_rate = 0.02\ndigest_interval = 60\n")
        config = read_config_file(path)
        self.assertEqual((config["digest"], config["digest_fp_rate"], config["digest_interval"]), (False, 0.02, 60.0))


class DigestMemoryTests(SynchronousTestCase):
    """All peers' digests together are bounded."""

    def test_total_budget(self) -> None:
        """A digest that would pass the total budget is not kept; its peer is asked for everything."""
        f = _Lan([A, C], max_total_bytes=400)
        f.node(A).add(*[shared(f"p{i}") for i in range(10)])
        f.node(C).add(*[shared(f"q{i}") for i in range(10)])
        f.digests.start()
        f.tick()
        states = sorted(d.state for d in (f.digests.get("http://a:9999"), f.digests.get("http://c:9999")) if d)
        self.assertEqual(states, ["error", "ok"])
        self.assertEqual(len(f.chosen(info("nowhere").hash_part)), 1)
        f.digests.stop()

    def test_unusable_version_not_refetched_on_announcements(self) -> None:
        """Announcements of a version that gave no usable digest do not make us fetch it again before the interval."""
        f = _Lan([A], interval=30.0)

        class Garbage(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                request.setHeader(b"Content-Type", DIGEST_CONTENT_TYPE)
                request.setHeader(b"ETag", b'"bad-1"')
                return b"\x00" * 20

        f.lan.peer(A).digest = Garbage()
        f.digests.start()
        f.tick()
        for _ in range(10):
            f.digests.announced("http://a:9999", "bad-1")
            f.tick(1)
        self.assertEqual(len(f.digest_requests(A)), 1)
        f.digests.stop()
