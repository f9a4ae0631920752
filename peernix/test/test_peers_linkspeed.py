"""Tests for :mod:`peernix.peers.linkspeed`: raw or zstd NARs from the measured link speed (Clock, fakes)."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import NarInfo
from peernix.peers.linkspeed import LinkSpeeds
from peernix.peers.registry import Peer
from peernix.test.test_peers_fanout import HONEST, FanoutTestMixin

MB = 1_000_000
LAN = "http://192.168.1.20:9999"


def peer(url: str = LAN) -> Peer:
    return Peer(url=url, first_seen=0.0, last_seen=0.0)


class LinkSpeedsTests(SynchronousTestCase):
    """The choice follows the measured NAR throughput of each mode."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.speeds = LinkSpeeds(self.clock, explore_every=4)

    def choices(self, n: int, p: Peer | None = None) -> list[bool]:
        p = p or peer()
        return [self.speeds.prefer_zstd(p) for _ in range(n)]

    def test_unmeasured_lan_peer_gets_zstd(self) -> None:
        """With nothing measured a LAN peer is asked for zstd, every time."""
        self.assertEqual(self.choices(5), [True] * 5)

    def test_loopback_never_zstd(self) -> None:
        """A peer on this machine is never asked for zstd, whatever was measured."""
        local = peer("http://127.0.0.1:9999")
        self.speeds.record(local.url, 100 * MB, 10.0, compressed=True)
        self.assertEqual(self.choices(6, local), [False] * 6)

    def test_slow_link_keeps_zstd(self) -> None:
        """Wi-Fi class: raw delivers 11 MB/s, zstd 40 MB/s of NAR: zstd, trying raw now and then."""
        self.speeds.record(LAN, 100 * MB, 9.0, compressed=False)
        self.speeds.record(LAN, 100 * MB, 2.5, compressed=True)
        self.assertEqual(self.choices(8), [True, True, True, False, True, True, True, False])

    def test_fast_link_goes_raw(self) -> None:
        """A link faster than the compressor: raw delivers more, so raw, trying zstd now and then."""
        self.speeds.record(LAN, 500 * MB, 1.0, compressed=False)
        self.speeds.record(LAN, 500 * MB, 2.5, compressed=True)
        self.assertEqual(self.choices(4), [False, False, False, True])

    def test_one_mode_measured_tries_the_other(self) -> None:
        """After the first zstd download the next request tries raw, so both get measured."""
        self.speeds.record(LAN, 100 * MB, 1.0, compressed=True)
        self.assertEqual(self.choices(4), [False, True, True, False])

    def test_small_downloads_not_measured(self) -> None:
        """NARs under a MiB measure latency, not the link: ignored."""
        self.speeds.record(LAN, 500_000, 0.001, compressed=False)
        self.assertIsNone(self.speeds.rate(LAN, False))
        self.speeds.record(LAN, 2 * MB, 0.0, compressed=False)
        self.assertIsNone(self.speeds.rate(LAN, False))

    def test_median_of_recent(self) -> None:
        """The median of the last few downloads counts; an outlier does not flip the choice."""
        for seconds in (1.0, 1.0, 1.0, 50.0):
            self.speeds.record(LAN, 100 * MB, seconds, compressed=False)
        self.assertEqual(self.speeds.rate(LAN, False), 100 * MB)

    def test_old_measurements_expire(self) -> None:
        """Measurements older than max_age no longer count: back to the default."""
        self.speeds.record(LAN, 500 * MB, 1.0, compressed=False)
        self.speeds.record(LAN, 500 * MB, 5.0, compressed=True)
        self.clock.advance(601)
        self.assertIsNone(self.speeds.rate(LAN, False))
        self.assertEqual(self.choices(3), [True] * 3)

    def test_link_changes(self) -> None:
        """When raw slows down (the link changed), the recent measurements win."""
        self.speeds.record(LAN, 500 * MB, 1.0, compressed=False)
        self.speeds.record(LAN, 500 * MB, 2.0, compressed=True)
        self.assertFalse(self.speeds.prefer_zstd(peer()))
        for _ in range(4):
            self.speeds.record(LAN, 500 * MB, 20.0, compressed=False)
        self.assertTrue(self.speeds.prefer_zstd(peer()))

    def test_per_peer(self) -> None:
        """Each peer has its own measurements."""
        other = peer("http://192.168.1.21:9999")
        self.speeds.record(LAN, 500 * MB, 1.0, compressed=False)
        self.speeds.record(LAN, 500 * MB, 5.0, compressed=True)
        self.assertFalse(self.speeds.prefer_zstd(peer()))
        self.assertTrue(self.speeds.prefer_zstd(other))
        self.speeds.forget(LAN)
        self.assertTrue(self.speeds.prefer_zstd(peer()))

    def test_bad_parameters(self) -> None:
        """Nonsense parameters are refused."""
        self.assertRaises(ValueError, LinkSpeeds, self.clock, history=0)
        self.assertRaises(ValueError, LinkSpeeds, self.clock, explore_every=1)


class FanoutLinkSpeedTests(FanoutTestMixin, SynchronousTestCase):
    """The fan-out asks in the chosen mode and measures its relays."""

    def make(self, hosts: list[str], registry_factory: Any = None, **kw: Any) -> None:
        super().make(hosts, registry_factory, **kw)
        #: The prefer_zstd of every narinfo request (None: the client's default).
        self.asked: list[bool | None] = []
        fetch = self.client.fetch_narinfo

        def spy(p: Peer, hash_part: str, *, prefer_zstd: bool | None = None) -> Deferred[NarInfo | None]:
            self.asked.append(prefer_zstd)
            return fetch(p, hash_part, prefer_zstd=prefer_zstd)

        self.client.fetch_narinfo = spy  # type: ignore[method-assign,assignment]

    def zstd_asks(self) -> int:
        """:returns: how many narinfo requests asked for zstd (the client's default counts: a LAN peer)."""
        return sum(1 for z in self.asked if z is None or z)

    def test_raw_when_raw_is_faster(self) -> None:
        """Measured: raw faster; the narinfo request to that peer asks for no zstd."""
        self.make([HONEST], link_speeds=LinkSpeeds(Clock()))
        speeds = self.fanout.link_speeds
        assert speeds is not None
        url = f"http://{HONEST}"
        speeds.record(url, 500 * MB, 1.0, compressed=False)
        speeds.record(url, 500 * MB, 3.0, compressed=True)
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        self.assertEqual(self.narinfo_requests(HONEST), 1)
        self.assertEqual(self.asked, [False])

    def test_zstd_by_default_and_relay_measured(self) -> None:
        """Unmeasured: zstd is asked; the relayed NAR's throughput is recorded as a zstd measurement."""
        speeds = LinkSpeeds(Clock(), min_bytes=1)
        self.make([HONEST], link_speeds=speeds)
        # Time passes as the fake LAN answers: every reading of the clock is 0.25 s later.
        now = [0.0]

        def ticking() -> float:
            now[0] += 0.25
            return now[0]

        self.clock.seconds = ticking  # type: ignore[method-assign]
        speeds._clock = self.clock
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        self.assertEqual(self.asked, [True])
        consumer = StringTransport()
        d = self.fanout.relay_nar(self.info, consumer)
        self.agent.flush()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertIsNotNone(speeds.rate(f"http://{HONEST}", True))
        self.assertIsNone(speeds.rate(f"http://{HONEST}", False))

    def test_without_link_speeds(self) -> None:
        """No LinkSpeeds: the client's default (zstd to a LAN peer), as before."""
        self.make([HONEST])
        self.assertIsNone(self.fanout.link_speeds)
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        self.assertEqual(self.zstd_asks(), 1)
