"""
The local Nix store, read straight from Nix's SQLite database and files.

Nix keeps one row per valid path in ``ValidPaths`` and the reference graph in
``Refs`` (``schema.sql``).  We open that database read-only; it runs in WAL
mode, so our readers never block Nix's writers nor wait for them.  Every
database or filesystem access runs on a small dedicated thread pool, never on
the reactor thread; a short-lived cache keeps hot narinfos off that pool.
"""

from __future__ import annotations

import os
import posixpath
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer


from peernix.interfaces import IStore, IStoreScanner
from peernix.nix.hashes import HashError, parse_hash
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import is_well_formed_sig
from peernix.nix.storepath import STORE_DIR, StorePathError, is_hash_part, parse_basename, parse_store_path
from peernix.store.scan import PathScan

__all__ = ["LocalStore", "PathScan", "StoreError"]

_log = Logger()

#: A database file whose modification time is closer to now than this may
#: still change without its time changing (timestamps are kept at the
#: kernel's tick, a few ms): such an observation does not confirm the cache.
SETTLE_SECONDS = 0.1

#: What identifies one version of a database file: ``(inode, size,
#: mtime_ns)``, or ``None`` when it does not exist.
_FileState = tuple[int, int, int] | None

#: Relative to the store root.
DB_RELPATH = "nix/var/nix/db/db.sqlite"
STORE_RELPATH = "nix/store"
LOG_RELPATH = "nix/var/log/nix/drvs"

#: How long a worker waits for a SQLite lock before failing (seconds).  In WAL
#: mode readers only wait during rare recovery, so this bounds a stuck lookup.
BUSY_TIMEOUT = 10.0

#: SQLite's result codes for "would have to wait for a lock".
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Busy(Exception):
    """A lookup that must not wait found the database locked."""


_SQLITE_MAGIC = b"SQLite format 3\x00"

_ROW_QUERY = (
    "SELECT id, path, hash, registrationTime, deriver, narSize, sigs, ca"
    " FROM ValidPaths WHERE path >= ? ORDER BY path LIMIT 1"
)
#: Rows per read transaction of :meth:`LocalStore.tally_path_infos`.
SCAN_BATCH = 500
_SCAN_QUERY = (
    "SELECT id, path, hash, registrationTime, deriver, narSize, sigs, ca"
    " FROM ValidPaths WHERE path > ? ORDER BY path LIMIT ?"
)
# The references of exactly the rows of _SCAN_QUERY, in the same snapshot.
_SCAN_REFS_QUERY = (
    "SELECT referrer, ValidPaths.path FROM Refs JOIN ValidPaths ON reference = ValidPaths.id"
    " WHERE referrer IN (SELECT id FROM ValidPaths WHERE path > ? ORDER BY path LIMIT ?)"
)
# The store digest's scans go by row id: Nix's ValidPaths.id is an
# AUTOINCREMENT key, so rows added later always have higher ids.
_ID_SCAN_QUERY = (
    "SELECT id, path, hash, registrationTime, deriver, narSize, sigs, ca"
    " FROM ValidPaths WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
)
_ID_SCAN_REFS_QUERY = (
    "SELECT referrer, ValidPaths.path FROM Refs JOIN ValidPaths ON reference = ValidPaths.id"
    " WHERE referrer IN (SELECT id FROM ValidPaths WHERE id > ? AND id <= ? ORDER BY id LIMIT ?)"
)
# Nix's own query (local-store.cc queryReferences); rows come back unsorted.
_REFS_QUERY = "SELECT path FROM Refs JOIN ValidPaths ON reference = id WHERE referrer = ?"


class StoreError(Exception):
    """
    The local store cannot be used: a one-line message saying what is wrong
    and how to fix it (raised by :meth:`LocalStore.check`), or a database
    error during a lookup.
    """


def _read_header(path: str) -> bytes:
    """
    :returns: the first 16 bytes of ``path``.
    :raises OSError: as ``open`` does (a seam for tests of unreadable files).
    """
    with open(path, "rb") as f:
        return f.read(len(_SQLITE_MAGIC))


#: SQLite's page cache per connection, KiB.
DB_PAGE_CACHE_KIB = 512


def _connect_ro(db_path: str, timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """
    Open ``db_path`` read-only, in autocommit mode (we issue ``BEGIN`` and
    ``COMMIT`` ourselves, so no read transaction stays open between lookups
    to hold back Nix's WAL checkpoints).

    ``check_same_thread=False`` only so :meth:`LocalStore.stop` can close
    every worker's connection after the workers have exited; a connection is
    never used by two threads at once.
    """
    uri = f"file:{quote(os.path.abspath(db_path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    # A lookup by hash reads a few B-tree pages, which the kernel's page
    # cache holds anyway; SQLite's default of 2 MB per connection (one per
    # worker thread) would hold most of a small store's database per thread.
    try:
        conn.execute(f"PRAGMA cache_size = -{DB_PAGE_CACHE_KIB}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


@implementer(IStore, IStoreScanner)
class LocalStore:
    """
    A read-only :class:`~peernix.interfaces.IStore` over a Nix store on this
    machine: ``/`` for the real store, or a chroot store root such as
    ``/tmp/a`` (files in ``/tmp/a/nix/store``, database in
    ``/tmp/a/nix/var/nix/db/db.sqlite``).  Paths keep their logical
    ``/nix/store/...`` names.

    Life cycle: :meth:`check` once at start-up (blocking), :meth:`start`,
    lookups, :meth:`stop`.  Lookups made before :meth:`start` wait for it;
    lookups after :meth:`stop` fail with :class:`StoreError`.

    Caching: each lookup result, a miss included, is kept ``cache_ttl``
    seconds (by ``reactor.seconds()``), at most ``cache_size`` entries, so a
    deleted or garbage-collected path stops being served within ``cache_ttl``
    seconds.  Concurrent lookups of one hash part share one database query.

    Revalidation (``revalidate=True``): while lookups come in, a worker
    checks every ``cache_ttl / 4`` seconds whether the database files
    (``db.sqlite`` and its WAL) changed.  An expired entry whose lookup
    started after the last change seen is then served on without a new
    query, as long as a check that started less than ``cache_ttl`` seconds
    ago saw no change: a database change (a path added, deleted or garbage
    collected) is still seen within ``cache_ttl`` seconds, but a busy cache
    no longer re-queries every hot path every ``cache_ttl`` seconds.
    Results that depend on more than the database (a path hidden by its
    ``.lock`` file or missing on disk) are never extended this way.
    """

    store_dir = STORE_DIR

    def __init__(
        self,
        store_root: str,
        reactor: IReactorTime,
        *,
        cache_ttl: float = 2.0,
        threads: int = 4,
        cache_size: int = 10000,
        threadpool: ThreadPool | None = None,
        revalidate: bool = False,
        inline: bool = True,
    ) -> None:
        """
        :param store_root: the directory holding ``nix/store`` and
            ``nix/var/nix/db``; ``/`` for the machine's own store.
        :param reactor: the reactor: its clock times the cache and results
            come back to it with ``callFromThread`` (it must also provide
            ``IReactorFromThreads``).
        :param cache_ttl: seconds a lookup result is reused.
        :param threads: the most worker threads reading the store at once.
        :param cache_size: the most cached lookup results.
        :param threadpool: a pool to use instead of making a new one (tests);
            :meth:`start` and :meth:`stop` still start and stop it.
        :param revalidate: extend expired entries while the database files
            are unchanged (see the class docstring).
        :param inline: once started, try each lookup on the reactor thread
            first, without waiting for a database lock (see
            :meth:`query_path_info`); ``False``: always on a worker thread.
        """
        self.store_root = os.path.abspath(store_root)
        self.db_path = os.path.join(self.store_root, DB_RELPATH)
        self.real_store_dir = os.path.join(self.store_root, STORE_RELPATH)
        self.log_dir = os.path.join(self.store_root, LOG_RELPATH)
        self._clock = reactor
        self._from_threads = IReactorFromThreads(reactor)
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._pool = threadpool if threadpool is not None else ThreadPool(0, threads, name="peernix-store")
        self._inline = inline
        self._running = False
        self._stopped = False
        # hash part -> (expiry time, result, epoch when its lookup started or
        # -1 when it may not be revalidated); insertion order is expiry order
        # because every entry lives exactly cache_ttl.
        self._cache: OrderedDict[str, tuple[float, PathInfo | None, int]] = OrderedDict()
        self._revalidate = revalidate
        # Revalidation: the database files as last seen, a counter bumped
        # whenever they change, when the last check that confirmed them
        # started, when the last check started, and whether one runs.
        self._db_state: tuple[_FileState, _FileState] | None = None
        self._epoch = 0
        self._confirmed_at = float("-inf")
        self._checked_at = float("-inf")
        self._checking = False
        # hash part -> Deferreds of callers waiting for the query in flight;
        # each caller has its own, so one cancelling never affects the others.
        self._inflight: dict[str, list[Deferred[PathInfo | None]]] = {}
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------

    def check(self) -> None:
        """
        Make sure this looks like a readable Nix store.  Blocking; call it
        once at start-up, before the reactor runs.

        :raises StoreError: with one line saying what is wrong and how to fix
            it: the database is missing, unreadable, not a Nix database, or
            the store directory is missing.
        """
        hint = f"is --store-root right? it must contain {DB_RELPATH}"
        db = self.db_path
        try:
            header = _read_header(db)
        except FileNotFoundError:
            raise StoreError(f"cannot open the Nix database {db}: no such file ({hint})") from None
        except PermissionError:
            raise StoreError(
                f"cannot read the Nix database {db}: permission denied"
                " (run peernix as a user who can read it and its directory)"
            ) from None
        except IsADirectoryError:
            raise StoreError(f"cannot open the Nix database {db}: it is a directory ({hint})") from None
        except OSError as e:
            raise StoreError(f"cannot open the Nix database {db}: {e.strerror} ({hint})") from None
        if header != _SQLITE_MAGIC:
            raise StoreError(f"{db} is not an SQLite database, so not a Nix database ({hint})")
        try:
            conn = _connect_ro(db)
            try:
                tables = {
                    row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
                }
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot read the Nix database {db}: {e} (a read-only reader of a WAL database needs"
                " db.sqlite-shm and db.sqlite-wal readable, or the db directory writable)"
            ) from None
        missing = {"ValidPaths", "Refs"} - tables
        if missing:
            raise StoreError(
                f"{db} is an SQLite database but not a Nix store database"
                f" (no {' or '.join(sorted(missing))} table; {hint})"
            )
        if not os.path.isdir(self.real_store_dir):
            raise StoreError(
                f"the store directory {self.real_store_dir} is missing"
                f" (is --store-root right? it must contain {STORE_RELPATH})"
            )

    def start(self) -> None:
        """Start the worker threads."""
        if self._running:
            return
        self._running = True
        self._stopped = False
        self._pool.start()

    def stop(self) -> None:
        """
        Stop the worker threads (waiting for running lookups to finish, so
        this blocks briefly) and close their database connections.
        Idempotent.
        """
        if self._running:
            self._running = False
            self._stopped = True
            self._pool.stop()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        # Connections are per thread; a new one is opened if this store is
        # used synchronously again.
        self._local = threading.local()

    # -- IStore ---------------------------------------------------------------

    def query_path_info(self, hash_part: str) -> Deferred[PathInfo | None]:
        """
        Look a path up by its hash part, as Nix does (see :class:`IStore`).

        :param hash_part: a 32-character nix32 hash part.
        :returns: a Deferred firing with the :class:`PathInfo` or ``None``
            (no such valid path, ``NarSize`` unknown, being written, missing
            on disk); it fails with :class:`ValueError` for an invalid hash
            part and with :class:`StoreError` when the database fails or the
            store is stopped.  Cancelling it stops only this caller's wait.

        Threading: once started (and unless ``inline=False``), a lookup
        that is not cached runs at once on the calling (reactor) thread
        with SQLite never waiting for a lock (a few B-tree pages and one
        ``lstat``); when the database is locked, a worker thread does it
        and may wait up to :data:`BUSY_TIMEOUT`.
        """
        if not is_hash_part(hash_part):
            return fail(ValueError(f"invalid hash part {hash_part!r}"))
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        now = self._clock.seconds()
        cached = self._cache.get(hash_part)
        if cached is not None:
            if cached[0] > now:
                if self._revalidate and now - self._checked_at >= self._cache_ttl / 4:
                    self._check_db(now)
                return succeed(cached[1])
            if self._revalidate:
                if now - self._checked_at >= self._cache_ttl / 4:
                    self._check_db(now)
                if cached[2] == self._epoch and self._confirmed_at + self._cache_ttl > now:
                    return succeed(cached[1])
            del self._cache[hash_part]
        mine: Deferred[PathInfo | None] = Deferred()
        waiters = self._inflight.get(hash_part)
        if waiters is not None:
            waiters.append(mine)
            return mine
        if self._inline and self._running:
            # A lookup reads a few B-tree pages of the page cache and stats
            # one path: tens of microseconds, less than handing it to a
            # worker thread and back (measured in bench.upstream, where that
            # hand-over was a tenth of the daemon's CPU).  Only when SQLite
            # would have to wait for a lock does a worker take over.
            try:
                result, durable = self._lookup_durable(hash_part, wait=False)
            except _Busy:
                pass
            except StoreError as e:
                return fail(e)
            else:
                self._remember(hash_part, result, self._epoch if durable else -1)
                return succeed(result)
        self._inflight[hash_part] = [mine]
        work = deferToThreadPool(self._from_threads, self._pool, self._lookup_durable, hash_part)
        # The thread cannot be cancelled; its result is delivered to whoever
        # still waits, and cached.
        work.addBoth(self._lookup_done, hash_part, self._epoch)
        return mine

    def real_path(self, store_path: str) -> str:
        """
        :param store_path: ``/nix/store/...``, a store path or a file in one.
        :returns: where it is on this machine: ``<store root>/nix/store/...``.
        :raises ValueError: if it is not below ``/nix/store`` (``..``
            components included).
        """
        if posixpath.normpath(store_path) != store_path or not store_path.startswith(STORE_DIR + "/"):
            raise ValueError(f"{store_path!r} is not a path below {STORE_DIR}")
        return os.path.join(self.store_root, store_path.lstrip("/"))

    def find_log(self, drv_basename: str) -> Deferred[str | None]:
        """
        Find the build log Nix keeps for a derivation, in
        ``nix/var/log/nix/drvs/<first 2 chars>/<rest>``, plain or ``.bz2``.

        :param drv_basename: ``<hash>-<name>.drv``.
        :returns: a Deferred firing with the log file's path (ending in
            ``.bz2`` when compressed) or ``None``; failing with
            :class:`ValueError` for a name that is not a ``.drv`` basename.
        """
        try:
            parse_basename(drv_basename)
        except StorePathError as e:
            return fail(ValueError(str(e)))
        if not drv_basename.endswith(".drv"):
            return fail(ValueError(f"{drv_basename!r} is not a derivation"))
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        return deferToThreadPool(self._from_threads, self._pool, self._find_log, drv_basename)

    def path_count(self) -> Deferred[int]:
        """:returns: a Deferred firing with the number of valid paths (for the status page)."""
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        return deferToThreadPool(self._from_threads, self._pool, self._count)

    def tally_path_infos(self, classify: Callable[[PathInfo], str]) -> Deferred[dict[str, int]]:
        """
        Count every servable path of the database by ``classify`` (for the
        status page's shared and withheld counts).  The scan runs on one
        worker thread, in batches of :data:`SCAN_BATCH` rows, each batch its
        own short read transaction (so Nix's WAL checkpoints are never held
        back for long) and no more than one batch in memory.  Rows a lookup
        would not serve (unknown ``NarSize``, bad paths) are not counted;
        ``.lock`` files and the files on disk are not looked at.

        :param classify: called on the worker thread with each path's info;
            it must be thread-safe and return a short label.
        :returns: a Deferred firing with ``{label: number of paths}``; it
            fails with :class:`StoreError` when the database fails or the
            store stops during the scan, and with whatever ``classify``
            raises.
        """
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        return deferToThreadPool(self._from_threads, self._pool, self._tally, classify)

    def database_state(self) -> Deferred[object]:
        """See :meth:`IStoreScanner.database_state`: the state of ``db.sqlite`` and its WAL."""
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        return deferToThreadPool(self._from_threads, self._pool, lambda: self._db_files_state()[0])

    def scan_paths(self, after_id: int, accept: Callable[[PathInfo], bool]) -> Deferred[PathScan]:
        """
        See :meth:`IStoreScanner.scan_paths`.  Runs on one worker thread in
        batches of :data:`SCAN_BATCH` rows, each its own short read
        transaction (Nix's checkpoints are never held back for long); the
        count and highest id come from a first transaction of their own.
        Rows a lookup would not serve are looked at (counted in
        ``scanned``) but never accepted.

        :returns: a Deferred failing with :class:`StoreError` when the
            database fails or the store stops during the scan.
        """
        if self._stopped:
            return fail(StoreError("the local store is stopped"))
        return deferToThreadPool(self._from_threads, self._pool, self._scan_paths, after_id, accept)

    # -- reactor-thread helpers -----------------------------------------------

    def _lookup_done(
        self, outcome: tuple[PathInfo | None, bool] | Failure, hash_part: str, epoch: int
    ) -> None:
        waiters = self._inflight.pop(hash_part, [])
        if isinstance(outcome, Failure):
            for d in waiters:
                d.errback(outcome)
            return
        result, durable = outcome
        self._remember(hash_part, result, epoch if durable else -1)
        for d in waiters:
            d.callback(result)

    def _remember(self, hash_part: str, result: PathInfo | None, epoch: int = -1) -> None:
        now = self._clock.seconds()
        cache = self._cache
        cache[hash_part] = (now + self._cache_ttl, result, epoch)
        cache.move_to_end(hash_part)
        if len(cache) <= self._cache_size:
            # Expired entries are dropped lazily (when looked up again, or
            # when the cache is full), so revalidation can still serve them.
            return
        # Oldest first: drop expired entries, then enough to respect the bound.
        while cache:
            oldest, (expiry, _, _) = next(iter(cache.items()))
            if expiry > now and len(cache) <= self._cache_size:
                break
            del cache[oldest]

    def _check_db(self, now: float) -> None:
        """Start a check of the database files unless one runs (revalidation)."""
        if self._checking or self._stopped:
            return
        self._checking = True
        self._checked_at = now
        work = deferToThreadPool(self._from_threads, self._pool, self._db_files_state)
        work.addBoth(self._db_checked, now)

    def _db_checked(self, outcome: tuple[tuple[_FileState, _FileState], bool] | Failure, started: float) -> None:
        self._checking = False
        if isinstance(outcome, Failure):
            # Nothing confirmed: entries expire as without revalidation.
            _log.failure("Checking the Nix database files failed", outcome)
            return
        state, settled = outcome
        if state != self._db_state:
            # Changed (or first seen): no entry looked up before may be
            # extended any more.
            self._db_state = state
            self._epoch += 1
        if settled:
            self._confirmed_at = started

    # -- blocking functions (worker threads; lookups also on the reactor) ----

    def _db_files_state(self) -> tuple[tuple[_FileState, _FileState], bool]:
        """
        :returns: the state of ``db.sqlite`` and ``db.sqlite-wal``, and
            whether both last changed more than :data:`SETTLE_SECONDS` ago
            (so a change after this call cannot leave their state as it is).
        """
        states: list[_FileState] = []
        settled = True
        now_ns = time.time_ns()
        for path in (self.db_path, self.db_path + "-wal"):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                states.append(None)
                continue
            states.append((st.st_ino, st.st_size, st.st_mtime_ns))
            if now_ns - st.st_mtime_ns < SETTLE_SECONDS * 1e9:
                settled = False
        return (states[0], states[1]), settled

    def _connection(self, wait: bool = True) -> sqlite3.Connection:
        """
        :param wait: whether the connection waits for locks (a worker's);
            ``False`` for the reactor thread's lookups, which never wait.
        :returns: this thread's read-only connection of that kind, opened on
            first use.
        """
        attr = "conn" if wait else "conn_nowait"
        conn: sqlite3.Connection | None = getattr(self._local, attr, None)
        if conn is None:
            conn = _connect_ro(self.db_path, BUSY_TIMEOUT if wait else 0.0)
            setattr(self._local, attr, conn)
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self, wait: bool = True) -> None:
        """Forget this thread's connection (of that kind) after an error, so the next call reopens the DB."""
        attr = "conn" if wait else "conn_nowait"
        conn: sqlite3.Connection | None = getattr(self._local, attr, None)
        setattr(self._local, attr, None)
        if conn is not None:
            with self._connections_lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()

    def _lookup(self, hash_part: str) -> PathInfo | None:
        """
        The whole lookup, blocking: one read transaction for the row and its
        references, then the ``.lock`` and on-disk checks (waiting for a
        lock, as on a worker thread); tests call it directly.

        :returns: the path's info, or ``None`` when it is not servable.
        :raises StoreError: when the database fails.
        """
        return self._lookup_durable(hash_part)[0]

    def _lookup_durable(self, hash_part: str, wait: bool = True) -> tuple[PathInfo | None, bool]:
        """
        :param wait: whether to wait (up to :data:`BUSY_TIMEOUT`) for a
            database lock; ``False`` for the reactor thread's lookups.
        :returns: what :meth:`_lookup` returns, and whether it depends on the
            database alone (not on a ``.lock`` file or the files on disk),
            so that it stays true while the database does not change.
        :raises _Busy: ``wait`` is false and SQLite would have to wait.
        :raises StoreError: when the database fails.
        """
        prefix = f"{STORE_DIR}/{hash_part}"
        try:
            conn = self._connection(wait)
            # One snapshot for both queries, closed at once so Nix's
            # checkpoints are never held back.
            conn.execute("BEGIN")
            try:
                row = conn.execute(_ROW_QUERY, (prefix,)).fetchone()
                # Accept only this exact hash part: the next path in sort
                # order may belong to another hash.
                if row is None or not row[1].startswith(prefix + "-"):
                    return None, True
                refs = [r[0] for r in conn.execute(_REFS_QUERY, (row[0],)).fetchall()]
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            if not wait and getattr(e, "sqlite_errorcode", None) in _BUSY_CODES:
                raise _Busy() from e
            self._drop_connection(wait)
            raise StoreError(f"reading the Nix database {self.db_path} failed: {e}") from e
        _id, path, hash_text, registration_time, deriver, nar_size, sigs, ca = row
        info = self._row_to_info(path, hash_text, registration_time, deriver, nar_size, sigs, ca, refs)
        if info is None:
            return None, True
        real = self.real_path(path)
        try:
            # Nix holds <path>.lock while it writes the path; never serve a
            # half-written path.
            if os.path.lexists(real + ".lock"):
                return None, False
            os.lstat(real)
        except OSError:
            return None, False
        return info, True

    def _row_to_info(
        self,
        path: str,
        hash_text: str,
        registration_time: int | None,
        deriver: str | None,
        nar_size: int | None,
        sigs: str | None,
        ca: str | None,
        refs: list[str],
    ) -> PathInfo | None:
        """
        Turn a ``ValidPaths`` row into a :class:`PathInfo`.

        :returns: ``None`` when the row cannot be served: a ``NarSize`` that
            is NULL or 0 (Nix rejects such narinfos, and computing it would
            mean reading the whole path on a lookup; Nix itself fills it in
            for every path it registers since 2.0), or a path, hash or
            reference Nix would not accept.
        """
        if not nar_size or nar_size < 0:
            _log.debug("not serving {path}: NarSize unknown", path=path)
            return None
        try:
            parse_store_path(path)
            for ref in refs:
                parse_store_path(ref)
            nar_hash = parse_hash(hash_text, "sha256")
        except (StorePathError, HashError) as e:
            _log.warn("not serving {path}: bad database row: {error}", path=path, error=str(e))
            return None
        if deriver is not None:
            try:
                parse_store_path(deriver)
            except StorePathError:
                # The deriver is informational only; a bad one is dropped, not fatal.
                deriver = None
        good_sigs = tuple(s for s in (sigs or "").split() if is_well_formed_sig(s))
        return PathInfo(
            path=path,
            nar_hash=nar_hash,
            nar_size=nar_size,
            references=tuple(refs),
            deriver=deriver,
            sigs=good_sigs,
            ca=ca or None,
            registration_time=registration_time or 0,
        )

    def _find_log(self, drv_basename: str) -> str | None:
        base = os.path.join(self.log_dir, drv_basename[:2], drv_basename[2:])
        for candidate in (base, base + ".bz2"):
            if os.path.isfile(candidate):
                return candidate
        return None

    def _tally(self, classify: Callable[[PathInfo], str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        after = ""
        while True:
            if self._stopped:
                raise StoreError("the local store is stopped")
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    rows = conn.execute(_SCAN_QUERY, (after, SCAN_BATCH)).fetchall()
                    refs: dict[int, list[str]] = {}
                    for referrer, ref in conn.execute(_SCAN_REFS_QUERY, (after, SCAN_BATCH)):
                        refs.setdefault(referrer, []).append(ref)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._drop_connection()
                raise StoreError(f"reading the Nix database {self.db_path} failed: {e}") from e
            for row_id, path, hash_text, registration_time, deriver, nar_size, sigs, ca in rows:
                info = self._row_to_info(
                    path, hash_text, registration_time, deriver, nar_size, sigs, ca, refs.get(row_id, [])
                )
                if info is not None:
                    label = classify(info)
                    counts[label] = counts.get(label, 0) + 1
            if len(rows) < SCAN_BATCH:
                return counts
            after = rows[-1][1]

    def _scan_paths(self, after_id: int, accept: Callable[[PathInfo], bool]) -> PathScan:
        conn = self._connection()
        try:
            rows, max_id = conn.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM ValidPaths").fetchone()
        except sqlite3.Error as e:
            self._drop_connection()
            raise StoreError(f"reading the Nix database {self.db_path} failed: {e}") from e
        found: list[str] = []
        scanned = 0
        after = after_id
        while after < max_id:
            if self._stopped:
                raise StoreError("the local store is stopped")
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    batch = conn.execute(_ID_SCAN_QUERY, (after, max_id, SCAN_BATCH)).fetchall()
                    refs: dict[int, list[str]] = {}
                    for referrer, ref in conn.execute(_ID_SCAN_REFS_QUERY, (after, max_id, SCAN_BATCH)):
                        refs.setdefault(referrer, []).append(ref)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._drop_connection()
                raise StoreError(f"reading the Nix database {self.db_path} failed: {e}") from e
            if not batch:
                break
            scanned += len(batch)
            for row_id, path, hash_text, registration_time, deriver, nar_size, sigs, ca in batch:
                info = self._row_to_info(
                    path, hash_text, registration_time, deriver, nar_size, sigs, ca, refs.get(row_id, [])
                )
                if info is not None and accept(info):
                    found.append(path[len(STORE_DIR) + 1 : len(STORE_DIR) + 33])
            after = batch[-1][0]
        return PathScan(hash_parts=tuple(found), rows=rows, max_id=max_id, scanned=scanned)

    def _count(self) -> int:
        conn = self._connection()
        try:
            count: int = conn.execute("SELECT COUNT(*) FROM ValidPaths").fetchone()[0]
        except sqlite3.Error as e:
            self._drop_connection()
            raise StoreError(f"reading the Nix database {self.db_path} failed: {e}") from e
        return count
