"""
TCP connections that move bigger steps per reactor turn than Twisted's
defaults, so a download keeps its link's speed while the daemon is busy.

A Twisted TCP transport reads at most 64 KiB (``bufferSize``) each time the
reactor finds its socket readable, and sends at most 128 KiB
(``SEND_LIMIT``) each time it finds it writable.  A connection therefore
moves at most that much per turn of the reactor, whatever the link: when
the machine is busy (several Nix clients and daemons on two cores, a
fleet fetching at once) a turn takes 5-10 ms and a download from an
upstream crawls at 6-13 MB/s on a 25 MB/s uplink, while the kernel holds
more bytes ready.  Measured in ``python -m bench.upstream`` with four nodes
(the uplink sampled every 0.25 s): the big NAR's download ran at 4-10 MB/s
for its first 3-4 s; reading up to 1 MiB a turn, it ran at the uplink's
25 MB/s from its start.

- :class:`LargeReads` reads up to :data:`READ_SIZE` bytes a turn, into one
  buffer the reactor thread reuses, and hands the protocol exactly the
  bytes read (no 1 MiB allocation per read).
- :data:`SEND_LIMIT` lets one writable event send up to 1 MiB of what the
  transport holds (the kernel still takes only what its buffer has room
  for).
- :class:`LargeReadReactor` is what client endpoints (``HostnameEndpoint``
  in an ``Agent``) are given instead of the reactor: its ``connectTCP``
  makes :class:`LargeReadClient` connections on a real POSIX reactor and
  defers to the reactor's own on any other (a test's ``MemoryReactor``);
  everything else is the reactor's.

What a protocol sees is unchanged (the same bytes in the same order, in
fewer calls); pausing, closing and errors take Twisted's own paths.
"""

from __future__ import annotations

from errno import EAGAIN, EWOULDBLOCK
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IConnector
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import directlyProvides, providedBy

__all__ = ["READ_SIZE", "SEND_LIMIT", "LargeReadClient", "LargeReadConnector", "LargeReadReactor", "LargeReads"]

#: The most bytes one read takes from a socket (Twisted: 64 KiB).
READ_SIZE = 1 << 20
#: The most bytes one writable event hands the socket (Twisted: 128 KiB).
SEND_LIMIT = 1 << 20

# Reads happen on the reactor thread only, one at a time: one buffer serves
# every connection.
_read_buffer = bytearray(READ_SIZE)
_read_view = memoryview(_read_buffer)


class LargeReads:
    """
    Mixin for :class:`twisted.internet.tcp.Connection` subclasses (put it
    first): reads up to :data:`READ_SIZE` bytes a turn and sends up to
    :data:`SEND_LIMIT`.

    Contract of :meth:`doRead`, as Twisted's: ``None`` after handing the
    protocol the bytes read (or when none were ready),
    ``CONNECTION_DONE`` when the peer closed, ``CONNECTION_LOST`` when
    the socket failed.
    """

    SEND_LIMIT = SEND_LIMIT
    socket: Any
    protocol: Any

    def doRead(self) -> Any:
        """Read what the socket holds, up to :data:`READ_SIZE` bytes, and hand it to the protocol."""
        try:
            received = self.socket.recv_into(_read_buffer)
        except OSError as e:
            if e.errno in (EAGAIN, EWOULDBLOCK):
                return None
            return main.CONNECTION_LOST
        if not received:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(bytes(_read_view[:received]))
        return None


class LargeReadClient(LargeReads, tcp.Client):
    """An outgoing TCP connection with :class:`LargeReads`."""


class LargeReadConnector(tcp.Connector):
    """A :class:`twisted.internet.tcp.Connector` whose connections are :class:`LargeReadClient`."""

    def _makeTransport(self) -> LargeReadClient:
        return LargeReadClient(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


class LargeReadReactor:
    """
    The reactor as client endpoints should see it: ``connectTCP`` makes
    :class:`LargeReadClient` connections (on a real POSIX reactor; on any
    other it is the reactor's own), every other call and attribute is the
    reactor's.  It provides exactly the interfaces the reactor provides.
    """

    def __init__(self, reactor: Any) -> None:
        """:param reactor: the real reactor (or a test's fake)."""
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30.0,
                   bindAddress: Any = None) -> IConnector:
        """Connect as ``IReactorTCP.connectTCP`` does, with :class:`LargeReadClient` on a real reactor."""
        if not isinstance(self._reactor, PosixReactorBase):
            connector: IConnector = self._reactor.connectTCP(host, port, factory, timeout, bindAddress)
            return connector
        large = LargeReadConnector(host, port, factory, timeout, bindAddress, self._reactor)
        large.connect()  # type: ignore[no-untyped-call]
        return large

    def __getattr__(self, name: str) -> Any:
        # listenTCP, callLater, seconds, nameResolver, ...: the reactor's.
        return getattr(self._reactor, name)
