"""Tests for :mod:`peernix.store.local`, against real chroot stores made by Nix."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import attrs
from nacl.signing import VerifyKey
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.interfaces import IStore
from peernix.nix import nix32
from peernix.nix.narinfo import NarInfo, parse_narinfo
from peernix.nix.pathinfo import PathInfo
from peernix.store import local
from peernix.store.local import DB_PAGE_CACHE_KIB, LocalStore, StoreError
from peernix.test import nixenv
from peernix.test.nixenv import ChrootStore, Closure

TTL = 2.0


@implementer(IReactorFromThreads)
class ThreadlessClock(Clock):
    """A ``Clock`` whose ``callFromThread`` runs the call at once (there are no threads)."""

    def callFromThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


class ManualPool(ThreadPool):
    """
    A thread pool without threads: work is queued until the test calls
    :meth:`run_all`, which runs it on the calling thread.
    """

    def __init__(self) -> None:
        super().__init__(0, 1, name="manual")
        self.queue: list[tuple[Any, Callable[..., object], tuple[object, ...]]] = []
        self.calls = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any, **kw: Any) -> None:
        self.queue.append((onResult, func, args))

    def run_all(self) -> None:
        while self.queue:
            on_result, func, args = self.queue.pop(0)
            self.calls += 1
            try:
                result: object = func(*args)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            on_result(ok, result)


@attrs.frozen
class _Shared:
    """Paths in one chroot store, built on first use and shared by every test here."""

    tmp: str
    store: ChrootStore
    closure: Closure
    text: str
    text_ca: str
    secret_key_file: str
    public_key: str


_shared: list[_Shared] = []


def _get_shared() -> _Shared:
    """
    :returns: the module's shared store, building it the first time (in
        trial's ``_trial_temp``; trial has no per-class hooks).
    """
    if not _shared:
        tmp = os.path.abspath("store-local-shared")
        sk, _, pk = nixenv.generate_key(os.path.join(tmp, "keys"), "test-1")
        store = ChrootStore(os.path.join(tmp, "store"))
        closure = store.build_closure(secret_key_file=sk)
        text = store.add_text("hello.txt", "hello\n")
        text_ca = store.to_file("note", "a text path\n")
        _shared.append(_Shared(tmp, store, closure, text, text_ca, sk, pk))
    return _shared[0]


def _hash_part(path: str) -> str:
    return path.split("/")[3][:32]


def _copy_store(test: SynchronousTestCase, store: ChrootStore) -> str:
    """
    :returns: the root of a new store sharing ``store``'s files (a symlinked
        ``nix/store``) with a private copy of its DB, for tests that edit rows.
    """
    root: str = os.path.abspath(test.mktemp())
    os.makedirs(os.path.join(root, "nix", "var", "nix", "db"))
    os.symlink(store.store_dir, os.path.join(root, "nix", "store"))
    dest = sqlite3.connect(os.path.join(root, local.DB_RELPATH))
    with sqlite3.connect(f"file:{store.db_path}?mode=ro", uri=True) as src:
        src.backup(dest)
    dest.execute("PRAGMA journal_mode=WAL")
    dest.close()
    return root


def _write(root: str, sql: str, *args: object) -> None:
    conn = sqlite3.connect(os.path.join(root, local.DB_RELPATH))
    with conn:
        conn.execute(sql, args)
    conn.close()


def _make_store(test: SynchronousTestCase, root: str) -> tuple[LocalStore, ThreadlessClock, ManualPool]:
    clock = ThreadlessClock()
    pool = ManualPool()
    store = LocalStore(root, clock, cache_ttl=TTL, threadpool=pool, inline=False)
    store.start()
    test.addCleanup(store.stop)
    return store, clock, pool


def _query(test: SynchronousTestCase, store: LocalStore, pool: ManualPool, hash_part: str) -> PathInfo | None:
    d = store.query_path_info(hash_part)
    pool.run_all()
    result: PathInfo | None = test.successResultOf(d)
    return result


class _OnACopy(SynchronousTestCase):
    """A started store over a copy of the shared store, with a manual pool; stopped at clean-up."""

    skip = nixenv.SKIP_NO_BUILD
    #: Passed to :class:`LocalStore`.
    store_options: dict[str, Any] = {}
    shared: _Shared
    root: str
    clock: ThreadlessClock
    pool: ManualPool
    store: LocalStore

    def setUp(self) -> None:
        self.shared = _get_shared()
        self.root = _copy_store(self, self.shared.store)
        self.clock = ThreadlessClock()
        self.pool = ManualPool()
        self.store = LocalStore(self.root, self.clock, cache_ttl=TTL, threadpool=self.pool, **self.store_options)
        self.store.start()
        self.addCleanup(self.store.stop)


class InlineLookupTests(_OnACopy):
    """The default: lookups on the calling (reactor) thread, a worker only when SQLite is locked."""

    def test_answered_without_a_worker(self) -> None:
        """A hit and a miss are answered at once, with no work for the pool, and cached."""
        info = self.successResultOf(self.store.query_path_info(_hash_part(self.shared.text)))
        assert info is not None
        self.assertEqual(info.path, self.shared.text)
        self.assertIsNone(self.successResultOf(self.store.query_path_info("0" * 32)))
        self.assertEqual(self.pool.queue, [])
        self.assertIn(_hash_part(self.shared.text), self.store._cache)

    def test_locked_database_goes_to_a_worker(self) -> None:
        """When SQLite would have to wait for a lock, a worker does the lookup (and may wait); nothing blocks."""
        db = os.path.join(self.root, local.DB_RELPATH)
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("BEGIN EXCLUSIVE")
        d = self.store.query_path_info(_hash_part(self.shared.text))
        self.assertNoResult(d)
        self.assertEqual(len(self.pool.queue), 1)
        conn.execute("COMMIT")
        conn.close()
        self.pool.run_all()
        info = self.successResultOf(d)
        assert info is not None
        self.assertEqual(info.path, self.shared.text)

    def test_before_start_waits_for_a_worker(self) -> None:
        """A store not started yet never answers on the calling thread."""
        store = LocalStore(self.root, self.clock, cache_ttl=TTL, threadpool=ManualPool())
        self.assertNoResult(store.query_path_info(_hash_part(self.shared.text)))


class LookupTests(SynchronousTestCase):
    """``LocalStore._lookup``: one DB row and the files, read synchronously."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        self.shared = _get_shared()
        self.nix = self.shared.store
        self.store, self.clock, self.pool = _make_store(self, self.nix.root)

    def test_provides_istore(self) -> None:
        """LocalStore provides IStore."""
        self.assertTrue(verifyObject(IStore, self.store))

    def test_text_path(self) -> None:
        """A nix-store --add path has its NarHash, NarSize, no references, no deriver, a fixed:r CA."""
        path = self.shared.text
        info = self.store._lookup(_hash_part(path))
        assert info is not None
        nar = self.nix.dump(path)
        self.assertEqual(info.path, path)
        self.assertEqual(info.nar_hash.digest, hashlib.sha256(nar).digest())
        self.assertEqual(info.nar_hash.algo, "sha256")
        self.assertEqual(info.nar_size, len(nar))
        self.assertEqual(info.references, ())
        self.assertIsNone(info.deriver)
        self.assertEqual(info.sigs, ())
        self.assertEqual(info.ca, "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
        self.assertGreater(info.registration_time, 0)

    def test_text_ca(self) -> None:
        """A builtins.toFile path keeps its text: CA verbatim."""
        info = self.store._lookup(_hash_part(self.shared.text_ca))
        assert info is not None
        ca = self.nix.path_info_json([self.shared.text_ca])[0]["ca"]
        self.assertEqual(info.ca, ca)
        assert info.ca is not None
        self.assertTrue(info.ca.startswith("text:sha256:"))

    def test_references_sorted_with_self_reference(self) -> None:
        """References are full paths, sorted, and keep a self-reference."""
        c = self.shared.closure
        top = self.store._lookup(_hash_part(c.top))
        mid = self.store._lookup(_hash_part(c.mid))
        leaf = self.store._lookup(_hash_part(c.leaf))
        assert top is not None and mid is not None and leaf is not None
        self.assertEqual(top.references, tuple(sorted([c.mid, c.top])))
        self.assertEqual(mid.references, (c.leaf,))
        self.assertEqual(leaf.references, ())

    def test_deriver(self) -> None:
        """The deriver is the full .drv path Nix recorded."""
        c = self.shared.closure
        for out in c.outputs:
            info = self.store._lookup(_hash_part(out))
            assert info is not None
            self.assertEqual(info.deriver, c.derivers[out])

    def test_build_signatures_verify(self) -> None:
        """Signatures Nix wrote at build time are returned and verify against the fingerprint."""
        name, key = self.shared.public_key.split(":")
        verify_key = VerifyKey(base64.b64decode(key))
        for out in self.shared.closure.outputs:
            info = self.store._lookup(_hash_part(out))
            assert info is not None
            self.assertEqual(len(info.sigs), 1)
            sig_name, sig = info.sigs[0].split(":")
            self.assertEqual(sig_name, name)
            fingerprint = NarInfo.from_path_info(info, "nar/x.nar").fingerprint()
            verify_key.verify(fingerprint, base64.b64decode(sig))

    def test_matches_nix_narinfo(self) -> None:
        """Every field Nix writes to its own narinfo for a path matches the lookup."""
        c = self.shared.closure
        cache = os.path.abspath(self.mktemp())
        self.nix.copy_to_file_cache([c.top, self.shared.text], cache)
        for path in (c.top, c.mid, c.leaf, self.shared.text):
            h = _hash_part(path)
            with open(os.path.join(cache, f"{h}.narinfo"), "rb") as f:
                theirs = parse_narinfo(f.read())
            info = self.store._lookup(h)
            assert info is not None
            ours = NarInfo.from_path_info(info, theirs.url)
            self.assertEqual(
                (ours.store_path, ours.nar_hash, ours.nar_size, ours.references, ours.deriver, ours.sigs, ours.ca),
                (theirs.store_path, theirs.nar_hash, theirs.nar_size, theirs.references, theirs.deriver, theirs.sigs, theirs.ca),
            )
            # compression=none: FileHash/FileSize as Nix's own writer gives them.
            self.assertEqual((ours.file_hash, ours.file_size), (theirs.file_hash, theirs.file_size))
            self.assertIsNotNone(ours.file_hash)

    def test_malformed_sigs_dropped(self) -> None:
        """Signatures that are not name:base64(64 bytes) are dropped; good ones keep their order."""
        root = _copy_store(self, self.nix)
        good1 = "a-1:" + base64.b64encode(b"\x01" * 64).decode()
        good2 = "b-1:" + base64.b64encode(b"\x02" * 64).decode()
        bad = [
            "nocolon",
            ":" + base64.b64encode(b"\x00" * 64).decode(),
            "c-1:!!!",
            "d-1:" + base64.b64encode(b"x" * 63).decode(),
        ]
        sigs = "  ".join([bad[0], good1, bad[1], bad[2], "\t", good2, bad[3]])
        _write(root, "UPDATE ValidPaths SET sigs = ? WHERE path = ?", sigs, self.shared.text)
        store, _, _ = _make_store(self, root)
        info = store._lookup(_hash_part(self.shared.text))
        assert info is not None
        self.assertEqual(info.sigs, (good1, good2))

    def test_null_nar_size_not_served(self) -> None:
        """A row whose narSize is NULL (or 0) is not served."""
        root = _copy_store(self, self.nix)
        store, _, _ = _make_store(self, root)
        h = _hash_part(self.shared.text)
        _write(root, "UPDATE ValidPaths SET narSize = NULL WHERE path = ?", self.shared.text)
        self.assertIsNone(store._lookup(h))
        _write(root, "UPDATE ValidPaths SET narSize = 0 WHERE path = ?", self.shared.text)
        self.assertIsNone(store._lookup(h))

    def test_bad_hash_column_not_served(self) -> None:
        """A row whose hash column is not a sha256 hash is not served."""
        root = _copy_store(self, self.nix)
        store, _, _ = _make_store(self, root)
        _write(root, "UPDATE ValidPaths SET hash = 'sha256:zz' WHERE path = ?", self.shared.text)
        self.assertIsNone(store._lookup(_hash_part(self.shared.text)))

    def test_empty_ca_is_none(self) -> None:
        """An empty ca column means no CA."""
        root = _copy_store(self, self.nix)
        store, _, _ = _make_store(self, root)
        _write(root, "UPDATE ValidPaths SET ca = '' WHERE path = ?", self.shared.text)
        info = store._lookup(_hash_part(self.shared.text))
        assert info is not None
        self.assertIsNone(info.ca)

    def test_lock_file_hides_path(self) -> None:
        """While <path>.lock exists the path is not served."""
        path = self.nix.add_text("locked", "being written")
        lock = self.nix.real_path(path) + ".lock"
        with open(lock, "w"):
            pass
        self.addCleanup(os.unlink, lock)
        self.assertIsNone(self.store._lookup(_hash_part(path)))
        os.unlink(lock)
        self.assertIsNotNone(self.store._lookup(_hash_part(path)))
        with open(lock, "w"):
            pass

    def test_missing_on_disk(self) -> None:
        """A path the DB lists but whose files are gone is not served."""
        path = self.nix.add_text("vanishing", "soon gone")
        self.assertIsNotNone(self.store._lookup(_hash_part(path)))
        os.unlink(self.nix.real_path(path))
        self.assertIsNone(self.store._lookup(_hash_part(path)))

    def test_hash_sorting_just_before_existing_path_is_a_miss(self) -> None:
        """A hash part that sorts just before an existing path does not match that path."""
        path = self.shared.text
        h = _hash_part(path)
        # The largest hash part that is smaller than h: decrement the last
        # character that can be decremented and max out the ones after it.
        alphabet = nix32.ALPHABET
        chars = list(h)
        i = len(chars) - 1
        while chars[i] == alphabet[0]:
            chars[i] = alphabet[-1]
            i -= 1
        chars[i] = alphabet[alphabet.index(chars[i]) - 1]
        before = "".join(chars)
        self.assertLess(before, h)
        self.assertIsNone(self.store._lookup(before))
        # A prefix of the real hash part padded with the smallest character too.
        self.assertIsNone(self.store._lookup(h[:31] + alphabet[0] if h[31] != alphabet[0] else before))
        self.assertIsNotNone(self.store._lookup(h))

    def test_past_last_path_is_a_miss(self) -> None:
        """A hash part sorting after every path in the store is a miss."""
        self.assertIsNone(self.store._lookup("z" * 32))
        self.assertIsNone(self.store._lookup("0" * 32))

    def test_lookup_during_write_transaction(self) -> None:
        """Lookups succeed while another connection holds a write transaction (WAL)."""
        root = _copy_store(self, self.nix)
        store, _, _ = _make_store(self, root)
        writer = sqlite3.connect(os.path.join(root, local.DB_RELPATH), isolation_level=None)
        self.addCleanup(writer.close)
        self.assertEqual(writer.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE ValidPaths SET sigs = 'x' WHERE path = ?", (self.shared.text,))
        start = time.monotonic()
        info = store._lookup(_hash_part(self.shared.closure.top))
        self.assertIsNotNone(info)
        # The uncommitted change is invisible.
        text = store._lookup(_hash_part(self.shared.text))
        assert text is not None
        self.assertEqual(text.sigs, ())
        self.assertLess(time.monotonic() - start, 2.0)
        writer.execute("COMMIT")

    def test_real_db_is_wal(self) -> None:
        """Nix keeps its DB in WAL mode (the reason readers never block it)."""
        with sqlite3.connect(f"file:{self.nix.db_path}?mode=ro", uri=True) as conn:
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_db_error_raises_store_error(self) -> None:
        """A database that breaks under a running store makes lookups fail with StoreError."""
        root = _copy_store(self, self.nix)
        store, _, _ = _make_store(self, root)
        self.assertIsNotNone(store._lookup(_hash_part(self.shared.text)))
        _write(root, "DROP TABLE Refs")
        self.assertRaises(StoreError, store._lookup, _hash_part(self.shared.closure.top))


class QueryPathInfoTests(SynchronousTestCase):
    """``query_path_info``: caching and coalescing around ``_lookup``."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        self.shared = _get_shared()
        self.nix = self.shared.store
        self.store, self.clock, self.pool = _make_store(self, self.nix.root)

    def test_hit(self) -> None:
        """A known hash part gives the path's info through the pool."""
        info = _query(self, self.store, self.pool, _hash_part(self.shared.text))
        assert info is not None
        self.assertEqual(info.path, self.shared.text)
        self.assertEqual(self.pool.calls, 1)

    def test_cached_within_ttl(self) -> None:
        """A second query within the TTL is answered from the cache, a miss included."""
        h = _hash_part(self.shared.text)
        miss = "0" * 32
        first = _query(self, self.store, self.pool, h)
        self.assertIsNone(_query(self, self.store, self.pool, miss))
        self.clock.advance(TTL - 0.1)
        self.assertEqual(self.successResultOf(self.store.query_path_info(h)), first)
        self.assertIsNone(self.successResultOf(self.store.query_path_info(miss)))
        self.assertEqual(self.pool.calls, 2)
        self.clock.advance(0.2)
        _query(self, self.store, self.pool, h)
        self.assertEqual(self.pool.calls, 3)

    def test_gc_stops_serving_after_ttl(self) -> None:
        """A garbage-collected path is served from cache until the TTL passes, then not at all."""
        path = self.nix.add_text("collectable", "gc me")
        h = _hash_part(path)
        self.assertIsNotNone(_query(self, self.store, self.pool, h))
        self.nix.delete(path)
        self.assertIsNotNone(self.successResultOf(self.store.query_path_info(h)))
        self.clock.advance(TTL)
        self.assertIsNone(_query(self, self.store, self.pool, h))

    def test_coalesced(self) -> None:
        """Concurrent queries for one hash part share one lookup; each caller gets its own Deferred."""
        h = _hash_part(self.shared.text)
        d1 = self.store.query_path_info(h)
        d2 = self.store.query_path_info(h)
        self.assertIsNot(d1, d2)
        self.assertEqual(len(self.pool.queue), 1)
        self.pool.run_all()
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))

    def test_cancel_one_waiter(self) -> None:
        """Cancelling one caller's Deferred leaves the other's lookup intact."""
        h = _hash_part(self.shared.text)
        d1 = self.store.query_path_info(h)
        d2 = self.store.query_path_info(h)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.pool.run_all()
        info = self.successResultOf(d2)
        assert info is not None
        self.assertEqual(info.path, self.shared.text)

    def test_cache_bounded(self) -> None:
        """The cache never holds more than cache_size entries."""
        store = LocalStore(self.nix.root, self.clock, cache_ttl=TTL, threadpool=self.pool, cache_size=3,
                           inline=False)
        store.start()
        self.addCleanup(store.stop)
        for i in range(10):
            _query(self, store, self.pool, nix32.ALPHABET[i] * 32)
        self.assertEqual(len(store._cache), 3)

    def test_invalid_hash_part(self) -> None:
        """A hash part that is not 32 nix32 characters fails with ValueError without touching the DB."""
        for bad in ("", "abc", "e" * 32, "0" * 33, "/" + "0" * 31):
            self.failureResultOf(self.store.query_path_info(bad), ValueError)
        self.assertEqual(self.pool.queue, [])

    def test_db_error_fails_every_waiter_and_is_not_cached(self) -> None:
        """A database error fails the waiting callers with StoreError and is retried next time."""
        root = _copy_store(self, self.nix)
        store, _, pool = _make_store(self, root)
        _write(root, "ALTER TABLE ValidPaths RENAME TO Gone")
        h = _hash_part(self.shared.text)
        d1 = store.query_path_info(h)
        d2 = store.query_path_info(h)
        pool.run_all()
        self.failureResultOf(d1, StoreError)
        self.failureResultOf(d2, StoreError)
        _write(root, "ALTER TABLE Gone RENAME TO ValidPaths")
        self.assertIsNotNone(_query(self, store, pool, h))

    def test_stopped(self) -> None:
        """After stop(), queries fail with StoreError instead of hanging."""
        self.store.stop()
        self.failureResultOf(self.store.query_path_info(_hash_part(self.shared.text)), StoreError)
        self.failureResultOf(self.store.path_count(), StoreError)

    def test_path_count(self) -> None:
        """path_count is the number of rows in ValidPaths."""
        with sqlite3.connect(f"file:{self.nix.db_path}?mode=ro", uri=True) as conn:
            expected = conn.execute("SELECT COUNT(*) FROM ValidPaths").fetchone()[0]
        d = self.store.path_count()
        self.pool.run_all()
        self.assertEqual(self.successResultOf(d), expected)


def _remove_if_there(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def _age_db_files(root: str) -> None:
    """Date the database files 10 s back, so a check sees them as settled."""
    old = time.time() - 10
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(root, local.DB_RELPATH) + suffix
        if os.path.exists(path):
            os.utime(path, (old, old))


class RevalidationTests(_OnACopy):
    """``revalidate=True``: expired entries are served on while the database files are unchanged."""

    store_options = {"revalidate": True, "inline": False}

    def setUp(self) -> None:
        super().setUp()
        self.h = _hash_part(self.shared.text)

    def _extendable(self, hash_part: str) -> PathInfo | None:
        """
        Bring ``hash_part``'s entry to where revalidation may extend it: looked
        up after a first check of the (settled) files, expired once and looked
        up again, then a check shortly before its expiry confirmed the files.
        The clock ends at that entry's expiry, with no work queued.
        """
        first = _query(self, self.store, self.pool, hash_part)
        # The read-only connection made the WAL files just now; settle them.
        _age_db_files(self.root)
        self.clock.advance(TTL / 4)
        self.assertEqual(self.successResultOf(self.store.query_path_info(hash_part)), first)
        self.pool.run_all()  # the first check: the files as they are
        self.clock.advance(TTL)
        # Expired, and looked up before the first check: a new lookup.
        self.assertEqual(_query(self, self.store, self.pool, hash_part), first)
        # A hit shortly before expiry starts a check that confirms the files.
        self.clock.advance(TTL - TTL / 4)
        self.assertEqual(self.successResultOf(self.store.query_path_info(hash_part)), first)
        self.pool.run_all()
        self.clock.advance(TTL / 4)
        return first

    def test_unchanged_db_extends_expired_entry(self) -> None:
        """An expired entry is answered at once, without a lookup, while a recent check saw the DB unchanged."""
        info = self._extendable(self.h)
        self.assertIsNotNone(info)
        calls = self.pool.calls
        d = self.store.query_path_info(self.h)
        self.assertEqual(self.successResultOf(d), info)
        # Only the periodic check of the files was queued, no lookup.
        self.assertEqual([func.__name__ for _, func, _ in self.pool.queue], ["_db_files_state"])
        self.pool.run_all()
        self.assertEqual(self.pool.calls, calls + 1)
        # Misses are extended too.
        miss = "0" * 32
        self.assertIsNone(self._extendable(miss))
        self.assertIsNone(self.successResultOf(self.store.query_path_info(miss)))
        self.assertEqual([func.__name__ for _, func, _ in self.pool.queue], ["_db_files_state"])

    def test_change_seen_within_ttl(self) -> None:
        """A path deleted from the database stops being served within cache_ttl of the change."""
        self.assertIsNotNone(self._extendable(self.h))
        self.assertIsNotNone(self.successResultOf(self.store.query_path_info(self.h)))
        self.pool.run_all()
        changed_at = self.clock.seconds()
        _write(self.root, "DELETE FROM ValidPaths WHERE path = ?", self.shared.text)
        while True:
            self.clock.advance(0.1)
            info = _query(self, self.store, self.pool, self.h)
            if info is None:
                break
            self.assertLess(self.clock.seconds() - changed_at, TTL)
        self.assertLessEqual(self.clock.seconds() - changed_at, TTL)

    def test_missing_on_disk_not_extended(self) -> None:
        """A row whose path is missing on disk is re-checked after cache_ttl, never extended."""
        ghost = f"/nix/store/{'1' * 32}-ghost"
        _write(
            self.root,
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize)"
            " SELECT ?, hash, registrationTime, narSize FROM ValidPaths WHERE path = ?",
            ghost,
            self.shared.text,
        )
        h = "1" * 32
        self.assertIsNone(self._extendable(h))
        d = self.store.query_path_info(h)
        self.assertNoResult(d)
        self.assertIn("_lookup_durable", [func.__name__ for _, func, _ in self.pool.queue])
        self.pool.run_all()
        self.assertIsNone(self.successResultOf(d))

    def test_lock_not_extended(self) -> None:
        """A path hidden by its .lock file is looked up again after cache_ttl, so it shows once the lock goes."""
        lock = self.store.real_path(self.shared.text) + ".lock"
        with open(lock, "w"):
            pass
        self.addCleanup(_remove_if_there, lock)
        self.assertIsNone(self._extendable(self.h))
        os.remove(lock)
        info = _query(self, self.store, self.pool, self.h)
        assert info is not None
        self.assertEqual(info.path, self.shared.text)

    def test_idle_then_new_lookup(self) -> None:
        """After more than cache_ttl without lookups (so without checks), an expired entry is looked up again."""
        self.assertIsNotNone(self._extendable(self.h))
        self.clock.advance(TTL)
        d = self.store.query_path_info(self.h)
        self.assertNoResult(d)
        self.assertEqual(
            sorted(func.__name__ for _, func, _ in self.pool.queue), ["_db_files_state", "_lookup_durable"]
        )
        self.pool.run_all()
        self.assertIsNotNone(self.successResultOf(d))

    def test_off_by_default(self) -> None:
        """Without revalidate=True an expired entry is always looked up again."""
        store, clock, pool = _make_store(self, self.root)
        _query(self, store, pool, self.h)
        _age_db_files(self.root)
        for _ in range(3):
            clock.advance(TTL)
            calls = pool.calls
            _query(self, store, pool, self.h)
            self.assertEqual(pool.calls, calls + 1)


class FindLogTests(SynchronousTestCase):
    """``find_log``: build logs below nix/var/log/nix/drvs."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        self.shared = _get_shared()
        self.store, _, self.pool = _make_store(self, self.shared.store.root)

    def _find(self, name: str) -> str | None:
        d = self.store.find_log(name)
        self.pool.run_all()
        result: str | None = self.successResultOf(d)
        return result

    def test_bz2_log_of_a_build(self) -> None:
        """The bzip2 log Nix wrote for a build is found."""
        drv = self.shared.closure.derivers[self.shared.closure.top].split("/")[-1]
        found = self._find(drv)
        assert found is not None
        self.assertTrue(found.endswith(f"/nix/var/log/nix/drvs/{drv[:2]}/{drv[2:]}.bz2"))
        self.assertTrue(os.path.isfile(found))

    def test_plain_log(self) -> None:
        """An uncompressed log is found, and preferred to a .bz2 one."""
        root = os.path.abspath(self.mktemp())
        drv = "1" * 32 + "-plain.drv"
        logdir = os.path.join(root, "nix/var/log/nix/drvs", drv[:2])
        os.makedirs(logdir)
        for suffix in ("", ".bz2"):
            with open(os.path.join(logdir, drv[2:] + suffix), "w") as f:
                f.write("log")
        store, _, pool = _make_store(self, root)
        d = store.find_log(drv)
        pool.run_all()
        self.assertEqual(self.successResultOf(d), os.path.join(logdir, drv[2:]))

    def test_missing(self) -> None:
        """A derivation without a log gives None."""
        self.assertIsNone(self._find("2" * 32 + "-nolog.drv"))

    def test_invalid_names(self) -> None:
        """Names that are not <hash>-<name>.drv fail with ValueError."""
        for bad in ("../../etc/passwd", "1" * 32 + "-x", "short-x.drv", "1" * 32 + "-a/b.drv"):
            self.failureResultOf(self.store.find_log(bad), ValueError)


class RealPathTests(SynchronousTestCase):
    """``real_path`` maps logical store paths below the store root."""

    def setUp(self) -> None:
        self.store = LocalStore("/tmp/root", ThreadlessClock())

    def test_maps_below_root(self) -> None:
        """A path in /nix/store maps to <root>/nix/store/..."""
        self.assertEqual(self.store.real_path("/nix/store/abc-x/bin/y"), "/tmp/root/nix/store/abc-x/bin/y")

    def test_system_root(self) -> None:
        """With root / the path is unchanged."""
        store = LocalStore("/", ThreadlessClock())
        self.assertEqual(store.real_path("/nix/store/abc-x"), "/nix/store/abc-x")

    def test_rejects_outside(self) -> None:
        """Paths not strictly below /nix/store, or with . or .. parts, are refused."""
        for bad in (
            "/etc/passwd",
            "/nix/store",
            "/nix/store/",
            "/nix/store/../etc",
            "/nix/store/a/../../x",
            "nix/store/a",
            "/nix/storex/a",
            "/nix/store//a",
        ):
            self.assertRaises(ValueError, self.store.real_path, bad)


def _nix_schema_db(path: str, tables: tuple[str, ...] = ("ValidPaths", "Refs")) -> None:
    """Make a DB at ``path`` with the named tables of Nix's schema (enough for check())."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path)
    if "ValidPaths" in tables:
        conn.execute(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null,"
            " hash text not null, registrationTime integer not null, deriver text, narSize integer,"
            " ultimate integer, sigs text, ca text)"
        )
    if "Refs" in tables:
        conn.execute(
            "CREATE TABLE Refs (referrer integer not null, reference integer not null,"
            " primary key (referrer, reference))"
        )
    if not tables:
        conn.execute("CREATE TABLE Other (x)")
    conn.commit()
    conn.close()


class CheckTests(SynchronousTestCase):
    """``check`` explains in one line what is wrong with the store root."""

    def _check_error(self, root: str) -> str:
        store = LocalStore(root, ThreadlessClock())
        message = str(self.assertRaises(StoreError, store.check))
        self.assertNotIn("\n", message)
        return message

    def test_good(self) -> None:
        """A store root with a Nix DB and a store directory passes."""
        root = os.path.abspath(self.mktemp())
        _nix_schema_db(os.path.join(root, local.DB_RELPATH))
        os.makedirs(os.path.join(root, "nix", "store"))
        LocalStore(root, ThreadlessClock()).check()

    def test_missing_db(self) -> None:
        """A root without a DB names the missing file and the --store-root fix."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        message = self._check_error(root)
        self.assertIn(f"cannot open the Nix database {root}/nix/var/nix/db/db.sqlite: no such file", message)
        self.assertIn("--store-root", message)

    def test_missing_root(self) -> None:
        """A root that does not exist at all gets the same missing-DB message."""
        self.assertIn("no such file", self._check_error(os.path.abspath(self.mktemp())))

    def test_unreadable_db(self) -> None:
        """A DB that cannot be read for lack of permission says so and how to fix it."""
        root = os.path.abspath(self.mktemp())
        _nix_schema_db(os.path.join(root, local.DB_RELPATH))

        def denied(path: str) -> bytes:
            raise PermissionError(13, "Permission denied", path)

        self.patch(local, "_read_header", denied)
        message = self._check_error(root)
        self.assertIn("permission denied", message)
        self.assertIn("run peernix as a user who can read it", message)

    def test_not_sqlite(self) -> None:
        """A DB file that is not SQLite at all is reported as not a Nix database."""
        root = os.path.abspath(self.mktemp())
        db = os.path.join(root, local.DB_RELPATH)
        os.makedirs(os.path.dirname(db))
        with open(db, "wb") as f:
            f.write(b"this is not a database at all\n")
        self.assertIn("is not an SQLite database", self._check_error(root))

    def test_db_is_directory(self) -> None:
        """A directory where the DB should be is reported."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, local.DB_RELPATH))
        self.assertIn("it is a directory", self._check_error(root))

    def test_not_a_nix_db(self) -> None:
        """An SQLite DB without ValidPaths is reported as not a Nix store database."""
        root = os.path.abspath(self.mktemp())
        _nix_schema_db(os.path.join(root, local.DB_RELPATH), tables=())
        os.makedirs(os.path.join(root, "nix", "store"))
        message = self._check_error(root)
        self.assertIn("is an SQLite database but not a Nix store database (no Refs or ValidPaths table", message)

    def test_missing_store_dir(self) -> None:
        """A DB without a nix/store directory next to it is reported."""
        root = os.path.abspath(self.mktemp())
        _nix_schema_db(os.path.join(root, local.DB_RELPATH))
        self.assertIn(f"the store directory {root}/nix/store is missing", self._check_error(root))

    def test_real_chroot_store(self) -> None:
        """A chroot store made by nix-store passes."""
        if nixenv.SKIP_NO_NIX:
            raise self.skipTest(nixenv.SKIP_NO_NIX)
        store = ChrootStore(os.path.abspath(self.mktemp()))
        self.addCleanup(store.remove)
        LocalStore(store.root, ThreadlessClock()).check()


class RealReactorTests(TestCase):
    """The store with the real reactor and its real thread pool."""

    skip = nixenv.SKIP_NO_BUILD

    async def test_threaded_lookups(self) -> None:
        """Lookups, log search and counting work through the real pool and come back to the reactor."""
        # The reactor trial is running; only tests may take it from here.
        from twisted.internet import reactor

        shared = _get_shared()
        store = LocalStore(shared.store.root, reactor, threads=2)
        store.check()
        store.start()
        self.addCleanup(store.stop)
        c = shared.closure
        results = [await store.query_path_info(_hash_part(p)) for p in c.outputs]
        self.assertEqual([r.path if r else None for r in results], list(c.outputs))
        self.assertIsNone(await store.query_path_info("0" * 32))
        self.assertGreater(await store.path_count(), 3)
        log = await store.find_log(c.derivers[c.top].split("/")[-1])
        assert log is not None
        self.assertTrue(log.endswith(".bz2"))
        # Several at once, on several threads.
        many = await gatherResults([store.query_path_info(_hash_part(p)) for p in (c.leaf, c.mid, c.top, shared.text)] * 3)
        self.assertEqual(len([m for m in many if m is not None]), 12)

    def test_stop_closes_connections(self) -> Deferred[None]:
        """stop() closes every connection the workers opened."""
        from twisted.internet import reactor

        shared = _get_shared()
        store = LocalStore(shared.store.root, reactor, threads=2)
        store.start()
        d = store.query_path_info(_hash_part(shared.text))

        def stop(_: object) -> None:
            conns = list(store._connections)
            self.assertEqual(len(conns), 1)
            # Each connection has the small page cache, not SQLite's 2 MB.
            self.assertEqual(conns[0].execute("PRAGMA cache_size").fetchone(), (-DB_PAGE_CACHE_KIB,))
            store.stop()
            self.assertEqual(store._connections, [])
            self.assertRaises(sqlite3.ProgrammingError, conns[0].execute, "SELECT 1")

        return d.addCallback(stop)
