"""Tests for :mod:`peernix.web.transport`: answers sent in the turn they are written."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import main
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from peernix.web.transport import TurnFlushPort, TurnFlushServer, TurnFlushTCPEndpoint, TurnFlusher


class _Answering(Protocol):
    """Answers every read with ``answer``, then closes when ``close`` is set."""

    def __init__(self, answer: bytes, close: bool = False) -> None:
        self.answer = answer
        self.close = close
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.answer:
            self.transport.write(self.answer)  # type: ignore[union-attr]
        if self.close:
            self.transport.loseConnection()  # type: ignore[union-attr]


def _receive_all(sock: socket.socket) -> bytes:
    """:returns: everything ``sock`` holds now (non-blocking)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


class _Port:
    """What a TurnFlushServer needs of its port: a flusher and a port number."""

    _realPortNumber = 9999

    def __init__(self, flusher: TurnFlusher) -> None:
        self.flusher = flusher


class TurnFlushServerTests(SynchronousTestCase):
    """:class:`TurnFlushServer` over socket pairs, with a memory reactor's reader and writer sets and clock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.port = _Port(TurnFlusher(self.reactor))

    def connect(self, protocol: Protocol, sndbuf: int | None = None,
                kind: type[TurnFlushServer] = TurnFlushServer) -> tuple[TurnFlushServer, socket.socket]:
        """:returns: a transport for ``protocol`` on one end of a socket pair, and the other end."""
        ours, theirs = socket.socketpair()
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        ours.setblocking(False)
        theirs.setblocking(False)
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        transport = kind(ours, protocol, ("127.0.0.1", 1), self.port, 1, self.reactor)  # type: ignore[arg-type]
        protocol.makeConnection(transport)
        return transport, theirs

    def end_turn(self) -> None:
        """Run what the reactor runs before it polls again (the calls due now)."""
        self.reactor.advance(0)

    def test_answer_written_while_reading_goes_out_at_the_end_of_the_turn(self) -> None:
        """What the protocol writes while reading is sent when the turn ends, and the reactor never watches for writability."""
        protocol = _Answering(b"the answer")
        transport, theirs = self.connect(protocol)
        theirs.sendall(b"a question")
        self.assertIsNone(transport.doRead())
        self.assertEqual(protocol.received, b"a question")
        self.assertEqual(self.reactor.getWriters(), [])
        self.end_turn()
        self.assertEqual(_receive_all(theirs), b"the answer")
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertIn(transport, self.reactor.getReaders())

    def test_one_flush_for_every_connection_of_the_turn(self) -> None:
        """Connections read in one turn are flushed together, by one call, in the order they were read."""
        pairs = [self.connect(_Answering(b"answer %d" % i)) for i in range(3)]
        for transport, theirs in pairs:
            theirs.sendall(b"q")
            transport.doRead()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.end_turn()
        self.assertEqual([_receive_all(theirs) for _, theirs in pairs], [b"answer 0", b"answer 1", b"answer 2"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_what_the_socket_does_not_take_is_left_to_the_reactor(self) -> None:
        """An answer larger than the socket takes at once is sent in order, the rest when the reactor says the socket is writable."""
        answer = bytes(range(256)) * (16 * 1024)  # 4 MiB
        transport, theirs = self.connect(_Answering(answer), sndbuf=64 * 1024)
        theirs.sendall(b"q")
        self.assertIsNone(transport.doRead())
        self.end_turn()
        self.assertEqual(self.reactor.getWriters(), [transport])
        got = _receive_all(theirs)
        self.assertLess(len(got), len(answer))
        for _ in range(10_000):
            if transport not in self.reactor.getWriters():
                break
            self.assertIsNone(transport.doWrite())
            got += _receive_all(theirs)
        self.assertEqual(got, answer)
        self.assertEqual(self.reactor.getWriters(), [])

    def test_closing_is_left_to_the_reactor(self) -> None:
        """A connection closed while reading is flushed and closed by the reactor's write path, the answer first."""
        transport, theirs = self.connect(_Answering(b"bye", close=True))
        theirs.sendall(b"q")
        self.assertIsNone(transport.doRead())
        self.end_turn()
        self.assertEqual(self.reactor.getWriters(), [transport])
        self.assertTrue(transport.disconnecting)
        self.assertIs(transport.doWrite(), main.CONNECTION_DONE)
        self.assertEqual(_receive_all(theirs), b"bye")

    def test_connection_gone_before_the_end_of_the_turn(self) -> None:
        """A connection lost between its read and the flush is skipped; the others are still flushed."""
        gone, theirs_gone = self.connect(_Answering(b"lost"))
        kept, theirs = self.connect(_Answering(b"kept"))
        theirs_gone.sendall(b"q")
        gone.doRead()
        theirs.sendall(b"q")
        kept.doRead()
        gone.connectionLost(Failure(main.CONNECTION_LOST))
        self.end_turn()
        self.assertEqual(_receive_all(theirs), b"kept")
        self.assertEqual(self.reactor.getWriters(), [])

    def failing_then_fine(self, kind: type[TurnFlushServer]) -> tuple[TurnFlushServer, socket.socket]:
        """
        Read one request on a connection of ``kind`` (whose flush fails),
        then one on an ordinary connection, and end the turn.

        :returns: the failing transport, and the ordinary connection's client end.
        """
        failing, theirs_failing = self.connect(_Answering(b"x"), kind=kind)
        fine, theirs = self.connect(_Answering(b"fine"))
        theirs_failing.sendall(b"q")
        failing.doRead()
        theirs.sendall(b"q")
        fine.doRead()
        self.end_turn()
        return failing, theirs

    def test_a_failing_flush_leaves_the_send_to_the_reactor(self) -> None:
        """A connection whose flush raises is logged and handed to the reactor; the rest of the turn is flushed."""
        failing, theirs = self.failing_then_fine(_FailingFlush)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.reactor.getWriters(), [failing])
        self.assertEqual(_receive_all(theirs), b"fine")

    def test_a_failing_fallback_keeps_no_answer_back(self) -> None:
        """Even when handing a connection to the reactor fails too, the other connections of the turn are flushed."""
        _, theirs = self.failing_then_fine(_FailingTwice)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(_receive_all(theirs), b"fine")

    def test_write_outside_a_read_takes_the_ordinary_path(self) -> None:
        """A write at any other time is buffered and waits for the reactor, as with Twisted's own transport."""
        transport, theirs = self.connect(_Answering(b""))
        transport.write(b"later")
        self.assertEqual(self.reactor.getWriters(), [transport])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(_receive_all(theirs), b"")
        self.assertIsNone(transport.doWrite())
        self.assertEqual(_receive_all(theirs), b"later")
        self.assertEqual(self.reactor.getWriters(), [])

    def test_one_writable_event_sends_more_than_twisteds_128_kib(self) -> None:
        """One doWrite hands the socket up to 1 MiB of what is buffered (as much as the socket takes)."""
        transport, theirs = self.connect(_Answering(b""), sndbuf=1 << 20)
        data = bytes(range(256)) * 2048  # 512 KiB
        transport.write(data)
        self.assertIsNone(transport.doWrite())
        got = _receive_all(theirs)
        self.assertGreater(len(got), 128 * 1024)
        self.assertEqual(got, data[:len(got)])

    def test_read_without_a_write_asks_nothing(self) -> None:
        """A read the protocol does not answer asks nothing of the reactor."""
        transport, theirs = self.connect(_Answering(b""))
        theirs.sendall(b"partial request")
        self.assertIsNone(transport.doRead())
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_write_sequence_sends_the_pieces_in_order(self) -> None:
        """writeSequence sends its pieces as one string, in order; a piece that is not bytes is a TypeError and writes nothing."""
        transport, theirs = self.connect(_Answering(b""))
        transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"A", b": ", b"b", b"\r\n", b"\r\n"])
        transport.writeSequence([])
        self.assertRaises(TypeError, transport.writeSequence, [b"x", "y"])
        self.assertIsNone(transport.doWrite())
        self.assertEqual(_receive_all(theirs), b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n")

    def test_end_of_stream_is_reported(self) -> None:
        """The peer's end of stream still ends the connection."""
        transport, theirs = self.connect(_Answering(b"x"))
        theirs.shutdown(socket.SHUT_WR)
        self.assertIs(transport.doRead(), main.CONNECTION_DONE)


class _FailingFlush(TurnFlushServer):
    def flush(self) -> None:
        raise RuntimeError("boom")


class _FailingTwice(_FailingFlush):
    def watch_writable(self) -> None:
        raise RuntimeError("boom again")


class TurnFlushTCPEndpointTests(TestCase):
    """The endpoint listens with turn-flushing transports on a real reactor, with ``listenTCP`` on any other."""

    def test_interface(self) -> None:
        """The endpoint provides IStreamServerEndpoint."""
        verifyObject(IStreamServerEndpoint, TurnFlushTCPEndpoint(MemoryReactor(), 0))

    def test_memory_reactor_gets_listen_tcp(self) -> None:
        """A reactor that is not a real POSIX one is asked to listenTCP with the same arguments."""
        reactor = MemoryReactor()
        factory = Factory.forProtocol(Protocol)
        ports: list[Any] = []
        TurnFlushTCPEndpoint(reactor, 9999, backlog=7, interface="::1").listen(factory).addCallback(ports.append)
        self.assertEqual(len(ports), 1)
        self.assertEqual(reactor.tcpServers, [(9999, factory, 7, "::1")])

    def test_real_reactor_gets_a_turn_flush_port(self) -> None:
        """On the real reactor the port is a TurnFlushPort on loopback, and it stops like any other."""
        from twisted.internet import reactor

        factory = Factory.forProtocol(Protocol)
        endpoint = TurnFlushTCPEndpoint(reactor, 0, interface="127.0.0.1")
        ports: list[Any] = []
        endpoint.listen(factory).addCallback(ports.append)
        self.assertIsInstance(ports[0], TurnFlushPort)
        self.assertIsInstance(ports[0].flusher, TurnFlusher)
        self.assertEqual(ports[0].getHost().host, "127.0.0.1")
        return ports[0].stopListening()  # type: ignore[no-any-return]
