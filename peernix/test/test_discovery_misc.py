"""Tests for :mod:`peernix.discovery.addresses`, :mod:`.nodeinfo`, :mod:`.static` and :mod:`.ratelimit`."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from attrs import frozen
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from peernix.discovery.addresses import host_addresses, ipv4_broadcast_addresses, peer_url, publishable_addresses
from peernix.discovery.nodeinfo import (
    detect_nix_version,
    detect_node_info,
    detect_platform,
    parse_nix_version,
)
from peernix.discovery.ratelimit import KeyedRateLimiter
from peernix.discovery.static import StaticPeersService
from peernix.interfaces import IDiscovery
from peernix.test.discoveryfakes import FakeRegistry


@frozen
class _IP:
    ip: Any
    network_prefix: int


@frozen
class _Adapter:
    ips: list[_IP]


ADAPTERS = [
    _Adapter([_IP("127.0.0.1", 8), _IP(("::1", 0, 0), 128)]),
    _Adapter([_IP("192.0.2.2", 24), _IP(("fd00::2", 0, 0), 64), _IP(("fe80::fc:ff:fe00:1", 0, 4), 64)]),
    _Adapter([_IP("10.1.2.3", 16), _IP("10.9.9.9", 32), _IP("192.0.2.3", 24)]),
]


class AddressesTests(SynchronousTestCase):
    """Interface addresses and peer URLs."""

    def test_broadcast_addresses(self) -> None:
        """Directed broadcasts of non-loopback IPv4 networks, deduplicated, then 255.255.255.255."""
        self.assertEqual(ipv4_broadcast_addresses(ADAPTERS), ["192.0.2.255", "10.1.255.255", "255.255.255.255"])

    def test_broadcast_addresses_system(self) -> None:
        """Reading the real interfaces returns at least the limited broadcast address."""
        self.assertEqual(ipv4_broadcast_addresses()[-1], "255.255.255.255")

    def test_host_addresses(self) -> None:
        """With IPv4 addresses, only those (every mDNS client, the Go one included, can use them); never loopback."""
        self.assertEqual(host_addresses(ADAPTERS), ["192.0.2.2", "10.1.2.3", "10.9.9.9", "192.0.2.3"])
        self.assertEqual(host_addresses(ADAPTERS, ipv6=False), ["192.0.2.2", "10.1.2.3", "10.9.9.9", "192.0.2.3"])

    def test_host_addresses_link_local_only_ipv6(self) -> None:
        """An interface with IPv4 and only a link-local IPv6 address publishes its IPv4 address only."""
        adapters = [
            _Adapter([_IP("127.0.0.1", 8), _IP(("::1", 0, 0), 128)]),
            _Adapter([_IP("10.0.0.2", 24), _IP(("fe80::fc:ff:fe00:2", 0, 7), 64)]),
        ]
        self.assertEqual(host_addresses(adapters), ["10.0.0.2"])

    def test_host_addresses_ipv6_only(self) -> None:
        """A host without IPv4 publishes its global and ULA IPv6 addresses, never link-local ones."""
        adapters = [
            _Adapter([_IP("127.0.0.1", 8)]),
            _Adapter([_IP(("fe80::1", 0, 2), 64), _IP(("fd00::2", 0, 0), 64), _IP(("2001:db8::2", 0, 0), 64)]),
            _Adapter([_IP(("fe80::3", 0, 3), 64)]),
        ]
        self.assertEqual(host_addresses(adapters), ["fd00::2", "2001:db8::2"])
        self.assertEqual(host_addresses(adapters, ipv6=False), [])
        self.assertEqual(host_addresses([_Adapter([_IP(("fe80::3", 0, 3), 64), _IP("127.0.0.1", 8)])]), [])

    def test_publishable_addresses(self) -> None:
        """Zones are stripped, junk, loopback, multicast and unspecified addresses skipped; IPv4 link-local (no zone needed) kept."""
        self.assertEqual(
            publishable_addresses(["fe80::1%eth0", "169.254.3.4", "::1", "224.0.0.251", "0.0.0.0", "x", "169.254.3.4"]),
            ["169.254.3.4"],
        )
        self.assertEqual(publishable_addresses(["fe80::1%eth0", "fd12::1%eth0", "ff02::fb"]), ["fd12::1"])

    def test_peer_url(self) -> None:
        """IPv4 and names stay bare, IPv6 is bracketed with its zone kept."""
        self.assertEqual(peer_url("192.0.2.1", 9999), "http://192.0.2.1:9999")
        self.assertEqual(peer_url("peer.lan", 80), "http://peer.lan:80")
        self.assertEqual(peer_url("2001:db8::1", 9999), "http://[2001:db8::1]:9999")
        self.assertEqual(peer_url("fe80::1%eth0", 9999), "http://[fe80::1%eth0]:9999")
        self.assertEqual(peer_url("fe80::1%3", 1), "http://[fe80::1%3]:1")

    def test_peer_url_rejects(self) -> None:
        """Bad ports and hosts raise ValueError."""
        for host, port in [("192.0.2.1", 0), ("192.0.2.1", 65536), ("", 1), ("a/b", 1), ("a@b", 1),
                           ("fe80::1%", 1), ("not:v6", 1), ("[::1]", 1)]:
            with self.assertRaises(ValueError, msg=host):
                peer_url(host, port)


class NodeInfoTests(SynchronousTestCase):
    """Detecting what we announce."""

    def test_parse_nix_version(self) -> None:
        """The version is the last word of the first line."""
        self.assertEqual(parse_nix_version("nix-store (Nix) 2.8.0\n"), "2.8.0")
        self.assertEqual(parse_nix_version("nix (Nix) 2.18.1"), "2.18.1")
        self.assertEqual(parse_nix_version(""), "unknown")
        self.assertEqual(parse_nix_version("garbage"), "unknown")

    def test_detect_nix_version_failures(self) -> None:
        """A missing, failing or hanging nix-store gives "unknown"."""

        def missing(*a: Any, **k: Any) -> subprocess.CompletedProcess[str]:
            raise FileNotFoundError("nix-store")

        def hanging(*a: Any, **k: Any) -> subprocess.CompletedProcess[str]:
            raise subprocess.TimeoutExpired("nix-store", k["timeout"])

        def failing(*a: Any, **k: Any) -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(a[0], 1, "", "error")

        for run in (missing, hanging, failing):
            self.assertEqual(detect_nix_version(run), "unknown")

    def test_detect_nix_version_real(self) -> None:
        """The installed nix-store reports a version."""
        if shutil.which("nix-store") is None:
            raise self.skipTest("nix-store not installed")
        self.assertRegex(detect_nix_version(), r"^\d+\.\d+")

    def test_platform(self) -> None:
        """Machine names are mapped to Nix system names."""
        self.assertEqual(detect_platform("x86_64", "Linux"), "x86_64-linux")
        self.assertEqual(detect_platform("arm64", "Darwin"), "aarch64-darwin")
        self.assertEqual(detect_platform("AMD64", "Linux"), "x86_64-linux")
        self.assertRegex(detect_platform(), r"^[a-z0-9_]+-[a-z]+$")

    def test_node_info(self) -> None:
        """Defaults: signing feature only with a key, a fresh node id per call."""
        a = detect_node_info("k:AAAA", nix_version="2.8.0", platform="x86_64-linux")
        b = detect_node_info("", nix_version="2.8.0", platform="x86_64-linux")
        self.assertIn("signing", a.features)
        self.assertNotIn("signing", b.features)
        self.assertNotEqual(a.node_id, b.node_id)
        self.assertEqual(len(a.node_id), 16)


class StaticPeersTests(SynchronousTestCase):
    """Configured peers."""

    def test_lifecycle(self) -> None:
        """Start adds each configured URL once with source static; stop removes them."""
        registry = FakeRegistry()
        service = StaticPeersService(registry, ["http://192.0.2.1:9999", "http://[fe80::1%eth0]:9999", "http://192.0.2.1:9999"])
        self.assertTrue(verifyObject(IDiscovery, service))
        self.assertEqual(service.name, "static")
        service.startService()
        self.assertEqual(
            registry.adds(),
            [("add", "http://192.0.2.1:9999", "static", None), ("add", "http://[fe80::1%eth0]:9999", "static", None)],
        )
        service.stopService()
        self.assertEqual(registry.urls(), set())


class RateLimiterTests(SynchronousTestCase):
    """Token buckets."""

    def test_bucket(self) -> None:
        """A key may spend its burst, then gains rate tokens a second, never more than burst."""
        clock = Clock()
        limiter = KeyedRateLimiter(clock, rate=2.0, burst=3.0)
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])
        self.assertTrue(limiter.allow("b"))
        clock.advance(0.5)
        self.assertEqual([limiter.allow("a") for _ in range(2)], [True, False])
        clock.advance(100)
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])

    def test_bounded(self) -> None:
        """The least recently used key is forgotten beyond max_keys."""
        limiter = KeyedRateLimiter(Clock(), rate=1.0, burst=1.0, max_keys=2)
        limiter.allow("a")
        limiter.allow("b")
        limiter.allow("a")
        limiter.allow("c")
        self.assertEqual(len(limiter), 2)
        self.assertFalse(limiter.allow("a"))
        self.assertTrue(limiter.allow("b"))
