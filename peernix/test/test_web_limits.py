"""
Tests for :mod:`peernix.web.limits` and the bounds :class:`PeernixSite`
puts on connections: header and idle timeouts, connection caps with 503 for
peers only, and request size limits.  Memory transports and a memory
reactor clock, no sockets.
"""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import ipaddress
import resource
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from peernix.options import SETTINGS_BY_NAME, Config
from peernix.service import REQUEST_IDLE_TIMEOUT, PeernixSite
from peernix.test.test_service import build, quiet
from peernix.web import limits
from peernix.web.limits import (
    Admission,
    ConnectionLimiter,
    ConnectionLimits,
    LimitedHTTPChannel,
    RefusalProtocol,
    client_address,
    ensure_file_limit,
)

PEER = "192.0.2.7"
OTHER_PEER = "192.0.2.8"
LOCAL = "127.0.0.1"

GET = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


class Hello(Resource):
    """Answers ``hello`` to every GET; ``/slow`` is held open until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/slow":
            self.held.append(request)
            return NOT_DONE_YET
        return b"hello"


def address(host: str, port: int = 40000) -> IPv4Address | IPv6Address:
    """:returns: a TCP address of ``host`` (IPv6 when it has a colon)."""
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


def status(data: bytes) -> int:
    """:returns: the status code of the (first) response in ``data``."""
    return int(data.split(b" ", 2)[1])


class SiteTestMixin:
    """A :class:`PeernixSite` over :class:`Hello` on a memory reactor clock."""

    clock: MemoryReactorClock
    site: PeernixSite
    resource: Hello

    def make(self, **limit_args: Any) -> PeernixSite:
        self.clock = MemoryReactorClock()
        self.resource = Hello()
        self.metrics = CollectorRegistry()
        self.site = PeernixSite(self.resource, reactor=self.clock, limits=ConnectionLimits(**limit_args),
                                metrics_registry=self.metrics)
        return self.site

    def connect(self, host: str, port: int = 40000) -> tuple[Protocol | None, StringTransport]:
        """:returns: the protocol the site built for a connection from ``host`` (connected), and its transport."""
        where = address(host, port)
        transport = StringTransport(peerAddress=where)
        protocol = self.site.buildProtocol(where)
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def close(self, protocol: Protocol | None) -> None:
        """The connection of ``protocol`` ends."""
        assert protocol is not None
        protocol.connectionLost(Failure(ConnectionDone()))

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


class ClientAddressTests(SynchronousTestCase):
    """:func:`client_address`."""

    def test_ipv4(self) -> None:
        """An IPv4 address is returned as such."""
        self.assertEqual(client_address(address(PEER)), ipaddress.ip_address(PEER))

    def test_mapped(self) -> None:
        """An IPv4-mapped IPv6 address (dual-stack socket) is the IPv4 address."""
        self.assertEqual(client_address(address("::ffff:192.0.2.7")), ipaddress.ip_address(PEER))

    def test_zone(self) -> None:
        """A link-local address with a zone id is the address without it."""
        self.assertEqual(client_address(address("fe80::1%eth0")), ipaddress.ip_address("fe80::1"))

    def test_not_ip(self) -> None:
        """No address, or a non-IP one, gives ``None``."""
        self.assertIsNone(client_address(None))
        self.assertIsNone(client_address(IPv4Address("TCP", "not-an-ip", 1)))


class ConnectionLimiterTests(SynchronousTestCase):
    """:class:`ConnectionLimiter` bookkeeping on its own."""

    def test_peer_caps(self) -> None:
        """Peers are refused past the per-address cap, then past the total cap."""
        limiter = ConnectionLimiter(ConnectionLimits(max_connections=3, max_per_client=2))
        a1 = limiter.admit(address(PEER))
        a2 = limiter.admit(address(PEER))
        self.assertIsInstance(a1, Admission)
        self.assertIsInstance(a2, Admission)
        self.assertEqual(limiter.admit(address(PEER)), "per_client")
        self.assertIsInstance(limiter.admit(address(OTHER_PEER)), Admission)
        self.assertEqual(limiter.admit(address("192.0.2.9")), "total")
        self.assertEqual(limiter.total, 3)

    def test_local_exempt_but_counted(self) -> None:
        """Local clients are never refused, are not capped per address, and count towards the total."""
        limiter = ConnectionLimiter(ConnectionLimits(max_connections=2, max_per_client=1))
        for _ in range(10):
            self.assertEqual(limiter.admit(address(LOCAL)), Admission(None))
        self.assertEqual(limiter.admit(address("::1")), Admission(None))
        self.assertEqual(limiter.admit(address("::ffff:127.0.0.1")), Admission(None))
        self.assertEqual(limiter.total, 12)
        self.assertEqual(limiter.admit(address(PEER)), "total")

    def test_custom_exempt(self) -> None:
        """The exempt networks are the configured proxy clients, not loopback by default."""
        limiter = ConnectionLimiter(ConnectionLimits(
            max_connections=1, max_per_client=1, exempt=(ipaddress.ip_network("10.0.0.0/8"),)))
        self.assertEqual(limiter.admit(address("10.1.2.3")), Admission(None))
        self.assertEqual(limiter.admit(address("10.1.2.3")), Admission(None))
        self.assertEqual(limiter.admit(address(LOCAL)), "total")

    def test_release(self) -> None:
        """Releasing every admission returns every count to zero and forgets the addresses."""
        limiter = ConnectionLimiter(ConnectionLimits(max_connections=4, max_per_client=2))
        admitted = [limiter.admit(address(h)) for h in (PEER, PEER, OTHER_PEER, LOCAL)]
        self.assertEqual(limiter.connections_from(ipaddress.ip_address(PEER)), 2)
        for a in admitted:
            assert isinstance(a, Admission)
            limiter.release(a)
        self.assertEqual(limiter.total, 0)
        self.assertEqual(limiter._per_client, {})
        self.assertEqual(limiter.connections_from(ipaddress.ip_address(PEER)), 0)

    def test_refusals_capped(self) -> None:
        """Past ``max_refusals`` refusals in progress, no more are started."""
        limiter = ConnectionLimiter(ConnectionLimits(max_refusals=2))
        self.assertTrue(limiter.start_refusal("total"))
        self.assertTrue(limiter.start_refusal("per_client"))
        self.assertFalse(limiter.start_refusal("total"))
        limiter.end_refusal()
        self.assertTrue(limiter.start_refusal("total"))


class HeaderTimeoutTests(SiteTestMixin, SynchronousTestCase):
    """The header timeout against slow clients, and the idle timeout."""

    def test_slowloris_cut_off(self) -> None:
        """A request trickling in one byte a second is aborted at the header timeout, however busy it is."""
        self.make()
        channel, transport = self.connect(PEER)
        request = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        for i in range(int(limits.HEADER_TIMEOUT) - 1):
            assert channel is not None
            channel.dataReceived(request[i:i + 1])
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.metric("peernix_http_requests_rejected_total", reason="header_timeout"), 1)
        self.close(channel)
        self.assertEqual(self.site.limiter.total, 0)

    def test_silent_connection_cut_off(self) -> None:
        """A connection that sends nothing is closed at the header timeout, long before the idle timeout."""
        self.make()
        channel, transport = self.connect(PEER)
        self.clock.advance(limits.HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_local_clients_too(self) -> None:
        """The header timeout also applies to local clients (a real Nix sends its request at once)."""
        self.make()
        _channel, transport = self.connect(LOCAL)
        self.clock.advance(limits.HEADER_TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_request_in_time_is_served(self) -> None:
        """A request that arrives in time is answered and its header timer is gone."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        self.clock.advance(limits.HEADER_TIMEOUT - 1)
        channel.dataReceived(GET)
        self.assertEqual(status(transport.value()), 200)
        self.assertTrue(transport.value().endswith(b"hello"))
        self.clock.advance(limits.HEADER_TIMEOUT)
        self.assertFalse(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """A kept-alive connection with no next request is closed by the idle timeout, not before."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(GET)
        self.clock.advance(REQUEST_IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_next_request_has_its_own_deadline(self) -> None:
        """On a kept-alive connection the next request's deadline runs from its first byte."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(GET)
        self.clock.advance(30)
        channel.dataReceived(b"GET /hel")
        self.clock.advance(limits.HEADER_TIMEOUT - 1)
        channel.dataReceived(b"lo HTTP/1.1\r\n")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_slow_response_not_cut(self) -> None:
        """A request whose answer takes longer than the header timeout is not cut off."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(limits.HEADER_TIMEOUT * 3)
        self.assertFalse(transport.disconnecting)
        [request] = self.resource.held
        request.write(b"late")
        request.finish()
        self.assertEqual(status(transport.value()), 200)

    def test_pipelined_partial_request(self) -> None:
        """A second request pipelined only in part behind a slow one gets its deadline once the first is done."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\n")
        self.clock.advance(limits.HEADER_TIMEOUT * 2)
        self.assertFalse(transport.disconnecting)
        [request] = self.resource.held
        request.finish()
        self.clock.advance(limits.HEADER_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_no_timers_left(self) -> None:
        """A closed connection leaves no timer behind, timed out or not."""
        self.make()
        channel, _transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(b"GET /hel")
        self.close(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        channel, _transport = self.connect(PEER)
        self.clock.advance(limits.HEADER_TIMEOUT)
        self.close(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_then_aborted(self) -> None:
        """A timed-out connection is closed gracefully first, and aborted if it does not go away."""
        self.make()
        channel, transport = self.connect(PEER)
        self.clock.advance(limits.HEADER_TIMEOUT)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        assert isinstance(channel, LimitedHTTPChannel)
        self.clock.advance(channel.abortTimeout)
        self.assertTrue(transport.disconnected)

    def test_disabled(self) -> None:
        """``header_timeout=None`` leaves only the idle timeout."""
        self.make()
        self.site.header_timeout = None
        channel, transport = self.connect(PEER)
        assert channel is not None
        for _ in range(30):
            channel.dataReceived(b"G")
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)


class ConnectionCapTests(SiteTestMixin, SynchronousTestCase):
    """Connection caps through :class:`PeernixSite`."""

    def refused(self, transport: StringTransport, protocol: Protocol | None) -> None:
        """Assert that ``protocol`` refuses with a real 503 + Retry-After once the request head arrived."""
        self.assertIsInstance(protocol, RefusalProtocol)
        assert protocol is not None
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"GET /nix-cache/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
        data = transport.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data)
        self.assertIn(b"\r\nRetry-After: 5\r\n", data)
        self.assertIn(b"\r\nContent-Length: 0\r\n", data)
        self.assertIn(b"\r\nConnection: close\r\n", data)
        self.assertTrue(data.endswith(b"\r\n\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_per_client_cap(self) -> None:
        """A peer over the per-address cap gets 503 with Retry-After; another peer is still served."""
        self.make(max_per_client=2)
        kept = [self.connect(PEER) for _ in range(2)]
        for protocol, _ in kept:
            self.assertIsInstance(protocol, LimitedHTTPChannel)
        protocol, transport = self.connect(PEER)
        self.refused(transport, protocol)
        other, other_transport = self.connect(OTHER_PEER)
        assert other is not None
        other.dataReceived(GET)
        self.assertEqual(status(other_transport.value()), 200)
        self.assertEqual(self.metric("peernix_http_connections_refused_total", reason="per_client"), 1)

    def test_total_cap(self) -> None:
        """A peer over the total cap gets 503 with Retry-After."""
        self.make(max_connections=3)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.assertIsInstance(self.connect(host)[0], LimitedHTTPChannel)
        protocol, transport = self.connect("192.0.2.4")
        self.refused(transport, protocol)
        self.assertEqual(self.metric("peernix_http_connections_refused_total", reason="total"), 1)
        self.assertEqual(self.metric("peernix_http_connections", client="peer"), 3)

    def test_local_never_refused(self) -> None:
        """Local clients are served past both caps (Nix disables a substituter on 5xx)."""
        self.make(max_connections=2, max_per_client=1)
        for port in range(40000, 40050):
            channel, transport = self.connect(LOCAL, port)
            self.assertIsInstance(channel, LimitedHTTPChannel)
            assert channel is not None
            channel.dataReceived(GET)
            self.assertEqual(status(transport.value()), 200)
        channel, _ = self.connect("::1")
        self.assertIsInstance(channel, LimitedHTTPChannel)
        self.assertEqual(self.metric("peernix_http_connections", client="local"), 51)
        # ...while they hold the room, peers wait.
        self.assertIsInstance(self.connect(PEER)[0], RefusalProtocol)

    def test_counts_go_down(self) -> None:
        """Closed connections free their places (no leak): admitted, refused and timed-out ones alike."""
        self.make(max_connections=4, max_per_client=2)
        opened = [self.connect(h)[0] for h in (PEER, PEER, LOCAL, OTHER_PEER)]
        refused, _ = self.connect(PEER)
        self.assertIsInstance(refused, RefusalProtocol)
        self.assertEqual(self.site.limiter.refusing, 1)
        for protocol in opened + [refused]:
            self.close(protocol)
        self.assertEqual(self.site.limiter.total, 0)
        self.assertEqual(self.site.limiter.refusing, 0)
        self.assertEqual(self.site.limiter._per_client, {})
        self.assertEqual(self.metric("peernix_http_connections", client="peer"), 0)
        self.assertEqual(self.metric("peernix_http_connections", client="local"), 0)
        # Timed out, then closed.
        channel, _ = self.connect(PEER)
        self.clock.advance(limits.HEADER_TIMEOUT)
        self.close(channel)
        self.assertEqual(self.site.limiter.total, 0)
        again = [self.connect(PEER)[0] for _ in range(2)]
        self.assertEqual([type(p) for p in again], [LimitedHTTPChannel] * 2)

    def test_release_once(self) -> None:
        """A connection lost twice is released only once."""
        self.make()
        channel, _ = self.connect(PEER)
        self.connect(PEER)
        self.close(channel)
        self.close(channel)
        self.assertEqual(self.site.limiter.total, 1)

    def test_refusal_without_request(self) -> None:
        """A refused peer that sends nothing still gets its 503 after a short wait, and no timer is left."""
        self.make(max_per_client=1)
        self.connect(PEER)
        protocol, transport = self.connect(PEER)
        self.assertIsInstance(protocol, RefusalProtocol)
        self.clock.advance(limits.REFUSAL_READ_TIMEOUT - 0.1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(status(transport.value()), 503)
        self.close(protocol)
        self.assertEqual(self.site.limiter.refusing, 0)

    def test_refusal_endless_head(self) -> None:
        """A refused peer sending an endless head gets its 503 once the read cap is reached."""
        self.make(max_per_client=1)
        self.connect(PEER)
        protocol, transport = self.connect(PEER)
        assert protocol is not None
        for _ in range(limits.REFUSAL_READ_BYTES // 1024):
            self.assertEqual(transport.value(), b"")
            protocol.dataReceived(b"x" * 1024)
        self.assertEqual(status(transport.value()), 503)
        protocol.dataReceived(b"more")
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_refusal_head_split(self) -> None:
        """The end of the head is found even when split across reads."""
        self.make(max_per_client=1)
        first, _ = self.connect(PEER)
        protocol, transport = self.connect(PEER)
        assert protocol is not None
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"\n")
        self.assertEqual(status(transport.value()), 503)
        self.close(protocol)
        self.close(first)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusal_overflow(self) -> None:
        """Past the refusals in progress cap, a refused connection is closed at once (no protocol)."""
        self.make(max_per_client=1, max_refusals=1)
        self.connect(PEER)
        self.assertIsInstance(self.connect(PEER)[0], RefusalProtocol)
        self.assertIsNone(self.connect(PEER)[0])
        self.assertEqual(self.metric("peernix_http_connections_refused_total", reason="overflow"), 1)

    def test_mapped_addresses_share_a_count(self) -> None:
        """A peer's IPv4 and IPv4-mapped IPv6 connections count under one address."""
        self.make(max_per_client=1)
        self.connect(PEER)
        self.assertIsInstance(self.connect("::ffff:" + PEER)[0], RefusalProtocol)


class SizeLimitTests(SiteTestMixin, SynchronousTestCase):
    """Oversized requests get a 4xx and a close, never a 5xx."""

    def send(self, data: bytes, host: str = PEER) -> tuple[int, StringTransport]:
        """:returns: the status the site answers ``data`` with, and the transport."""
        self.make()
        channel, transport = self.connect(host)
        assert channel is not None
        channel.dataReceived(data)
        return status(transport.value()), transport

    def test_limits_explicit(self) -> None:
        """The channel's limits are set explicitly, not left to twisted's defaults."""
        self.assertEqual(LimitedHTTPChannel.MAX_LENGTH, limits.MAX_REQUEST_LINE)
        self.assertEqual(LimitedHTTPChannel.totalHeadersSize, limits.MAX_HEADER_BYTES)
        self.assertEqual(LimitedHTTPChannel.maxHeaders, limits.MAX_HEADER_COUNT)

    def test_request_line_too_long(self) -> None:
        """An over-long request line gets 414 and a close."""
        code, transport = self.send(b"GET /" + b"a" * limits.MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(code, 414)
        self.assertTrue(transport.disconnecting)

    def test_request_line_without_end(self) -> None:
        """An endless request line with no line break gets 414 as soon as it is too long."""
        code, transport = self.send(b"GET /" + b"a" * (limits.MAX_REQUEST_LINE + 10))
        self.assertEqual(code, 414)
        self.assertTrue(transport.disconnecting)

    def test_local_client_too(self) -> None:
        """The size limits hold for local clients too, still as a 4xx."""
        code, _ = self.send(b"GET /" + b"a" * limits.MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n", host=LOCAL)
        self.assertEqual(code, 414)

    def test_header_line_too_long(self) -> None:
        """An over-long header line gets 431."""
        code, transport = self.send(GET[:-2] + b"X-Big: " + b"a" * limits.MAX_REQUEST_LINE + b"\r\n\r\n")
        self.assertEqual(code, 431)
        self.assertTrue(transport.disconnecting)

    def test_headers_too_large(self) -> None:
        """Headers over the total size get 431."""
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        count = limits.MAX_HEADER_BYTES // len(line) + 1
        self.assertLess(count, limits.MAX_HEADER_COUNT)
        code, transport = self.send(GET[:-2] + line * count + b"\r\n")
        self.assertEqual(code, 431)
        self.assertTrue(transport.disconnecting)

    def test_too_many_headers(self) -> None:
        """More headers than allowed get 400."""
        code, transport = self.send(GET[:-2] + b"X-A: b\r\n" * (limits.MAX_HEADER_COUNT + 1) + b"\r\n")
        self.assertEqual(code, 400)
        self.assertTrue(transport.disconnecting)

    def test_body_too_large(self) -> None:
        """A declared body over the cap gets 413 before any of it is read."""
        code, transport = self.send(
            b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (limits.MAX_REQUEST_BODY + 1)
            + b"a" * 1000)
        self.assertEqual(code, 413)
        self.assertTrue(transport.disconnecting)

    def test_chunked_body(self) -> None:
        """A chunked body (no declared size) gets 413."""
        code, transport = self.send(
            b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertEqual(code, 413)
        self.assertTrue(transport.disconnecting)

    def test_small_body_accepted(self) -> None:
        """A small declared body is read and the request handled (here: 405, no POST route)."""
        code, transport = self.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(code, 405)

    def test_within_limits(self) -> None:
        """A request just within every limit is served."""
        line = b"X-Pad: " + b"a" * 100 + b"\r\n"
        code, _ = self.send(GET[:-2] + line * 50 + b"\r\n")
        self.assertEqual(code, 200)

    def test_nothing_after_rejection(self) -> None:
        """Bytes after a rejected request are ignored: one response, nothing more."""
        self.make()
        channel, transport = self.connect(PEER)
        assert channel is not None
        channel.dataReceived(b"GET /" + b"a" * (limits.MAX_REQUEST_LINE + 10))
        channel.dataReceived(b" HTTP/1.1\r\n\r\n" + GET)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)


class TransportTuningTests(SiteTestMixin, SynchronousTestCase):
    """The channel sends in bigger pieces and asks the kernel for its local address once."""

    def test_send_limit(self) -> None:
        """A TCP transport sends up to SEND_BYTES at once (twisted's default is 128 KiB)."""

        class Tcp(StringTransport):
            SEND_LIMIT = 128 * 1024

        self.make()
        protocol = self.site.buildProtocol(address("127.0.0.1"))
        assert protocol is not None
        transport = Tcp(peerAddress=address("127.0.0.1"))
        protocol.makeConnection(transport)
        self.assertEqual(transport.SEND_LIMIT, limits.SEND_BYTES)
        self.assertGreater(limits.SEND_BYTES, 128 * 1024)

    def test_host_asked_once(self) -> None:
        """Many requests on one connection ask the transport for the local address once."""
        self.make()
        protocol, transport = self.connect("127.0.0.1")
        asked: list[int] = []
        real = transport.getHost

        def get_host() -> Any:
            asked.append(1)
            return real()

        transport.getHost = get_host  # type: ignore[method-assign]
        for _ in range(5):
            transport.clear()
            assert protocol is not None
            protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status(transport.value()), 200)
        self.assertEqual(len(asked), 1)


class WiringTests(SynchronousTestCase):
    """The settings reach the site :func:`build_service` makes."""

    def test_defaults_agree(self) -> None:
        """The settings' defaults are the module's constants."""
        self.assertEqual(SETTINGS_BY_NAME["header_timeout"].default, limits.HEADER_TIMEOUT)
        self.assertEqual(SETTINGS_BY_NAME["max_connections"].default, limits.MAX_CONNECTIONS)
        self.assertEqual(SETTINGS_BY_NAME["max_connections_per_client"].default,
                         limits.MAX_CONNECTIONS_PER_CLIENT)
        config = Config()
        self.assertEqual((config.header_timeout, config.max_connections, config.max_connections_per_client),
                         (limits.HEADER_TIMEOUT, limits.MAX_CONNECTIONS, limits.MAX_CONNECTIONS_PER_CLIENT))

    def test_build_service(self) -> None:
        """build_service gives the site the configured timeout, caps and the proxy clients as exempt."""
        networks = (ipaddress.ip_network("10.0.0.0/8"),)
        service, _ = build(self, quiet(header_timeout=3.5, max_connections=7, max_connections_per_client=2,
                                       proxy_clients=networks))
        site = service.site
        self.assertIsInstance(site, PeernixSite)
        self.assertEqual(site.header_timeout, 3.5)
        self.assertEqual(site.limiter.limits.max_connections, 7)
        self.assertEqual(site.limiter.limits.max_per_client, 2)
        self.assertEqual(site.limiter.limits.exempt, networks)
        # The connection metrics are on the service's /metrics.
        assert service.metrics is not None
        self.assertIsNotNone(service.metrics.registry.get_sample_value(
            "peernix_http_connections", {"client": "peer"}))


class FileLimitTests(SynchronousTestCase):
    """:func:`ensure_file_limit`."""

    def run_with(self, soft: int, hard: int, max_connections: int = 1024,
                 refuse: bool = False) -> tuple[int, list[tuple[int, int]], list[Any]]:
        """:returns: the resulting soft limit, the setrlimit calls and the logged events."""
        calls: list[tuple[int, int]] = []

        def setrlimit(which: int, limits_: tuple[int, int]) -> None:
            self.assertEqual(which, resource.RLIMIT_NOFILE)
            if refuse:
                raise ValueError("not allowed")
            calls.append(limits_)

        with capturedLogs() as events:
            result = ensure_file_limit(max_connections, getrlimit=lambda which: (soft, hard), setrlimit=setrlimit)
        return result, calls, list(events)

    def test_raised_to_fit(self) -> None:
        """A low soft limit is raised to fit the connections plus a reserve, quietly."""
        result, calls, events = self.run_with(1024, 524288)
        self.assertEqual(result, 1024 + limits.FD_RESERVE)
        self.assertEqual(calls, [(1024 + limits.FD_RESERVE, 524288)])
        self.assertEqual(events, [])

    def test_enough_already(self) -> None:
        """A soft limit that fits already is left alone."""
        result, calls, events = self.run_with(65536, 524288)
        self.assertEqual((result, calls, events), (65536, [], []))

    def test_unlimited_hard(self) -> None:
        """An unlimited hard limit lets the soft limit rise as needed."""
        result, calls, _ = self.run_with(1024, resource.RLIM_INFINITY, max_connections=4000)
        self.assertEqual(calls, [(4000 + limits.FD_RESERVE, resource.RLIM_INFINITY)])

    def test_hard_limit_too_low(self) -> None:
        """When the hard limit is too low the soft limit rises to it and a warning says what to do."""
        result, calls, events = self.run_with(1024, 1200)
        self.assertEqual(result, 1200)
        self.assertEqual(calls, [(1200, 1200)])
        [event] = events
        self.assertEqual((event["limit"], event["max_connections"]), (1200, 1024))

    def test_refused(self) -> None:
        """When raising is not allowed, the old limit stays and a warning is logged."""
        result, _, events = self.run_with(1024, 524288, refuse=True)
        self.assertEqual(result, 1024)
        self.assertEqual(len(events), 1)
