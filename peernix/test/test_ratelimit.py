"""Tests for :mod:`peernix.web.ratelimit`: the rate, the fair shares, the backpressure."""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.web.ratelimit import ThrottledConsumer, UploadLimiter


@implementer(IPushProducer)
class ChunkProducer:
    """An endless push producer writing ``chunk``-byte chunks whenever resumed, until paused."""

    def __init__(self, consumer: IConsumer, chunk: int, total: int | None = None) -> None:
        self.consumer = consumer
        self.chunk = chunk
        self.total = total
        self.paused = True
        self.stopped = False
        self.written = 0
        self.pauses = 0

    def start(self) -> None:
        """Register (which may pause it at once) and write unless paused."""
        self.paused = False
        self.consumer.registerProducer(self, True)
        if not self.paused:
            self.resumeProducing()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped:
            if self.total is not None and self.written >= self.total:
                self.consumer.unregisterProducer()
                self.stopped = True
                return
            self.written += self.chunk
            self.consumer.write(b"x" * self.chunk)

    def stopProducing(self) -> None:
        self.stopped = True


def stream(limiter: UploadLimiter, chunk: int, total: int | None = None) -> tuple[ChunkProducer, StringTransport]:
    """:returns: a started producer writing through a ThrottledConsumer into a transport."""
    transport = StringTransport()
    throttled = ThrottledConsumer(transport, limiter)
    producer = ChunkProducer(throttled, chunk, total)
    producer.start()
    return producer, transport


class UploadLimiterTests(SynchronousTestCase):
    """The shared bucket."""

    def test_interfaces(self) -> None:
        """ThrottledConsumer is a consumer to its producer and a push producer to its transport."""
        throttled = ThrottledConsumer(StringTransport(), UploadLimiter(1000, Clock()))
        self.assertTrue(verifyObject(IConsumer, throttled))
        self.assertTrue(verifyObject(IPushProducer, throttled))

    def test_rejects_zero_rate(self) -> None:
        """A rate below 1 byte/s is a programming error."""
        self.assertRaises(ValueError, UploadLimiter, 0, Clock())

    def test_rate_of_one_stream(self) -> None:
        """One endless stream gets the rate (plus the burst once), paused between its turns, never buffered."""
        clock = Clock()
        limiter = UploadLimiter(1_000_000, clock, burst=100_000)
        producer, transport = stream(limiter, 64 * 1024)
        for _ in range(1000):
            clock.advance(0.01)
        sent = len(transport.value())
        self.assertApproximates(sent, 10 * 1_000_000 + 100_000, 64 * 1024)
        # Backpressure: the producer was paused, not asked to write more than allowed.
        self.assertGreater(producer.pauses, 100)
        self.assertEqual(producer.written, sent)

    def test_fair_shares_whatever_the_chunk_size(self) -> None:
        """Three concurrent streams with different chunk sizes get equal bytes (within a chunk or two)."""
        clock = Clock()
        limiter = UploadLimiter(3_000_000, clock, burst=100_000)
        streams = [stream(limiter, size) for size in (16 * 1024, 64 * 1024, 256 * 1024)]
        for _ in range(1000):
            clock.advance(0.01)
        sent = [len(t.value()) for _, t in streams]
        self.assertApproximates(sum(sent), 30_000_000 + 100_000, 256 * 1024)
        for n in sent:
            self.assertApproximates(n, sum(sent) / 3, 2 * 256 * 1024)

    def test_newcomer_starts_level(self) -> None:
        """A stream joining late is not given the bytes the others got before it: shares are even from then on."""
        clock = Clock()
        limiter = UploadLimiter(1_000_000, clock, burst=50_000)
        first, first_t = stream(limiter, 32 * 1024)
        for _ in range(500):
            clock.advance(0.01)
        before = len(first_t.value())
        second, second_t = stream(limiter, 32 * 1024)
        for _ in range(500):
            clock.advance(0.01)
        first_share = len(first_t.value()) - before
        second_share = len(second_t.value())
        self.assertApproximates(first_share, second_share, 3 * 32 * 1024)
        self.assertApproximates(first_share + second_share, 5_000_000, 2 * 32 * 1024)

    def test_transport_pause_wins(self) -> None:
        """A turn never resumes a producer its transport paused; the transport's resume does."""
        clock = Clock()
        limiter = UploadLimiter(1000, clock, burst=1000)
        transport = StringTransport()
        throttled = ThrottledConsumer(transport, limiter)
        producer = ChunkProducer(throttled, 2000)
        producer.start()
        self.assertTrue(throttled.throttled)
        throttled.pauseProducing()  # the client is slow
        clock.advance(5)
        self.assertTrue(producer.paused)
        self.assertEqual(len(transport.value()), 2000)
        throttled.resumeProducing()
        self.assertEqual(len(transport.value()), 4000)

    def test_ended_stream_leaves_the_queue(self) -> None:
        """A stream that ends or is stopped while waiting gives up its turn and leaves no timer."""
        clock = Clock()
        limiter = UploadLimiter(1000, clock, burst=1000)
        producer, _ = stream(limiter, 5000)
        self.assertEqual(limiter.waiting, 1)
        producer.consumer.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(producer.stopped)
        self.assertEqual(limiter.waiting, 0)
        clock.advance(10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_one_off_waiters(self) -> None:
        """A short body waiting for its turn goes out once the debt is paid; a cancelled one never."""
        clock = Clock()
        limiter = UploadLimiter(1000, clock, burst=1000)
        self.assertTrue(limiter.may_write())
        self.assertTrue(limiter.take(3000))  # 2 s of debt
        went: list[str] = []
        limiter.wait(lambda: went.append("a"))
        cancelled = limiter.wait(lambda: went.append("b"))
        cancelled.cancel()
        clock.advance(1.9)
        self.assertEqual(went, [])
        clock.advance(0.2)
        self.assertEqual(went, ["a"])
        self.assertEqual(clock.getDelayedCalls(), [])
        limiter.wait(lambda: went.append("c"))
        limiter.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
