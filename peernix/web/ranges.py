"""
Answering a ``Range`` request for a NAR that is relayed from a peer.

A relayed NAR can only be verified from its first byte: its NarHash covers
the whole NAR.  So a ranged relay still fetches (and the relay still hashes)
the whole NAR from the peer; :class:`RangeConsumer` sits between the relay
and the client, drops the bytes before the range, forwards the range and
drops what follows it.  It holds back the last piece it forwarded until
:meth:`RangeConsumer.finish` is called, which the caller does only once the
relay reported the whole NAR verified: the last byte of a 206 leaves, as the
last byte of a 200 does, only after NarHash and NarSize checked out.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer


@implementer(IConsumer)
class RangeConsumer:
    """
    An ``IConsumer`` passing on bytes ``first`` to ``last`` (inclusive) of
    what is written to it.

    Producers register with the wrapped consumer, so backpressure is the
    client's while bytes of the range flow (and nobody's while bytes outside
    it are dropped, which only costs reading the peer at its own pace).
    Memory held: one written piece at most.

    :param consumer: where the range goes (the client's request).
    :param first: the first byte of the range (0-based).
    :param last: the last byte of the range (inclusive, ``>= first``).
    :ivar forwarded: the number of bytes passed to ``consumer`` so far.
    """

    def __init__(self, consumer: IConsumer, first: int, last: int) -> None:
        if first < 0 or last < first:
            raise ValueError(f"invalid byte range {first}-{last}")
        self._consumer = consumer
        self._first = first
        self._last = last
        #: Offset (in the whole NAR) of the next byte written to us.
        self._position = 0
        #: The latest piece of the range, not passed on yet.
        self._held: bytes | None = None
        self.forwarded = 0

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        start = self._position
        self._position += len(data)
        lo = max(self._first - start, 0)
        hi = min(self._last + 1 - start, len(data))
        if lo >= hi:
            return
        piece = data if (lo, hi) == (0, len(data)) else data[lo:hi]
        held, self._held = self._held, piece
        if held is not None:
            self._pass(held)

    def finish(self) -> None:
        """
        Pass on the held-back last piece.  Call it only once the whole NAR
        verified; never after a failure (then the connection is aborted).
        """
        held, self._held = self._held, None
        if held is not None:
            self._pass(held)

    def _pass(self, data: bytes) -> None:
        self.forwarded += len(data)
        self._consumer.write(data)
