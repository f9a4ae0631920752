"""
Streaming blocking byte sources to HTTP consumers with backpressure.

A *source* is a blocking ``Iterator[bytes]`` (a NAR writer walking the
filesystem, a compressor wrapped around it, a log file reader).  Every
``next()`` on it runs in a worker thread through an injected
:class:`DeferToThread`; :class:`ThreadedProducer` keeps at most one chunk
ahead of the consumer: the next chunk is made while the transport sends the
previous one (also while the consumer is paused), and nothing more is asked
for until that chunk was handed over.  So at most two chunks are in flight
(one in the transport's buffer, one made or being made): memory stays
constant whatever the size of the stream, and the worker thread and the
socket work at the same time instead of taking turns.

The source transformers (:func:`zstd_chunks`, :func:`gzip_chunks`,
:func:`slice_chunks`, :func:`exact_length`) are plain generators, composed
into one source whose every step runs in the same worker-thread call, so
compression never runs on the reactor thread.
"""

from __future__ import annotations

import bz2
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Protocol, TypeVar

import zstandard
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

_T = TypeVar("_T")

#: zstd level for NARs made on the fly: level 1 compresses at several hundred
#: MB/s per core, well above LAN speed, which matters more on a 2-core
#: machine than the few percent that higher levels save.
ZSTD_LEVEL = 1
#: gzip level, for the same reason (gzip is only used when zstd is not
#: accepted).
GZIP_LEVEL = 1
#: Chunk size of file reads (logs).
READ_CHUNK = 256 * 1024

_log = Logger()


class DeferToThread(Protocol):
    """
    Runs a blocking callable off the reactor thread.

    Production passes ``functools.partial(deferToThreadPool, reactor, pool)``
    over a small CPU thread pool (see :func:`thread_pool_runner`); unit tests
    pass a synchronous runner.  The Deferred fires on the reactor thread with
    the result, or fails with the exception the callable raised.
    """

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


def thread_pool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> DeferToThread:
    """
    :returns: a :class:`DeferToThread` running callables on ``pool``; the
        caller starts and stops ``pool``.
    """

    def run(f: Callable[[], _T], /) -> Deferred[_T]:
        return deferToThreadPool(reactor, pool, f)

    return run


class SizeMismatch(Exception):
    """A source produced more or fewer bytes than announced in Content-Length."""


def close_source(source: Iterator[bytes]) -> None:
    """Close ``source`` if it is a generator (or anything with ``close``), releasing files it holds."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


def zstd_chunks(source: Iterator[bytes], level: int = ZSTD_LEVEL) -> Iterator[bytes]:
    """
    :returns: a zstd frame of the bytes of ``source``, streamed (never an
        empty chunk).  Closing it closes ``source``.
    """
    compressor = zstandard.ZstdCompressor(level=level).compressobj()
    try:
        for chunk in source:
            out = compressor.compress(chunk)
            if out:
                yield out
        tail = compressor.flush()
        if tail:
            yield tail
    finally:
        close_source(source)


def gzip_chunks(source: Iterator[bytes], level: int = GZIP_LEVEL) -> Iterator[bytes]:
    """
    :returns: a gzip member (RFC 1952) of the bytes of ``source``, streamed
        (never an empty chunk).  Closing it closes ``source``.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    try:
        for chunk in source:
            out = compressor.compress(chunk)
            if out:
                yield out
        yield compressor.flush()
    finally:
        close_source(source)


def slice_chunks(source: Iterator[bytes], first: int, last: int) -> Iterator[bytes]:
    """
    :returns: bytes ``first..last`` (inclusive) of ``source``.  Chunks before
        ``first`` are dropped as they come (never accumulated) and ``source``
        is closed as soon as ``last`` has been passed.
    """
    position = 0
    try:
        for chunk in source:
            end = position + len(chunk)
            if end > first:
                piece = chunk[max(first - position, 0) : last + 1 - position]
                if piece:
                    yield piece
            position = end
            if position > last:
                return
    finally:
        close_source(source)


def exact_length(source: Iterator[bytes], size: int) -> Iterator[bytes]:
    """
    :returns: the chunks of ``source``, checked to add up to exactly ``size``
        bytes.
    :raises SizeMismatch: (from ``next()``) before yielding a chunk that
        would exceed ``size``, or at the end when fewer bytes came; the
        consumer must then abort rather than finish the response, since its
        Content-Length would be wrong.
    """
    total = 0
    try:
        for chunk in source:
            total += len(chunk)
            if total > size:
                raise SizeMismatch(f"source is longer than the announced {size} bytes")
            if chunk:
                yield chunk
        if total != size:
            raise SizeMismatch(f"source ended after {total} of the announced {size} bytes")
    finally:
        close_source(source)


def file_chunks(path: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """
    :returns: the contents of the file at ``path``, decompressed on the fly
        when its name ends in ``.bz2``.  Blocking; the file is opened on the
        first ``next()`` and closed when the generator ends or is closed.
    """
    stream: IO[bytes]
    if path.endswith(".bz2"):
        stream = bz2.open(path, "rb")
    else:
        stream = open(path, "rb")
    with stream:
        while True:
            chunk = stream.read(chunk_size)
            if not chunk:
                return
            yield chunk


class ProducerStopped(Exception):
    """The consumer went away (``stopProducing``) before the source ended."""


class StalledConsumer(Exception):
    """The consumer stayed paused for longer than the stall timeout."""


@implementer(IPushProducer)
class ThreadedProducer:
    """
    Push the chunks of a blocking source to a consumer, pulling each chunk in
    a worker thread, honouring pause/resume and stop.

    Invariants: at most one ``next()`` on the source is outstanding; a new
    one starts only when the previous chunk was written to the consumer.
    While the consumer is paused one chunk is made ahead and kept (at most
    one), and written on resume; so at most two chunks are in flight.  The
    source is closed exactly once (in a worker thread, never while a
    ``next()`` runs) when it ends, fails, or the producer is stopped.

    Use :meth:`start` once.
    """

    def __init__(
        self,
        source: Iterator[bytes],
        consumer: IConsumer,
        defer_to_thread: DeferToThread,
        *,
        clock: IReactorTime | None = None,
        stall_timeout: float = 300.0,
    ) -> None:
        """
        :param source: the blocking chunk iterator; this producer owns it.
        :param consumer: where chunks go, e.g. a ``twisted.web`` request.
        :param defer_to_thread: runs ``next()`` and ``close()`` off the
            reactor thread.
        :param clock: when given, a consumer paused for ``stall_timeout``
            seconds without resuming stops the producer (a client that
            stopped reading must not pin a worker's source forever).
        :param stall_timeout: see ``clock``.
        """
        self._source = source
        self._consumer = consumer
        self._defer_to_thread = defer_to_thread
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stall_call: IDelayedCall | None = None
        self._paused = False
        self._in_flight = False
        # A chunk made while the consumer was paused, waiting for resume;
        # _ready_end: the source ended (after that chunk, if any).
        self._ready: bytes | None = None
        self._ready_end = False
        self._pulling = False
        self._finished = False
        self._closed = False
        self._done: Deferred[int] = Deferred(self._cancel)
        #: Number of ``next()`` calls made on the source so far.
        self.pulls = 0
        #: Number of bytes written to the consumer so far.
        self.written = 0

    def start(self) -> Deferred[int]:
        """
        Register with the consumer as a streaming producer and start pulling.

        :returns: a Deferred firing with the number of bytes written once the
            source is exhausted (the producer has then unregistered; the
            caller finishes the response).  It fails with the source's
            exception, with :class:`ProducerStopped` after
            ``stopProducing``, or with :class:`StalledConsumer`; the producer
            has then unregistered too, and the caller must abort the
            connection if any byte was written.  Cancelling it stops the
            producer.
        """
        self._consumer.registerProducer(self, True)
        self._pull()
        return self._done

    # IPushProducer

    def pauseProducing(self) -> None:
        """Stop writing until resumed; one chunk is still made ahead and kept for then."""
        self._paused = True
        if self._clock is not None and self._stall_call is None and not self._finished:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        """Write the chunk made ahead, if any, and ask for chunks again."""
        self._paused = False
        self._cancel_stall_timer()
        if self._finished:
            return
        ready, self._ready = self._ready, None
        if ready is not None:
            self.written += len(ready)
            # May pause us again; _pull then makes one chunk ahead.
            self._consumer.write(ready)
        if self._ready_end:
            if not self._paused:
                self._end(None)
            return
        self._pull()

    def stopProducing(self) -> None:
        """The consumer is gone: stop, close the source, fail :meth:`start`'s Deferred."""
        self._end(ProducerStopped())

    # internals

    def _cancel(self, d: Deferred[int]) -> None:
        # Called when our caller cancels start()'s Deferred (the client went
        # away and the request handler was cancelled).
        self._end(CancelledError(), fire=False)

    def _stalled(self) -> None:
        self._stall_call = None
        _log.warn("Consumer paused for {timeout}s; stopping the stream", timeout=self._stall_timeout)
        self._end(StalledConsumer())

    def _cancel_stall_timer(self) -> None:
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _next_chunk(self) -> bytes | None:
        # Runs in a worker thread.
        return next(self._source, None)

    def _pull(self) -> None:
        # A loop rather than recursion: with a synchronous defer_to_thread
        # every chunk arrives before the Deferred is returned, and a
        # multi-GB NAR must not become a multi-thousand-frame stack.
        if self._pulling:
            return
        self._pulling = True
        try:
            while not (self._finished or self._in_flight or self._ready is not None or self._ready_end):
                self._in_flight = True
                self.pulls += 1
                d = self._defer_to_thread(self._next_chunk)
                d.addCallbacks(self._arrived, self._failed)
        finally:
            self._pulling = False

    def _arrived(self, chunk: bytes | None) -> None:
        self._in_flight = False
        if self._finished:
            # Stopped while this chunk was being made: nobody wants it, and
            # the source can be closed now that no next() is running.
            self._close_source()
            return
        if self._paused:
            # Made ahead: kept until resumeProducing (no further pull).
            if chunk is None:
                self._ready_end = True
            elif chunk:
                self._ready = chunk
            return
        if chunk is None:
            self._end(None)
            return
        if chunk:
            self.written += len(chunk)
            # write() may call pauseProducing() synchronously (the
            # transport's buffer is full); _pull() then does nothing.
            self._consumer.write(chunk)
        self._pull()

    def _failed(self, failure: Failure) -> None:
        self._in_flight = False
        if self._finished:
            self._close_source()
            return
        self._end(failure)

    def _end(self, result: Failure | BaseException | None, fire: bool = True) -> None:
        if self._finished:
            return
        self._finished = True
        self._ready = None
        self._cancel_stall_timer()
        self._consumer.unregisterProducer()
        if not self._in_flight:
            self._close_source()
        if not fire:
            return
        if result is None:
            self._done.callback(self.written)
        else:
            self._done.errback(result)

    def _close_source(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            close_source(self._source)

        d = self._defer_to_thread(close)
        d.addErrback(lambda f: _log.failure("Closing a stream source failed", failure=f))
