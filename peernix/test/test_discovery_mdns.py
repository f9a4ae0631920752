"""Tests for :mod:`peernix.discovery.mdns` with a fake zeroconf, and a real one on loopback."""

from __future__ import annotations

import time
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zeroconf import ServiceInfo
from zope.interface.verify import verifyClass, verifyObject

from peernix.discovery.mdns import (
    SERVICE_TYPE,
    IZeroconf,
    MdnsDiscoveryService,
    ResolvedPeer,
    ZeroconfAdapter,
    build_service_info,
    instance_name,
    make_zeroconf,
    resolved_peer,
)
from peernix.discovery.nodeinfo import NodeInfo
from peernix.interfaces import IDiscovery
from peernix.test.discoveryfakes import FakeRegistry, FakeZeroconf, ManualThreads, call_now
from peernix.test.fakes import run_synchronously
from peernix.test.test_discovery_datagrams import PUBKEY

NODE = NodeInfo("0.1.0", "2.8.0", "x86_64-linux", ("compression", "signing"), PUBKEY, "ourid")
PEER_NAME = f"other-9999-abc.{SERVICE_TYPE}"


def peer_info(addresses: list[str], port: int = 9999, interface_index: int | None = None, **txt: str) -> ServiceInfo:
    properties = {"version": "0.1.0", "platform": "x86_64-linux", "features": "compression", "id": "peerid"}
    properties.update(txt)
    return ServiceInfo(SERVICE_TYPE, PEER_NAME, port=port, properties=properties, server="other.local.",
                       parsed_addresses=addresses, interface_index=interface_index)


class NamingTests(SynchronousTestCase):
    """Instance names, registered info and resolved URLs."""

    def test_instance_name(self) -> None:
        """The instance name is host-port-nodeid, a DNS label of at most 63 characters."""
        self.assertEqual(instance_name("myhost.example.org", 9999, "0123abcd"), "myhost-9999-0123abcd")
        long = instance_name("h" * 100 + "_x", 9999, "f" * 16)
        self.assertEqual(len(long), 63)
        self.assertTrue(long.endswith("-9999-" + "f" * 16))
        self.assertEqual(instance_name("", 1, "a"), "peernix-1-a")

    def test_service_info(self) -> None:
        """We register port, addresses and TXT version, platform, features, pubkey, id."""
        info = build_service_info(NODE, 9999, "host-9999-ourid", ["192.0.2.1", "fd00::1"])
        self.assertEqual(info.name, f"host-9999-ourid.{SERVICE_TYPE}")
        self.assertEqual(info.port, 9999)
        self.assertEqual(info.parsed_addresses(), ["192.0.2.1"])
        self.assertEqual(
            info.properties,
            {b"version": b"0.1.0", b"platform": b"x86_64-linux", b"features": b"compression,signing",
             b"id": b"ourid", b"pubkey": PUBKEY.encode()},
        )

    def test_service_info_addresses(self) -> None:
        """
        The A/AAAA records we publish: IPv4 only when there is any (a Go
        node keeps the last address record it reads and cannot use IPv6);
        otherwise routable IPv6; never link-local IPv6.
        """
        cases = [
            (["192.0.2.1", "fe80::1", "fd00::1", "2001:db8::1"], ["192.0.2.1"]),
            (["fe80::1%eth0", "10.0.0.2"], ["10.0.0.2"]),
            (["fe80::1", "fd00::1", "2001:db8::1"], ["fd00::1", "2001:db8::1"]),
            (["fe80::1"], []),
            (["127.0.0.1"], ["127.0.0.1"]),
        ]
        for given, published in cases:
            info = build_service_info(NODE, 9999, "host-9999-ourid", given)
            self.assertEqual(info.parsed_addresses(), published, given)
            for record in info.dns_addresses():
                self.assertFalse(record.address.startswith(b"\xfe\x80"), given)

    def test_no_pubkey_without_key(self) -> None:
        """Without a key there is no pubkey TXT record."""
        node = NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", "id")
        self.assertNotIn(b"pubkey", build_service_info(node, 1, "h-1-id", []).properties)

    def test_resolved_urls(self) -> None:
        """One URL per peer: IPv4 first, then global IPv6 (bracketed), then link-local with its zone; loopback skipped."""
        info = peer_info(["fe80::1", "2001:db8::5", "127.0.1.1", "192.0.2.5"], interface_index=3, pubkey=PUBKEY)
        self.assertEqual(resolved_peer(info), ResolvedPeer(("http://192.0.2.5:9999",), PUBKEY, "peerid"))
        info = peer_info(["fe80::1", "2001:db8::5"], interface_index=3)
        self.assertEqual(resolved_peer(info).urls, ("http://[2001:db8::5]:9999",))
        info = peer_info(["fe80::1"], interface_index=3)
        self.assertEqual(resolved_peer(info).urls, ("http://[fe80::1%3]:9999",))
        info = peer_info(["127.0.1.1"])
        self.assertEqual(resolved_peer(info).urls, ())
        self.assertEqual(resolved_peer(info, skip_loopback=False).urls, ("http://127.0.1.1:9999",))
        # A link-local address whose interface is unknown has no zone: unusable.
        info = peer_info(["fe80::1"])
        self.assertEqual(resolved_peer(info).urls, ())
        info = peer_info(["fe80::1", "fd00::7"])
        self.assertEqual(resolved_peer(info).urls, ("http://[fd00::7]:9999",))

    def test_bad_pubkey_dropped(self) -> None:
        """A malformed pubkey TXT record is treated as absent."""
        self.assertIsNone(resolved_peer(peer_info(["192.0.2.5"], pubkey="garbage")).public_key)

    def test_go_txt(self) -> None:
        """A Go node's TXT records (no id) resolve with its key and no node id."""
        info = ServiceInfo(SERVICE_TYPE, f"peernix.{SERVICE_TYPE}", port=9999, server="gohost.local.",
                           properties={"version": "2.0.0", "platform": "amd64-linux", "features": "compression,parallel,health", "pubkey": PUBKEY},
                           parsed_addresses=["192.0.2.9"])
        self.assertEqual(resolved_peer(info), ResolvedPeer(("http://192.0.2.9:9999",), PUBKEY, None))


class _Fixture:
    def __init__(self, threads: Any = run_synchronously) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.zc = FakeZeroconf()
        self.factory_calls = 0

        def factory() -> FakeZeroconf:
            self.factory_calls += 1
            return self.zc

        self.service = MdnsDiscoveryService(
            registry=self.registry, node=NODE, http_port=9999, clock=self.clock,
            zeroconf_factory=factory, defer_to_thread=threads, call_from_thread=call_now,
            addresses=lambda: ["192.0.2.1"], hostname="myhost", refresh_interval=30.0,
        )


class ServiceTests(SynchronousTestCase):
    """The service's life cycle and browsing."""

    def test_verify(self) -> None:
        """The fake zeroconf and the adapter implement IZeroconf; the service provides IDiscovery."""
        f = _Fixture()
        self.assertTrue(verifyObject(IZeroconf, f.zc))
        self.assertTrue(verifyClass(IZeroconf, ZeroconfAdapter))
        self.assertTrue(verifyObject(IDiscovery, f.service))
        self.assertEqual(f.service.name, "mdns")

    def test_adapter_cooperating(self) -> None:
        """The adapter registers with cooperating_responders so it does not wait out probing."""
        calls: list[Any] = []

        class Recorder:
            def register_service(self, info: object, **kwargs: object) -> None:
                calls.append(kwargs)

        ZeroconfAdapter(cast(Any, Recorder())).register_service(cast(Any, None))
        self.assertEqual(calls, [{"cooperating_responders": True}])

    def test_start_registers_and_browses(self) -> None:
        """Start creates zeroconf, registers our unique instance and browses _peernix._tcp."""
        f = _Fixture()
        f.service.startService()
        self.assertEqual(f.factory_calls, 1)
        self.assertEqual(f.zc.calls, [("register_service", f"myhost-9999-ourid.{SERVICE_TYPE}"), ("add_service_listener", SERVICE_TYPE)])
        self.assertEqual(f.zc.registered[0].parsed_addresses(), ["192.0.2.1"])
        self.successResultOf(f.service.stopService())

    def test_registers_no_link_local(self) -> None:
        """A host whose interface has IPv4 and a link-local IPv6 address registers the IPv4 one only; with no usable address it warns."""
        f = _Fixture()
        f.service._addresses = lambda: ["10.0.0.2", "fe80::fc:ff:fe00:2%veth0"]
        f.service.startService()
        self.assertEqual(f.zc.registered[0].parsed_addresses(), ["10.0.0.2"])
        self.successResultOf(f.service.stopService())
        f = _Fixture()
        f.service._addresses = lambda: ["fe80::fc:ff:fe00:2%veth0"]
        with capturedLogs() as events:
            f.service.startService()
        self.assertEqual(f.zc.registered[0].parsed_addresses(), [])
        self.assertTrue(any("no IPv4 or routable IPv6" in str(e.get("log_format")) for e in events))
        self.successResultOf(f.service.stopService())

    def test_add_resolves(self) -> None:
        """A new service is resolved and its URL added once with source mdns and its key."""
        f = _Fixture()
        f.service.startService()
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5", "2001:db8::5"], pubkey=PUBKEY)
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.adds(), [("add", "http://192.0.2.5:9999", "mdns", PUBKEY)])
        self.assertIn(("get_service_info", PEER_NAME, 2000), f.zc.calls)
        self.successResultOf(f.service.stopService())

    def test_own_skipped(self) -> None:
        """Our own instance (by name or node id) is never added."""
        f = _Fixture()
        f.service.startService()
        f.zc.fire("add_service", SERVICE_TYPE, f.service.service_name)
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"], id="ourid")
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.adds(), [])
        self.assertNotIn(("get_service_info", f.service.service_name, 2000), f.zc.calls)
        self.successResultOf(f.service.stopService())

    def test_update_moves(self) -> None:
        """An update with new addresses removes the URLs that went away."""
        f = _Fixture()
        f.service.startService()
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.6"])
        f.zc.fire("update_service", SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.urls("mdns"), {"http://192.0.2.6:9999"})
        self.assertIn(("remove", "http://192.0.2.5:9999", "mdns"), f.registry.calls)
        self.successResultOf(f.service.stopService())

    def test_remove(self) -> None:
        """A removed service's URLs are removed from the registry."""
        f = _Fixture()
        f.service.startService()
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        f.zc.fire("remove_service", SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.urls(), set())
        self.assertEqual(f.service.known_urls(), {})
        self.successResultOf(f.service.stopService())

    def test_refresh(self) -> None:
        """Known services are re-resolved every refresh_interval: found ones re-added, vanished ones removed."""
        f = _Fixture()
        f.service.startService()
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        f.clock.advance(30.0)
        self.assertEqual(len(f.registry.adds()), 2)
        f.zc.infos[PEER_NAME] = None
        f.clock.advance(30.0)
        self.assertEqual(f.registry.urls(), set())
        self.successResultOf(f.service.stopService())

    def test_stop_cleans_up(self) -> None:
        """Stop removes the listener, unregisters, closes, removes our peers, and leaves no timers."""
        f = _Fixture()
        f.service.startService()
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        self.successResultOf(f.service.stopService())
        self.assertEqual(f.zc.calls[-3:], [("remove_service_listener",), ("unregister_service", f.service.service_name), ("close",)])
        self.assertEqual((f.zc.listeners, f.zc.registered, f.zc.closed), ([], [], True))
        self.assertEqual(f.registry.urls(), set())
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_events_after_stop_ignored(self) -> None:
        """Browse events arriving after stop change nothing."""
        f = _Fixture()
        f.service.startService()
        listener = f.zc.listeners[0]
        self.successResultOf(f.service.stopService())
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        listener.add_service(f.zc, SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.adds(), [])

    def test_blocking_calls_in_threads(self) -> None:
        """Construction, registration, resolution and close all go through defer_to_thread."""
        threads = ManualThreads()
        f = _Fixture(threads)
        f.service.startService()
        self.assertEqual(f.factory_calls, 0)
        threads.run_all()
        self.assertEqual(f.zc.calls[0][0], "register_service")
        f.zc.infos[PEER_NAME] = peer_info(["192.0.2.5"])
        f.zc.fire("add_service", SERVICE_TYPE, PEER_NAME)
        self.assertEqual(f.registry.adds(), [])
        threads.run_all()
        self.assertEqual(len(f.registry.adds()), 1)
        d = f.service.stopService()
        self.assertNoResult(d)
        self.assertFalse(f.zc.closed)
        threads.run_all()
        self.successResultOf(d)
        self.assertTrue(f.zc.closed)

    def test_stop_during_start(self) -> None:
        """Stopping while zeroconf is being created waits for it and closes it without registering."""
        threads = ManualThreads()
        f = _Fixture(threads)
        f.service.startService()
        d = f.service.stopService()
        self.assertNoResult(d)
        threads.run_all()
        self.successResultOf(d)
        self.assertEqual(f.zc.calls, [("close",)])
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_stop_hands_shutdown_to_threads_at_once(self) -> None:
        """Stop queues its thread work before returning, so a pool stopped right after still closes zeroconf."""
        for steps_done in range(4):
            threads = ManualThreads()
            f = _Fixture(threads)
            f.service.startService()
            for _ in range(steps_done):
                threads.run_next()
            # One start-up step is in a thread when stop is called.
            d = f.service.stopService()
            # The pool is stopped now (a MultiService does not wait for us):
            # it finishes the work it has and never runs anything queued later.
            accepted, threads.queue = threads.queue, []
            for job in accepted:
                threads.queue = [job]
                threads.run_next()
            self.successResultOf(d)
            made = [c[0] for c in f.zc.calls]
            if f.factory_calls:
                self.assertTrue(f.zc.closed, steps_done)
                self.assertEqual(made.count("register_service"), made.count("unregister_service"), steps_done)
                self.assertEqual(made.count("add_service_listener"), made.count("remove_service_listener"), steps_done)
            self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_pending_bounded(self) -> None:
        """At most max_pending resolutions are in flight; a repeat event for one in flight resolves once more after it."""
        threads = ManualThreads()
        f = _Fixture(threads)
        f.service._max_pending = 2
        f.service.startService()
        threads.run_all()
        for i in range(4):
            f.zc.fire("add_service", SERVICE_TYPE, f"p{i}.{SERVICE_TYPE}")
        self.assertEqual(len(threads.queue), 2)
        f.zc.fire("update_service", SERVICE_TYPE, f"p0.{SERVICE_TYPE}")
        self.assertEqual(len(threads.queue), 2)
        threads.run_next()
        self.assertEqual(len(threads.queue), 2)
        threads.run_all()
        d = f.service.stopService()
        threads.run_all()
        self.successResultOf(d)

    def test_register_failure_logged(self) -> None:
        """A failing registration is logged; stop still closes zeroconf."""
        f = _Fixture()
        f.zc.register_error = OSError("no multicast")
        with capturedLogs() as events:
            f.service.startService()
        self.assertTrue(any(e.get("log_failure") is not None for e in events))
        self.flushLoggedErrors(OSError)
        self.successResultOf(f.service.stopService())
        self.assertTrue(f.zc.closed)


class RealZeroconfTests(TestCase):
    """Two services with real zeroconf find each other, restricted to the loopback interface."""

    timeout = 30

    def test_find_each_other(self) -> Deferred[None]:
        """Two nodes on 127.0.0.1 register and each adds the other within a few seconds."""
        from twisted.internet import reactor, threads
        from twisted.internet.task import deferLater

        services = []
        registries = []
        for i, node_id in enumerate(("aaaa", "bbbb")):
            registry = FakeRegistry()
            service = MdnsDiscoveryService(
                registry=registry,
                node=NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", f"{node_id}{time.monotonic_ns()}"),
                http_port=18000 + i,
                clock=reactor,  # type: ignore[arg-type]
                zeroconf_factory=lambda: make_zeroconf(["127.0.0.1"]),
                defer_to_thread=threads.deferToThread,
                call_from_thread=reactor.callFromThread,  # type: ignore[attr-defined]
                addresses=lambda: ["127.0.0.1"],
                skip_loopback=False,
            )
            services.append(service)
            registries.append(registry)

        async def run() -> None:
            started = time.monotonic()
            for s in services:
                s.startService()
            try:
                for _ in range(200):
                    if registries[0].urls("mdns") and registries[1].urls("mdns"):
                        break
                    await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
                print(f"mDNS loopback discovery took {time.monotonic() - started:.2f} s")
                self.assertEqual(registries[0].urls("mdns"), {"http://127.0.0.1:18001"})
                self.assertEqual(registries[1].urls("mdns"), {"http://127.0.0.1:18000"})
            finally:
                for s in services:
                    await s.stopService()

        return Deferred.fromCoroutine(run())
