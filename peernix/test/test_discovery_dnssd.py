"""
Tests for :mod:`peernix.discovery.dnssd`: against a ``twisted.names``
authority used as the resolver (no sockets, a ``Clock``), and against a
``twisted.names`` DNS server on a random UDP port of 127.0.0.1 asked by the
real stub resolver.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.interfaces import IResolver
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.names import dns, error
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.discovery.dnssd import (
    SOURCE,
    DnsSdDiscoveryService,
    close_resolver,
    parse_txt,
    service_name,
    system_resolver,
)
from peernix.interfaces import IDiscovery
from peernix.test.discoveryfakes import FakeRegistry
from peernix.test.dnszone import MemoryZone, add_instance, load_zone
from peernix.test.test_discovery_datagrams import PUBKEY

DOMAIN = "peernix.test"
SERVICE = service_name(DOMAIN)
PORT = 9999
OUR_ID = "our-node-id"


@implementer(IResolver)
class SwitchableResolver:
    """
    Passes lookups to a zone, or, when :attr:`mode` says so, never answers
    (``"hang"``) or fails like a broken server (``"servfail"``).

    :ivar asked: ``(method, name)`` of every lookup.
    :ivar pending: the lookups left hanging.
    """

    def __init__(self, zone: MemoryZone) -> None:
        self.zone = zone
        self.mode = "answer"
        self.asked: list[tuple[str, str]] = []
        self.pending: list[Deferred[Any]] = []
        self.only: set[str] | None = None

    def __getattr__(self, method: str) -> Any:
        if not method.startswith("lookup"):
            raise AttributeError(method)

        def lookup(name: str | bytes, timeout: Any = None) -> Deferred[Any]:
            # The service asks with the bytes it received; recorded as text.
            name = name.decode("latin-1") if isinstance(name, bytes) else name
            self.asked.append((method, name))
            affected = self.only is None or name in self.only
            if self.mode == "hang" and affected:
                d: Deferred[Any] = Deferred()
                self.pending.append(d)
                return d
            if self.mode == "servfail" and affected:
                return fail(error.DNSServerError(dns.Message()))
            result: Deferred[Any] = getattr(self.zone, method)(name.encode("latin-1"), timeout)
            return result

        return lookup


def make_zone() -> MemoryZone:
    """A zone listing alice (IPv4, pubkey) and bob (IPv6 only)."""
    zone = MemoryZone(DOMAIN)
    add_instance(zone, DOMAIN, "alice", [("alice.hosts.peernix.test", PORT, ["192.0.2.10"])],
                 {"pubkey": PUBKEY, "id": "alice-id", "version": "0.1.0"})
    add_instance(zone, DOMAIN, "bob", [("bob.hosts.peernix.test", 9998, ["2001:db8::b0b"])])
    return zone


class DnsSdUnitTestCase(SynchronousTestCase):
    """A service over a :class:`SwitchableResolver`, a ``Clock`` and a :class:`FakeRegistry`."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.zone = make_zone()
        self.resolver = SwitchableResolver(self.zone)
        self.own = ["192.0.2.1", "2001:db8::1"]

    def start(self, domains: tuple[str, ...] = (DOMAIN,), **kwargs: Any) -> DnsSdDiscoveryService:
        kwargs.setdefault("node_id", OUR_ID)
        service = DnsSdDiscoveryService(self.registry, domains, PORT, self.clock, lambda: self.resolver,
                                        interval=60.0, query_timeout=5.0, own_addresses=lambda: self.own,
                                        **kwargs)
        service.startService()
        self.addCleanup(self.stop, service)
        return service

    def stop(self, service: DnsSdDiscoveryService) -> None:
        if service.running:
            service.stopService()

    def urls(self) -> set[str]:
        return self.registry.urls(SOURCE)


class TxtTests(SynchronousTestCase):
    """RFC 6763 TXT strings."""

    def test_pairs(self) -> None:
        """key=value pairs, keys case-insensitive, the first wins, bare keys have no value."""
        self.assertEqual(parse_txt([b"pubkey=a:b", b"PubKey=second", b"flag", b"empty=", b"", b"=nokey",
                                    b"x=y=z"]),
                         {"pubkey": "a:b", "flag": None, "empty": "", "x": "y=z"})

    def test_bad_bytes(self) -> None:
        """Values that are not printable UTF-8 are dropped, keys that are not ASCII too."""
        self.assertEqual(parse_txt([b"a=\xff", b"b=line\nbreak", b"\xc3\xa9=x", b"c=\xc3\xa9"]), {"c": "\u00e9"})


class ResolutionTests(DnsSdUnitTestCase):
    """What a resolution puts into the registry."""

    def test_interface(self) -> None:
        """The service provides IDiscovery under the source name dns-sd."""
        service = self.start()
        self.assertTrue(verifyObject(IDiscovery, service))
        self.assertEqual(service.name, "dns-sd")

    def test_found_at_start(self) -> None:
        """Both instances are added at start-up: IPv4, and an IPv6 literal in brackets, with the TXT key."""
        service = self.start()
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998"})
        self.assertIn(("add", "http://192.0.2.10:9999", SOURCE, PUBKEY), self.registry.calls)
        self.assertIn(("add", "http://[2001:db8::b0b]:9998", SOURCE, None), self.registry.calls)
        self.assertEqual(service.resolutions, 1)
        # PTR, then SRV and TXT of each instance, then addresses: bob has no A, so AAAA too.
        asked = set(self.resolver.asked)
        self.assertIn(("lookupPointer", SERVICE), asked)
        self.assertIn(("lookupService", f"alice.{SERVICE}"), asked)
        self.assertIn(("lookupText", f"bob.{SERVICE}"), asked)
        self.assertIn(("lookupIPV6Address", "bob.hosts.peernix.test"), asked)
        self.assertNotIn(("lookupIPV6Address", "alice.hosts.peernix.test"), asked)

    def test_ipv4_preferred_and_stable(self) -> None:
        """A target with A and AAAA records is used at its lowest IPv4 address, whatever the answer order."""
        self.zone.add("alice.hosts.peernix.test", dns.Record_AAAA("2001:db8::a", ttl=0))
        self.zone.add("alice.hosts.peernix.test", dns.Record_A("192.0.2.9", ttl=0))
        self.start()
        self.assertIn("http://192.0.2.9:9999", self.urls())
        self.assertNotIn("http://192.0.2.10:9999", self.urls())
        self.assertNotIn("http://[2001:db8::a]:9999", self.urls())

    def test_refreshed_every_interval(self) -> None:
        """Each interval the peers are added again (refreshing them), and nothing is removed."""
        self.start()
        adds = len(self.registry.adds())
        self.clock.advance(60)
        self.assertEqual(len(self.registry.adds()), 2 * adds)
        self.assertFalse([c for c in self.registry.calls if c[0] == "remove"])

    def test_instance_removed(self) -> None:
        """An instance gone from the zone is removed at the next resolution, the other stays."""
        self.start()
        self.zone.remove_pointer(SERVICE, f"bob.{SERVICE}")
        self.clock.advance(59)
        self.assertIn("http://[2001:db8::b0b]:9998", self.urls())
        self.clock.advance(1)
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999"})
        self.assertIn(("remove", "http://[2001:db8::b0b]:9998", SOURCE), self.registry.calls)

    def test_address_changed(self) -> None:
        """A target whose address changed moves: the old URL is removed, the new one added."""
        self.start()
        self.zone.remove("alice.hosts.peernix.test")
        self.zone.add("alice.hosts.peernix.test", dns.Record_A("192.0.2.11", ttl=0))
        self.clock.advance(60)
        self.assertEqual(self.urls(), {"http://192.0.2.11:9999", "http://[2001:db8::b0b]:9998"})

    def test_zone_emptied(self) -> None:
        """When the service name no longer exists (NXDOMAIN), every peer it listed is removed."""
        self.start()
        self.zone.remove(SERVICE)
        self.clock.advance(60)
        self.assertEqual(self.urls(), set())

    def test_several_targets(self) -> None:
        """Every usable SRV target of one instance is a peer; "." and port 0 are not."""
        add_instance(self.zone, DOMAIN, "rack", [("r1.hosts.peernix.test", PORT, ["192.0.2.21"]),
                                                 ("r2.hosts.peernix.test", PORT, ["192.0.2.22"]),
                                                 ("r3.hosts.peernix.test", 9000, ["2001:db8::23"])])
        name = f"rack.{SERVICE}"
        self.zone.add(name, dns.Record_SRV(0, 0, PORT, b"", ttl=0))
        self.zone.add(name, dns.Record_SRV(0, 0, 0, "r4.hosts.peernix.test", ttl=0))
        self.zone.add("r4.hosts.peernix.test", dns.Record_A("192.0.2.24", ttl=0))
        self.start()
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998",
                                       "http://192.0.2.21:9999", "http://192.0.2.22:9999",
                                       "http://[2001:db8::23]:9000"})
        # One target leaves: only its peer goes.
        self.zone.remove(name, dns.SRV)
        self.zone.add(name, dns.Record_SRV(0, 0, PORT, "r1.hosts.peernix.test", ttl=0))
        self.clock.advance(60)
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998",
                                       "http://192.0.2.21:9999"})

    def test_too_many_targets(self) -> None:
        """At most max_targets SRV targets of one instance are used, the best (lowest priority) first."""
        name = f"many.{SERVICE}"
        self.zone.add(SERVICE, dns.Record_PTR(name, ttl=0))
        for i in range(5):
            self.zone.add(name, dns.Record_SRV(i, 0, PORT, f"m{i}.hosts.peernix.test", ttl=0))
            self.zone.add(f"m{i}.hosts.peernix.test", dns.Record_A(f"192.0.2.{100 + i}", ttl=0))
        with capturedLogs() as events:
            self.start(max_targets=2)
        self.assertEqual({u for u in self.urls() if "192.0.2.1" in u and u.count(".") == 3 and "10:" not in u},
                         {"http://192.0.2.100:9999", "http://192.0.2.101:9999"})
        self.assertTrue(any("5 SRV targets" in str(e.get("problem")) for e in events))

    def test_bad_records_ignored(self) -> None:
        """Unusable addresses, a PTR to a missing instance, an SRV-less instance and a bad key do no harm."""
        add_instance(self.zone, DOMAIN, "junk", [("junk.hosts.peernix.test", PORT,
                                                  ["0.0.0.0", "224.0.0.251", "127.0.0.1", "fe80::1", "::"])])
        self.zone.add(SERVICE, dns.Record_PTR(f"ghost.{SERVICE}", ttl=0))
        self.zone.add(SERVICE, dns.Record_PTR(f"nosrv.{SERVICE}", ttl=0))
        self.zone.add(f"nosrv.{SERVICE}", dns.Record_TXT(b"pubkey=" + PUBKEY.encode(), ttl=0))
        self.zone.remove(f"alice.{SERVICE}", dns.TXT)
        self.zone.add(f"alice.{SERVICE}", dns.Record_TXT(b"pubkey=not a key", b"\xff\xfe", ttl=0))
        # A record of another type where an address is expected.
        self.zone.add("bob.hosts.peernix.test", dns.Record_TXT(b"hello", ttl=0))
        with capturedLogs() as events:
            self.start()
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998"})
        self.assertIn(("add", "http://192.0.2.10:9999", SOURCE, None), self.registry.calls)
        self.assertEqual(len([e for e in events if "malformed TXT pubkey" in str(e.get("problem"))]), 1)

    def test_any_instance_name(self) -> None:
        """An instance name of UTF-8, spaces and apostrophes (RFC 6763 allows them) is asked for as it is."""
        name = "Zo\u00eb's Mac Book".encode() + b"." + SERVICE.encode()
        self.zone.add(SERVICE, dns.Record_PTR(name, ttl=0))
        self.zone.add(name, dns.Record_SRV(0, 0, PORT, "zoe.hosts.peernix.test", ttl=0))
        self.zone.add("zoe.hosts.peernix.test", dns.Record_A("192.0.2.30", ttl=0))
        with capturedLogs() as events:
            self.start()
        self.assertIn("http://192.0.2.30:9999", self.urls())
        self.assertFalse([e for e in events if e.get("log_level") == LogLevel.warn])

    def test_cname_followed(self) -> None:
        """A target that is a CNAME is followed to its address."""
        self.zone.remove("alice.hosts.peernix.test")
        self.zone.add("alice.hosts.peernix.test", dns.Record_CNAME("real-alice.hosts.peernix.test", ttl=0))
        self.zone.add("real-alice.hosts.peernix.test", dns.Record_A("192.0.2.12", ttl=0))
        self.start()
        self.assertIn("http://192.0.2.12:9999", self.urls())

    def test_ourselves_skipped(self) -> None:
        """Our own instance (TXT id), and our own address at our port, are not peers; our address at another port is."""
        add_instance(self.zone, DOMAIN, "me", [("me.hosts.peernix.test", PORT, ["192.0.2.50"])], {"id": OUR_ID})
        add_instance(self.zone, DOMAIN, "me2", [("me2.hosts.peernix.test", PORT, ["192.0.2.1"])])
        add_instance(self.zone, DOMAIN, "other-port", [("me3.hosts.peernix.test", 9000, ["192.0.2.1"])])
        self.start()
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998",
                                       "http://192.0.2.1:9000"})

    def test_several_domains(self) -> None:
        """Peers of every domain are added; one listed in two domains stays while either lists it."""
        other = MemoryZone("other.test")
        add_instance(other, "other.test", "carol", [("carol.other.test", PORT, ["198.51.100.3"])])
        add_instance(other, "other.test", "alice", [("alice.other.test", PORT, ["192.0.2.10"])])

        @implementer(IResolver)
        class Both(SwitchableResolver):
            def __getattr__(self, method: str) -> Any:
                inner = super().__getattr__(method)

                def lookup(name: str | bytes, timeout: Any = None) -> Deferred[Any]:
                    name = name.decode("latin-1") if isinstance(name, bytes) else name
                    if name.endswith("other.test"):
                        result: Deferred[Any] = getattr(other, method)(name, timeout)
                        return result
                    return inner(name, timeout)  # type: ignore[no-any-return]

                return lookup

        self.resolver = Both(self.zone)
        self.start(domains=(DOMAIN, "Other.Test."))
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998",
                                       "http://198.51.100.3:9999"})
        self.zone.remove_pointer(SERVICE, f"alice.{SERVICE}")
        self.clock.advance(60)
        self.assertIn("http://192.0.2.10:9999", self.urls())
        other.remove_pointer(service_name("other.test"), "alice._peernix._tcp.other.test")
        self.clock.advance(60)
        self.assertNotIn("http://192.0.2.10:9999", self.urls())

    def test_additional_records_used(self) -> None:
        """Records a response carries in its additional section are not asked for again."""
        zone = self.zone
        resolver = self.resolver

        @implementer(IResolver)
        class WithAdditional(SwitchableResolver):
            def __getattr__(self, method: str) -> Any:
                inner = super().__getattr__(method)

                def lookup(name: str | bytes, timeout: Any = None) -> Deferred[Any]:
                    d: Deferred[Any] = inner(name, timeout)
                    if method != "lookupPointer":
                        return d

                    def more(result: Any) -> Any:
                        answer, authority, _ = result
                        extra = [dns.RRHeader(f"alice.{SERVICE}", dns.SRV, dns.IN, 0,
                                              dns.Record_SRV(0, 0, PORT, "alice.hosts.peernix.test")),
                                 dns.RRHeader("alice.hosts.peernix.test", dns.A, dns.IN, 0,
                                              dns.Record_A("192.0.2.10"))]
                        return answer, authority, extra

                    return d.addCallback(more)

                return lookup

        self.resolver = WithAdditional(zone)
        self.start()
        self.assertIn("http://192.0.2.10:9999", self.urls())
        self.assertNotIn(("lookupService", f"alice.{SERVICE}"), self.resolver.asked)
        self.assertNotIn(("lookupAddress", "alice.hosts.peernix.test"), self.resolver.asked)
        self.assertIn(("lookupService", f"bob.{SERVICE}"), self.resolver.asked)
        del resolver


class FailureTests(DnsSdUnitTestCase):
    """Timeouts and server failures: bounded, logged once, and peers kept."""

    def warnings(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_level") == LogLevel.warn]

    def test_timeout_keeps_peers(self) -> None:
        """A server that stops answering: each round ends after the query timeout, peers stay, one warning."""
        service = self.start()
        before = self.urls()
        self.resolver.mode = "hang"
        with capturedLogs() as events:
            self.clock.advance(60)
            self.assertEqual(service.resolutions, 1)
            self.clock.advance(5)
            self.assertEqual(service.resolutions, 2)
            self.assertEqual(self.urls(), before)
            for _ in range(3):
                self.clock.advance(60)
                self.clock.advance(5)
        self.assertEqual(service.resolutions, 5)
        self.assertEqual(self.urls(), before)
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("no answer in time", warnings[0]["problem"])
        self.assertFalse([c for c in self.registry.calls if c[0] == "remove"])
        # Back again: one message, and changes are seen again.
        self.resolver.mode = "answer"
        self.zone.remove_pointer(SERVICE, f"bob.{SERVICE}")
        with capturedLogs() as events:
            self.clock.advance(60)
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999"})
        self.assertEqual(len([e for e in events if "resolved again" in e.get("log_format", "")]), 1)

    def test_instance_timeout_keeps_instance(self) -> None:
        """When one instance's lookups time out, it keeps its peer; the others are updated."""
        self.start()
        self.resolver.only = {f"bob.{SERVICE}"}
        self.resolver.mode = "hang"
        self.zone.remove("alice.hosts.peernix.test")
        self.zone.add("alice.hosts.peernix.test", dns.Record_A("192.0.2.11", ttl=0))
        self.clock.advance(60)
        self.clock.advance(5)
        self.assertEqual(self.urls(), {"http://192.0.2.11:9999", "http://[2001:db8::b0b]:9998"})

    def test_first_resolution_times_out(self) -> None:
        """With no answer at start-up there are no peers, and no error escapes."""
        self.resolver.mode = "hang"
        service = self.start()
        self.clock.advance(5)
        self.assertEqual(service.resolutions, 1)
        self.assertEqual(self.urls(), set())

    def test_server_failure_keeps_peers(self) -> None:
        """SERVFAIL is a failure, not an empty zone: the peers stay."""
        self.start()
        self.resolver.mode = "servfail"
        with capturedLogs() as events:
            self.clock.advance(60)
            self.clock.advance(60)
        self.assertEqual(self.urls(), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998"})
        self.assertEqual(len(self.warnings(events)), 1)

    def test_resolver_factory_fails(self) -> None:
        """A resolver that cannot be made is logged; the service runs on without resolving."""
        def broken() -> IResolver:
            raise OSError("Permission denied: /etc/resolv.conf")

        service = DnsSdDiscoveryService(self.registry, [DOMAIN], PORT, self.clock, broken)
        with capturedLogs() as events:
            service.startService()
        self.assertTrue(service.running)
        self.assertTrue(any("cannot make a resolver" in e.get("log_format", "") for e in events))
        self.flushLoggedErrors(OSError)
        service.stopService()

    def test_stop(self) -> None:
        """Stopping removes every peer found and abandons a resolution in flight; nothing runs after."""
        service = self.start()
        self.resolver.mode = "hang"
        self.clock.advance(60)
        service.stopService()
        self.assertEqual(self.urls(), set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(all(d.called for d in self.resolver.pending))


class SystemResolverTests(SynchronousTestCase):
    """The production resolver reads resolv.conf."""

    def test_reads_resolv_conf(self) -> None:
        """Its nameservers come from the file; its periodic re-read stops with close_resolver."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("search example.org\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
        clock = Clock()
        resolver = system_resolver(clock, path)
        self.assertEqual(resolver.dynServers, [("192.0.2.53", 53), ("2001:db8::53", 53)])  # type: ignore[attr-defined]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        close_resolver(resolver)
        self.assertEqual(clock.getDelayedCalls(), [])


class RealServerTests(TestCase):
    """The real stub resolver asking a twisted.names server over UDP on 127.0.0.1."""

    def setUp(self) -> None:
        self.zone = make_zone()
        factory = DNSServerFactory(authorities=[self.zone])
        factory.noisy = False
        protocol = dns.DNSDatagramProtocol(factory)
        self.port = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.registry = FakeRegistry()

    def service(self, **kwargs: Any) -> DnsSdDiscoveryService:
        server = ("127.0.0.1", self.port.getHost().port)
        service = DnsSdDiscoveryService(
            self.registry, [DOMAIN], PORT, reactor,
            lambda: system_resolver(reactor, None, [server]),
            interval=3600, own_addresses=lambda: [], **kwargs)
        return service

    @inlineCallbacks
    def test_resolve_and_remove(self) -> Any:
        """Peers listed by the server are found, one removed from the zone is dropped at the next resolution."""
        service = self.service()
        service.startService()
        self.addCleanup(service.stopService)
        # The first resolution started with the service; wait for it, then resolve again.
        while service.resolutions < 1:
            d: Deferred[None] = Deferred()
            reactor.callLater(0.01, d.callback, None)  # type: ignore[attr-defined]
            yield d
        self.assertEqual(self.registry.urls(SOURCE), {"http://192.0.2.10:9999", "http://[2001:db8::b0b]:9998"})
        self.assertIn(("add", "http://192.0.2.10:9999", SOURCE, PUBKEY), self.registry.calls)
        self.zone.remove_pointer(SERVICE, f"alice.{SERVICE}")
        with capturedLogs() as events:
            yield service.resolve()
        self.assertEqual(self.registry.urls(SOURCE), {"http://[2001:db8::b0b]:9998"})
        # All queries go over the one socket bound at the first: no log lines about sockets.
        self.assertEqual([e for e in events if "starting on" in str(e.get("log_text", e.get("message")))
                          or "Closed" in str(e.get("log_text", e.get("message")))], [])
        self.assertEqual(len(events), 1, events)

    @inlineCallbacks
    def test_no_server(self) -> Any:
        """A nameserver that does not answer: the resolution ends within the timeout, without peers."""
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        started = reactor.seconds()  # type: ignore[attr-defined]
        service = DnsSdDiscoveryService(
            self.registry, [DOMAIN], PORT, reactor,
            lambda: system_resolver(reactor, None, [("127.0.0.1", port)]),
            interval=3600, own_addresses=lambda: [], query_timeout=0.5)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.resolve()
        self.assertEqual(self.registry.urls(SOURCE), set())
        # Generous: the bound is 0.5 s a query, three queries at most in a row.
        self.assertLess(reactor.seconds() - started, 10)  # type: ignore[attr-defined]


class ZoneFileTests(SynchronousTestCase):
    """The JSON zones the end-to-end DNS server serves."""

    def test_load(self) -> None:
        """A JSON zone lists its instances as add_instance does."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"origin": "peernix.test", "instances": [{"instance": "a", "targets": '
                    '[["a.hosts.peernix.test", 9999, ["10.0.0.1"]]], "txt": {"pubkey": "k:v"}}]}')
        zone = load_zone(path)
        self.assertEqual(sorted(zone.records), [b"_peernix._tcp.peernix.test", b"a._peernix._tcp.peernix.test",
                                                b"a.hosts.peernix.test"])
        self.assertTrue(os.path.exists(path))
