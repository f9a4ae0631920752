"""Tests for :mod:`peernix.tcp`: outgoing connections that read up to 1 MiB a turn."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer, main, tcp
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from peernix.tcp import READ_SIZE, SEND_LIMIT, LargeReadClient, LargeReadReactor, LargeReads


class _Collecting(Protocol):
    """Keeps every ``dataReceived`` call's bytes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


class _Reader(LargeReads):
    """Just what :meth:`LargeReads.doRead` uses of a connection: a socket and a protocol."""

    def __init__(self, sock: Any, protocol: Protocol) -> None:
        self.socket = sock
        self.protocol = protocol


class _FailingSocket:
    """A socket whose ``recv_into`` fails with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code

    def recv_into(self, buffer: bytearray) -> int:
        raise OSError(self.code, "test")


class LargeReadsTests(SynchronousTestCase):
    """:meth:`LargeReads.doRead` over socket pairs: what a turn's read hands the protocol."""

    def pair(self) -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        return ours, theirs

    def test_one_read_takes_more_than_twisteds_64_kib(self) -> None:
        """What the socket holds (150,000 bytes here) comes in one call, byte for byte."""
        ours, theirs = self.pair()
        data = bytes(range(256)) * 586  # 150,016 bytes
        theirs.sendall(data)
        protocol = _Collecting()
        self.assertIsNone(_Reader(ours, protocol).doRead())
        self.assertEqual(protocol.chunks, [data])
        self.assertGreater(len(protocol.chunks[0]), 65536)

    def test_the_bytes_handed_over_are_the_protocols_own(self) -> None:
        """The next read reuses the buffer: bytes handed over earlier do not change."""
        ours, theirs = self.pair()
        protocol = _Collecting()
        reader = _Reader(ours, protocol)
        theirs.sendall(b"a" * 1000)
        reader.doRead()
        theirs.sendall(b"b" * 1000)
        reader.doRead()
        self.assertEqual(protocol.chunks, [b"a" * 1000, b"b" * 1000])

    def test_nothing_ready(self) -> None:
        """A read with nothing to read hands nothing over and keeps the connection."""
        ours, _ = self.pair()
        protocol = _Collecting()
        self.assertIsNone(_Reader(ours, protocol).doRead())
        self.assertEqual(protocol.chunks, [])

    def test_peer_closed(self) -> None:
        """The peer's close ends the connection as done, after the bytes it sent first."""
        ours, theirs = self.pair()
        protocol = _Collecting()
        reader = _Reader(ours, protocol)
        theirs.sendall(b"last")
        theirs.close()
        self.assertIsNone(reader.doRead())
        self.assertIs(reader.doRead(), main.CONNECTION_DONE)
        self.assertEqual(protocol.chunks, [b"last"])

    def test_socket_failure_loses_the_connection(self) -> None:
        """A failing socket (a reset) ends the connection as lost; EAGAIN does not."""
        protocol = _Collecting()
        self.assertIs(_Reader(_FailingSocket(errno.ECONNRESET), protocol).doRead(), main.CONNECTION_LOST)
        self.assertIsNone(_Reader(_FailingSocket(errno.EAGAIN), protocol).doRead())
        self.assertEqual(protocol.chunks, [])

    def test_limits(self) -> None:
        """Reads and sends go up to 1 MiB, above Twisted's 64 and 128 KiB."""
        self.assertEqual(READ_SIZE, 1 << 20)
        self.assertEqual(LargeReadClient.SEND_LIMIT, SEND_LIMIT)
        self.assertGreater(SEND_LIMIT, tcp.Client.SEND_LIMIT)
        self.assertGreater(READ_SIZE, tcp.Client.bufferSize)


class LargeReadReactorTests(TestCase):
    """The reactor view client endpoints are given."""

    def test_provides_what_the_reactor_provides(self) -> None:
        """It provides the reactor's interfaces, and only those."""
        view = LargeReadReactor(MemoryReactorClock())
        verifyObject(IReactorTCP, view)
        verifyObject(IReactorTime, view)
        verifyObject(IReactorPluggableNameResolver, view)
        only_time = LargeReadReactor(Clock())
        verifyObject(IReactorTime, only_time)
        self.assertFalse(IReactorTCP.providedBy(only_time))

    def test_everything_else_is_the_reactors(self) -> None:
        """Time and calls are the reactor's own."""
        clock = MemoryReactorClock()
        view = LargeReadReactor(clock)
        calls: list[int] = []
        view.callLater(2, calls.append, 1)
        clock.advance(2)
        self.assertEqual(calls, [1])
        self.assertEqual(view.seconds(), clock.seconds())

    def test_memory_reactor_gets_its_own_connect_tcp(self) -> None:
        """A reactor that is not a real POSIX one is asked to connectTCP with the same arguments."""
        reactor = MemoryReactor()
        factory = ClientFactory.forProtocol(Protocol)
        LargeReadReactor(reactor).connectTCP("192.0.2.1", 9999, factory, 7, None)
        self.assertEqual(reactor.tcpClients, [("192.0.2.1", 9999, factory, 7, None)])

    @defer.inlineCallbacks
    def test_real_connection_through_hostname_endpoint(self) -> Any:
        """
        On the real reactor an endpoint given the view connects with a
        LargeReadClient, and 3 MiB sent by the server arrive whole and in
        order.
        """
        from twisted.internet import reactor

        payload = bytes(range(256)) * (3 * 4096)

        class Sending(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(payload)
                self.transport.loseConnection()

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Sending))
        self.addCleanup(port.stopListening)
        protocol = _Collecting()
        endpoint = HostnameEndpoint(LargeReadReactor(reactor), "127.0.0.1", port.getHost().port)
        connected = yield endpoint.connect(Factory.forProtocol(lambda: protocol))
        self.assertIs(connected, protocol)
        self.assertIsInstance(protocol.transport, LargeReadClient)
        yield protocol.done
        self.assertEqual(b"".join(protocol.chunks), payload)
