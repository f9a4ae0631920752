"""Tests for :mod:`peernix.web.streaming`: the threaded push producer and stream transformers."""

from __future__ import annotations

import bz2
import gzip
import os
import queue
import random
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import zstandard
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.test.fakes import run_synchronously
from peernix.web.streaming import (
    BIG_CHUNK,
    SMALL_CHUNK,
    AheadBudget,
    ProducerStopped,
    close_source,
    SizeMismatch,
    StalledConsumer,
    ThreadedProducer,
    exact_length,
    file_chunks,
    gzip_chunks,
    slice_chunks,
    zstd_chunks,
)

_T = TypeVar("_T")


class ManualThreads:
    """A defer_to_thread whose calls wait in a queue until the test runs them, one by one."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.running = False

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        self.queue.append((f, d))
        return d

    def run_one(self) -> None:
        """Run the oldest queued call and fire its Deferred."""
        f, d = self.queue.pop(0)
        assert not self.running, "two worker calls at once"
        self.running = True
        try:
            result = f()
        except Exception as e:
            self.running = False
            d.errback(e)
            return
        self.running = False
        d.callback(result)

    def run_all(self, limit: int = 10000) -> None:
        """Run queued calls (including ones they queue) until none is left."""
        for _ in range(limit):
            if not self.queue:
                return
            self.run_one()
        raise AssertionError("worker calls never stopped")


@implementer(IConsumer)
class FakeConsumer:
    """Records what a producer does to it; pauses the producer when its buffer passes ``high_water``."""

    def __init__(self, high_water: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.producer: IProducer | None = None
        self.streaming: bool | None = None
        self.unregistered = 0
        self.high_water = high_water

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        assert self.producer is None
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.high_water is not None and len(self.chunks) >= self.high_water and self.producer is not None:
            assert IPushProducer.providedBy(self.producer)
            self.producer.pauseProducing()


class Source:
    """A blocking chunk source that counts next() calls and notices closing."""

    def __init__(self, chunks: list[bytes], error_at: int | None = None) -> None:
        self.chunks = chunks
        self.error_at = error_at
        self.nexts = 0
        self.closed = False
        self.thread_ids: set[int] = set()
        self._gen = self._generate()

    def _generate(self) -> Generator[bytes, None, None]:
        try:
            for i, chunk in enumerate(self.chunks):
                if i == self.error_at:
                    raise OSError("disk on fire")
                yield chunk
        finally:
            self.closed = True

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self.nexts += 1
        return next(self._gen)

    def close(self) -> None:
        self.closed = True
        self._gen.close()


def _result(d: Deferred[_T]) -> list[_T | Failure]:
    out: list[_T | Failure] = []
    d.addBoth(out.append)
    return out


class ThreadedProducerTests(SynchronousTestCase):
    """ThreadedProducer streams a blocking source with backpressure and cleans up on every exit."""

    def test_provides_push_producer(self) -> None:
        """The producer provides IPushProducer and registers as a streaming producer."""
        consumer = FakeConsumer()
        producer = ThreadedProducer(Source([]), consumer, ManualThreads())
        verifyObject(IPushProducer, producer)
        producer.start()
        self.assertIs(consumer.producer, producer)
        self.assertTrue(consumer.streaming)

    def test_bad_bounds(self) -> None:
        """``ahead`` and ``batch`` must be positive."""
        self.assertRaises(ValueError, ThreadedProducer, Source([]), FakeConsumer(), ManualThreads(), ahead=0)
        self.assertRaises(ValueError, ThreadedProducer, Source([]), FakeConsumer(), ManualThreads(), batch=0)

    def test_streams_everything(self) -> None:
        """Every chunk is written in order, then the producer unregisters and fires with the byte count."""
        source = Source([b"ab", b"", b"cde", b"f"])
        consumer = FakeConsumer()
        threads = ManualThreads()
        result = _result(ThreadedProducer(source, consumer, threads).start())
        threads.run_all()
        self.assertEqual(consumer.chunks, [b"ab", b"cde", b"f"])
        self.assertEqual(result, [6])
        self.assertEqual(consumer.unregistered, 1)
        self.assertIsNone(consumer.producer)
        self.assertTrue(source.closed)

    def test_one_worker_call_runs_ahead(self) -> None:
        """A consumer that keeps up gets every chunk of one worker call as it is made, without round trips."""
        source = Source([b"x" * 10] * 8)
        consumer = FakeConsumer()
        threads = ManualThreads()
        producer = ThreadedProducer(source, consumer, threads, ahead=20, batch=1000)
        result = _result(producer.start())
        self.assertEqual(len(threads.queue), 1)
        threads.run_one()
        self.assertEqual(len(consumer.chunks), 8)
        self.assertEqual(producer.pulls, 1)
        threads.run_all()  # closing the source
        self.assertEqual(result, [80])

    def test_batch_gives_the_thread_back(self) -> None:
        """A worker call stops after ``batch`` bytes and the next one is queued behind other work."""
        source = Source([b"y" * 10] * 9)
        consumer = FakeConsumer()
        threads = ManualThreads()
        producer = ThreadedProducer(source, consumer, threads, ahead=1000, batch=25)
        producer.start()
        for calls in (1, 2, 3):
            self.assertEqual(len(threads.queue), 1)
            threads.run_one()
            self.assertEqual(len(consumer.chunks), 3 * calls)
        self.assertEqual(producer.pulls, 4)  # the fourth finds the end
        threads.run_all()
        self.assertEqual(producer.written, 90)

    def test_ahead_bounds_memory(self) -> None:
        """A consumer paused at every write gets at most ``ahead`` bytes (plus one chunk) made ahead, whatever the source size."""
        source = Source([b"z" * 10] * 1000)
        threads = ManualThreads()
        consumer = FakeConsumer(high_water=0)
        producer = ThreadedProducer(source, consumer, threads, ahead=30, batch=1000)
        producer.start()
        for written in range(1, 200):
            threads.run_all()
            self.assertEqual(len(consumer.chunks), written)
            # One chunk in the transport, at most three waiting.
            self.assertLessEqual(source.nexts - written, 3)
            self.assertEqual(threads.queue, [])
            producer.resumeProducing()
        self.assertLess(source.nexts, 210)

    def test_paused_worker_fills_up_to_ahead(self) -> None:
        """While paused the worker keeps making chunks until ``ahead`` bytes wait; resuming writes them in order."""
        source = Source([b"%d" % i for i in range(10)])
        threads = ManualThreads()
        consumer = FakeConsumer()
        producer = ThreadedProducer(source, consumer, threads, ahead=3, batch=1000)
        result = _result(producer.start())
        producer.pauseProducing()
        threads.run_all()
        self.assertEqual(consumer.chunks, [])
        self.assertEqual(source.nexts, 3)
        producer.resumeProducing()
        threads.run_all()
        self.assertEqual(consumer.chunks, [b"%d" % i for i in range(10)])
        self.assertEqual(result, [10])

    def test_pause_from_write_bounds_memory(self) -> None:
        """A consumer pausing inside write() with a synchronous runner gets at most ``ahead`` bytes more made."""
        source = Source([b"y" * 10] * 1000)
        consumer = FakeConsumer(high_water=2)
        producer = ThreadedProducer(source, consumer, run_synchronously, ahead=20, batch=1000)
        producer.start()
        self.assertEqual(len(consumer.chunks), 2)
        self.assertEqual(source.nexts, 4)
        consumer.chunks.clear()
        producer.resumeProducing()
        self.assertEqual(len(consumer.chunks), 2)
        self.assertLessEqual(source.nexts, 6)

    def test_end_while_paused(self) -> None:
        """A source that ends while the consumer is paused finishes only after resume, with every byte written."""
        threads = ManualThreads()
        consumer = FakeConsumer(high_water=0)
        producer = ThreadedProducer(Source([b"a", b"b"]), consumer, threads)
        result = _result(producer.start())
        threads.run_all()  # "a" written (pausing), "b" made ahead, the end found
        self.assertEqual(consumer.chunks, [b"a"])
        producer.resumeProducing()  # "b" written (pausing again)
        threads.run_all()
        self.assertEqual(result, [])
        self.assertEqual(consumer.chunks, [b"a", b"b"])
        producer.resumeProducing()
        self.assertEqual(result, [2])
        self.assertEqual(consumer.unregistered, 1)

    def test_synchronous_runner_does_not_recurse(self) -> None:
        """A synchronous defer_to_thread streams many chunks and many worker calls in a loop, not a recursion."""
        for batch in (1, 1000):
            source = Source([b"z"] * 20000)
            consumer = FakeConsumer()
            producer = ThreadedProducer(source, consumer, run_synchronously, batch=batch)
            result = _result(producer.start())
            self.assertEqual(result, [20000])

    def test_random_interleavings(self) -> None:
        """Whatever the order of worker calls, pauses and resumes, every byte arrives once, in order, within the bound."""
        for seed in range(200):
            rng = random.Random(seed)
            chunks = [bytes([65 + i % 26]) * rng.randint(1, 7) for i in range(rng.randint(0, 40))]
            source = Source(chunks)
            consumer = FakeConsumer()
            threads = ManualThreads()
            ahead = rng.randint(1, 20)
            producer = ThreadedProducer(source, consumer, threads, ahead=ahead, batch=rng.randint(1, 30))
            result = _result(producer.start())
            for _ in range(1000):
                if result and not threads.queue:
                    break
                step = rng.random()
                if step < 0.5 and threads.queue:
                    threads.run_one()
                elif step < 0.75:
                    producer.pauseProducing()
                else:
                    producer.resumeProducing()
                made = sum(len(c) for c in chunks[: source.nexts])
                self.assertLessEqual(made - producer.written, ahead + 7, f"seed {seed}")
            producer.resumeProducing()
            threads.run_all()
            self.assertEqual(b"".join(consumer.chunks), b"".join(chunks), f"seed {seed}")
            self.assertEqual(result, [sum(map(len, chunks))], f"seed {seed}")
            self.assertTrue(source.closed, f"seed {seed}")

    def test_stop_when_idle_closes_source(self) -> None:
        """stopProducing while paused closes the source in a worker call and fails with ProducerStopped."""
        source = Source([b"a"] * 10)
        threads = ManualThreads()
        consumer = FakeConsumer()
        producer = ThreadedProducer(source, consumer, threads, ahead=3)
        result = _result(producer.start())
        producer.pauseProducing()
        threads.run_one()
        self.assertEqual(source.nexts, 3)
        producer.stopProducing()
        self.assertIsInstance(result[0], Failure)
        assert isinstance(result[0], Failure)
        result[0].trap(ProducerStopped)
        self.assertEqual(consumer.unregistered, 1)
        self.assertFalse(source.closed)  # closing is a worker call
        threads.run_all()
        self.assertTrue(source.closed)
        self.assertEqual(source.nexts, 3)
        self.assertEqual(consumer.chunks, [])

    def test_stop_while_in_flight_closes_after(self) -> None:
        """stopProducing during a worker call closes the source only once that call returned, and writes nothing more."""
        source = Source([b"a"] * 10)
        threads = ManualThreads()
        consumer = FakeConsumer()
        producer = ThreadedProducer(source, consumer, threads)
        result = _result(producer.start())
        producer.stopProducing()
        self.assertEqual(len(threads.queue), 1)  # only the call in flight, no close yet
        threads.run_all()  # ManualThreads asserts no two calls overlap
        self.assertTrue(source.closed)
        self.assertEqual(consumer.chunks, [])
        assert isinstance(result[0], Failure)
        result[0].trap(ProducerStopped)
        producer.stopProducing()  # idempotent
        producer.resumeProducing()
        self.assertEqual(threads.queue, [])

    def test_stop_from_write_ends_the_worker_call(self) -> None:
        """A consumer that stops the producer inside write() gets nothing more, and the worker call ends at once."""
        source = Source([b"a"] * 10)
        threads = ManualThreads()
        consumer = FakeConsumer()
        producer = ThreadedProducer(source, consumer, threads)
        original = consumer.write

        def write(data: bytes) -> None:
            original(data)
            producer.stopProducing()

        consumer.write = write  # type: ignore[method-assign]
        _result(producer.start())
        threads.run_all()
        self.assertEqual(consumer.chunks, [b"a"])
        self.assertEqual(source.nexts, 1)
        self.assertTrue(source.closed)

    def test_source_error(self) -> None:
        """An exception from the source fails the Deferred with it after the chunks made before, unregisters, and closes the source."""
        source = Source([b"a", b"b", b"c"], error_at=1)
        consumer = FakeConsumer()
        threads = ManualThreads()
        result = _result(ThreadedProducer(source, consumer, threads).start())
        threads.run_all()
        self.assertEqual(consumer.chunks, [b"a"])
        assert isinstance(result[0], Failure)
        result[0].trap(OSError)
        self.assertEqual(consumer.unregistered, 1)
        self.assertTrue(source.closed)

    def test_cancel_stops(self) -> None:
        """Cancelling start()'s Deferred stops the producer and closes the source."""
        source = Source([b"a"] * 5)
        consumer = FakeConsumer()
        threads = ManualThreads()
        d = ThreadedProducer(source, consumer, threads).start()
        result = _result(d)
        d.cancel()
        threads.run_all()
        assert isinstance(result[0], Failure)
        result[0].trap(CancelledError)
        self.assertTrue(source.closed)
        self.assertEqual(consumer.chunks, [])
        self.assertEqual(consumer.unregistered, 1)

    def test_stalled_consumer(self) -> None:
        """A consumer paused longer than the stall timeout stops the stream; resuming in time keeps it."""
        clock = Clock()
        source = Source([b"a"] * 5)
        consumer = FakeConsumer()
        threads = ManualThreads()
        producer = ThreadedProducer(source, consumer, threads, clock=clock, stall_timeout=10)
        result = _result(producer.start())
        producer.pauseProducing()
        clock.advance(9)
        producer.resumeProducing()
        self.assertEqual(clock.getDelayedCalls(), [])
        producer.pauseProducing()
        clock.advance(10)
        assert isinstance(result[0], Failure)
        result[0].trap(StalledConsumer)
        threads.run_all()
        self.assertTrue(source.closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_timer_left_after_success(self) -> None:
        """Pausing and finishing leaves no delayed call behind."""
        clock = Clock()
        consumer = FakeConsumer()
        threads = ManualThreads()
        producer = ThreadedProducer(Source([b"a", b"b"]), consumer, threads, clock=clock)
        producer.start()
        producer.pauseProducing()
        threads.run_all()
        producer.resumeProducing()
        threads.run_all()
        self.assertEqual(consumer.chunks, [b"a", b"b"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_budget_lowers_ahead(self) -> None:
        """With a shared budget, a stream runs ahead by its share only while others run, and leaves the budget at its end."""
        budget = AheadBudget(total=40, per_stream=30, floor=10)
        others = 3
        for _ in range(others):
            budget.join()
        source = Source([b"q" * 10] * 100)
        threads = ManualThreads()
        consumer = FakeConsumer()
        producer = ThreadedProducer(source, consumer, threads, ahead=30, budget=budget)
        result = _result(producer.start())
        self.assertEqual((budget.streams, budget.share), (4, 10))
        producer.pauseProducing()
        threads.run_all()
        self.assertEqual(source.nexts, 1)  # one 10-byte chunk: the share
        for _ in range(others):
            budget.leave()
        self.assertEqual(budget.share, 30)
        producer.resumeProducing()
        producer.pauseProducing()
        threads.run_all()
        self.assertEqual(source.nexts, 4)  # now three chunks ahead
        producer.resumeProducing()
        threads.run_all()
        self.assertEqual(result, [1000])
        self.assertEqual((budget.streams, budget.share), (0, 30))

    def test_budget_left_on_every_end(self) -> None:
        """Stopping, failing and cancelling all leave the budget, once."""
        budget = AheadBudget()
        for end in ("stop", "fail", "cancel"):
            threads = ManualThreads()
            source = Source([b"a", b"b"], error_at=1 if end == "fail" else None)
            producer = ThreadedProducer(source, FakeConsumer(), threads, budget=budget)
            d = producer.start()
            d.addErrback(lambda f: None)
            self.assertEqual(budget.streams, 1)
            if end == "stop":
                producer.stopProducing()
                producer.stopProducing()
            elif end == "cancel":
                d.cancel()
            threads.run_all()
            self.assertEqual(budget.streams, 0, end)

    def test_budget_chunk_size(self) -> None:
        """Big chunks for a stream running alone, small ones when others run."""
        budget = AheadBudget()
        sizes = []
        for _ in range(3):
            sizes.append(budget.chunk_size())
            budget.join()
        self.assertEqual(sizes, [BIG_CHUNK, SMALL_CHUNK, SMALL_CHUNK])
        for _ in range(3):
            budget.leave()
        self.assertEqual(budget.chunk_size(), BIG_CHUNK)

    def test_budget_shares(self) -> None:
        """Each stream's share: the per-stream bound while the total allows, an equal share beyond, never below the floor."""
        budget = AheadBudget(total=2048, per_stream=512, floor=64)
        shares = []
        for _ in range(40):
            budget.join()
            shares.append(budget.share)
        self.assertEqual(shares[:4], [512] * 4)
        self.assertEqual(shares[7], 256)
        self.assertEqual(shares[-1], 64)
        for _ in range(50):
            budget.leave()
        self.assertEqual((budget.streams, budget.share), (0, 512))

    def test_real_threads(self) -> None:
        """With a real thread pool and a hand-over queue, the bytes arrive in order on the calling thread."""
        pool = ThreadPool(1, 2, name="producer-test")
        pool.start()
        self.addCleanup(pool.stop)
        handed: queue.Queue[tuple[Callable[..., object], tuple[object, ...]]] = queue.Queue()
        results: queue.Queue[tuple[bool, object]] = queue.Queue()

        def defer_to_thread(f: Callable[[], _T], /) -> Deferred[_T]:
            d: Deferred[_T] = Deferred()

            def run() -> None:
                try:
                    value: object = f()
                except Exception as e:
                    value = e
                handed.put((lambda v: d.errback(v) if isinstance(v, Exception) else d.callback(v), (value,)))

            pool.callInThread(run)
            return d

        def call_from_thread(f: Callable[..., object], /, *args: object) -> None:
            handed.put((f, args))

        data = [os.urandom(1000) for _ in range(300)]
        main = threading.get_ident()
        consumer = FakeConsumer()
        original = consumer.write

        def write(data: bytes) -> None:
            self.assertEqual(threading.get_ident(), main)
            original(data)

        consumer.write = write  # type: ignore[method-assign]
        producer = ThreadedProducer(Source(data), consumer, defer_to_thread, call_from_thread=call_from_thread,
                                    ahead=5000, batch=20000)
        result = _result(producer.start())
        while not result:
            f, args = handed.get(timeout=10)
            f(*args)
        self.assertEqual(result, [300000])
        self.assertEqual(b"".join(consumer.chunks), b"".join(data))


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class TransformerTests(SynchronousTestCase):
    """The source transformers keep content exact and close what they wrap."""

    data = os.urandom(3000) + b"\0" * 300000

    def test_zstd_roundtrip(self) -> None:
        """zstd_chunks output decompresses to the input and has no empty chunk."""
        out = list(zstd_chunks(_chunks(self.data, 65536)))
        self.assertNotIn(b"", out)
        self.assertEqual(zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(out)), self.data)

    def test_gzip_roundtrip(self) -> None:
        """gzip_chunks output is a gzip member of the input."""
        out = b"".join(gzip_chunks(_chunks(self.data, 65536)))
        self.assertEqual(gzip.decompress(out), self.data)

    def test_empty_input(self) -> None:
        """An empty source still makes a valid (empty) zstd frame and gzip member."""
        self.assertEqual(zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(zstd_chunks(iter([])))), b"")
        self.assertEqual(gzip.decompress(b"".join(gzip_chunks(iter([])))), b"")

    def test_slice_every_range(self) -> None:
        """slice_chunks returns exactly data[first:last+1] for every range and chunking."""
        data = bytes(range(23))
        for size in (1, 4, 7, 23, 50):
            for first in range(len(data)):
                for last in range(first, len(data)):
                    got = b"".join(slice_chunks(_chunks(data, size), first, last))
                    self.assertEqual(got, data[first : last + 1], (size, first, last))

    def test_slice_stops_early(self) -> None:
        """slice_chunks closes its source once past the range, without reading further."""
        source = Source([b"abcd"] * 100)
        self.assertEqual(b"".join(slice_chunks(source, 1, 5)), b"bcdab")
        self.assertEqual(source.nexts, 2)
        self.assertTrue(source.closed)

    def test_closing_closes_inner(self) -> None:
        """Closing a transformer part-way closes the wrapped source."""
        for wrap in (zstd_chunks, gzip_chunks, lambda s: exact_length(s, 400), lambda s: slice_chunks(s, 0, 399)):
            source = Source([os.urandom(100) for _ in range(4)] * 1)
            out = wrap(source)
            next(out)
            close_source(out)
            self.assertTrue(source.closed, wrap)

    def test_exact_length(self) -> None:
        """exact_length passes the right size and raises before too many bytes or at a short end."""
        self.assertEqual(b"".join(exact_length(iter([b"ab", b"c"]), 3)), b"abc")
        long_ = exact_length(iter([b"ab", b"cd"]), 3)
        self.assertEqual(next(long_), b"ab")
        self.assertRaises(SizeMismatch, next, long_)
        short = exact_length(iter([b"ab"]), 3)
        self.assertEqual(next(short), b"ab")
        self.assertRaises(SizeMismatch, next, short)

    def test_file_chunks(self) -> None:
        """file_chunks reads plain files and decompresses .bz2 files, in bounded chunks."""
        directory = self.mktemp()
        os.mkdir(directory)
        plain = os.path.join(directory, "log")
        with open(plain, "wb") as f:
            f.write(self.data)
        packed = os.path.join(directory, "log.bz2")
        with open(packed, "wb") as f:
            f.write(bz2.compress(self.data))
        for path in (plain, packed):
            chunks = list(file_chunks(path, chunk_size=4096))
            self.assertEqual(b"".join(chunks), self.data)
            self.assertLessEqual(max(map(len, chunks)), 4096)

    def test_file_chunks_missing(self) -> None:
        """A missing file fails on the first next(), not when the generator is made."""
        gen = file_chunks(os.path.join(self.mktemp(), "absent"))
        self.assertRaises(FileNotFoundError, next, gen)


class ThreadPoolRunnerTests(SynchronousTestCase):
    """thread_pool_runner is a DeferToThread over a real pool (smoke test without a reactor)."""

    def test_runs_in_pool(self) -> None:
        """The callable runs in a pool thread and its result reaches the reactor through callFromThread."""
        from twisted.python.threadpool import ThreadPool

        from peernix.web.streaming import thread_pool_runner

        calls: list[Callable[[], object]] = []

        class FromThreads:
            def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
                calls.append(lambda: f(*args, **kw))

        pool = ThreadPool(1, 1)
        pool.start()
        self.addCleanup(pool.stop)
        done = threading.Event()
        run = thread_pool_runner(FromThreads(), pool)  # type: ignore[arg-type]

        def work() -> int:
            done.set()
            return threading.get_ident()

        result = _result(run(work))
        self.assertTrue(done.wait(10))
        for _ in range(1000):
            if calls:
                break
            threading.Event().wait(0.01)
        calls[0]()
        self.assertEqual(len(result), 1)
        self.assertNotEqual(result[0], threading.get_ident())
