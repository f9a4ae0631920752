"""Tests for :mod:`peernix.peers.registry`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from peernix.interfaces import IPeerRegistry
from peernix.peers.registry import Peer, PeerRegistry, backoff_delay, parse_peer_url
from peernix.test.peerfakes import FakeRegistry


class ParsePeerUrlTests(SynchronousTestCase):
    """Validating and normalising peer base URLs."""

    def test_normalises(self) -> None:
        """Accepted forms normalise to ``http://host:port``."""
        cases = {
            "http://10.0.0.1:9999": "http://10.0.0.1:9999",
            "HTTP://Host.Example.:9999/": "http://host.example:9999",
            "http://box:9999/nix-cache/": "http://box:9999",
            " http://box:8080/nix-cache ": "http://box:8080",
            "http://[::1]:9999": "http://[::1]:9999",
            "http://[FE80:0:0::1%eth0]:9999": "http://[fe80::1%eth0]:9999",
            "http://[fe80::1%25wlan0]:9999": "http://[fe80::1%wlan0]:9999",
            "http://[2001:db8::0001]:1": "http://[2001:db8::1]:1",
        }
        for text, expected in cases.items():
            self.assertEqual(parse_peer_url(text), expected, text)

    def test_rejects(self) -> None:
        """Malformed URLs raise ValueError with a message naming the problem."""
        cases = {
            "": "empty",
            "https://box:9999": "scheme",
            "box:9999": "scheme",
            "http://box": "port is required",
            "http://box:0": "port",
            "http://box:99999": "invalid peer URL",
            "http://box:x": "invalid peer URL",
            "http://u:p@box:9999": "user",
            "http://box:9999/other": "expected http://host:port",
            "http://box:9999/?a=b": "query",
            "http://[::1:9999": "invalid peer URL",
            "http://[zz::1]:9999": "IPv6",
            "http://[fe80::1%]:9999": "invalid peer URL",
            "http://bad_host:9999": "host name",
            "http://-a:9999": "host name",
            "http://1.2.3.400:9999": "host name",
        }
        for text, fragment in cases.items():
            e = self.assertRaises(ValueError, parse_peer_url, text)
            self.assertIn(fragment, str(e), text)


class BackoffTests(SynchronousTestCase):
    """The backoff schedule."""

    def test_schedule(self) -> None:
        """Backoff doubles per strike from the base and stops at the cap."""
        self.assertEqual([backoff_delay(n) for n in range(9)], [0, 1, 2, 4, 8, 16, 32, 60, 60])
        self.assertEqual(backoff_delay(1000, cap=5), 5)


class PeerRegistryTests(SynchronousTestCase):
    """The bounded peer table."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = PeerRegistry(self.clock, ttl=120.0, max_peers=3)

    def test_interface(self) -> None:
        """PeerRegistry and FakeRegistry provide IPeerRegistry."""
        verifyObject(IPeerRegistry, self.registry)
        verifyObject(IPeerRegistry, FakeRegistry())

    def test_add_normalises_and_merges(self) -> None:
        """The same peer under two spellings and two sources is one entry."""
        a = self.registry.add("http://Box:9999/", "udp")
        self.clock.advance(5)
        b = self.registry.add("http://box:9999", "mdns", "box-1:KEY")
        self.assertIs(a, b)
        assert a is not None
        self.assertEqual(a.url, "http://box:9999")
        self.assertEqual(a.sources, {"udp", "mdns"})
        self.assertEqual((a.first_seen, a.last_seen, a.public_key), (0, 5, "box-1:KEY"))
        self.assertEqual(len(self.registry.peers()), 1)

    def test_add_invalid(self) -> None:
        """An invalid URL is not admitted and does not raise."""
        self.assertIsNone(self.registry.add("ftp://x:1", "udp"))
        self.assertEqual(self.registry.peers(), [])

    def test_subscribe_new_only(self) -> None:
        """Subscribers hear of genuinely new peers only, and a failing subscriber does not stop others."""
        seen: list[Peer] = []

        def broken(peer: Peer) -> None:
            raise RuntimeError("subscriber bug")

        self.registry.subscribe(broken)
        self.registry.subscribe(seen.append)
        self.registry.add("http://a:1", "udp")
        self.registry.add("http://a:1", "mdns")
        self.registry.add("http://b:1", "udp")
        self.assertEqual([p.url for p in seen], ["http://a:1", "http://b:1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_remove(self) -> None:
        """A peer is dropped when the last source that knows it forgets it."""
        self.registry.add("http://a:1", "udp")
        self.registry.add("http://a:1", "mdns")
        self.registry.remove("http://a:1", "udp")
        self.assertEqual(len(self.registry.peers()), 1)
        self.registry.remove("http://a:1", "mdns")
        self.assertEqual(self.registry.peers(), [])
        self.registry.remove("http://a:1", "mdns")
        self.registry.remove("not a url", "mdns")

    def test_cap_refuses_newcomer(self) -> None:
        """When full, a discovered newcomer is refused rather than evicting healthy peers."""
        for i in range(3):
            self.assertIsNotNone(self.registry.add(f"http://p{i}:1", "udp"))
        self.assertIsNone(self.registry.add("http://new:1", "udp"))
        self.assertEqual(len(self.registry.peers()), 3)

    def test_cap_failing_peer_gives_way(self) -> None:
        """When full, a discovered newcomer replaces a discovered peer that is failing."""
        peers = [self.registry.add(f"http://p{i}:1", "udp") for i in range(3)]
        assert peers[1] is not None
        self.registry.record_failure(peers[1], "timeout")
        new = self.registry.add("http://new:1", "udp")
        self.assertIsNotNone(new)
        self.assertNotIn("http://p1:1", [p.url for p in self.registry.peers()])

    def test_cap_static_admitted(self) -> None:
        """A static newcomer evicts a discovered peer, but static peers never exceed the cap."""
        for i in range(3):
            self.registry.add(f"http://p{i}:1", "udp")
        for i in range(3):
            self.assertIsNotNone(self.registry.add(f"http://s{i}:1", "static"))
        self.assertEqual(sorted(p.url for p in self.registry.peers()), [f"http://s{i}:1" for i in range(3)])
        self.assertIsNone(self.registry.add("http://s3:1", "static"))

    def test_expire(self) -> None:
        """Discovered peers not seen within the TTL expire; static ones never do."""
        self.registry.add("http://static:1", "static")
        self.registry.add("http://old:1", "udp")
        self.registry.add("http://alive:1", "mdns")
        self.clock.advance(100)
        self.registry.add("http://old:1", "udp")
        alive = self.registry.get("http://alive:1")
        assert alive is not None
        self.registry.record_success(alive, 0.01)
        self.clock.advance(100)
        self.registry.expire()
        self.assertEqual(
            sorted(p.url for p in self.registry.peers()), ["http://alive:1", "http://old:1", "http://static:1"]
        )
        self.clock.advance(21)
        self.registry.expire()
        self.assertEqual([p.url for p in self.registry.peers()], ["http://static:1"])

    def test_backoff(self) -> None:
        """Consecutive failures skip a peer for exponentially longer; a success ends it."""
        peer = self.registry.add("http://a:1", "static")
        assert peer is not None
        self.registry.record_failure(peer, "timeout")
        self.assertEqual(self.registry.healthy_peers(), [])
        self.clock.advance(1)
        self.assertEqual(self.registry.healthy_peers(), [peer])
        self.registry.record_failure(peer, "connection")
        self.clock.advance(1.5)
        self.assertEqual(self.registry.healthy_peers(), [])
        self.clock.advance(0.5)
        self.assertEqual(self.registry.healthy_peers(), [peer])
        for _ in range(20):
            self.registry.record_failure(peer, "http")
        self.assertEqual(peer.backoff_until, self.clock.seconds() + 60)
        self.assertEqual(peer.failures, {"timeout": 1, "connection": 1, "http": 20})
        self.registry.record_success(peer, 0.05)
        self.assertEqual(self.registry.healthy_peers(), [peer])
        self.assertEqual(peer.consecutive_failures, 0)

    def test_misbehaviour_weighs_more(self) -> None:
        """Untrusted and verification failures back off longer, and a success only halves them."""
        peer = self.registry.add("http://liar:1", "static")
        assert peer is not None
        self.registry.record_failure(peer, "verification")
        self.assertEqual(peer.backoff_until, 8.0)
        self.registry.record_failure(peer, "untrusted")
        self.assertEqual(peer.strikes, 6)
        self.assertEqual(peer.backoff_until, 32.0)
        self.registry.record_success(peer, 0.01)
        self.assertEqual(peer.strikes, 3)
        self.assertEqual(self.registry.healthy_peers(), [])
        self.clock.advance(4)
        self.assertEqual(self.registry.healthy_peers(), [peer])

    def test_latency_and_score(self) -> None:
        """Latency is an EWMA and healthy peers come best score first."""
        slow = self.registry.add("http://slow:1", "static")
        fast = self.registry.add("http://fast:1", "static")
        assert slow is not None and fast is not None
        self.registry.record_success(slow, 1.0)
        self.registry.record_success(slow, 0.0)
        self.assertAlmostEqual(slow.latency or 0, 0.7)
        self.registry.record_success(fast, 0.01)
        self.assertEqual(self.registry.healthy_peers(), [fast, slow])
        self.assertGreater(fast.score, slow.score)


class VerifiedPeerTests(SynchronousTestCase):
    """Verified peers (signed announcements by a trusted key): marked, preferred, and given room."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = PeerRegistry(self.clock, ttl=120.0, max_peers=8, verified_reserve=2)

    def fill(self, count: int, prefix: str = "p", verified: bool = False) -> list[Peer]:
        peers = [self.registry.add(f"http://{prefix}{i}:1", "udp", verified=verified) for i in range(count)]
        assert all(p is not None for p in peers)
        return [p for p in peers if p is not None]

    def urls(self) -> set[str]:
        return {p.url for p in self.registry.peers()}

    def test_mark_kept_and_lapses(self) -> None:
        """verified=True marks a peer; an unverified sighting keeps the mark; it lapses a TTL after the last verified one."""
        peer = self.registry.add("http://a:1", "udp", verified=True)
        assert peer is not None
        self.assertTrue(peer.verified)
        self.registry.add("http://a:1", "udp")
        self.assertTrue(peer.verified)
        self.clock.advance(100)
        self.registry.add("http://a:1", "udp", verified=True)
        self.clock.advance(100)
        self.registry.add("http://a:1", "udp")
        self.registry.expire()
        self.assertTrue(peer.verified)
        self.clock.advance(21)
        self.registry.expire()
        self.assertFalse(peer.verified)
        self.assertIs(self.registry.get("http://a:1"), peer)
        self.assertFalse(self.registry.add("http://b:1", "udp").verified)  # type: ignore[union-attr]

    def test_verified_first(self) -> None:
        """healthy_peers() and peers() list verified peers first, then by score."""
        fast = self.registry.add("http://fast:1", "udp")
        slow = self.registry.add("http://slow:1", "udp", verified=True)
        assert fast is not None and slow is not None
        self.registry.record_success(fast, 0.001)
        self.registry.record_success(slow, 2.0)
        self.assertEqual(self.registry.healthy_peers(), [slow, fast])
        self.assertEqual(self.registry.peers(), [slow, fast])

    def test_unverified_flood_evicts_no_healthy_peer(self) -> None:
        """With a full table of long-lived healthy peers, a flood of unverified newcomers changes nothing."""
        old = self.fill(6) + self.fill(2, "v", verified=True)
        for peer in old:
            self.registry.record_success(peer, 0.01)
        self.clock.advance(3600)
        for peer in old:
            self.registry.add(peer.url, "udp")
        before = self.urls()
        for i in range(1000):
            self.assertIsNone(self.registry.add(f"http://10.0.{i // 256}.{i % 256}:9999", "udp"))
        self.assertEqual(self.urls(), before)

    def test_unverified_newcomers_never_evict_verified(self) -> None:
        """A failing verified peer does not give way to an unverified newcomer; a failing unverified one does."""
        unverified = self.fill(6)
        verified = self.fill(2, "v", verified=True)
        self.registry.record_failure(verified[0], "timeout")
        self.assertIsNone(self.registry.add("http://new:1", "udp"))
        self.registry.record_failure(unverified[3], "timeout")
        self.assertIsNotNone(self.registry.add("http://new:1", "udp"))
        self.assertNotIn(unverified[3].url, self.urls())
        self.assertIn(verified[0].url, self.urls())

    def test_reserve_for_verified(self) -> None:
        """Unverified discovered peers never take the reserved places; verified newcomers get them."""
        self.fill(6)
        self.assertEqual(len(self.registry), 6)
        self.assertIsNone(self.registry.add("http://u:1", "udp"))
        self.assertIsNone(self.registry.add("http://u:1", "mdns"))
        self.fill(2, "v", verified=True)
        self.assertEqual(len(self.registry), 8)

    def test_verified_newcomer_when_full(self) -> None:
        """A verified newcomer to a full table evicts a failing peer first, else the worst unverified one, never a verified one."""
        unverified = self.fill(6)
        self.fill(2, "v", verified=True)
        for peer in unverified:
            self.registry.record_success(peer, 0.01)
        self.registry.record_success(unverified[2], 0.5)
        self.registry.record_failure(unverified[4], "connection")
        self.assertIsNotNone(self.registry.add("http://w0:1", "udp", verified=True))
        self.assertNotIn(unverified[4].url, self.urls())
        self.assertIsNotNone(self.registry.add("http://w1:1", "udp", verified=True))
        self.assertNotIn(unverified[2].url, self.urls())
        for i in range(2, 6):
            self.assertIsNotNone(self.registry.add(f"http://w{i}:1", "udp", verified=True))
        self.assertTrue(all(p.verified for p in self.registry.peers()))
        self.assertIsNone(self.registry.add("http://w9:1", "udp", verified=True))

    def test_unverified_peer_becoming_verified(self) -> None:
        """A known peer that proves itself is verified in place, without needing room."""
        peers = self.fill(6)
        self.fill(2, "v", verified=True)
        again = self.registry.add(peers[0].url, "udp", verified=True)
        self.assertIs(again, peers[0])
        self.assertTrue(peers[0].verified)

    def test_reserve_validated(self) -> None:
        """The reserve must leave room for at least one unverified peer; the default is a quarter."""
        self.assertRaises(ValueError, PeerRegistry, self.clock, max_peers=4, verified_reserve=4)
        self.assertRaises(ValueError, PeerRegistry, self.clock, max_peers=4, verified_reserve=-1)
        registry = PeerRegistry(self.clock, max_peers=8)
        for i in range(7):
            registry.add(f"http://p{i}:1", "udp")
        self.assertEqual(len(registry), 6)

    def test_fake_registry_marks_verified(self) -> None:
        """The peer-side fake records the verified mark too."""
        fake = FakeRegistry()
        self.assertTrue(fake.add("http://a:1", "udp", verified=True).verified)  # type: ignore[union-attr]
