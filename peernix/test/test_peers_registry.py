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
