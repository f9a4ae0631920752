"""Tests of announcing fetching for the LAN: UDP ``fetch_for_lan`` and mDNS TXT ``fetch=1``."""

from __future__ import annotations

import json

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zeroconf import ServiceInfo

from peernix.discovery.datagrams import Announce, DatagramError, parse_datagram, render_datagram
from peernix.discovery.mdns import SERVICE_TYPE, build_service_info, resolved_peer
from peernix.test.test_discovery_udp import NODE, _Fixture, announce


class DatagramTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """fetch_for_lan is rendered as true and parsed back; absent means False."""
        a = Announce(peernix_version="0.2", node_id="n1", port=9999, fetch_for_lan=True)
        data = render_datagram(a)
        self.assertIn(b'"fetch_for_lan":true', data)
        self.assertEqual(parse_datagram(data), a)
        plain = render_datagram(attrs.evolve(a, fetch_for_lan=False))
        self.assertNotIn(b"fetch_for_lan", plain)
        parsed = parse_datagram(plain)
        assert isinstance(parsed, Announce)
        self.assertFalse(parsed.fetch_for_lan)

    def test_go_announce(self) -> None:
        """A Go node's announce (no such field) does not offer fetching."""
        go = json.dumps({"cmd": "announce", "peernix_version": "0.1.0", "nix_version": "2.24",
                         "platform": "x86_64-linux", "features": ["compression"], "port": 9999}).encode()
        parsed = parse_datagram(go)
        assert isinstance(parsed, Announce)
        self.assertFalse(parsed.fetch_for_lan)

    def test_not_a_boolean(self) -> None:
        """A non-boolean fetch_for_lan is a malformed announce."""
        with self.assertRaises(DatagramError):
            parse_datagram(announce(fetch_for_lan="yes"))


class UdpTests(SynchronousTestCase):
    def test_our_announce_says_so(self) -> None:
        """A node fetching for the LAN announces fetch_for_lan: true."""
        f = _Fixture(node=attrs.evolve(NODE, fetch_for_lan=True))
        obj = json.loads(f.service.protocol.announce_datagram)
        self.assertIs(obj["fetch_for_lan"], True)
        f = _Fixture()
        self.assertNotIn("fetch_for_lan", json.loads(f.service.protocol.announce_datagram))

    def test_offers_reported(self) -> None:
        """Full announces (with node_id) report the offer; those without a node_id report nothing."""
        f = _Fixture()
        seen: list[tuple[str, str | None, bool]] = []
        f.service.protocol._on_fetch_offer = lambda *a: seen.append(a)
        f.receive(announce(fetch_for_lan=True))
        f.receive(announce(node_id="peer2"), ("192.0.2.8", 9999))
        f.receive(announce(node_id=None, reply=True), ("192.0.2.9", 9999))
        self.assertEqual(seen, [("http://192.0.2.7:8080", "peer1", True), ("http://192.0.2.8:8080", "peer2", False)])


class MdnsTests(SynchronousTestCase):
    def test_txt(self) -> None:
        """A node fetching for the LAN registers TXT fetch=1; others have no fetch record."""
        info = build_service_info(attrs.evolve(NODE, fetch_for_lan=True), 9999, "h-9999-id", ["192.0.2.1"])
        self.assertEqual(info.properties[b"fetch"], b"1")
        self.assertNotIn(b"fetch", build_service_info(NODE, 9999, "h-9999-id", []).properties)

    def test_resolved(self) -> None:
        """fetch=1 in a resolved service marks the peer as offering fetching."""
        def info(props: dict[str, str]) -> ServiceInfo:
            return ServiceInfo(SERVICE_TYPE, f"peer.{SERVICE_TYPE}", port=9999, properties=props,
                               server="peer.local.", parsed_addresses=["192.0.2.5"])

        self.assertTrue(resolved_peer(info({"id": "x", "fetch": "1"})).fetch_for_lan)
        self.assertFalse(resolved_peer(info({"id": "x"})).fetch_for_lan)
        self.assertFalse(resolved_peer(info({"id": "x", "fetch": "0"})).fetch_for_lan)



