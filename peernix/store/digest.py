"""
This node's store digest: a Bloom filter over the hash parts of the paths
it shares with peers, published at ``GET /peernix/digest``.

A peer that holds our digest asks us for a narinfo only when the digest may
contain its hash part, so most misses (the common Nix case) cost no request
at all.  The digest is a *hint*: a false positive costs one request, a stale
digest a missed share, never a wrong answer (answers are judged exactly as
without digests).

What goes in.  Exactly the paths :class:`~peernix.store.share.SharedStore`
lets peers see (the ``--share`` policy), by database row: a withheld path is
never in it, so the digest tells a peer nothing it could not learn by asking
for the path, except probabilistically which hash parts this node shares.

Wire format (``rbloom1``).  The filter is an `rbloom
<https://pypi.org/project/rbloom/>`_ ``Bloom`` serialised with
``save_bytes()``: 8 bytes little-endian, the number of hash functions, then
the bit array.  Each item is the integer :func:`digest_key` of a hash part
(the 160 bits its 32 nix32 characters encode, of which the low 128, as a
signed integer), and rbloom's hash function is the identity on it, so the
filter means the same in every process (rbloom's default, Python's
``hash()``, is salted per process).  A delta (``?since=``) is the hash
parts added since the named version, one a line.

Versions.  The digest is rebuilt in full at start-up, when paths were
deleted (a Bloom filter cannot forget), when it fills past its capacity
(then bigger), and every ``full_interval`` seconds after a change; each full
build starts a new *generation*.  Paths added in between are added in place
and bump the version.  The ETag is ``"<generation>-<version>"``; a peer
naming an older version of the same generation gets only what was added
since.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from attrs import frozen
from prometheus_client import CollectorRegistry, Gauge
from rbloom import Bloom
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from peernix.interfaces import IStoreScanner
from peernix.nix.pathinfo import PathInfo
from peernix.nix.storepath import is_hash_part
from peernix.store.local import StoreError
from peernix.store.scan import PathScan

__all__ = [
    "DELTA_CONTENT_TYPE",
    "DIGEST_CONTENT_TYPE",
    "DIGEST_FORMAT",
    "DigestError",
    "DigestPublisher",
    "DigestSnapshot",
    "digest_key",
    "load_digest",
    "new_digest",
    "parse_delta",
]

_log = Logger()

#: Name of the wire format (``X-Peernix-Digest-Format``).
DIGEST_FORMAT: Final = "rbloom1"
#: Content type of a whole digest.
DIGEST_CONTENT_TYPE: Final = b"application/x-peernix-digest"
#: Content type of a delta: hash parts, one a line.
DELTA_CONTENT_TYPE: Final = b"text/x-peernix-digest-delta"

#: The most hash functions a digest we load may use: 1% needs 7, 0.01% 14;
#: a stranger's digest with millions would make every lookup spin.
MAX_HASH_FUNCTIONS: Final = 32
#: The largest digest we load (a million paths at 0.1% is ~1.8 MB).
MAX_DIGEST_BYTES: Final = 8 * 1024 * 1024

#: A new digest holds this many paths more than the store has, as a
#: fraction, so paths added later fit without a rebuild.
HEADROOM: Final = 0.25
#: The smallest capacity a digest is built for (a few hundred bytes at 1%).
MIN_CAPACITY: Final = 256
#: Hash parts kept for deltas since the last full build; a peer further
#: behind gets the whole digest.
DELTA_LOG_LIMIT: Final = 65536

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
_TO_BASE32 = str.maketrans(_NIX32, "0123456789abcdefghijklmnopqrstuv")
_LOW128 = (1 << 128) - 1
_SIGN128 = 1 << 127


class DigestError(ValueError):
    """A digest or delta received from a peer is malformed."""


def digest_key(hash_part: str) -> int:
    """
    :param hash_part: a valid 32-character nix32 hash part (not checked).
    :returns: the item the digest holds for it: the low 128 bits of the
        160-bit number its characters encode, as a signed 128-bit integer
        (rbloom's hash range).  Hash parts are truncated SHA-256 digests, so
        these bits are uniformly distributed.
    """
    return (int(hash_part.translate(_TO_BASE32), 32) & _LOW128) - _SIGN128


def _identity(key: int) -> int:
    # rbloom's hash function: the items are already uniform 128-bit keys.
    return key


def new_digest(capacity: int, fp_rate: float) -> Bloom:
    """:returns: an empty digest sized for ``capacity`` paths at ``fp_rate``."""
    return Bloom(max(1, capacity), fp_rate, _identity)


def load_digest(data: bytes) -> Bloom:
    """
    Load a peer's ``rbloom1`` digest.

    :raises DigestError: when it is too short, too large, or uses no or too
        many hash functions.
    """
    if len(data) > MAX_DIGEST_BYTES:
        raise DigestError(f"digest of {len(data)} bytes is larger than {MAX_DIGEST_BYTES}")
    if len(data) < 9:
        raise DigestError("digest shorter than its header")
    k = int.from_bytes(data[:8], "little")
    if not 1 <= k <= MAX_HASH_FUNCTIONS:
        raise DigestError(f"digest uses {k} hash functions (1 to {MAX_HASH_FUNCTIONS} accepted)")
    try:
        return Bloom.load_bytes(data, _identity)
    except Exception as e:  # rbloom's errors are plain ValueErrors of its own
        raise DigestError(f"digest cannot be loaded: {e}") from None


def parse_delta(body: bytes, max_items: int = DELTA_LOG_LIMIT) -> list[str]:
    """
    :returns: the hash parts of a delta body (one a line; an empty body is
        an empty delta).
    :raises DigestError: for anything else.
    """
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise DigestError("delta is not ASCII") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) > max_items:
        raise DigestError(f"delta of {len(lines)} hash parts (at most {max_items})")
    for line in lines:
        if not is_hash_part(line):
            raise DigestError("delta line is not a hash part")
    return lines


@frozen
class DigestSnapshot:
    """What the status page says about this node's digest."""

    #: ``"<generation>-<version>"``; ``None`` before the first build.
    tag: str | None
    #: Paths in the digest.
    paths: int
    #: Paths it can hold before the false-positive rate passes the configured one.
    capacity: int
    #: Size of the serialised digest, bytes.
    size_bytes: int
    #: The configured false-positive rate.
    fp_rate: float
    #: Clock time of the last full build (``None`` before it).
    built_at: float | None
    #: Full builds and incremental updates since start.
    builds: int
    updates: int


class DigestPublisher:
    """
    Keeps this node's digest up to date with the store.

    Every ``check_interval`` seconds it asks the store whether its database
    changed (a few ``stat`` calls on the store's worker thread); when it
    did, it reads the rows added since the last look (one scan on the
    worker thread) and adds the shared ones, or rebuilds in full when rows
    were deleted or the digest is full.  One update runs at a time.

    :param scanner: reads the database (:class:`~peernix.interfaces.IStoreScanner`).
    :param accept: whether peers may see a path (the ``--share`` policy's
        ``shares``); called on the worker thread, so it must be thread-safe.
    :param clock: for the schedule.
    :param fp_rate: the false-positive rate the digest is sized for.
    :param check_interval: seconds between two looks at the database files.
    :param full_interval: a change seen this long after the last full build
        triggers a full one (signatures added to old rows change what is
        shared without a new row).
    :param metrics_registry: where the gauges ``peernix_digest_paths`` and
        ``peernix_digest_bytes`` go (``None``: nowhere).
    """

    def __init__(
        self,
        scanner: IStoreScanner,
        accept: Callable[[PathInfo], bool],
        clock: IReactorTime,
        *,
        fp_rate: float = 0.01,
        check_interval: float = 1.0,
        full_interval: float = 600.0,
        delta_log_limit: int = DELTA_LOG_LIMIT,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        if not 0.0 < fp_rate < 1.0:
            raise ValueError("fp_rate must be between 0 and 1")
        self._scanner = scanner
        self._accept = accept
        self._clock = clock
        self.fp_rate = fp_rate
        self._check_interval = check_interval
        self._full_interval = full_interval
        self._delta_log_limit = delta_log_limit
        self._bloom: Bloom | None = None
        self._generation = ""
        self._version = 0
        self._paths = 0
        self._capacity = 0
        self._max_id = 0
        self._rows = 0
        self._built_at: float | None = None
        self._builds = 0
        self._updates = 0
        #: (version, hash parts added at it), oldest first, since the last full build.
        self._log: list[tuple[int, list[str]]] = []
        self._logged = 0
        #: The oldest version a delta can start from.
        self._log_floor = 0
        self._bytes: tuple[str, bytes] | None = None
        self._db_state: object = None
        self._busy = False
        self._again = False
        self._loop: LoopingCall | None = None
        self._stopped = False
        self._subscribers: list[Callable[[], object]] = []
        #: Hash parts shared from outside the store (NARs staged for the
        #: LAN, see :meth:`include`), read at every full build.
        self._extra: Callable[[], Iterable[str]] | None = None
        self._full_wanted = False
        self._rebuild_call: IDelayedCall | None = None
        if metrics_registry is not None:
            Gauge("peernix_digest_paths", "Paths in this node's store digest",
                  registry=metrics_registry).set_function(lambda: float(self._paths))
            Gauge("peernix_digest_bytes", "Size of this node's store digest as served",
                  registry=metrics_registry).set_function(lambda: float(len(self.digest_bytes())))

    # -- reading -------------------------------------------------------

    @property
    def tag(self) -> str | None:
        """:returns: ``"<generation>-<version>"``, or ``None`` before the first build."""
        if self._bloom is None:
            return None
        return f"{self._generation}-{self._version}"

    @property
    def etag(self) -> str | None:
        """:returns: the HTTP ETag (the quoted :attr:`tag`), or ``None``."""
        tag = self.tag
        return None if tag is None else f'"{tag}"'

    @property
    def paths(self) -> int:
        """:returns: the number of paths in the digest."""
        return self._paths

    def contains(self, hash_part: str) -> bool:
        """:returns: whether the digest may hold ``hash_part`` (``False`` before the first build)."""
        return self._bloom is not None and is_hash_part(hash_part) and digest_key(hash_part) in self._bloom

    def digest_bytes(self) -> bytes:
        """:returns: the serialised digest (cached per version); ``b""`` before the first build."""
        tag = self.tag
        if tag is None or self._bloom is None:
            return b""
        if self._bytes is None or self._bytes[0] != tag:
            self._bytes = (tag, self._bloom.save_bytes())
        return self._bytes[1]

    def delta_since(self, tag: str) -> list[str] | None:
        """
        :param tag: a version a peer holds (``"<generation>-<version>"``,
            quotes tolerated).
        :returns: the hash parts added since that version, or ``None`` when
            it is not one a delta can start from (another generation, too
            old, malformed): the peer needs the whole digest then.
        """
        generation, _, number = tag.strip('"').partition("-")
        if self._bloom is None or generation != self._generation or not number.isdigit() or len(number) > 18:
            return None
        version = int(number)
        if version < self._log_floor or version > self._version:
            return None
        added: list[str] = []
        for at, parts in self._log:
            if at > version:
                added.extend(parts)
        return added

    def snapshot(self) -> DigestSnapshot:
        """:returns: the status page's view."""
        return DigestSnapshot(
            tag=self.tag,
            paths=self._paths,
            capacity=self._capacity,
            size_bytes=len(self.digest_bytes()),
            fp_rate=self.fp_rate,
            built_at=self._built_at,
            builds=self._builds,
            updates=self._updates,
        )

    def subscribe(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever the digest changed (a new :attr:`tag`)."""
        self._subscribers.append(callback)

    # -- paths from outside the store -------------------------------------

    def include(self, extra: Callable[[], Iterable[str]]) -> None:
        """
        Cover hash parts shared from outside the store too: ``extra()``
        (already filtered by ``--share``; called on the reactor thread at
        every full build) lists them, e.g. the verified NARs staged for the
        LAN (:meth:`peernix.upstream.fetch.LanFetcher.staged_hash_parts`).
        Tell the digest of changes with :meth:`add` and :meth:`rebuild_soon`.
        """
        self._extra = extra

    def add(self, hash_parts: Sequence[str]) -> None:
        """
        Add hash parts shared from outside the store now (an incremental
        update: a new version, in the deltas).  Before the first build it
        does nothing: the build reads :meth:`include`'s source.
        """
        parts = [h for h in hash_parts if is_hash_part(h)]
        if self._bloom is None or not parts:
            return
        if self._paths + len(parts) > self._capacity:
            self.rebuild_soon(0.0)
            return
        self._add(parts)

    def rebuild_soon(self, delay: float = 2.0) -> None:
        """
        Rebuild in full within ``delay`` seconds (coalesced: many calls, one
        build), e.g. after a staged NAR left: a Bloom filter cannot forget.
        Until then the digest may still claim it, which costs a peer one
        request, never a wrong answer.
        """
        self._full_wanted = True
        if self._rebuild_call is not None and self._rebuild_call.active():
            return

        def run() -> None:
            self._rebuild_call = None
            if not self._stopped:
                self.update()

        self._rebuild_call = self._clock.callLater(delay, run)

    # -- life cycle ------------------------------------------------------

    def start(self) -> None:
        """Build the digest now, then look for changes every ``check_interval`` seconds."""
        if self._loop is not None:
            return
        self._stopped = False
        self._loop = LoopingCall(self.update)
        self._loop.clock = self._clock
        # Stopped in stop(); update() never fails (it logs).
        self._loop.start(self._check_interval, now=True)

    def stop(self) -> None:
        """Stop looking for changes (an update running on the worker thread finishes on its own)."""
        self._stopped = True
        if self._rebuild_call is not None and self._rebuild_call.active():
            self._rebuild_call.cancel()
        self._rebuild_call = None
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    # -- updating --------------------------------------------------------

    def update(self) -> Deferred[None]:
        """
        Bring the digest up to date if the database changed (the first call
        builds it).  Never fails: errors are logged and retried at the next
        call.  A call while an update runs makes that update look again.

        :returns: a Deferred firing when this update is done.
        """
        if self._busy:
            self._again = True
            return succeed(None)
        self._busy = True
        d = Deferred.fromCoroutine(self._update())

        def done(result: None | Failure) -> None:
            self._busy = False
            if isinstance(result, Failure):
                if self._stopped:
                    pass  # stopped meanwhile: the store may be gone too
                elif isinstance(result.value, StoreError):
                    _log.warn("Updating the store digest failed: {error}", error=str(result.value))
                else:
                    _log.failure("Updating the store digest failed", result)
            if self._again:
                self._again = False
                self.update()

        d.addBoth(done)
        return d

    async def _update(self) -> None:
        state = await self._scanner.database_state()
        now = self._clock.seconds()
        if self._full_wanted:
            await self._build(state)
            return
        if self._bloom is not None and state == self._db_state:
            return
        if self._bloom is None:
            await self._build(state)
            return
        if self._built_at is not None and now - self._built_at >= self._full_interval:
            await self._build(state)
            return
        scan = await self._scanner.scan_paths(self._max_id, self._accept)
        if scan.rows != self._rows + scan.scanned:
            # Rows went away: a Bloom filter cannot forget them.
            await self._build(state)
            return
        if self._paths + len(scan.hash_parts) > self._capacity:
            await self._build(state)
            return
        self._db_state = state
        self._max_id = scan.max_id
        self._rows = scan.rows
        if scan.hash_parts:
            self._add(scan.hash_parts)

    def _add(self, hash_parts: Sequence[str]) -> None:
        assert self._bloom is not None
        bloom = self._bloom
        for hash_part in hash_parts:
            bloom.add(digest_key(hash_part))
        self._paths += len(hash_parts)
        self._version += 1
        self._updates += 1
        self._log.append((self._version, list(hash_parts)))
        self._logged += len(hash_parts)
        while self._logged > self._delta_log_limit and self._log:
            at, parts = self._log.pop(0)
            self._logged -= len(parts)
            self._log_floor = at
        self._changed()

    async def _build(self, state: object) -> None:
        self._full_wanted = False
        scan: PathScan = await self._scanner.scan_paths(0, self._accept)
        # Read after the scan, on the reactor thread: a path staged while the
        # scan ran is in this list (its add() may have gone to the old filter).
        extra = [h for h in self._extra() if is_hash_part(h)] if self._extra is not None else []
        hash_parts = [*scan.hash_parts, *extra]
        capacity = max(MIN_CAPACITY, math.ceil(len(hash_parts) * (1 + HEADROOM)))
        # On the reactor thread: about 0.6 us a path (60 ms for 100k paths),
        # once per full build; the scan itself ran on the worker thread.
        bloom = new_digest(capacity, self.fp_rate)
        bloom.update(map(digest_key, hash_parts))
        self._bloom = bloom
        self._generation = secrets.token_hex(4)
        self._version = 0
        self._paths = len(hash_parts)
        self._capacity = capacity
        self._max_id = scan.max_id
        self._rows = scan.rows
        self._db_state = state
        self._built_at = self._clock.seconds()
        self._builds += 1
        self._log = []
        self._logged = 0
        self._log_floor = 0
        _log.info(
            "Store digest built: {paths} shared paths, {size} bytes",
            paths=self._paths,
            size=len(self.digest_bytes()),
        )
        self._changed()

    def _changed(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                _log.failure("digest subscriber failed")
