"""Tests for :mod:`peernix.web.ranges`: cutting a byte range out of a relayed NAR."""

from __future__ import annotations

import os

from twisted.internet.interfaces import IConsumer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from peernix.test.peerfakes import chunks_of
from peernix.web.ranges import RangeConsumer

DATA = os.urandom(10000)


class RangeConsumerTests(SynchronousTestCase):
    """RangeConsumer passes on exactly the range, its last piece only after finish()."""

    def cut(self, first: int, last: int, piece: int) -> tuple[StringTransport, RangeConsumer]:
        consumer = StringTransport()
        ranged = RangeConsumer(consumer, first, last)
        for chunk in chunks_of(DATA, piece):
            ranged.write(chunk)
        return consumer, ranged

    def test_interface(self) -> None:
        """RangeConsumer provides IConsumer."""
        verifyObject(IConsumer, RangeConsumer(StringTransport(), 0, 0))

    def test_exact_slices(self) -> None:
        """Whatever the piece sizes, first..last (inclusive) come out, nothing else."""
        for first, last in ((0, 0), (0, 9999), (1, 1), (999, 1000), (1000, 1999), (5, 9999), (9999, 9999), (0, 20000)):
            for piece in (1, 7, 1000, 1001, 10000):
                consumer, ranged = self.cut(first, last, piece)
                ranged.finish()
                self.assertEqual(consumer.value(), DATA[first : last + 1], (first, last, piece))
                self.assertEqual(ranged.forwarded, len(DATA[first : last + 1]))

    def test_last_piece_held(self) -> None:
        """Until finish() the range's last piece is held back, even when the range ends before the data."""
        for first, last in ((1000, 9999), (1000, 4999), (0, 0)):
            consumer, ranged = self.cut(first, last, 1000)
            expected = DATA[first : last + 1]
            self.assertLess(len(consumer.value()), len(expected))
            self.assertTrue(expected.startswith(consumer.value()))
            ranged.finish()
            self.assertEqual(consumer.value(), expected)

    def test_without_finish_never_complete(self) -> None:
        """A failed relay (finish() never called) leaves the range short, so the client sees an error."""
        consumer, _ranged = self.cut(0, len(DATA) - 1, 100)
        self.assertEqual(consumer.value(), DATA[:-100])

    def test_producer_passes_through(self) -> None:
        """Producers register with and unregister from the wrapped consumer."""
        consumer = StringTransport()
        ranged = RangeConsumer(consumer, 0, 10)
        producer = StringTransport()
        ranged.registerProducer(producer, True)
        self.assertIs(consumer.producer, producer)
        self.assertTrue(consumer.streaming)
        ranged.unregisterProducer()
        self.assertIsNone(consumer.producer)

    def test_invalid_range(self) -> None:
        """A range ending before it starts, or starting below 0, is refused."""
        for first, last in ((5, 4), (-1, 3)):
            self.assertRaises(ValueError, RangeConsumer, StringTransport(), first, last)
