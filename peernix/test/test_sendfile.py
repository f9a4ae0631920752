"""
Tests for NAR streams whose file contents go to the socket by ``sendfile``:
:func:`peernix.nix.nar.nar_pieces`, :class:`peernix.web.streaming.SocketSink`
and :class:`~peernix.web.streaming.ThreadedProducer` with a sink.

The stream tests use a real ``twisted.web`` server on 127.0.0.1 and a
plain blocking client socket (in a thread), since what they check is the
interplay of the kernel's socket, Twisted's write buffer and ``sendfile``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.nix.nar import FileContents, nar_chunks, nar_pieces
from peernix.test.fakes import run_synchronously
from peernix.web.streaming import Piece, ProducerStopped, SizeMismatch, SocketSink, ThreadedProducer, exact_length

reactor: Any = _reactor


def _tree(root: str) -> str:
    """Make a tree with big and small files (the big ones first in NAR order). :returns: its path."""
    path = os.path.join(root, "tree")
    os.makedirs(os.path.join(path, "sub"))
    rng = os.urandom
    with open(os.path.join(path, "a-big"), "wb") as f:
        f.write(rng(3 * 1024 * 1024 + 5))
    with open(os.path.join(path, "b-small"), "wb") as f:
        f.write(b"small file\n")
    with open(os.path.join(path, "c-medium"), "wb") as f:
        f.write(rng(100 * 1024 + 3))
    os.chmod(os.path.join(path, "c-medium"), 0o755)
    with open(os.path.join(path, "sub", "d-big"), "wb") as f:
        f.write(rng(2 * 1024 * 1024))
    os.symlink("a-big", os.path.join(path, "e-link"))
    with open(os.path.join(path, "z-empty"), "wb"):
        pass
    return path


def _joined(pieces: Iterator[Piece]) -> bytes:
    """:returns: the bytes of ``pieces``, reading each :class:`FileContents` (and closing it)."""
    out = []
    for piece in pieces:
        if isinstance(piece, FileContents):
            out.append(os.pread(piece.fd, piece.size, 0))
            piece.close()
        else:
            out.append(piece)
    return b"".join(out)


class NarPiecesTests(SynchronousTestCase):
    """:func:`nar_pieces` is :func:`nar_chunks` with big files' contents left as descriptors."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.tree = _tree(self.dir)

    def test_same_nar(self) -> None:
        """The framing and the files' contents make exactly the NAR."""
        pieces = list(nar_pieces(self.tree, 64 * 1024, file_min=64 * 1024))
        contents = [p for p in pieces if isinstance(p, FileContents)]
        self.assertEqual([c.size for c in contents], [3 * 1024 * 1024 + 5, 100 * 1024 + 3, 2 * 1024 * 1024])
        self.assertEqual(_joined(iter(pieces)), b"".join(nar_chunks(self.tree)))
        self.assertEqual(sum(len(p) for p in pieces), len(b"".join(nar_chunks(self.tree))))

    def test_small_files_inline(self) -> None:
        """Files under ``file_min`` are read into the chunks."""
        pieces = list(nar_pieces(self.tree, file_min=4 * 1024 * 1024))
        self.assertFalse([p for p in pieces if isinstance(p, FileContents)])
        self.assertEqual(b"".join(p for p in pieces if isinstance(p, bytes)), b"".join(nar_chunks(self.tree)))

    def test_receiver_owns_descriptor(self) -> None:
        """Closing the generator right after a FileContents leaves its descriptor open for the receiver."""
        gen = nar_pieces(self.tree, file_min=64 * 1024)
        first = next(gen)
        self.assertIsInstance(first, bytes)
        contents = next(gen)
        assert isinstance(contents, FileContents)
        gen.close()
        self.assertEqual(len(os.pread(contents.fd, 10, 0)), 10)
        contents.close()
        contents.close()  # idempotent
        self.assertEqual(contents.fd, -1)

    def test_bad_file_min(self) -> None:
        """``file_min`` must be positive."""
        self.assertRaises(ValueError, nar_pieces, self.tree, file_min=0)


@implementer(IConsumer)
class _Consumer:
    """An in-memory consumer that never pauses."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: object = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)


class FallbackTests(SynchronousTestCase):
    """Without a socket sink, file contents are read and written as bytes."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.tree = _tree(self.dir)

    def test_no_sink_for_fakes(self) -> None:
        """A request without a real TCP transport has no sink."""
        self.assertIsNone(SocketSink.of(DummyRequest([b"x"])))
        self.assertIsNone(SocketSink.of(object()))

    def test_pread_path(self) -> None:
        """The producer without a sink writes the whole NAR, and closes every file."""
        expected = b"".join(nar_chunks(self.tree))
        seen: list[FileContents] = []

        def source() -> Iterator[Piece]:
            for p in nar_pieces(self.tree, file_min=64 * 1024):
                if isinstance(p, FileContents):
                    seen.append(p)
                yield p

        consumer = _Consumer()
        verifyObject(IConsumer, consumer)
        producer = ThreadedProducer(exact_length(source(), len(expected)), consumer, run_synchronously)
        written = self.successResultOf(producer.start())
        self.assertEqual(written, len(expected))
        self.assertEqual(b"".join(consumer.data), expected)
        self.assertEqual(len(seen), 3)
        self.assertEqual([c.fd for c in seen], [-1, -1, -1])

    def test_pread_path_shrunk(self) -> None:
        """A file that shrank after its framing was made fails the stream (and its file is closed)."""
        big = os.path.join(self.tree, "a-big")
        size = len(b"".join(nar_chunks(self.tree)))
        seen: list[FileContents] = []

        def source() -> Iterator[Piece]:
            for p in nar_pieces(self.tree, file_min=64 * 1024):
                if isinstance(p, FileContents):
                    seen.append(p)
                    os.truncate(big, 1000)
                yield p

        producer = ThreadedProducer(exact_length(source(), size), _Consumer(), run_synchronously)
        self.failureResultOf(producer.start(), SizeMismatch)
        self.assertEqual(seen[0].fd, -1)


def _leave_early(port: int) -> int:
    """GET /nar, read a little, then reset the connection (blocking). :returns: the bytes read."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /nar HTTP/1.1\r\nHost: test\r\n\r\n")
    got = s.recv(4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    return len(got)


def _fetch(port: int, rcvbuf: int | None = None, delay: float = 0.0) -> tuple[bytes, bytes, bool]:
    """
    GET /nar with a plain socket (blocking; run it in a thread).

    :returns: ``(headers, body, reset)``: the body as far as it came, and
        whether the connection was reset.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(60)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /nar HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        if delay:
            time.sleep(delay)
        data = []
        reset = False
        while True:
            try:
                got = s.recv(16384 if rcvbuf is not None else 1 << 20)
            except ConnectionResetError:
                reset = True
                break
            if not got:
                break
            data.append(got)
            if rcvbuf is not None and len(data) % 16 == 0:
                time.sleep(0.001)
        raw = b"".join(data)
        head, _, body = raw.partition(b"\r\n\r\n")
        return head, body, reset
    finally:
        s.close()


class _NarResource(Resource):
    """Serves ``make_source()`` (of ``size`` bytes) at /nar with a ThreadedProducer and a socket sink."""

    isLeaf = True

    def __init__(self, make_source: Callable[[], Iterator[Piece]], size: int, use_sink: bool = True) -> None:
        super().__init__()
        self.make_source = make_source
        self.size = size
        self.use_sink = use_sink
        self.sends = 0
        self.sinks: list[SocketSink | None] = []
        #: Fires with the bytes written, or with ``(failure,)`` when the stream failed.
        self.outcome: Deferred[int | tuple[Failure]] = Deferred()

    def render_GET(self, request: Request) -> int:  # noqa: N802
        request.setHeader(b"Content-Length", b"%d" % self.size)
        sink = SocketSink.of(request) if self.use_sink else None
        self.sinks.append(sink)
        if sink is not None:
            send = sink.send

            def counted(fd: int, offset: int, count: int) -> int | None:
                self.sends += 1
                return send(fd, offset, count)

            sink.send = counted  # type: ignore[method-assign]
        producer = ThreadedProducer(
            self.make_source(), request, deferToThread, call_from_thread=reactor.callFromThread, sink=sink,
            ahead=256 * 1024,
        )

        def done(written: int) -> None:
            request.finish()  # type: ignore[no-untyped-call]
            self.outcome.callback(written)

        def failed(f: Failure) -> None:
            if request.channel is not None:
                transport: Any = request.channel.transport
                transport.abortConnection()
            self.outcome.callback((f,))

        producer.start().addCallbacks(done, failed)
        return NOT_DONE_YET


class SendfileStreamTests(TestCase):
    """Real streams on loopback: framing by Python, file contents by the kernel."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.tree = _tree(self.dir)
        self.expected = b"".join(nar_chunks(self.tree))

    def serve(self, resource: _NarResource) -> int:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def source(self, change: Callable[[], None] | None = None) -> Callable[[], Iterator[Piece]]:
        """:returns: a maker of the tree's NAR pieces; ``change`` runs right after the first file's framing."""

        def make() -> Iterator[Piece]:
            changed = False
            for p in nar_pieces(self.tree, 64 * 1024, file_min=64 * 1024):
                if isinstance(p, FileContents) and change is not None and not changed:
                    changed = True
                    change()
                yield p

        return make

    async def test_whole_nar(self) -> None:
        """The client gets exactly the NAR, and most of the files' bytes went by sendfile."""
        resource = _NarResource(lambda: exact_length(self.source()(), len(self.expected)), len(self.expected))
        port = self.serve(resource)
        head, body, reset = await deferToThread(_fetch, port)
        self.assertFalse(reset)
        self.assertIn(b"200", head.split(b"\r\n")[0])
        self.assertEqual(len(body), len(self.expected))
        self.assertEqual(body, self.expected)
        self.assertEqual(await resource.outcome, len(self.expected))
        self.assertIsNotNone(resource.sinks[0])
        self.assertGreater(resource.sends, 0)

    async def test_slow_reader(self) -> None:
        """A reader slower than the disk (small window, late start): backpressure, same bytes."""
        resource = _NarResource(lambda: exact_length(self.source()(), len(self.expected)), len(self.expected))
        port = self.serve(resource)
        head, body, reset = await deferToThread(_fetch, port, 8192, 0.3)
        self.assertFalse(reset)
        self.assertEqual(body, self.expected)
        self.assertEqual(await resource.outcome, len(self.expected))

    async def test_without_sink(self) -> None:
        """The same stream without sendfile (as where it is unavailable) gives the same bytes."""
        resource = _NarResource(lambda: exact_length(self.source()(), len(self.expected)), len(self.expected),
                                use_sink=False)
        port = self.serve(resource)
        _, body, _ = await deferToThread(_fetch, port)
        self.assertEqual(body, self.expected)
        self.assertEqual(resource.sends, 0)

    async def _changed(self, change: Callable[[], None]) -> None:
        resource = _NarResource(lambda: exact_length(self.source(change)(), len(self.expected)),
                                len(self.expected))
        port = self.serve(resource)
        _, body, _ = await deferToThread(_fetch, port)
        outcome = await resource.outcome
        assert isinstance(outcome, tuple), outcome
        outcome[0].trap(SizeMismatch)
        # The connection was aborted: the client never gets a whole NAR.
        self.assertLess(len(body), len(self.expected))

    async def test_file_shrinks(self) -> None:
        """A file cut short after its framing was sent aborts the connection."""
        await self._changed(lambda: os.truncate(os.path.join(self.tree, "a-big"), 1024 * 1024))

    async def test_file_grows(self) -> None:
        """A file that grew after its framing was sent aborts the connection (its size no longer matches)."""

        def grow() -> None:
            with open(os.path.join(self.tree, "a-big"), "ab") as f:
                f.write(b"x" * 4096)

        await self._changed(grow)

    async def test_client_leaves(self) -> None:
        """A client that resets the connection mid-NAR stops the stream as a client that left (no error)."""
        resource = _NarResource(lambda: exact_length(self.source()(), len(self.expected)), len(self.expected))
        port = self.serve(resource)
        self.assertGreater(await deferToThread(_leave_early, port), 0)
        outcome = await resource.outcome
        assert isinstance(outcome, tuple), outcome
        outcome[0].trap(ProducerStopped)
