"""
Verified test doubles for peernix's interfaces (every one is checked with
``verifyObject`` in the tests), and small helpers for tests of the web layer.

:class:`MemoryStore` keeps its path infos in memory but its store paths as
real files in a directory, so NARs, listings and logs can be produced from
it exactly as from a real store.  It computes NAR hashes with its own small
NAR writer (not :mod:`peernix.nix.nar`), so tests of code that uses
:func:`peernix.nix.nar.nar_chunks` are checked against an independent
implementation.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from peernix.interfaces import IStore, IStoreScanner, IUpstream
from peernix.store.scan import PathScan
from peernix.sources import Found, peer_source
from peernix.nix import nix32
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo
from peernix.nix.pathinfo import PathInfo
from peernix.nix.storepath import STORE_DIR, parse_store_path
from peernix.peers.errors import NarUnavailable

_T = TypeVar("_T")


def run_synchronously(f: Callable[[], _T], /) -> Deferred[_T]:
    """
    A ``defer_to_thread`` for unit tests: runs ``f`` at once on the calling
    thread.

    :returns: an already-fired Deferred with ``f``'s result, or failed with
        the exception it raised.
    """
    try:
        result = f()
    except Exception as e:
        return fail(e)
    return succeed(result)


# -- an independent NAR writer ------------------------------------------------


def _token(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar_pieces(path: str) -> Iterator[bytes]:
    """
    :returns: the NAR serialisation of ``path`` in pieces (file contents in
        64 KiB reads), written straight from the format description in
        nix-protocol.md §1.6.
    """
    yield _token(b"nix-archive-1")
    yield from _node(os.fsencode(path))


def _node(path: bytes) -> Iterator[bytes]:
    st = os.lstat(path)
    yield _token(b"(")
    yield _token(b"type")
    if stat.S_ISLNK(st.st_mode):
        yield _token(b"symlink") + _token(b"target") + _token(os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        yield _token(b"directory")
        for name in sorted(os.listdir(path)):
            yield _token(b"entry") + _token(b"(") + _token(b"name") + _token(name) + _token(b"node")
            yield from _node(os.path.join(path, name))
            yield _token(b")")
    else:
        yield _token(b"regular")
        if st.st_mode & stat.S_IXUSR:
            yield _token(b"executable") + _token(b"")
        yield _token(b"contents") + struct.pack("<Q", st.st_size)
        with open(path, "rb") as f:
            while chunk := f.read(65536):
                yield chunk
        yield b"\0" * (-st.st_size % 8)
    yield _token(b")")


def nar_bytes(path: str) -> bytes:
    """:returns: the whole NAR of ``path`` (tests only: small paths)."""
    return b"".join(nar_pieces(path))


def nar_hash_and_size(path: str) -> tuple[Hash, int]:
    """:returns: the sha256 and length of the NAR of ``path``, streamed."""
    hasher = hashlib.sha256()
    size = 0
    for piece in nar_pieces(path):
        hasher.update(piece)
        size += len(piece)
    return Hash("sha256", hasher.digest()), size


def fake_hash_part(name: str) -> str:
    """:returns: a deterministic 32-character nix32 hash part derived from ``name``."""
    return nix32.encode(hashlib.sha256(name.encode()).digest()[:20])


# -- MemoryStore ----------------------------------------------------------------


@implementer(IStore, IStoreScanner)
class MemoryStore:
    """
    An :class:`~peernix.interfaces.IStore` whose path infos live in a dict
    and whose files live under ``<root>/nix/store`` (logs under
    ``<root>/nix/var/log/nix/drvs``), like a chroot store.

    Every lookup answers synchronously (an already-fired Deferred).

    :ivar lookups: hash parts asked of :meth:`query_path_info`, in order.
    """

    store_dir = STORE_DIR

    def __init__(self, root: str) -> None:
        """:param root: an existing, writable directory (e.g. ``self.mktemp()`` made)."""
        self.root = root
        self.real_store_dir = os.path.join(root, "nix", "store")
        self.log_dir = os.path.join(root, "nix", "var", "log", "nix", "drvs")
        os.makedirs(self.real_store_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self._infos: dict[str, PathInfo] = {}
        self.lookups: list[str] = []
        #: Row ids, as the database's ``ValidPaths.id``: new for every added path.
        self._ids: dict[str, int] = {}
        self._next_id = 1
        #: Bumped by every change, as the database files' state.
        self._state = 0

    # building the store

    def add(
        self,
        name: str,
        write: Callable[[str], None],
        *,
        hash_part: str | None = None,
        references: tuple[str, ...] = (),
        sigs: tuple[str, ...] = (),
        deriver: str | None = None,
        ca: str | None = None,
    ) -> PathInfo:
        """
        Add a valid path ``/nix/store/<hash>-<name>``.

        :param write: called with the real filesystem path to create (a
            file, directory or symlink).
        :param hash_part: the hash part; derived from ``name`` when omitted.
        :param references: full store paths; the path itself may be among them.
        :returns: the path's info, with NarHash and NarSize of what was written.
        """
        store_path = f"{STORE_DIR}/{hash_part or fake_hash_part(name)}-{name}"
        parsed = parse_store_path(store_path)
        real = self.real_path(store_path)
        write(real)
        nar_hash, nar_size = nar_hash_and_size(real)
        info = PathInfo(
            path=store_path,
            nar_hash=nar_hash,
            nar_size=nar_size,
            references=references,
            deriver=deriver,
            sigs=sigs,
            ca=ca,
        )
        self._infos[parsed.hash_part] = info
        self._changed(parsed.hash_part)
        return info

    def add_file(self, name: str, contents: bytes, *, executable: bool = False, **kwargs: Any) -> PathInfo:
        """Add a path that is one regular file; ``kwargs`` as :meth:`add`."""

        def write(real: str) -> None:
            with open(real, "wb") as f:
                f.write(contents)
            os.chmod(real, 0o555 if executable else 0o444)

        return self.add(name, write, **kwargs)

    def add_tree(self, name: str, tree: dict[str, object], **kwargs: Any) -> PathInfo:
        """
        Add a path that is a directory: ``tree`` maps names to ``bytes``
        (a file), a ``dict`` (a subdirectory) or ``("symlink", target)``.
        ``kwargs`` as :meth:`add`.
        """

        def build(real: str, node: dict[str, object]) -> None:
            os.mkdir(real)
            for entry, value in node.items():
                target = os.path.join(real, entry)
                if isinstance(value, bytes):
                    with open(target, "wb") as f:
                        f.write(value)
                elif isinstance(value, dict):
                    build(target, value)
                else:
                    kind, link = cast(tuple[str, str], value)
                    assert kind == "symlink"
                    os.symlink(link, target)

        return self.add(name, lambda real: build(real, tree), **kwargs)

    def set_info(self, info: PathInfo) -> None:
        """Replace (or add) the database entry of ``info.path`` without touching files."""
        self._infos[info.hash_part] = info
        self._changed(info.hash_part)

    def evolve(self, hash_part: str, **changes: Any) -> PathInfo:
        """Change fields of a path's database entry (e.g. a different ``nar_hash``)."""
        info = attrs.evolve(self._infos[hash_part], **changes)
        self._infos[hash_part] = info
        self._changed(hash_part)
        return info

    def remove(self, hash_part: str) -> None:
        """Forget a path's database entry (its files stay, as after a failed GC)."""
        del self._infos[hash_part]
        del self._ids[hash_part]
        self._state += 1

    def _changed(self, hash_part: str) -> None:
        """A path was added or its entry changed: a new row id for a new path, and a new database state."""
        if hash_part not in self._ids:
            self._ids[hash_part] = self._next_id
            self._next_id += 1
        self._state += 1

    def add_log(self, drv_basename: str, text: bytes, *, compress: bool = False) -> str:
        """
        Write the build log of ``drv_basename`` where Nix keeps it.

        :returns: the log file's path (ending ``.bz2`` when ``compress``).
        """
        directory = os.path.join(self.log_dir, drv_basename[:2])
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, drv_basename[2:])
        if compress:
            path += ".bz2"
            text = bz2.compress(text)
        with open(path, "wb") as f:
            f.write(text)
        return path

    # IStore

    def query_path_info(self, hash_part: str) -> Deferred[PathInfo | None]:
        """See :meth:`peernix.interfaces.IStore.query_path_info`."""
        self.lookups.append(hash_part)
        return succeed(self._infos.get(hash_part))

    def real_path(self, store_path: str) -> str:
        """See :meth:`peernix.interfaces.IStore.real_path`."""
        return os.path.join(self.real_store_dir, parse_store_path(store_path).basename)

    def find_log(self, drv_basename: str) -> Deferred[str | None]:
        """See :meth:`peernix.interfaces.IStore.find_log`."""
        base = os.path.join(self.log_dir, drv_basename[:2], drv_basename[2:])
        for candidate in (base, base + ".bz2"):
            if os.path.isfile(candidate):
                return succeed(candidate)
        return succeed(None)

    def path_count(self) -> Deferred[int]:
        """:returns: the number of valid paths, like ``LocalStore.path_count``."""
        return succeed(len(self._infos))

    def database_state(self) -> Deferred[object]:
        """See :meth:`peernix.interfaces.IStoreScanner.database_state`."""
        return succeed(self._state)

    def scan_paths(self, after_id: int, accept: Callable[[PathInfo], bool]) -> Deferred[PathScan]:
        """See :meth:`peernix.interfaces.IStoreScanner.scan_paths` (synchronous here)."""
        newer = [(row, hash_part) for hash_part, row in self._ids.items() if row > after_id]
        return succeed(PathScan(
            hash_parts=tuple(h for _, h in newer if accept(self._infos[h])),
            rows=len(self._ids),
            max_id=max(self._ids.values(), default=0),
            scanned=len(newer),
        ))


# -- FakeUpstream ---------------------------------------------------------------


@implementer(IUpstream)
class FakeUpstream:
    """
    An :class:`~peernix.interfaces.IUpstream` standing for the LAN: answers
    from dicts, records every call, and can be told to fail.

    :ivar narinfos: hash part -> the narinfo a peer would give.
    :ivar nars: NarHash string (``sha256:<nix32>``) -> the NAR bytes a peer holds.
    :ivar lookups: hash parts asked of :meth:`lookup`, in order.
    :ivar relays: narinfos passed to :meth:`relay_nar`, in order.
    :ivar lookup_error: when set, :meth:`lookup` fails with it (a broken
        upstream; a correct one never fails).
    :ivar relay_error: when set, :meth:`relay_nar` writes the first
        ``relay_error_after`` bytes and then fails with it.
    :ivar hold_lookups: when true, :meth:`lookup` returns a Deferred that
        never fires by itself; they are kept in ``held`` and a cancellation
        is counted in ``cancelled``.
    :ivar peer_url: the base URL of "the peer" that answers (the source
        :meth:`find` names and :meth:`relay_nar` reports).
    """

    #: The default :attr:`peer_url` (a TEST-NET-1 address: never contacted).
    PEER_URL = "http://192.0.2.99:9999"

    def __init__(self) -> None:
        self.narinfos: dict[str, NarInfo] = {}
        self.nars: dict[str, bytes] = {}
        self.lookups: list[str] = []
        self.relays: list[NarInfo] = []
        self.lookup_error: Exception | None = None
        self.relay_error: Exception | None = None
        self.relay_error_after = 0
        self.hold_lookups = False
        self.held: list[Deferred[Found | None]] = []
        self.cancelled = 0
        self.peer_url = self.PEER_URL

    def add(self, info: NarInfo, nar: bytes | None = None) -> None:
        """Make ``info`` (and, when given, its NAR) available from "a peer"."""
        self.narinfos[info.store_path[len(STORE_DIR) + 1 :][:32]] = info
        if nar is not None:
            self.nars[info.nar_hash.to_string()] = nar

    def lookup(self, hash_part: str) -> Deferred[NarInfo | None]:
        """See :meth:`peernix.interfaces.IUpstream.lookup`."""
        return self.find(hash_part).addCallback(lambda found: None if found is None else found.info)

    def find(self, hash_part: str) -> Deferred[Found | None]:
        """See :meth:`peernix.interfaces.IUpstream.find`; the source is :attr:`peer_url`."""
        self.lookups.append(hash_part)
        if self.lookup_error is not None:
            return fail(self.lookup_error)
        if self.hold_lookups:

            def cancel(d: Deferred[Found | None]) -> None:
                self.cancelled += 1

            held: Deferred[Found | None] = Deferred(cancel)
            self.held.append(held)
            return held
        info = self.narinfos.get(hash_part)
        return succeed(None if info is None else Found(info, peer_source(self.peer_url)))

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """See :meth:`peernix.interfaces.IUpstream.relay_nar`; writes synchronously."""
        self.relays.append(info)
        nar = self.nars.get(info.nar_hash.to_string())
        if nar is None:
            return fail(NarUnavailable(info.store_path))
        if callable(on_peer):
            on_peer(self.peer_url)
        target = cast(IConsumer, consumer)
        if self.relay_error is not None:
            target.write(nar[: self.relay_error_after])
            return fail(self.relay_error)
        target.write(nar)
        return succeed(None)
