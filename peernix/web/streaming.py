"""
Streaming blocking byte sources to HTTP consumers with backpressure.

A *source* is a blocking ``Iterator[bytes]`` (a NAR writer walking the
filesystem, a compressor wrapped around it, a log file reader).  Its
``next()`` calls run in a worker thread through an injected
:class:`DeferToThread`.  :class:`ThreadedProducer` lets the worker run ahead
of the consumer by a bounded number of bytes: each chunk is handed to the
reactor thread as soon as it is made, so the worker makes the next chunks
while the transport sends earlier ones (also while the consumer is paused),
and a worker call gives its thread back when that bound is reached or after
a bounded batch.  Memory stays constant whatever the size of the stream.

The source transformers (:func:`zstd_chunks`, :func:`gzip_chunks`,
:func:`slice_chunks`, :func:`exact_length`) are plain generators, composed
into one source whose every step runs in the same worker-thread call, so
compression never runs on the reactor thread.
"""

from __future__ import annotations

import bz2
import errno
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sized
from typing import IO, Protocol, TypeVar

import zstandard
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IDelayedCall, IPushProducer, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Request
from zope.interface import implementer

from peernix.nix.nar import FileContents

_T = TypeVar("_T")
_Sized = TypeVar("_Sized", bound=Sized)

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


def close_source(source: Iterator[object]) -> None:
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


def exact_length(source: Iterator[_Sized], size: int) -> Iterator[_Sized]:
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


#: What a stream source yields: bytes, or a file's contents for the kernel
#: to copy (see :class:`SocketSink`).
Piece = bytes | FileContents

#: The most bytes :class:`ThreadedProducer` sends with ``sendfile`` in one
#: reactor turn before it lets other connections have theirs.
SENDFILE_TURN_BYTES = 4 * 1024 * 1024


class SocketSink:
    """
    The socket under a ``twisted.web`` request, for ``os.sendfile``: the
    kernel copies a file's bytes to it, so Python never reads them.

    Twisted buffers what is written to a transport and sends it when the
    socket is writable; bytes sent with ``sendfile`` must not overtake
    that buffer, so :meth:`idle` says when they may be sent (the buffer is
    empty, the response's headers are out and its body is neither chunked
    nor encoded).  Everything runs on the reactor thread, so the socket
    cannot be closed between :meth:`idle` and :meth:`send`.

    Use :meth:`of`, which answers ``None`` where ``sendfile`` cannot be used
    (no ``os.sendfile``, a transport that is not a plain TCP connection,
    e.g. TLS or a test's fake): the stream then takes the ordinary path.
    """

    def __init__(self, request: object, transport: object) -> None:
        self._request = request
        self._transport = transport

    @classmethod
    def of(cls, request: object) -> SocketSink | None:
        """:returns: the sink of ``request``'s connection, or ``None`` where ``sendfile`` cannot be used."""
        if not hasattr(os, "sendfile"):
            return None
        from twisted.internet import tcp

        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
        if not isinstance(transport, tcp.Connection):
            return None
        if not all(hasattr(transport, a) for a in ("dataBuffer", "offset", "_tempDataLen", "bufferSize")):
            return None
        return cls(request, transport)

    @property
    def buffer_size(self) -> int:
        """The transport's buffer size: writing more than this pauses its producer."""
        size: int = getattr(self._transport, "bufferSize")
        return size

    def idle(self) -> bool:
        """:returns: whether bytes may be sent on the socket now (nothing buffered before them)."""
        t = self._transport
        r = self._request
        return bool(
            getattr(t, "connected", False)
            and not getattr(t, "disconnecting", True)
            and getattr(r, "startedWriting", False)
            and not getattr(r, "chunked", True)
            and not getattr(r, "finished", True)
            and len(getattr(t, "dataBuffer")) - getattr(t, "offset") == 0
            and getattr(t, "_tempDataLen") == 0
        )

    def send(self, fd: int, offset: int, count: int) -> int | None:
        """
        Copy up to ``count`` bytes of ``fd`` from ``offset`` to the socket
        (non-blocking).

        :returns: the bytes sent, ``0`` at the end of the file, ``None``
            when the socket cannot take any now.
        :raises OSError: when the connection or the file fails.
        """
        sock: int = getattr(self._transport, "fileno")()
        try:
            sent = os.sendfile(sock, fd, offset, count)
        except BlockingIOError:
            return None
        except InterruptedError:
            return None
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise
        self._count(sent)
        return sent

    def send_bytes(self, data: bytes) -> int:
        """
        Send ``data`` on the socket now, as much as it takes (non-blocking;
        only while :meth:`idle`): the transport's buffer is skipped, as
        it would only hold the bytes until the next reactor turn.

        :returns: how many bytes were sent (0 when the socket takes none);
            the caller writes the rest through the transport.
        :raises OSError: when the connection failed.
        """
        try:
            sent: int = getattr(self._transport, "socket").send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        self._count(sent)
        return sent

    def _count(self, sent: int) -> None:
        # The request's byte count (its log line) sees these bytes too.
        r = self._request
        if hasattr(r, "sentLength"):
            setattr(r, "sentLength", getattr(r, "sentLength") + sent)


class ProducerStopped(Exception):
    """The consumer went away (``stopProducing``) before the source ended."""


class StalledConsumer(Exception):
    """The consumer stayed paused for longer than the stall timeout."""


#: How many bytes a stream may have made ahead of its consumer (handed to
#: the reactor thread but not yet written to the transport): two big chunks,
#: so the worker keeps making chunks while the transport sends earlier ones;
#: :class:`AheadBudget` lowers it when many streams run at once.
AHEAD_BYTES = 1024 * 1024
#: Chunk sizes of NAR streams: big for a stream running alone (half the
#: hand-overs and reactor turns per byte), small when several share the
#: budget.
BIG_CHUNK = 512 * 1024
SMALL_CHUNK = 256 * 1024
#: How many bytes one worker call makes at most before giving its thread
#: back, so streams sharing the small CPU pool take turns.
BATCH_BYTES = 4 * 1024 * 1024


#: How many bytes all streams together may have made ahead of their
#: consumers (see :class:`AheadBudget`).
TOTAL_AHEAD_BYTES = 2 * 1024 * 1024


class AheadBudget:
    """
    Shares :data:`TOTAL_AHEAD_BYTES` among the streams running at once:
    each may run up to ``per_stream`` bytes ahead while there is room, and
    an equal share (but at least ``floor``) when more streams run, so the
    read-ahead of all streams together stays bounded however many clients
    download at once.

    :meth:`join` and :meth:`leave` run on the reactor thread; :attr:`share`
    is read by worker threads (a plain int, replaced whole).
    """

    def __init__(self, total: int = TOTAL_AHEAD_BYTES, per_stream: int = AHEAD_BYTES, floor: int = 64 * 1024) -> None:
        self._total = total
        self._per_stream = per_stream
        self._floor = floor
        self._streams = 0
        #: The bytes each stream may run ahead now.
        self.share = per_stream

    @property
    def streams(self) -> int:
        """The streams that joined and have not left."""
        return self._streams

    def chunk_size(self) -> int:
        """
        :returns: the chunk size for a stream about to start:
            :data:`BIG_CHUNK` when no other stream runs (throughput),
            else :data:`SMALL_CHUNK` (memory).
        """
        return BIG_CHUNK if self._streams == 0 else SMALL_CHUNK

    def join(self) -> None:
        """A stream starts."""
        self._streams += 1
        self._update()

    def leave(self) -> None:
        """A stream ended."""
        self._streams = max(0, self._streams - 1)
        self._update()

    def _update(self) -> None:
        equal = self._total // max(1, self._streams)
        self.share = max(self._floor, min(self._per_stream, equal))


def call_directly(f: Callable[..., object], /, *args: object) -> None:
    """A ``call_from_thread`` for synchronous runners (tests): calls ``f(*args)`` at once."""
    f(*args)


@implementer(IPushProducer)
class ThreadedProducer:
    """
    Push the chunks of a blocking source to a consumer, making them in a
    worker thread, honouring pause/resume and stop.

    A worker call pulls chunks from the source one after the other and hands
    each to the reactor thread as soon as it is made (``call_from_thread``),
    without waiting for it to be written: the worker and the transport work
    at the same time, and a chunk costs one hand-over rather than a round
    trip.  A worker call ends when the bytes made but not yet written reach
    ``ahead`` (the consumer is paused or slow), after ``batch`` bytes (so
    streams sharing a small pool take turns), or at the end of the source;
    the next one starts when the consumer has taken enough.

    Invariants: at most one worker call on the source runs at a time; at
    most ``ahead`` bytes (or the stream's share of a shared
    :class:`AheadBudget`, if lower) plus one chunk wait for the consumer,
    whatever the size of the stream; the source is closed exactly once (in a worker
    thread, never while a worker call uses it) when it ends, fails, or the
    producer is stopped.

    Use :meth:`start` once.
    """

    def __init__(
        self,
        source: Iterator[Piece],
        consumer: IConsumer,
        defer_to_thread: DeferToThread,
        *,
        call_from_thread: Callable[..., object] = call_directly,
        clock: IReactorTime | None = None,
        stall_timeout: float = 300.0,
        ahead: int = AHEAD_BYTES,
        batch: int = BATCH_BYTES,
        budget: AheadBudget | None = None,
        sink: SocketSink | None = None,
    ) -> None:
        """
        :param source: the blocking chunk iterator; this producer owns it,
            and every :class:`~peernix.nix.nar.FileContents` it yields
            (closed once sent, or when the stream ends).
        :param consumer: where chunks go, e.g. a ``twisted.web`` request.
        :param defer_to_thread: runs the worker calls (chunks and
            ``close()``) off the reactor thread.
        :param call_from_thread: how a worker call hands a chunk to the
            reactor thread: ``reactor.callFromThread`` in production; the
            default calls at once, which is only right when
            ``defer_to_thread`` runs on the calling thread (tests).
        :param clock: when given, a consumer paused for ``stall_timeout``
            seconds without resuming stops the producer (a client that
            stopped reading must not pin a worker's source forever).
        :param stall_timeout: see ``clock``.
        :param ahead: bytes made ahead of the consumer at most (plus one
            chunk).
        :param batch: bytes one worker call makes at most.
        :param budget: shared with the other streams; while this stream
            runs, its share lowers ``ahead`` when many streams run at once.
        :param sink: the consumer's socket, where a file's contents are
            copied with ``sendfile`` whenever the transport has nothing
            buffered; without it (or while the transport has bytes
            buffered) they are read with ``pread`` and written as bytes.
            Bytes chunks, too, go straight to the socket while the
            transport has nothing buffered.  A
            :class:`~peernix.nix.nar.FileContents` counts as its size (at
            most the whole budget) against the read-ahead.
        """
        if ahead <= 0 or batch <= 0:
            raise ValueError("ahead and batch must be positive")
        self._source = source
        self._consumer = consumer
        self._defer_to_thread = defer_to_thread
        self._call_from_thread = call_from_thread
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._ahead = ahead
        self._batch = batch
        self._budget = budget
        self._sink = sink
        # The file whose contents are being sent, and the bytes sent with
        # sendfile since the reactor last had a turn.
        self._current: FileContents | None = None
        self._turn = 0
        self._joined = False
        self._stall_call: IDelayedCall | None = None
        self._paused = False
        self._in_flight = False
        # Chunks handed over while the consumer was paused, oldest first.
        self._waiting: deque[Piece] = deque()
        # Bytes handed over by the worker and not yet written to the
        # consumer (in _waiting or in the reactor's queue); the worker reads
        # it, so it changes under the lock.
        self._outstanding = 0
        self._lock = threading.Lock()
        # The source ended; written once _waiting is empty.
        self._source_done = False
        self._pulling = False
        self._finished = False
        self._closed = False
        self._done: Deferred[int] = Deferred(self._cancel)
        #: Number of worker calls made on the source so far.
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
        if self._budget is not None:
            self._budget.join()
            self._joined = True
        self._pull()
        return self._done

    # IPushProducer

    def pauseProducing(self) -> None:
        """Stop writing until resumed; the worker goes on until ``ahead`` bytes wait."""
        self._paused = True
        if self._clock is not None and self._stall_call is None and not self._finished:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        """Write the chunks made ahead, and make more."""
        self._paused = False
        self._cancel_stall_timer()
        if self._finished:
            return
        self._flush()
        if self._finished:
            return
        if self._source_done:
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

    def _limit(self) -> int:
        # The bytes this stream may have made ahead now.
        budget = self._budget
        return self._ahead if budget is None else min(self._ahead, budget.share)

    def _make_chunks(self) -> bool:
        # Runs in a worker thread.  Returns whether the source ended.
        made = 0
        while not self._finished and self._outstanding < self._limit() and made < self._batch:
            chunk = next(self._source, None)
            if chunk is None:
                return True
            if chunk:
                if isinstance(chunk, FileContents):
                    # Costs no memory, but holds a descriptor: it counts as
                    # its size up to the whole budget, so a stream holds a
                    # few small files open ahead at most, and the worker
                    # waits for a big one to be sent.
                    chunk.weight = weight = max(min(len(chunk), self._limit()), 1)
                else:
                    weight = len(chunk)
                made += weight
                with self._lock:
                    self._outstanding += weight
                self._call_from_thread(self._arrived, chunk)
        return False

    def _pull(self) -> None:
        # A loop rather than recursion: with a synchronous defer_to_thread
        # every worker call ends before its Deferred is returned, and a
        # multi-GB NAR must not become a multi-thousand-frame stack.
        if self._pulling:
            return
        self._pulling = True
        try:
            while not (self._finished or self._in_flight or self._source_done or self._outstanding >= self._limit()):
                self._in_flight = True
                self.pulls += 1
                d = self._defer_to_thread(self._make_chunks)
                d.addCallbacks(self._call_ended, self._failed)
        finally:
            self._pulling = False

    def _taken(self, chunk: Piece) -> None:
        weight = chunk.weight if isinstance(chunk, FileContents) else len(chunk)
        with self._lock:
            self._outstanding -= weight

    def _arrived(self, chunk: Piece) -> None:
        # On the reactor thread, in the order the worker made the chunks.
        if self._finished:
            self._taken(chunk)
            if isinstance(chunk, FileContents):
                chunk.close()
            return
        if self._paused or self._waiting or self._current is not None:
            self._waiting.append(chunk)
            return
        self._write(chunk)

    def _write(self, chunk: Piece) -> None:
        if isinstance(chunk, FileContents):
            self._current = chunk
            self._flush()
            return
        self._taken(chunk)
        self.written += len(chunk)
        sink = self._sink
        if sink is not None and sink.idle():
            # Straight to the socket while nothing is buffered before it:
            # the file contents after these bytes can then go by sendfile
            # at once rather than after the next reactor turn.
            try:
                sent = sink.send_bytes(chunk)
            except ConnectionError:
                self._end(ProducerStopped())
                return
            except OSError as e:
                self._end(e)
                return
            if sent == len(chunk):
                return
            chunk = chunk[sent:]
        # write() may call pauseProducing() synchronously (the transport's
        # buffer is full).
        self._consumer.write(chunk)

    def _send_current(self) -> None:
        """
        Send the current file's contents until they are out, the consumer
        pauses, or the stream ends: with ``sendfile`` while the transport
        has nothing buffered, else (and after each turn of
        :data:`SENDFILE_TURN_BYTES`) one piece read with ``pread`` and
        written through the transport, behind what it holds; that piece is
        bigger than the transport's buffer, so the transport pauses us and
        resumes us when it has sent everything (the socket took it), and
        other connections get their turn meanwhile.
        """
        current = self._current
        assert current is not None
        sink = self._sink
        piece_size = sink.buffer_size + 1 if sink is not None else SMALL_CHUNK
        while not self._paused and not self._finished:
            if not current.remaining:
                self._current = None
                self._taken(current)
                try:
                    size_now = current.size_now()
                finally:
                    current.close()
                if size_now != current.size:
                    self._end(SizeMismatch(f"{current.where!r} changed size while being sent "
                                           f"({current.size} -> {size_now} bytes)"))
                return
            if sink is not None and self._turn < SENDFILE_TURN_BYTES and sink.idle():
                try:
                    sent = sink.send(current.fd, current.offset,
                                     min(current.remaining, SENDFILE_TURN_BYTES - self._turn))
                except ConnectionError:
                    # The client went away (EPIPE, ECONNRESET): as when the
                    # transport stops us.
                    self._end(ProducerStopped())
                    return
                except OSError as e:
                    self._end(e)
                    return
                if sent == 0:
                    self._end(SizeMismatch(f"{current.where!r} shrank while being sent"))
                    return
                if sent is not None:
                    current.offset += sent
                    self._turn += sent
                    self.written += sent
                    continue
            try:
                data = os.pread(current.fd, min(current.remaining, piece_size), current.offset)
            except OSError as e:
                self._end(e)
                return
            if not data:
                self._end(SizeMismatch(f"{current.where!r} shrank while being sent"))
                return
            current.offset += len(data)
            self._turn = 0
            self.written += len(data)
            self._consumer.write(data)

    def _flush(self) -> None:
        waiting = self._waiting
        while not self._paused and not self._finished:
            if self._current is not None:
                self._send_current()
                if self._current is None and not self._finished:
                    # The worker waited for that file to be sent.
                    self._pull()
                continue
            if not waiting:
                return
            piece = waiting.popleft()
            if isinstance(piece, FileContents):
                self._current = piece
                continue
            self._write(piece)

    def _call_ended(self, source_ended: bool) -> None:
        # Fires after every chunk of that call has arrived (call_from_thread
        # and the Deferred's result keep the worker's order).
        self._in_flight = False
        if self._finished:
            # Stopped while the call ran: the source can be closed now that
            # nothing uses it.
            self._close_source()
            return
        if source_ended:
            self._source_done = True
            if not self._paused and not self._waiting and self._current is None:
                self._end(None)
            return
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
        if self._joined:
            self._joined = False
            assert self._budget is not None
            self._budget.leave()
        while self._waiting:
            piece = self._waiting.popleft()
            self._taken(piece)
            if isinstance(piece, FileContents):
                piece.close()
        if self._current is not None:
            self._taken(self._current)
            self._current.close()
            self._current = None
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


@implementer(IConsumer)
class RequestConsumer:
    """
    A request as an ``IConsumer`` that tolerates unregistering after the
    connection was lost: ``twisted.web`` drops a request's channel on
    ``connectionLost`` and its ``unregisterProducer`` would then raise.
    """

    def __init__(self, request: Request) -> None:
        self._request = request

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._request.registerProducer(producer, streaming)  # type: ignore[no-untyped-call]

    def unregisterProducer(self) -> None:
        if self._request.channel is not None:
            self._request.unregisterProducer()  # type: ignore[no-untyped-call]

    def write(self, data: bytes) -> None:
        self._request.write(data)  # type: ignore[no-untyped-call]
