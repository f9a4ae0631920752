"""
The staging area: NARs fetched for the LAN, on disk, streamed to every
waiting consumer while they download.

A :class:`Download` writes one NAR (decompressed, as the NAR itself) into a
temporary file ``<hash>-<narhash>.<random>.partial`` and checks NarSize and
NarHash over every byte written.  Any number of :class:`StagedReader`\\ s
stream it to consumers (HTTP requests of local clients and of peers) with
backpressure, each from its own offset: a reader that joins late reads what
has arrived from the file, then follows live.  Readers never get the NAR's
last byte before the whole NAR verified, so a client can never mistake a
partial or wrong file for a whole one; when a download fails, its readers
fail (the caller aborts their connections) and the temporary file goes.

Only a verified NAR is renamed to ``<hash>-<narhash>.nar`` and kept for late
comers: at most ``max_size`` bytes in all (running downloads count with
their NarSize), least recently used out first, and a NAR nobody asked for
in ``idle`` seconds is dropped.  Start-up empties the directory of our
files, partial and complete: a crash (even a power loss between a rename and
the data reaching the disk) leaves nothing that is served later.  Staging is
a rendezvous for concurrent demand, not a second store.

Small NARs (at most ``memory_max`` bytes, :data:`SMALL_NAR` by default)
are held in memory instead, running and complete, while the ones held so
take at most ``memory_budget`` bytes (:data:`MEMORY_BUDGET`); beyond that a
small NAR gets a file like any other.  A closure is mostly small paths, and
creating, renaming and removing a file per path cost more than everything
else a small path costs (measured in ``bench.upstream``); memory-held NARs
follow the same rules (verification, hold-back, eviction, the size limit)
and, like files, are gone after a restart.

Memory stays flat whatever the NAR's size: bytes go from the network to the
file and from the file to each consumer in chunks of :data:`READ_CHUNK`.
File reads and writes run on the reactor thread: they hit the page cache
(the bytes were just written), a few microseconds per chunk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from collections import OrderedDict
from typing import Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from peernix.nix.hashes import Hash
from peernix.nix.nar import NarError, NarVerifier
from peernix.upstream.client import UpstreamError, VerificationFailed

_log = Logger()

#: Bytes read from the staging file per write to a consumer.
READ_CHUNK = 256 * 1024

#: A staged NAR nobody asked for in this long is dropped, seconds.
DEFAULT_IDLE = 3600.0

#: NARs of at most this many bytes are held in memory rather than in a file.
SMALL_NAR = 64 * 1024

#: At most this many bytes of NARs are held in memory (running and complete).
MEMORY_BUDGET = 16 * 1024 * 1024

_OWN_FILE = re.compile(r"[0-9a-df-np-sv-z]{32}-[0-9a-df-np-sv-z]{52}(\.[0-9a-f]+\.partial|\.nar)")


class ConsumerGone(Exception):
    """The consumer stopped the transfer (its client went away)."""


Key = tuple[str, str]


def staging_key(hash_part: str, nar_hash: Hash) -> Key:
    """:returns: the staging key of a NAR: its hash part and NarHash (nix32)."""
    return hash_part, nar_hash.nix32()


class Download:
    """
    One NAR being written into the staging area.  Made by
    :meth:`Staging.begin`; sources call :meth:`append`, then :meth:`finish`
    or :meth:`fail`.

    :ivar written: bytes written so far (all checked against NarSize; the
        NarHash is checked by :meth:`finish`).
    :ivar state: ``"running"``, ``"done"`` or ``"failed"``.
    :ivar error: why it failed.
    :ivar readers: how many readers it has had (for metrics).
    """

    def __init__(self, staging: Staging, key: Key, nar_hash: Hash, nar_size: int, path: str | None) -> None:
        """
        :param path: the temporary file to write, or ``None`` to hold the
            NAR in memory (:attr:`buffer`).
        """
        self.key = key
        self.nar_size = nar_size
        self.path = path
        self.written = 0
        self.state = "running"
        self.error: Exception | None = None
        self.readers = 0
        self._staging = staging
        self._verifier = NarVerifier(nar_hash, nar_size, check_grammar=False)
        #: The NAR's bytes so far when it is held in memory, else ``None``.
        self.buffer: bytearray | None = bytearray() if path is None else None
        self._file = open(path, "wb", buffering=0) if path is not None else None
        self._watchers: list[Callable[[], None]] = []

    def readable(self) -> int:
        """
        :returns: how many bytes readers may have: all once verified, else
            what was written but never the last byte.
        """
        if self.state == "done":
            return self.nar_size
        return min(self.written, self.nar_size - 1)

    def append(self, data: bytes) -> None:
        """
        Write the next bytes of the NAR.

        :raises ValueError: (``NarError``) more than NarSize bytes; the
            download is then failed.
        :raises OSError: the disk failed; the download is then failed.
        """
        if self.state != "running":
            raise ValueError("the download is over")
        try:
            self._verifier.feed(data)
            if self.buffer is not None:
                self.buffer += data
            else:
                assert self._file is not None
                self._file.write(data)
        except (NarError, OSError) as e:
            self.fail(VerificationFailed(str(e)) if isinstance(e, NarError) else e)
            raise
        self.written += len(data)
        self._notify()

    def finish(self) -> None:
        """
        Check NarSize and NarHash over everything written; on success keep
        the NAR (renamed into place) and let readers have the last byte.

        :raises VerificationFailed: the NAR is not what was promised; the
            download is then failed (readers fail, the file goes).
        """
        if self.state != "running":
            raise ValueError("the download is over")
        try:
            self._verifier.finish()
        except NarError as e:
            error = VerificationFailed(str(e))
            self.fail(error)
            raise error from None
        if self._file is not None:
            self._file.close()
        self.state = "done"
        self._staging._completed(self)
        self._notify()

    def fail(self, error: Exception) -> None:
        """Give up: readers fail with ``error``, the temporary file goes."""
        if self.state != "running":
            return
        self.state = "failed"
        self.error = error
        if self._file is not None:
            self._file.close()
        self.buffer = None
        self._staging._failed(self)
        self._notify()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, at the next change (bytes arrived, done, failed)."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        """Forget a :meth:`watch` callback (a reader going away)."""
        try:
            self._watchers.remove(callback)
        except ValueError:
            pass

    def _notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for callback in watchers:
            callback()


class _Entry:
    """A complete staged NAR: its file, or its bytes when held in memory."""

    def __init__(self, path: str | None, size: int, last_used: float, data: bytes | None = None) -> None:
        self.path = path
        self.size = size
        self.last_used = last_used
        self.data = data


class Staging:
    """
    The staging directory.

    :param directory: where staged NARs live (created by :meth:`start`).
    :param max_size: most bytes kept, running downloads counted with their
        NarSize.  A NAR larger than this still streams through (its file
        goes as soon as it is complete; open readers keep reading it).
    :param clock: for least-recently-used order and idle expiry.
    :param idle: a complete NAR not read for this long goes at the next
        :meth:`sweep`.
    :param memory_max: NARs of at most this many bytes are held in memory
        (0: none).
    :param memory_budget: most bytes of NARs held in memory at once.
    """

    def __init__(self, directory: str, max_size: int, clock: IReactorTime, *, idle: float = DEFAULT_IDLE,
                 memory_max: int = SMALL_NAR, memory_budget: int = MEMORY_BUDGET) -> None:
        self.directory = directory
        self.max_size = max_size
        self.idle = idle
        self.memory_max = memory_max
        self.memory_budget = memory_budget
        self._clock = clock
        self._complete: OrderedDict[Key, _Entry] = OrderedDict()
        self._running: dict[Key, Download] = {}
        # Bytes held (see usage), and of those the ones held in memory.
        self._usage = 0
        self._memory = 0
        self.evictions = 0
        #: Told the key of every verified NAR that leaves the staging area
        #: (evicted, idle, or its file gone), e.g. to update the digest.
        self.on_dropped: Callable[[Key], object] | None = None
        # The lock on the directory, held from start() to close().
        self._lock_fd: int | None = None

    # -- life cycle ---------------------------------------------------------

    def start(self) -> int:
        """
        Create the directory, lock it (one daemon per staging directory: a
        second one would delete the first one's files), and remove every
        file a previous run left (partial or complete): nothing of a crashed
        run is ever served.

        Blocking (a directory listing): call it at start-up.

        :returns: how many leftover files were removed.
        :raises OSError: the directory cannot be created, locked or listed
            (``EBUSY`` when another process holds it).
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OSError(errno.EBUSY, "another peernix uses this staging directory") from None
        self._lock_fd = fd
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if _OWN_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        if removed:
            _log.info("Removed {count} leftover files from the staging directory {directory}",
                      count=removed, directory=self.directory)
        return removed

    def close(self) -> None:
        """Release the directory's lock (the process exiting does too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- lookups ------------------------------------------------------------

    def running(self, key: Key) -> Download | None:
        """:returns: the download of ``key`` under way, if any."""
        return self._running.get(key)

    def staged(self, key: Key) -> bool:
        """:returns: whether the verified NAR ``key`` is staged (not counted as a use)."""
        return key in self._complete

    def _use(self, key: Key) -> _Entry | None:
        """
        :returns: the verified staged NAR ``key``, if any (counted as a use:
            it moves to the back of the eviction order).
        """
        entry = self._complete.get(key)
        if entry is None:
            return None
        entry.last_used = self._clock.seconds()
        self._complete.move_to_end(key)
        return entry

    def complete(self, key: Key) -> str | None:
        """
        :returns: the file of the verified staged NAR ``key``, if it is
            staged in a file (counted as a use, see :meth:`_use`).
        """
        entry = self._use(key)
        return entry.path if entry is not None else None

    @property
    def usage(self) -> int:
        """:returns: bytes held: complete NARs plus running downloads' NarSize."""
        return self._usage

    @property
    def memory_usage(self) -> int:
        """:returns: the part of :attr:`usage` held in memory."""
        return self._memory

    @property
    def complete_count(self) -> int:
        """:returns: how many verified NARs are staged."""
        return len(self._complete)

    def active(self) -> list[Download]:
        """:returns: the downloads under way."""
        return list(self._running.values())

    # -- writing ------------------------------------------------------------

    def begin(self, hash_part: str, nar_hash: Hash, nar_size: int) -> Download:
        """
        Start staging a NAR: a fresh temporary file, room made for it.

        :raises ValueError: a download of it is already under way (join
            that one: :meth:`running`).
        :raises OSError: the file cannot be created.
        """
        key = staging_key(hash_part, nar_hash)
        if key in self._running:
            raise ValueError(f"{key} is already being downloaded")
        self._make_room(nar_size)
        in_memory = nar_size <= self.memory_max and self._memory + nar_size <= self.memory_budget
        path = None if in_memory else os.path.join(
            self.directory, f"{key[0]}-{key[1]}.{secrets.token_hex(4)}.partial")
        download = Download(self, key, nar_hash, nar_size, path)
        self._running[key] = download
        self._held(nar_size, in_memory)
        return download

    def _held(self, size: int, in_memory: bool) -> None:
        """Count ``size`` more bytes held (less when negative)."""
        self._usage += size
        if in_memory:
            self._memory += size

    def _drop_entry(self, entry: _Entry) -> None:
        """Forget a complete NAR's bytes: its file goes, or its memory is freed."""
        self._held(-entry.size, entry.data is not None)
        if entry.path is not None:
            self._unlink(entry.path)

    def _completed(self, download: Download) -> None:
        del self._running[download.key]
        if download.buffer is not None:
            entry = _Entry(None, download.nar_size, self._clock.seconds(), bytes(download.buffer))
            download.buffer = None
        else:
            assert download.path is not None
            final = os.path.join(self.directory, f"{download.key[0]}-{download.key[1]}.nar")
            try:
                os.replace(download.path, final)
            except OSError as e:
                _log.warn("Cannot keep staged NAR {path}: {error}", path=final, error=str(e))
                self._held(-download.nar_size, False)
                self._unlink(download.path)
                return
            # Readers already reading keep their open file: the rename does
            # not disturb them.
            download.path = final
            entry = _Entry(final, download.nar_size, self._clock.seconds())
        old = self._complete.pop(download.key, None)
        if old is not None:
            # The same NAR staged again: the new bytes replace it (the same
            # file name is not removed).
            self._held(-old.size, old.data is not None)
            if old.path is not None and old.path != entry.path:
                self._unlink(old.path)
        self._complete[download.key] = entry
        self._make_room(0)

    def _failed(self, download: Download) -> None:
        self._running.pop(download.key, None)
        self._held(-download.nar_size, download.path is None)
        if download.path is not None:
            self._unlink(download.path)

    # -- eviction -----------------------------------------------------------

    def _make_room(self, incoming: int) -> None:
        """Drop least recently used complete NARs until ``incoming`` more bytes fit (or none is left)."""
        while self._complete and self.usage + incoming > self.max_size:
            key, entry = self._complete.popitem(last=False)
            self._drop_entry(entry)
            self.evictions += 1
            _log.debug("Evicted staged NAR {key}", key=key)
            self._dropped(key)

    def sweep(self) -> int:
        """
        Drop complete NARs nobody asked for in :attr:`idle` seconds.

        :returns: how many were dropped.
        """
        deadline = self._clock.seconds() - self.idle
        dropped = 0
        for key, entry in list(self._complete.items()):
            if entry.last_used < deadline:
                del self._complete[key]
                self._drop_entry(entry)
                dropped += 1
                self._dropped(key)
        return dropped

    def _dropped(self, key: Key) -> None:
        if self.on_dropped is not None:
            try:
                self.on_dropped(key)
            except Exception:
                _log.failure("Staging on_dropped hook failed for {key}", key=key)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warn("Cannot remove staged file {path}: {error}", path=path, error=str(e))

    # -- reading ------------------------------------------------------------

    @staticmethod
    def _open_source(data: bytes | bytearray | None, path: str | None) -> _Source | None:
        """:returns: a source over ``data`` when held in memory, else over the file ``path`` (``None``: it cannot be opened)."""
        if data is not None:
            return _MemorySource(data)
        assert path is not None
        try:
            return _FileSource(os.open(path, os.O_RDONLY))
        except OSError:
            return None

    def open_reader(
        self,
        hash_part: str,
        nar_hash: Hash,
        consumer: IConsumer,
        *,
        offset: int = 0,
        on_bytes: Callable[[int], None] | None = None,
    ) -> StagedReader | None:
        """
        :returns: a reader of the staged (complete or running) NAR into
            ``consumer`` from ``offset``, not started; ``None`` when nothing
            is staged for it.
        """
        key = staging_key(hash_part, nar_hash)
        download = self._running.get(key)
        if download is not None:
            source = self._open_source(download.buffer, download.path)
            if source is None:
                return None
            download.readers += 1
            return StagedReader(source, download.nar_size, consumer, offset=offset, download=download,
                                on_bytes=on_bytes)
        entry = self._use(key)
        if entry is None:
            return None
        source = self._open_source(entry.data, entry.path)
        if source is None:
            # Its file went under us: it is not staged any more.
            if self._complete.pop(key, None) is not None:
                self._held(-entry.size, False)
                self._dropped(key)
            return None
        return StagedReader(source, entry.size, consumer, offset=offset, on_bytes=on_bytes)


class _Source(Protocol):
    """Where a :class:`StagedReader` reads a NAR's bytes from."""

    def pread(self, size: int, offset: int) -> bytes:
        """:returns: at most ``size`` bytes from ``offset`` (fewer only at the end)."""

    def close(self) -> None:
        """Release the source (called once)."""


class _FileSource:
    """A staged file, open for reading (closed by :meth:`close`)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        os.close(self._fd)


class _MemorySource:
    """
    A NAR held in memory: the running download's growing buffer (only ever
    appended to, and read only up to what it holds) or the complete bytes.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data

    def close(self) -> None:
        pass

    def pread(self, size: int, offset: int) -> bytes:
        return bytes(self._data[offset:offset + size])


@implementer(IPushProducer)
class StagedReader:
    """
    Streams one staged NAR from its file (or memory) into a consumer, with
    backpressure, following a running :class:`Download` live.

    :param source: where the bytes are (closed by the reader).
    :param size: the NAR's size (NarSize).
    :param consumer: an ``IConsumer`` (a ``twisted.web`` request).
    :param offset: the first byte to send.
    :param download: the download still writing the file, if any.
    :param on_bytes: told the size of each chunk written (metrics).

    :ivar done: fires with ``None`` once the last byte was written (only
        ever after the download verified); fails with the download's error
        (:class:`VerificationFailed`, :class:`UpstreamError`) or
        :class:`ConsumerGone`.  The caller must then abort the client's
        connection, never finish the response.  Cancelling it stops the
        reader.
    """

    def __init__(
        self,
        source: _Source,
        size: int,
        consumer: IConsumer,
        *,
        offset: int = 0,
        download: Download | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        # Cancelled: stop quietly; Deferred.cancel fails it with CancelledError.
        self.done: Deferred[None] = Deferred(lambda _d: self._stop(None, fire=False))
        self.sent = 0
        self._source: _Source | None = source
        self._size = size
        self._consumer = consumer
        self._pos = offset
        self._download = download
        self._on_bytes = on_bytes
        self._paused = False
        self._pumping = False
        self._registered = False

    def start(self) -> Deferred[None]:
        """Register with the consumer and start writing; :returns: :attr:`done`."""
        self._consumer.registerProducer(self, True)
        self._registered = True
        self._pump()
        return self.done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stop(ConsumerGone("the consumer stopped the transfer"))

    def _available(self) -> int:
        download = self._download
        if download is None or download.state == "done":
            return self._size
        return download.readable()

    def _pump(self) -> None:
        # Re-entrancy guard: consumer.write may pause or resume us.
        if self._pumping or self._source is None:
            return
        self._pumping = True
        try:
            while self._source is not None and not self._paused:
                download = self._download
                if download is not None and download.state == "failed":
                    error = download.error or UpstreamError("download failed")
                    self._stop(error)
                    return
                if self._pos >= self._size and (download is None or download.state == "done"):
                    self._stop(None)
                    return
                available = self._available()
                if self._pos >= available:
                    assert download is not None
                    download.watch(self._changed)
                    return
                data = self._source.pread(min(READ_CHUNK, available - self._pos), self._pos)
                if not data:
                    self._stop(UpstreamError("staged file shorter than expected"))
                    return
                self._pos += len(data)
                self.sent += len(data)
                if self._on_bytes is not None:
                    self._on_bytes(len(data))
                self._consumer.write(data)
        finally:
            self._pumping = False

    def _changed(self) -> None:
        self._pump()

    def _stop(self, failure: Exception | None, fire: bool = True) -> None:
        if self._source is None:
            return
        self._source.close()
        self._source = None
        if self._download is not None:
            self._download.unwatch(self._changed)
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()
        if self.done.called or not fire:
            return
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)
