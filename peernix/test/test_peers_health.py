"""Tests for :mod:`peernix.peers.health`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.peers.client import PeerClient
from peernix.peers.health import HealthChecker
from peernix.peers.registry import PeerRegistry
from peernix.test.peerfakes import FakeLan, FakeRegistry, lan_client


class HealthCheckerTests(SynchronousTestCase):
    """The periodic peer probe."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        http, self.agent = lan_client(self.lan)
        self.client = PeerClient(http, self.clock, timeout=2.0)

    def test_probes_and_records(self) -> None:
        """Each round probes every peer once and records success or the failure kind, then expires."""
        registry = FakeRegistry(["http://up:1", "http://err:1", "http://down:1"])
        self.lan.peer("up:1")
        self.lan.peer("err:1").mode = "error"
        self.lan.peer("down:1").mode = "down"
        checker = HealthChecker(registry, self.client, self.clock, interval=5.0)
        checker.startService()
        self.agent.flush()
        self.assertEqual([u for u, _ in registry.successes], ["http://up:1"])
        self.assertEqual(sorted(registry.failures), [("http://down:1", "connection"), ("http://err:1", "http")])
        self.assertEqual(registry.expired, 1)
        self.assertEqual(self.lan.count("up:1", "/nix-cache/nix-cache-info"), 1)
        self.clock.pump([5.0] * 2)
        self.agent.flush()
        self.assertEqual(self.lan.count("up:1"), 3)
        checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_mid_round(self) -> None:
        """Stopping while probes are in flight cancels them and leaves no timers."""
        registry = FakeRegistry(["http://slow:1"])
        self.lan.peer("slow:1").mode = "slow"
        checker = HealthChecker(registry, self.client, self.clock, interval=5.0)
        checker.startService()
        self.agent.flush()
        self.assertEqual(len(self.lan.peer("slow:1").pending), 1)
        checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(registry.failures, [])

    def test_slow_peer_times_out(self) -> None:
        """A peer that never answers is recorded as a timeout; the next round starts after it."""
        registry = FakeRegistry(["http://slow:1"])
        self.lan.peer("slow:1").mode = "slow"
        checker = HealthChecker(registry, self.client, self.clock, interval=1.0)
        checker.startService()
        self.agent.flush()
        self.clock.advance(2.0)
        self.assertEqual(registry.failures, [("http://slow:1", "timeout")])
        checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_real_registry_recovers_and_expires(self) -> None:
        """With the real registry a probe ends backoff, and discovered peers that stop answering expire."""
        registry = PeerRegistry(self.clock, ttl=10.0)
        peer = registry.add("http://up:1", "udp")
        registry.add("http://gone:1", "udp")
        assert peer is not None
        registry.record_failure(peer, "timeout")
        self.lan.peer("up:1")
        self.lan.peer("gone:1").mode = "down"
        checker = HealthChecker(registry, self.client, self.clock, interval=5.0)
        checker.startService()
        self.agent.flush()
        self.assertEqual([p.url for p in registry.healthy_peers()], ["http://up:1"])
        for _ in range(3):
            self.clock.advance(5.0)
            self.agent.flush()
        self.assertEqual([p.url for p in registry.peers()], ["http://up:1"])
        checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RecoveryTests(SynchronousTestCase):
    """Peers known to be down are probed often, so one that comes back is used again within about a second."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        http, self.agent = lan_client(self.lan)
        self.client = PeerClient(http, self.clock, timeout=2.0)
        self.registry = PeerRegistry(self.clock, ttl=120.0)
        peer = self.registry.add("http://back:1", "static")
        assert peer is not None
        self.peer = peer
        self.registry.add("http://up:1", "static")
        self.lan.peer("up:1")
        self.lan.peer("back:1").mode = "down"
        self.checker = HealthChecker(self.registry, self.client, self.clock, interval=10.0)
        self.checker.startService()
        self.addCleanup(self.checker.stopService)
        self.agent.flush()

    def step(self, seconds: float) -> None:
        """Advance the clock in small steps, delivering every fake HTTP exchange."""
        for _ in range(round(seconds / 0.1)):
            self.clock.advance(0.1)
            self.agent.flush()

    def test_static_peer_back_within_a_second(self) -> None:
        """A static peer down for a while (in long backoff) is healthy again within a second of answering, long before the next round."""
        self.step(45.0)
        self.assertGreater(self.peer.consecutive_failures, 0)
        self.assertNotIn(self.peer, self.registry.healthy_peers())
        self.assertGreater(self.peer.backoff_until - self.clock.seconds(), 5.0)
        self.lan.peer("back:1").mode = "normal"
        self.step(1.0)
        self.assertIn(self.peer, self.registry.healthy_peers())
        self.assertEqual(self.peer.consecutive_failures, 0)

    def test_down_peer_probed_often_but_counted_by_rounds(self) -> None:
        """While down it is probed about twice a second (one GET each), yet its failures are counted once per round only; healthy peers get no extra probes."""
        before = self.lan.count("back:1", "/nix-cache/nix-cache-info")
        self.step(10.5)
        probes = self.lan.count("back:1", "/nix-cache/nix-cache-info") - before
        self.assertGreaterEqual(probes, 15)
        self.assertLessEqual(probes, 24)
        # The first round, plus the one at t=10.
        self.assertEqual(self.peer.failures, {"connection": 2})
        self.assertEqual(self.lan.count("up:1"), 2)

    def test_one_probe_in_flight_and_stop(self) -> None:
        """A peer that hangs gets one recovery probe at a time, cut short after a second; stopping cancels it and leaves no timers."""
        self.lan.peer("back:1").mode = "slow"
        self.step(0.55)
        self.assertEqual(len(self.lan.peer("back:1").pending), 1)
        self.step(0.4)
        self.assertEqual(len(self.lan.peer("back:1").pending), 1)
        # Cut short at 1.5 s; the next tick starts a fresh one.
        self.step(1.1)
        self.assertEqual(len(self.lan.peer("back:1").pending), 2)
        # Recovery probes record nothing; only the first round's failure is counted.
        self.assertEqual(self.peer.failures, {"connection": 1})
        self.checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_back_while_a_probe_hangs(self) -> None:
        """A peer back while a recovery probe still waits on it is found by the next, fresh probe within about a second."""
        self.lan.peer("back:1").mode = "slow"
        self.step(0.6)
        self.lan.peer("back:1").mode = "normal"
        self.step(1.5)
        self.assertIn(self.peer, self.registry.healthy_peers())

    def test_slow_but_alive_peer_not_probed_more(self) -> None:
        """A peer whose fan-out requests failed but whose health probe answers is not "down": no recovery probes between rounds."""
        self.lan.peer("back:1").mode = "normal"
        self.step(10.5)
        up = self.registry.get("http://up:1")
        assert up is not None
        self.registry.record_failure(up, "timeout")
        before = self.lan.count("up:1")
        self.step(5.0)
        self.assertEqual(self.lan.count("up:1"), before)
        self.assertGreater(up.consecutive_failures, 0)
