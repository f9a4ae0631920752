"""Tests for :mod:`peernix.service`: the wiring, on a memory reactor."""

from __future__ import annotations

import io

import attrs
import os
import tempfile
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.interfaces import IStore
from peernix.nix.signing import KeyFormatError, SecretKey
from peernix.options import Config
from peernix.service import (
    DigestService,
    LISTEN_BACKLOG,
    REQUEST_IDLE_TIMEOUT,
    ListenError,
    ListenerService,
    LocalStoreService,
    PeernixSite,
    ThreadPoolService,
    build_service,
    local_cache_url,
    probe_ip_stack,
    trusted_keys,
)
from peernix.store.local import LocalStore, StoreError
from peernix.discovery.nodeinfo import NodeInfo
from peernix.test.discoveryfakes import MemoryUDPReactor
from peernix.peers.fanout import Fanout
from peernix.peers.registry import PeerRegistry
from peernix.test.fakes import FakeUpstream, MemoryStore
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore
from peernix.web.savings import SavingsService


@implementer(IReactorFromThreads)
class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A ``MemoryReactorClock`` that also takes calls from threads (run at
    once) and "listens" on UDP (recorded in ``udp_ports``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._udp = MemoryUDPReactor()
        self.udp_ports = self._udp.udp_ports

    def callFromThread(self, callable: Any, *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        return self._udp.listenUDP(port, protocol, interface, maxPacketSize)


#: This node, as announced (fixed, so no test runs ``nix-store --version``).
NODE = NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", "testnode")

#: No mDNS and no trusted keys from this machine's nix.conf: unit tests
#: neither touch the network nor read /etc.
#: The savings state goes to a directory of this test run, never /var/lib/peernix;
#: no upstream (fetching for the LAN off: no nix.conf substituters, no staging).
QUIET = Config(mdns=False, trusted_public_keys=(), upstream=(),
               state_dir=os.path.join(tempfile.gettempdir(), f"peernix-test-state-{os.getpid()}"))


def quiet(**changes: Any) -> Config:
    """:returns: :data:`QUIET` with ``changes``."""
    return attrs.evolve(QUIET, **changes)


def build(case: SynchronousTestCase, config: Config | None = None,
          **kwargs: Any) -> tuple[Any, ThreadedMemoryReactor]:
    """:returns: ``(service, reactor)`` built from ``config`` with a MemoryStore, on a memory reactor."""
    reactor = ThreadedMemoryReactor()
    root = case.mktemp()
    os.makedirs(root)
    kwargs.setdefault("store", MemoryStore(root))
    kwargs.setdefault("ip_stack", "dual")
    kwargs.setdefault("node", NODE)
    return build_service(config or QUIET, reactor, **kwargs), reactor


class BuildServiceTests(SynchronousTestCase):
    """:func:`build_service` with fakes."""

    def build(self, config: Config | None = None, **kwargs: Any) -> tuple[Any, ThreadedMemoryReactor]:
        """:returns: ``(service, reactor)``; see :func:`build`."""
        return build(self, config, **kwargs)

    def test_fakes_provide_interfaces(self) -> None:
        """The store and reactor fakes used here provide their interfaces."""
        root = self.mktemp()
        os.makedirs(root)
        self.assertTrue(verifyObject(IStore, MemoryStore(root)))
        self.assertTrue(verifyObject(IReactorFromThreads, ThreadedMemoryReactor()))

    def test_children(self) -> None:
        """With a given store: CPU pool, peer side, savings, digests, HTTP listener, then discovery, in that order."""
        service, _ = self.build()
        children = list(service)
        self.assertEqual([c.name for c in children],
                         ["cpu-threads", "peer-client", "peer-health", "savings", "digests", "http [::]:9999",
                          "static", "udp"])
        self.assertIsInstance(children[0], ThreadPoolService)
        self.assertIsInstance(children[3], SavingsService)
        self.assertIsInstance(children[4], DigestService)
        self.assertIsInstance(children[5], ListenerService)
        self.assertEqual(service.listeners, [children[5]])
        self.assertIsInstance(service.upstream, Fanout)
        self.assertIsInstance(service.registry, PeerRegistry)

    def test_giving_settings_wired(self) -> None:
        """--max-upload-rate makes the app's limiter, --serve-peers no reaches the announcements, --state-dir the savings."""
        service, _ = self.build(quiet(max_upload_rate=20_000_000, serve_peers=False))
        assert service.upload_limiter is not None and service.node is not None
        self.assertEqual(service.upload_limiter.rate, 20_000_000)
        self.assertFalse(service.node.serve_peers)
        self.assertEqual(service.node.max_upload_rate, 20_000_000)
        saver = service.getServiceNamed("savings")
        self.assertEqual(saver.state_file.directory, QUIET.state_dir)
        unlimited, _ = self.build()
        self.assertIsNone(unlimited.upload_limiter)

    def test_mdns_child(self) -> None:
        """With mDNS on, an mDNS service with a thread pool of its own comes last."""
        service, _ = self.build(quiet(mdns=True))
        self.assertEqual([c.name for c in service][-3:], ["udp", "mdns-threads", "mdns"])

    def test_static_peers_and_udp_ports(self) -> None:
        """Static peers reach the registry at start; UDP listens on --udp-port."""
        service, reactor = self.build(quiet(peers=("http://192.0.2.5:9999",), udp_port=9876))
        service.startService()
        self.assertEqual([p.url for p in service.registry.peers()], ["http://192.0.2.5:9999"])
        self.assertEqual([p.port for p in reactor.udp_ports], [9876])
        self.successResultOf(service.stopService())

    def test_given_upstream_leaves_out_peers(self) -> None:
        """An injected upstream replaces the peer side and discovery."""
        upstream = FakeUpstream()
        service, _ = self.build(upstream=upstream)
        self.assertEqual([c.name for c in service], ["cpu-threads", "savings", "digests", "http [::]:9999"])
        self.assertIs(service.upstream, upstream)

    def test_trusted_keys_from_options(self) -> None:
        """--trusted-public-key replaces the keys of nix.conf."""
        key = SecretKey("k-1", b"\1" * 32).public_key
        self.assertEqual(trusted_keys(quiet(trusted_public_keys=(key.to_string(),))), [key])

    def test_parts(self) -> None:
        """The service keeps handles on what it assembled."""
        config = quiet(priority=12)
        service, _ = self.build(config)
        self.assertIs(service.config, config)
        self.assertIsNotNone(service.metrics)
        self.assertIsNotNone(service.app)
        self.assertIsNone(service.secret_key)
        self.assertIsInstance(service.site, PeernixSite)
        self.assertEqual(service.site.timeOut, REQUEST_IDLE_TIMEOUT)

    def test_dual_stack_listener(self) -> None:
        """By default one listener on ``::`` takes IPv6 and IPv4, on the configured port."""
        service, reactor = self.build(quiet(port=8123), ip_stack="dual")
        service.privilegedStartService()
        service.startService()
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(8123, "::")])
        self.assertIs(reactor.tcpServers[0][1], service.site)
        # A backlog that a thousand clients connecting at once do not overflow.
        self.assertEqual(reactor.tcpServers[0][2], LISTEN_BACKLOG)
        self.assertGreaterEqual(LISTEN_BACKLOG, 1000)

    def test_separate_stacks(self) -> None:
        """Where IPv6 sockets are IPv6-only, it listens on ``::`` and ``0.0.0.0``."""
        service, reactor = self.build(ip_stack="separate")
        service.startService()
        self.assertEqual([i for _, _, _, i in reactor.tcpServers], ["::", "0.0.0.0"])

    def test_ipv4_only(self) -> None:
        """Without IPv6 in the kernel it listens on ``0.0.0.0``."""
        service, reactor = self.build(ip_stack="ipv4")
        service.startService()
        self.assertEqual([i for _, _, _, i in reactor.tcpServers], ["0.0.0.0"])

    def test_interface(self) -> None:
        """``--interface`` picks the one address, IPv4 or IPv6, whatever the stack."""
        for address in ("127.0.0.1", "::1"):
            service, reactor = self.build(quiet(interface=address, port=0), ip_stack="separate")
            service.startService()
            self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(0, address)])
            service.stopService()

    def test_listens_once(self) -> None:
        """privilegedStartService then startService listens once, not twice."""
        service, reactor = self.build()
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)

    def test_start_stop_leaves_nothing(self) -> None:
        """Stopping closes the listener and pool and leaves no timers behind."""
        service, reactor = self.build()
        service.startService()
        listener = service.listeners[0]
        pool = service.getServiceNamed("cpu-threads").pool
        self.assertIsNotNone(listener.port)
        self.assertTrue(pool.started)
        self.successResultOf(service.stopService())
        self.assertIsNone(listener.port)
        self.assertFalse(pool.started)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_logs_nix_conf_line(self) -> None:
        """Listening logs the substituter URL to put in nix.conf."""
        service, _ = self.build(quiet(port=8123))
        with capturedLogs() as events:
            service.startService()
        urls = [e["url"] for e in events if "url" in e]
        self.assertEqual(urls, ["http://127.0.0.1:8123/nix-cache"])
        service.stopService()

    def test_logs_where(self) -> None:
        """The start-up line says which addresses are served, per listener."""
        for stack, expected in [("dual", ["all addresses, IPv6 and IPv4"]),
                                ("separate", ["all IPv6 addresses", "all IPv4 addresses"]),
                                ("ipv4", ["all IPv4 addresses"])]:
            service, _ = self.build(ip_stack=stack)
            with capturedLogs() as events:
                service.startService()
            self.assertEqual([e["where"] for e in events if "where" in e], expected)
            service.stopService()

    def test_secret_key_loaded(self) -> None:
        """``secret_key_file`` is read at build time."""
        key = SecretKey("host-peernix-1", bytes(range(32)))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(key.to_string() + "\n")
        service, _ = self.build(quiet(secret_key_file=path))
        self.assertEqual(service.secret_key, key)

    def test_bad_secret_key(self) -> None:
        """A missing or malformed key file stops the build with KeyFormatError."""
        path = self.mktemp()
        self.assertRaises(KeyFormatError, self.build, quiet(secret_key_file=path))
        with open(path, "w") as f:
            f.write("not a key\n")
        self.assertRaises(KeyFormatError, self.build, quiet(secret_key_file=path))

    def test_missing_store(self) -> None:
        """Without an injected store, a store root without a Nix database stops the build."""
        root = self.mktemp()
        os.makedirs(root)
        error = self.assertRaises(
            StoreError, build_service, quiet(store_root=root), ThreadedMemoryReactor(), ip_stack="dual"
        )
        self.assertIn(root, str(error))


class LocalStoreWiringTests(SynchronousTestCase):
    """:func:`build_service` with the default :class:`LocalStore`, on a real chroot store."""

    skip = SKIP_NO_NIX

    def test_store_service(self) -> None:
        """The local store is checked, and started and stopped by the first child."""
        store = ChrootStore(os.path.abspath(self.mktemp()))
        self.addCleanup(store.remove)
        reactor = ThreadedMemoryReactor()
        service = build_service(quiet(store_root=store.root), reactor, ip_stack="dual", node=NODE)
        first = list(service)[0]
        self.assertIsInstance(first, LocalStoreService)
        self.assertIsInstance(service.store, LocalStore)
        self.assertIs(first.store, service.store)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])


class ListenerServiceTests(SynchronousTestCase):
    """:class:`ListenerService` on its own."""

    def site(self) -> PeernixSite:
        return PeernixSite(Resource(), reactor=MemoryReactorClock())

    def test_listen_failure(self) -> None:
        """A port in use raises ListenError with the address and a hint."""
        reactor = RaisingMemoryReactor(
            listenException=CannotListenError("0.0.0.0", 9999, OSError(98, "Address already in use"))
        )
        listener = ListenerService(TCP4ServerEndpoint(reactor, 9999), self.site(), "0.0.0.0:9999")
        error = self.assertRaises(ListenError, listener.privilegedStartService)
        self.assertIn("0.0.0.0:9999", str(error))
        self.assertIn("--port", str(error))
        self.assertIsNone(listener.port)

    def test_on_listening(self) -> None:
        """``on_listening`` gets the port once listening."""
        reactor = MemoryReactorClock()
        seen: list[Any] = []
        listener = ListenerService(TCP4ServerEndpoint(reactor, 1234), self.site(), "x",
                                   on_listening=seen.append)
        listener.startService()
        self.assertEqual([p.getHost().port for p in seen], [1234])
        listener.stopService()


class SiteTests(SynchronousTestCase):
    """:class:`PeernixSite`."""

    def logged(self, access_log: bool) -> str:
        """:returns: what the site writes to its log file for one request."""
        site = PeernixSite(Resource(), reactor=MemoryReactorClock(), access_log=access_log)
        out = io.StringIO()
        site.logFile = out
        site._logFormatter = lambda timestamp, request: "GET /x"
        site.log(object())  # type: ignore[arg-type]
        return out.getvalue()

    def test_access_log_off(self) -> None:
        """Access logging is off by default: nothing is written."""
        self.assertEqual(self.logged(False), "")

    def test_access_log_on(self) -> None:
        """With access_log, one line per request is written."""
        self.assertEqual(self.logged(True), "GET /x\n")

    def test_quiet(self) -> None:
        """The site does not log factory start and stop."""
        self.assertFalse(PeernixSite(Resource(), reactor=MemoryReactorClock()).noisy)


class HelperTests(SynchronousTestCase):
    """Small functions of the wiring."""

    def test_local_cache_url(self) -> None:
        """The nix.conf URL is loopback for all addresses, else the interface, IPv6 bracketed."""
        self.assertEqual(local_cache_url(Config(), 9999), "http://127.0.0.1:9999/nix-cache")
        self.assertEqual(local_cache_url(Config(interface="::1"), 80), "http://[::1]:80/nix-cache")
        self.assertEqual(local_cache_url(Config(interface="192.0.2.1"), 1), "http://192.0.2.1:1/nix-cache")
        self.assertEqual(local_cache_url(Config(interface="::"), 1), "http://127.0.0.1:1/nix-cache")

    def test_probe(self) -> None:
        """The IP stack probe answers one of the three known answers."""
        self.assertIn(probe_ip_stack(), ("dual", "separate", "ipv4"))
