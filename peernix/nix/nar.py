"""NAR (Nix ARchive) writing, sizing, parsing and verification.

The format (``archive.cc``): every token is a *framed string*,
``u64le(len) || bytes || zero padding to a multiple of 8``::

    nar  = str("nix-archive-1") node
    node = "(" "type" ( "regular" ["executable" ""] "contents" <framed bytes>
                      | "symlink" "target" str(target)
                      | "directory" { "entry" "(" "name" str(name) "node" node ")" } ) ")"

Directory entries come in strictly ascending byte order.  Only the
executable bit (``S_IXUSR``) of the owner is recorded.

The writer, :func:`nar_size` and the listing read the filesystem and block:
run them in a worker thread.  :class:`NarReader` and :class:`NarVerifier` are
pure and keep memory bounded however large the NAR is.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterator

from attrs import frozen

from peernix.nix.hashes import Hash

#: Limits Nix's parser enforces since 2.35 (commit ``77db3d4``); older Nix
#: accepts more, but a NAR beyond them would not import into newer Nix.
MAX_DEPTH = 64
MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095

#: Suffix macOS Nix appends to store file names that differ only in case
#: (``use-case-hack``, on by default there); the NAR never contains it.
CASE_HACK_SUFFIX = b"~nix~case~hack~"

DEFAULT_CHUNK_SIZE = 256 * 1024

_USE_CASE_HACK = sys.platform == "darwin"


class NarError(ValueError):
    """A NAR is malformed or does not match what was expected, or a path cannot be archived."""


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def _framed_len(n: int) -> int:
    return 8 + n + (-n % 8)


_MAGIC = _frame(b"nix-archive-1")
_OPEN = _frame(b"(")
_CLOSE = _frame(b")")
_REGULAR = _OPEN + _frame(b"type") + _frame(b"regular")
_EXECUTABLE = _frame(b"executable") + _frame(b"")
_CONTENTS = _frame(b"contents")
_SYMLINK = _OPEN + _frame(b"type") + _frame(b"symlink") + _frame(b"target")
_DIRECTORY = _OPEN + _frame(b"type") + _frame(b"directory")
_ENTRY = _frame(b"entry") + _OPEN + _frame(b"name")
_NODE = _frame(b"node")

# Bytes before a regular file's contents, counted from the start of its node.
_REG_HEAD = len(_REGULAR) + len(_CONTENTS) + 8
_REG_EXEC_HEAD = _REG_HEAD + len(_EXECUTABLE)

# Walker event kinds.
_DIR, _REG, _LNK, _END = range(4)


#: Whether the walk can work relative to open directories (``openat`` and
#: friends): no path is resolved again from the root for every file, and
#: ``scandir``'s file types spare an ``lstat`` per entry.
_AT_CALLS = {os.open, os.stat, os.readlink} <= os.supports_dir_fd

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind_of(mode: int, path: bytes) -> int:
    if stat.S_ISDIR(mode):
        return _DIR
    if stat.S_ISREG(mode):
        return _REG
    if stat.S_ISLNK(mode):
        return _LNK
    raise NarError(f"{os.fsdecode(path)!r} is not a regular file, directory or symlink")


#: Appended to a name while listing a directory: NUL (which no file name
#: contains, and which sorts before every other byte, so tagged names sort
#: as the names do) and the node's kind.
_TAGS = {kind: b"\0" + bytes([kind]) for kind in (_DIR, _REG, _LNK)}


class _Listing:
    """A sorted directory listing (tagged names, one bytes object), shareable."""

    __slots__ = ("packed", "__weakref__")

    def __init__(self, packed: bytes) -> None:
        self.packed = packed


#: Listings of big directories that walks are inside right now, by the
#: directory's (device, inode, mtime, size): several clients downloading the same
#: path at once hold one copy of, say, a man1 of 18,000 names, not one each.
#: An entry goes when the last walk using it leaves the directory.
_shared_listings: weakref.WeakValueDictionary[tuple[int, int, int, int], _Listing] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()
#: Listings at least this long (bytes) are shared.
_SHARE_MIN = 32 * 1024


def _dir_entries(path: bytes, case_hack: bool, key: tuple[int, int, int, int] | None = None) -> Iterator[tuple[bytes, bytes, int]]:
    """
    :param key: the directory's identity (device, inode, mtime, size), to share
        the listing with concurrent walks; ``None``: not shared.
    :returns: ``(name in the NAR, name on disk, kind)`` triples in NAR order.
    """
    if key is not None and not case_hack:
        with _shared_lock:
            shared = _shared_listings.get(key)
        if shared is not None:
            return _unpacked(shared)
    # One bytes object per entry (name and kind tag), not a tuple: a
    # directory of tens of thousands of files streamed to several clients at
    # once is listed by each of them.
    listed: list[bytes] = []
    add = listed.append
    reg, sub, lnk = _TAGS[_REG], _TAGS[_DIR], _TAGS[_LNK]
    # By path, not by descriptor: scandir then gives names as bytes.  One
    # resolution per directory is cheap; files are opened relative to it.
    with os.scandir(path) as it:
        for e in it:
            # is_*() use the directory's d_type and only lstat when it is unknown.
            if e.is_file(follow_symlinks=False):
                add(e.name + reg)
            elif e.is_dir(follow_symlinks=False):
                add(e.name + sub)
            elif e.is_symlink():
                add(e.name + lnk)
            else:
                raise NarError(f"{os.fsdecode(e.path)!r} is not a regular file, directory or symlink")
    if not case_hack:
        listed.sort()
        # Kept as one bytes object while the walk is inside this directory.
        listing = _Listing(b"".join(listed))
        del listed
        if key is not None and len(listing.packed) >= _SHARE_MIN:
            with _shared_lock:
                listing = _shared_listings.setdefault(key, listing)
        return _unpacked(listing)
    unhacked: dict[bytes, tuple[bytes, int]] = {}
    for tagged in listed:
        fs_name, kind = tagged[:-2], tagged[-1]
        pos = fs_name.find(CASE_HACK_SUFFIX)
        name = fs_name if pos < 0 else fs_name[:pos]
        if name in unhacked:
            raise NarError(f"file name collision between {unhacked[name][0]!r} and {fs_name!r} in {path!r}")
        unhacked[name] = (fs_name, kind)
    return iter(sorted((name, fs_name, kind) for name, (fs_name, kind) in unhacked.items()))


def _unpacked(listing: _Listing) -> Iterator[tuple[bytes, bytes, int]]:
    """:returns: ``(name, name, kind)`` for each tagged name (``name NUL kind``) of the listing."""
    packed = listing.packed
    start = 0
    end_of_all = len(packed)
    while start < end_of_all:
        end = packed.find(b"\0", start)
        name = packed[start:end]
        kind = packed[end + 1]
        start = end + 2
        yield name, name, kind


def _shown(where: bytes, dir_fd: int | None, dir_path: bytes) -> str:
    """:returns: a node's path for messages."""
    return os.fsdecode(dir_path + b"/" + where if dir_fd is not None else where)


def _identity(fd: int | None) -> tuple[int, int, int, int] | None:
    """:returns: the (device, inode, mtime, size) of the directory open as ``fd``, or ``None`` without one."""
    if fd is None:
        return None
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


#: One node of a walk: its kind, its name in the NAR (``None`` for the root),
#: the directory it is in as an open descriptor (``None`` for the root, or
#: where ``openat`` is missing), its name relative to that (else its path),
#: and the path of that directory (for messages).
_Node = tuple[int, "bytes | None", "int | None", bytes, bytes]


def _walk(root: bytes, case_hack: bool) -> Generator[_Node, None, None]:
    """
    Walk the tree at ``root`` in NAR order, without recursion (so a deep tree
    cannot exhaust Python's stack), working relative to open directories.

    :returns: a generator of nodes, and ``(_END, None, None, b"", dir path)``
        after a directory's last entry.  Closing it closes the directories
        it holds open.
    """
    kind = _kind_of(os.lstat(root).st_mode, root)
    yield kind, None, None, root, root
    if kind != _DIR:
        return
    # (directory path, its descriptor or None, its entries)
    stack: list[tuple[bytes, int | None, Iterator[tuple[bytes, bytes, int]]]] = []
    try:
        fd = os.open(root, _DIR_FLAGS) if _AT_CALLS else None
        stack.append((root, fd, _dir_entries(root, case_hack, _identity(fd))))
        while stack:
            dir_path, dir_fd, entries = stack[-1]
            nxt = next(entries, None)
            if nxt is None:
                stack.pop()
                if dir_fd is not None:
                    os.close(dir_fd)
                yield _END, None, None, b"", dir_path
                continue
            name, fs_name, kind = nxt
            where = fs_name if dir_fd is not None else dir_path + b"/" + fs_name
            yield kind, name, dir_fd, where, dir_path
            if kind == _DIR:
                sub_path = dir_path + b"/" + fs_name
                fd = os.open(fs_name, _DIR_FLAGS, dir_fd=dir_fd) if dir_fd is not None else None
                stack.append((sub_path, fd, _dir_entries(sub_path, case_hack, _identity(fd))))
    finally:
        for _, dir_fd, _ in stack:
            if dir_fd is not None:
                os.close(dir_fd)


class FileContents:
    """
    The contents of one regular file in a NAR, to be copied by the kernel
    (``os.sendfile``) rather than read into Python: an open descriptor and
    the size announced in the NAR's framing.

    Whoever receives it from :func:`nar_pieces` owns the descriptor and must
    :meth:`close` it.  ``len()`` is the announced size, so byte counters and
    :func:`~peernix.web.streaming.exact_length` count it like the bytes it
    stands for.

    :ivar fd: the open file (read with ``pread``/``sendfile`` at
        :attr:`offset`; its own position is not used).
    :ivar size: the file's size when the framing was made.
    :ivar offset: how many bytes of it were sent so far.
    :ivar where: the file's path, for messages.
    :ivar weight: set by the stream that carries it: how much of its
        read-ahead budget the piece takes.
    """

    __slots__ = ("fd", "size", "offset", "where", "weight")

    def __init__(self, fd: int, size: int, where: str) -> None:
        self.fd = fd
        self.size = size
        self.offset = 0
        self.where = where
        self.weight = 0

    def __len__(self) -> int:
        return self.size

    @property
    def remaining(self) -> int:
        """Bytes still to send."""
        return self.size - self.offset

    def size_now(self) -> int:
        """:returns: the file's size now (``fstat``), to tell whether it changed while being sent."""
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def nar_pieces(
    fs_path: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *, file_min: int, case_hack: bool = _USE_CASE_HACK
) -> Generator[bytes | FileContents, None, None]:
    """
    Like :func:`nar_chunks`, but the contents of every regular file of
    ``file_min`` bytes or more come as one :class:`FileContents` (the bytes
    before it are yielded first, so nothing is reordered): the NAR's
    framing is made here and the file's bytes are left for the kernel to
    copy.  The receiver owns each :class:`FileContents` yielded (also when
    the generator is closed right after yielding it).

    A file that shrinks or grows after its framing was made is the
    receiver's to detect (:meth:`FileContents.size_now`, or ``sendfile``
    reaching its end early).
    """
    if file_min <= 0:
        raise ValueError("file_min must be positive")
    return _nar_pieces(fs_path, chunk_size, case_hack, file_min)


def nar_chunks(
    fs_path: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *, case_hack: bool = _USE_CASE_HACK
) -> Generator[bytes, None, None]:
    """
    Serialise the file, directory or symlink at ``fs_path`` as a NAR.

    Blocking filesystem I/O: run it in a worker thread.  Memory stays
    bounded by about twice ``chunk_size`` whatever the NAR's size: file
    contents are read in pieces, never whole.  Closing the generator early
    closes any open file.

    :param fs_path: the path on this machine's filesystem (not followed if it
        is a symlink).
    :param chunk_size: the size of the chunks yielded; only the last one may
        be smaller.
    :param case_hack: strip macOS Nix's ``~nix~case~hack~N`` suffixes from
        names, as Nix does with ``use-case-hack`` (the default on macOS).
    :returns: a generator of non-empty byte chunks whose concatenation is
        the NAR.
    :raises NarError: for a special file (device, socket, fifo), a case-hack
        name collision, or a file that shrank while being read.
    :raises OSError: when the filesystem fails (missing or unreadable path).
    """
    return _nar_pieces(fs_path, chunk_size, case_hack, None)  # type: ignore[return-value]


def _nar_pieces(
    fs_path: str, chunk_size: int, case_hack: bool, file_min: int | None
) -> Generator[bytes | FileContents, None, None]:
    """:func:`nar_chunks` (``file_min`` ``None``) and :func:`nar_pieces`."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    # The chunk being assembled: ``parts`` hold ``have`` bytes.  File
    # contents are read in pieces that end exactly where the chunk ends, so
    # a big file's chunks come straight from os.read without being copied
    # again, and other chunks are joined once.
    parts: list[bytes] = []
    have = 0

    def overflow() -> Iterator[bytes]:
        # Small tokens filled the chunk (at most a few KiB past its end).
        nonlocal parts, have
        joined = b"".join(parts)
        while len(joined) >= chunk_size:
            yield joined[:chunk_size]
            joined = joined[chunk_size:]
        parts = [joined] if joined else []
        have = len(joined)

    parts.append(_MAGIC)
    have = len(_MAGIC)
    depth = 0
    walk = _walk(os.fsencode(fs_path), case_hack)
    try:
        for kind, name, dir_fd, where, dir_path in walk:
            prefix = b"" if name is None else _ENTRY + _frame(name) + _NODE
            suffix = b"" if name is None else _CLOSE
            if kind == _REG:
                fd = os.open(where, _FILE_FLAGS, dir_fd=dir_fd)
                try:
                    # fstat the open file so size and mode describe what we read.
                    fst = os.fstat(fd)
                    if not stat.S_ISREG(fst.st_mode):
                        raise NarError(f"{_shown(where, dir_fd, dir_path)!r} changed while being archived")
                    size = fst.st_size
                    head = _REGULAR + _EXECUTABLE if fst.st_mode & stat.S_IXUSR else _REGULAR
                    token = prefix + head + _CONTENTS + size.to_bytes(8, "little")
                    parts.append(token)
                    have += len(token)
                    if have >= chunk_size:
                        yield from overflow()
                    remaining = size
                    if file_min is not None and size >= file_min:
                        if have:
                            yield b"".join(parts)
                            parts = []
                            have = 0
                        contents = FileContents(fd, size, _shown(where, dir_fd, dir_path))
                        fd = -1  # the receiver owns it from here
                        remaining = 0
                        yield contents
                    while remaining:
                        data = os.read(fd, min(remaining, chunk_size - have))
                        if not data:
                            raise NarError(f"{_shown(where, dir_fd, dir_path)!r} shrank while being archived")
                        remaining -= len(data)
                        if have == 0 and len(data) == chunk_size:
                            yield data
                            continue
                        parts.append(data)
                        have += len(data)
                        if have == chunk_size:
                            yield b"".join(parts)
                            parts = []
                            have = 0
                finally:
                    if fd >= 0:
                        os.close(fd)
                token = b"\0" * (-size % 8) + _CLOSE + suffix
            elif kind == _LNK:
                token = prefix + _SYMLINK + _frame(os.readlink(where, dir_fd=dir_fd)) + _CLOSE + suffix
            elif kind == _DIR:
                depth += 1
                token = prefix + _DIRECTORY
            else:
                depth -= 1
                # Close the directory node, and its entry unless it is the root.
                token = _CLOSE + _CLOSE if depth else _CLOSE
            parts.append(token)
            have += len(token)
            if have >= chunk_size:
                yield from overflow()
    finally:
        walk.close()
    if have:
        yield b"".join(parts)


@frozen
class NarEntry:
    """
    One node met by :class:`NarReader`.

    :ivar path: the node's path inside the NAR, components joined by ``/``;
        ``b""`` for the root.
    :ivar type: ``"regular"``, ``"symlink"`` or ``"directory"``.
    :ivar size: a regular file's length, else 0.
    :ivar executable: a regular file's executable bit.
    :ivar nar_offset: where a regular file's contents start in the NAR, else 0.
    :ivar target: a symlink's target, else ``b""``.
    """

    path: bytes
    type: str
    size: int = 0
    executable: bool = False
    nar_offset: int = 0
    target: bytes = b""


def _layout(root: bytes, case_hack: bool) -> Generator[NarEntry, None, int]:
    """
    :returns: a generator of the entries of the NAR of ``root`` with their
        offsets, computed from metadata alone; its return value is the NAR's
        total length.
    """
    offset = len(_MAGIC)
    dirs: list[bytes] = []  # NAR paths of the directories we are inside
    for kind, name, dir_fd, where, _dir_path in _walk(root, case_hack):
        if kind == _END:
            dirs.pop()
            # The directory's ")" and, unless it is the root, its entry's ")".
            offset += 2 * len(_CLOSE) if dirs else len(_CLOSE)
            continue
        if name is None:
            rel = b""
        else:
            rel = dirs[-1] + b"/" + name if dirs[-1] else name
            offset += len(_ENTRY) + _framed_len(len(name)) + len(_NODE)
        entry_close = 0 if name is None else len(_CLOSE)
        if kind == _REG:
            st = os.stat(where, dir_fd=dir_fd, follow_symlinks=False)
            executable = bool(st.st_mode & stat.S_IXUSR)
            offset += _REG_EXEC_HEAD if executable else _REG_HEAD
            size = st.st_size
            yield NarEntry(rel, "regular", size, executable, offset)
            offset += size + (-size % 8) + len(_CLOSE) + entry_close
        elif kind == _LNK:
            target = os.readlink(where, dir_fd=dir_fd)
            yield NarEntry(rel, "symlink", target=target)
            offset += len(_SYMLINK) + _framed_len(len(target)) + len(_CLOSE) + entry_close
        else:
            yield NarEntry(rel, "directory")
            offset += len(_DIRECTORY)
            dirs.append(rel)
    return offset


def nar_entries(fs_path: str, *, case_hack: bool = _USE_CASE_HACK) -> Iterator[NarEntry]:
    """
    :returns: the entries of the NAR of ``fs_path`` in NAR order, with the
        same values :class:`NarReader` would report for that NAR, computed
        from ``lstat``/``readlink`` alone (no file contents are read).
        Blocking: run it in a worker thread.
    :raises NarError: as :func:`nar_chunks`.
    :raises OSError: when the filesystem fails.
    """
    yield from _layout(os.fsencode(fs_path), case_hack)


def nar_size(fs_path: str, *, case_hack: bool = _USE_CASE_HACK) -> int:
    """
    :returns: the exact length of the NAR of ``fs_path``, computed from
        ``lstat``/``readlink``/directory listings alone (no file contents are
        read).  Blocking: run it in a worker thread.
    :raises NarError: as :func:`nar_chunks`.
    :raises OSError: when the filesystem fails.
    """
    layout = _layout(os.fsencode(fs_path), case_hack)
    while True:
        try:
            next(layout)
        except StopIteration as stop:
            total: int = stop.value
            return total


# A parser request: (_READ, n) wants exactly n bytes sent back; (_SKIP, n)
# consumes n bytes of file contents without keeping them.
_READ, _SKIP = 0, 1
_Request = tuple[int, int]
_Parser = Generator[_Request, bytes, None]


class NarReader:
    """
    Incremental validating NAR parser: push bytes in as they arrive.

    It checks everything Nix's parser checks: the magic, every token, zero
    padding, entry names (non-empty, not ``.``/``..``, no ``/`` or NUL, at
    most :data:`MAX_NAME_LEN` bytes) in strictly ascending order, nesting
    below :data:`MAX_DEPTH`, symlink targets of 1..:data:`MAX_TARGET_LEN`
    bytes without NUL, and that nothing follows the root node.  File
    contents are counted, never buffered; at most one token (a few KiB) is
    held.  After an error every further call raises :class:`NarError` again.
    """

    def __init__(self, on_entry: Callable[[NarEntry], None] | None = None) -> None:
        """
        :param on_entry: called with each node, in NAR order, as soon as its
            header has been parsed (before a file's contents).
        """
        self._on_entry = on_entry
        self._buf = bytearray()
        self._need = 0
        self._skip = 0
        #: Bytes consumed so far; the parser reads it for file offsets.
        self._offset = 0
        self._done = False
        self._error: NarError | None = None
        self._parser: _Parser = self._nar()
        self._advance(None)

    @property
    def done(self) -> bool:
        """Whether the complete NAR has been read."""
        return self._done

    @property
    def offset(self) -> int:
        """How many bytes were fed so far."""
        return self._offset

    def _fail(self, error: NarError) -> NarError:
        self._error = error
        return error

    def _advance(self, value: bytes | None) -> None:
        """
        Resume the parser with ``value`` (``None`` to start it) until it
        wants bytes we do not have yet.
        """
        try:
            kind, n = next(self._parser) if value is None else self._parser.send(value)
            while not n:
                # Zero bytes wanted (empty string, no padding): answer at once.
                kind, n = self._parser.send(b"")
        except StopIteration:
            self._done = True
            return
        except NarError as e:
            raise self._fail(e) from None
        except BaseException:
            # An on_entry callback failed: the parser generator is gone, so
            # any further input must be refused rather than mistaken for
            # the end of the NAR.
            self._error = NarError("NAR parsing was aborted by an error in on_entry")
            raise
        if kind == _READ:
            self._need = n
        else:
            self._skip = n

    def feed(self, data: bytes) -> None:
        """
        Parse the next piece of the NAR.

        :raises NarError: as soon as the bytes seen so far cannot be the
            start of a valid NAR, including bytes after its end.
        """
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._done:
                raise self._fail(NarError("trailing data after the end of the NAR"))
            if self._skip:
                take = min(self._skip, end - pos)
                pos += take
                self._offset += take
                self._skip -= take
                if not self._skip:
                    self._advance(b"")
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += view[pos:pos + take]
            pos += take
            self._offset += take
            if len(self._buf) == self._need:
                value = bytes(self._buf)
                self._buf.clear()
                self._advance(value)

    def finish(self) -> None:
        """
        Declare the end of input.

        :raises NarError: if the NAR is incomplete or was already found bad.
        """
        if self._error is not None:
            raise self._error
        if not self._done:
            raise self._fail(NarError(f"NAR is truncated after {self._offset} bytes"))

    # The grammar, as generator-based coroutines: each ``yield`` asks the
    # feeding loop for bytes, so the grammar reads like a blocking parser.

    def _string(self, max_len: int, what: str) -> Generator[_Request, bytes, bytes]:
        n = int.from_bytes((yield _READ, 8), "little")
        if n > max_len:
            raise NarError(f"{what} too long ({n} bytes) at offset {self._offset - 8}")
        padded = yield _READ, n + (-n % 8)
        if padded[n:].strip(b"\0"):
            raise NarError(f"non-zero padding at offset {self._offset - len(padded) + n}")
        return padded[:n]

    def _expect(self, token: bytes) -> Generator[_Request, bytes, None]:
        n = int.from_bytes((yield _READ, 8), "little")
        if n != len(token):
            raise NarError(f"expected {token.decode()!r} at offset {self._offset - 8}")
        padded = yield _READ, n + (-n % 8)
        if padded[:n] != token:
            raise NarError(f"expected {token.decode()!r}, got {padded[:n]!r} at offset {self._offset - len(padded)}")
        if padded[n:].strip(b"\0"):
            raise NarError(f"non-zero padding at offset {self._offset - len(padded) + n}")

    def _nar(self) -> _Parser:
        yield from self._expect(b"nix-archive-1")
        yield from self._node(b"", 0)

    def _node(self, path: bytes, depth: int) -> _Parser:
        if depth >= MAX_DEPTH:
            raise NarError(f"NAR nests deeper than {MAX_DEPTH} levels")
        yield from self._expect(b"(")
        yield from self._expect(b"type")
        kind = yield from self._string(9, "node type")
        if kind == b"regular":
            token = yield from self._string(10, "token after 'regular'")
            executable = token == b"executable"
            if executable:
                yield from self._expect(b"")
                token = yield from self._string(8, "token after 'executable'")
            if token != b"contents":
                raise NarError(f"expected 'contents', got {token!r} at offset {self._offset}")
            size = int.from_bytes((yield _READ, 8), "little")
            if self._on_entry is not None:
                self._on_entry(NarEntry(path, "regular", size, executable, self._offset))
            yield _SKIP, size
            padding = yield _READ, -size % 8
            if padding.strip(b"\0"):
                raise NarError(f"non-zero padding after file contents at offset {self._offset}")
            yield from self._expect(b")")
        elif kind == b"symlink":
            yield from self._expect(b"target")
            target = yield from self._string(MAX_TARGET_LEN, "symlink target")
            if not target or b"\0" in target:
                raise NarError(f"invalid symlink target {target!r}")
            if self._on_entry is not None:
                self._on_entry(NarEntry(path, "symlink", target=target))
            yield from self._expect(b")")
        elif kind == b"directory":
            if self._on_entry is not None:
                self._on_entry(NarEntry(path, "directory"))
            previous: bytes | None = None
            while True:
                token = yield from self._string(5, "directory token")
                if token == b")":
                    break
                if token != b"entry":
                    raise NarError(f"expected 'entry' or ')', got {token!r} at offset {self._offset}")
                yield from self._expect(b"(")
                yield from self._expect(b"name")
                name = yield from self._string(MAX_NAME_LEN, "entry name")
                if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                    raise NarError(f"invalid NAR entry name {name!r}")
                if previous is not None and name <= previous:
                    raise NarError(f"NAR directory is not sorted: {name!r} after {previous!r}")
                previous = name
                yield from self._expect(b"node")
                yield from self._node(path + b"/" + name if path else name, depth + 1)
                yield from self._expect(b")")
        else:
            raise NarError(f"unknown NAR node type {kind!r}")


class NarVerifier:
    """
    Check a NAR stream against the NarHash and NarSize a narinfo promised.

    Feed it the bytes as they are relayed; it hashes them, counts them and,
    with ``check_grammar``, checks the NAR grammar with a :class:`NarReader`.

    Hash and size alone decide whether the bytes are the NAR the narinfo's
    signer hashed: bytes with that SHA-256 are that NAR.  The grammar check
    only finds a broken stream before its end (at the cost of a parser in
    Python, about as much CPU as the rest of a relay), so the relay goes
    without it.
    """

    def __init__(self, expected_hash: Hash, expected_size: int, *, check_grammar: bool = True) -> None:
        self._expected_hash = expected_hash
        self._expected_size = expected_size
        self._hasher = hashlib.new(expected_hash.algo)
        self._size = 0
        self._reader = NarReader() if check_grammar else None
        self._error: NarError | None = None

    @property
    def size(self) -> int:
        """How many bytes were fed so far."""
        return self._size

    def feed(self, data: bytes) -> None:
        """
        :raises NarError: as soon as more than the expected size arrived or
            (with ``check_grammar``) the grammar is broken.
        """
        if self._error is not None:
            raise self._error
        self._size += len(data)
        if self._size > self._expected_size:
            self._error = NarError(f"size mismatch: more than the expected {self._expected_size} bytes")
            raise self._error
        self._hasher.update(data)
        if self._reader is None:
            return
        try:
            self._reader.feed(data)
        except NarError as e:
            self._error = e
            raise

    def finish(self) -> None:
        """
        :raises NarError: ``size mismatch`` if fewer bytes arrived than
            expected, ``hash mismatch`` if the digest differs, or a grammar
            error (with ``check_grammar``); returns only if the NAR is
            exactly what was promised.
        """
        if self._error is not None:
            raise self._error
        if self._size != self._expected_size:
            self._error = NarError(f"size mismatch: expected {self._expected_size} bytes, got {self._size}")
        elif self._hasher.digest() != self._expected_hash.digest:
            got = Hash(self._expected_hash.algo, self._hasher.digest())
            self._error = NarError(f"hash mismatch: expected {self._expected_hash}, got {got}")
        elif self._reader is not None:
            try:
                self._reader.finish()
            except NarError as e:
                self._error = e
        if self._error is not None:
            raise self._error
