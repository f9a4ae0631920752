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
