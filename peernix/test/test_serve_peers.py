"""
``--serve-peers no`` as peers learn it, socket-free: the UDP announce field,
the mDNS TXT record, the health probe's header, the registry and the fan-out
skipping such peers; and the fan-out naming the peer that answered.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from peernix.discovery.datagrams import Announce, parse_datagram, render_datagram
from peernix.discovery.mdns import build_service_info, resolved_peer
from peernix.discovery.signed import AnnounceKeys
from peernix.interfaces import IPeerRegistry
from peernix.peers.client import PeerClient
from peernix.peers.health import HealthChecker
from peernix.peers.registry import PeerRegistry
from peernix.sources import Found, peer_source
from peernix.test import discoveryfakes, peerfakes
from peernix.test.peerfakes import FakeLan, lan_client
from peernix.test.test_discovery_mdns import peer_info
from peernix.test.test_discovery_udp import NODE, OUR_KEY, _Fixture, announce
from peernix.test.test_peers_fanout import HONEST, FanoutTestMixin


class AnnounceTests(SynchronousTestCase):
    """The UDP announce carries serve_peers only when false; Go nodes never send it."""

    def test_render_and_parse(self) -> None:
        """serve_peers false is rendered and parsed back; absent means serving; not a boolean is an error."""
        consuming = Announce(peernix_version="1", port=9999, serve_peers=False)
        wire = render_datagram(consuming)
        self.assertEqual(json.loads(wire)["serve_peers"], False)
        self.assertEqual(parse_datagram(wire), consuming)
        serving = Announce(peernix_version="1", port=9999)
        self.assertNotIn(b"serve_peers", render_datagram(serving))
        self.assertTrue(parse_datagram(render_datagram(serving)).serve_peers)  # type: ignore[union-attr]
        from peernix.discovery.datagrams import DatagramError

        self.assertRaises(DatagramError, parse_datagram, announce(serve_peers="no"))
        limited = Announce(peernix_version="1", port=9999, max_upload_rate=20_000_000)
        self.assertEqual(json.loads(render_datagram(limited))["max_upload_rate"], 20_000_000)
        self.assertEqual(parse_datagram(render_datagram(limited)), limited)
        self.assertNotIn(b"max_upload_rate", render_datagram(serving))
        for bad in (0, -5, "20M", True, 1.5):
            self.assertRaises(DatagramError, parse_datagram, announce(max_upload_rate=bad))

    def test_our_announces_say_it(self) -> None:
        """A consume-only node's broadcast and replies (full and compact, signed) say serve_peers false."""
        f = _Fixture(node=attrs.evolve(NODE, serve_peers=False, max_upload_rate=1_000_000),
                     keys=AnnounceKeys(OUR_KEY, []))
        f.service.startService()
        port = f.reactor.udp_ports[-1]
        sent = [json.loads(data) for data, _ in port.take()]
        self.assertTrue(sent)
        self.assertTrue(all(obj["serve_peers"] is False for obj in sent))
        self.assertTrue(all(obj["max_upload_rate"] == 1_000_000 for obj in sent))
        # A long enough announce: answers are never longer than the request.
        f.receive(announce(features=["x" * 40] * 10))
        replies = [json.loads(data) for data, _ in port.take()]
        self.assertTrue(replies)
        self.assertTrue(all(obj["serve_peers"] is False for obj in replies))

    def test_received_marks_the_peer(self) -> None:
        """An announce with serve_peers false marks its peer not serving; a later one without it serving again."""
        f = _Fixture()
        f.start()
        f.receive(announce(serve_peers=False))
        self.assertIn(("serving", "http://192.0.2.7:8080", False), f.registry.calls)
        self.assertEqual(f.registry.healthy_peers(), [])
        f.reactor.advance(60)
        f.receive(announce())
        self.assertEqual([p.url for p in f.registry.healthy_peers()], ["http://192.0.2.7:8080"])


class MdnsTests(SynchronousTestCase):
    """The mDNS TXT record serve=0."""

    def test_txt(self) -> None:
        """A consume-only node registers serve=0; a serving one no serve record; resolving reads it."""
        node = attrs.evolve(NODE, serve_peers=False, max_upload_rate=20_000_000)
        info = build_service_info(node, 9999, "h-9999-id", ["192.0.2.1"])
        self.assertEqual(info.properties[b"serve"], b"0")
        self.assertEqual(info.properties[b"upload_rate"], b"20000000")
        self.assertNotIn(b"serve", build_service_info(NODE, 9999, "h-9999-id", ["192.0.2.1"]).properties)
        self.assertFalse(resolved_peer(peer_info(["192.0.2.5"], serve="0")).serving)
        self.assertTrue(resolved_peer(peer_info(["192.0.2.5"])).serving)


class HealthTests(SynchronousTestCase):
    """Static peers learn it from the health probe's nix-cache-info header."""

    def test_probe_reads_serve_header(self) -> None:
        """A peer answering X-Peernix-Serve-Peers: no is left out of healthy peers until it says yes."""
        clock = Clock()
        lan = FakeLan()
        http, agent = lan_client(lan)
        client = PeerClient(http, clock, timeout=2.0)
        registry = PeerRegistry(clock)
        registry.add("http://consumer:1", "static")
        registry.add("http://go:1", "static")
        lan.peer("consumer:1").serving = False
        lan.peer("go:1")  # no header at all, as the Go peernix
        checker = HealthChecker(registry, client, clock, interval=5.0)
        checker.startService()
        agent.flush()
        self.assertEqual([p.url for p in registry.healthy_peers()], ["http://go:1"])
        self.assertEqual(len(registry.peers()), 2)
        lan.peer("consumer:1").serving = True
        clock.advance(5.0)
        agent.flush()
        self.assertEqual(sorted(p.url for p in registry.healthy_peers()), ["http://consumer:1", "http://go:1"])
        checker.stopService()

    def test_fakes_verify(self) -> None:
        """Both fake registries still implement IPeerRegistry (record_serving included)."""
        self.assertTrue(verifyObject(IPeerRegistry, peerfakes.FakeRegistry()))
        self.assertTrue(verifyObject(IPeerRegistry, discoveryfakes.FakeRegistry()))
        self.assertTrue(verifyObject(IPeerRegistry, PeerRegistry(Clock())))


class FanoutSourceTests(FanoutTestMixin, SynchronousTestCase):
    """The fan-out names the peer that answered and never asks consume-only peers."""

    def test_find_names_the_winner(self) -> None:
        """find() gives the narinfo and the winning peer's base URL; lookup() the narinfo alone."""
        self.make([HONEST, "other:9999"])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        d = self.fanout.find(self.h)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), Found(self.info, peer_source(f"http://{HONEST}")))
        self.assertEqual(self.successResultOf(self.lookup()), self.info)

    def test_relay_reports_the_sending_peer(self) -> None:
        """relay_nar calls on_peer with the base URL of the peer whose NAR it writes, before the first byte."""
        self.make([HONEST])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        consumer = StringTransport()
        seen: list[tuple[str, int]] = []
        d = self.fanout.relay_nar(self.info, consumer, lambda url: seen.append((url, len(consumer.value()))))
        self.agent.flush()
        self.successResultOf(d)
        self.assertEqual(seen, [(f"http://{HONEST}", 0)])
        self.assertEqual(consumer.value(), self.nar)

    def test_consume_only_peer_never_asked(self) -> None:
        """A peer that said it serves no peers gets no narinfo request, even holding the path."""
        self.make([HONEST, "consumer:9999"])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.lan.peer("consumer:9999").serve(self.info, self.nar)
        consumer = self.registry.add("http://consumer:9999", "static")
        assert consumer is not None
        self.registry.record_serving(consumer, False)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.narinfo_requests("consumer:9999"), 0)
