"""
What this node shares with its peers (``--share``): a pure policy and an
:class:`~peernix.interfaces.IStore` wrapper that applies it.

The Nix store is world-readable on one machine, but serving it to a LAN is
a different promise: a locally built path can hold configuration, tokens or
private sources.  Under ``trusted`` (the default) a path is shared only when
its database row carries a signature that verifies against a trusted key:
the fan-out's trusted set (``--trusted-public-key``, else the local Nix's
``trusted-public-keys``) plus this node's own public key, so what came from
cache.nixos.org (or another trusted cache) and the builds Nix signed with
``--secret-key-file``.  Content-addressed paths get no exception: a
fixed-output fetch may be of a private repository.  Under ``all`` every
valid path is shared.

:class:`SharedStore` answers a withheld path exactly like a missing one
(``None``), so every route built on it -- narinfo, NAR, ``.ls``, ``log/``,
UDP ``has_path`` -- cannot tell a stranger that the path exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Final

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.interfaces import IStore
from peernix.nix.hashes import Hash
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import PublicKey, SecretKey
from peernix.nix.storepath import STORE_DIR, StorePathError, parse_basename

__all__ = [
    "SHARED",
    "SHARE_MODES",
    "WITHHELD_REASONS",
    "ShareCounts",
    "SharePolicy",
    "ShareStatus",
    "SharedStore",
    "Tally",
    "make_share_policy",
    "path_fingerprint",
]

_log = Logger()

#: The share modes (``--share``, ``share`` in the config file):
#: ``trusted`` (only paths whose database signature verifies against a
#: trusted key or this node's own) or ``all``.  Defined here, where they are
#: implemented; :mod:`peernix.options` takes them from here.
SHARE_MODES: Final = ("trusted", "all")

#: :meth:`SharePolicy.classify`'s answer for a path that is shared.
SHARED: Final = "shared"

#: Why a path is withheld: reason id (as :meth:`SharePolicy.classify`
#: returns it and ``/status.json`` shows it) -> label for the status page.
WITHHELD_REASONS: Mapping[str, str] = {
    "unsigned": "no signature",
    "ca_unsigned": "content-addressed, unsigned",
    "untrusted_key": "signature by an untrusted key",
    "bad_signature": "signature by a trusted key name that does not verify",
}

#: Verdicts :class:`SharedStore` remembers (a verification costs ~80 µs; a
#: cached verdict a dict lookup).  Entries are small (the key holds the
#: fingerprint's parts, shared with the path infos), so this is a few MB.
VERDICT_CACHE_SIZE: Final = 16384

#: Seconds between two counts of the whole database for the status page.
COUNT_INTERVAL: Final = 300.0

#: Counts the paths of a store by class: called with a pure, thread-safe
#: classifier (:meth:`SharePolicy.classify`), it returns a Deferred firing
#: with ``{class: number of paths}``
#: (:meth:`peernix.store.local.LocalStore.tally_path_infos`).
Tally = Callable[[Callable[[PathInfo], str]], "Deferred[dict[str, int]]"]


def path_fingerprint(info: PathInfo) -> bytes:
    """
    :returns: what Nix signs for ``info`` (the same bytes as
        ``NarInfo.from_path_info(info, ...).fingerprint()``):
        ``1;<path>;<sha256:nix32>;<size>;<refs>`` with the full reference
        paths, sorted (``PathInfo`` keeps them sorted), comma-separated.
    """
    refs = ",".join(info.references)
    return f"1;{info.path};{info.nar_hash.to_string()};{info.nar_size};{refs}".encode()


class SharePolicy:
    """
    Which local paths peers may see.  Pure and thread-safe (the status
    page's count runs it on a worker thread).

    :param mode: ``"trusted"`` or ``"all"`` (see the module docstring).
    :param keys: the keys whose signatures make a path shared (``trusted``).
        Unlike Nix's ``trusted-public-keys``, two keys may share a name:
        a signature counts when it verifies against any key of its name.
    :raises ValueError: for an unknown mode.
    """

    def __init__(self, mode: str, keys: Iterable[PublicKey] = ()) -> None:
        if mode not in SHARE_MODES:
            raise ValueError(f"unknown share mode {mode!r}; expected one of {', '.join(SHARE_MODES)}")
        self.mode = mode
        by_name: dict[str, list[PublicKey]] = {}
        for key in keys:
            if key not in by_name.setdefault(key.name, []):
                by_name[key.name].append(key)
        self._keys: dict[str, tuple[PublicKey, ...]] = {name: tuple(ks) for name, ks in by_name.items()}

    @property
    def shares_everything(self) -> bool:
        """:returns: whether every valid path is shared (``all``)."""
        return self.mode == "all"

    @property
    def keys(self) -> tuple[PublicKey, ...]:
        """:returns: the keys a signature is checked against."""
        return tuple(key for keys in self._keys.values() for key in keys)

    def classify(self, info: PathInfo) -> str:
        """
        :returns: :data:`SHARED`, or the reason ``info`` is withheld (a key
            of :data:`WITHHELD_REASONS`): no signature (``unsigned``, or
            ``ca_unsigned`` for a content-addressed path), only signatures
            by names of no trusted key (``untrusted_key``), or signatures by
            a trusted name that do not verify (``bad_signature``).  Never
            raises.
        """
        if self.mode == "all":
            return SHARED
        if not info.sigs:
            return "ca_unsigned" if info.ca else "unsigned"
        fingerprint: bytes | None = None
        named = False
        for sig in info.sigs:
            keys = self._keys.get(sig.partition(":")[0])
            if not keys:
                continue
            named = True
            if fingerprint is None:
                fingerprint = path_fingerprint(info)
            for key in keys:
                if key.verify(fingerprint, sig):
                    return SHARED
        return "bad_signature" if named else "untrusted_key"

    def shares(self, info: PathInfo) -> bool:
        """:returns: whether peers may see ``info``."""
        return self.classify(info) == SHARED


def make_share_policy(mode: str, trusted: Iterable[PublicKey], own: SecretKey | None) -> SharePolicy:
    """
    :param mode: the ``--share`` mode.
    :param trusted: the fan-out's trusted keys.
    :param own: this node's signing key (``--secret-key-file``), whose
        public half also counts: Nix signs local builds with it.
    :returns: the policy.
    :raises ValueError: for an unknown mode.
    """
    keys = list(trusted)
    if own is not None:
        keys.append(own.public_key)
    return SharePolicy(mode, keys)


@frozen
class ShareCounts:
    """One count of the whole store by :meth:`SharePolicy.classify`."""

    #: Paths peers may see.
    shared: int
    #: Withheld paths by reason (keys of :data:`WITHHELD_REASONS`), only
    #: reasons with at least one path.
    withheld: Mapping[str, int]
    #: When the count finished (the store's clock).
    counted_at: float

    @property
    def withheld_total(self) -> int:
        """:returns: the number of withheld paths."""
        return sum(self.withheld.values())


@frozen
class ShareStatus:
    """What the status page says about sharing."""

    #: The ``--share`` mode.
    mode: str
    #: The last finished count, ``None`` before the first one (or when the
    #: store cannot be counted).
    counts: ShareCounts | None
    #: Whether a count is running now.
    counting: bool


_VerdictKey = tuple[str, Hash, int, tuple[str, ...], tuple[str, ...]]


@implementer(IStore)
class SharedStore:
    """
    The :class:`~peernix.interfaces.IStore` peers are served from: ``store``
    with every path ``policy`` withholds answered as missing.

    ``query_path_info`` answers ``None`` for a withheld path; ``find_log``
    answers ``None`` unless the derivation itself (a store path with a
    database row of its own) is shared.  Answers are as synchronous as the
    wrapped store's: an already-fired lookup gives an already-fired result.
    Verdicts are cached by everything a signature covers, plus the
    signatures, so a changed row is judged again.

    :param store: the whole local store.
    :param policy: what to share.
    :param clock: times the status page's counts.
    :param tally: counts the whole store by class on a worker thread
        (``None``: the status page shows no counts).
    :param count_interval: seconds between two counts.
    """

    def __init__(
        self,
        store: IStore,
        policy: SharePolicy,
        *,
        clock: IReactorTime,
        tally: Tally | None = None,
        count_interval: float = COUNT_INTERVAL,
    ) -> None:
        self.store_dir = store.store_dir
        self.store = store
        self.policy = policy
        self._clock = clock
        self._tally = tally
        self._count_interval = count_interval
        self._verdicts: dict[_VerdictKey, bool] = {}
        self._counts: ShareCounts | None = None
        self._counting = False
        self._count_started = float("-inf")

    # -- IStore ---------------------------------------------------------------

    def query_path_info(self, hash_part: str) -> Deferred[PathInfo | None]:
        """See :meth:`IStore.query_path_info`; a withheld path is ``None``."""
        lookup = self.store.query_path_info(hash_part)
        if self.policy.shares_everything:
            return lookup
        # Same Deferred: cancelling the caller's wait cancels the lookup.
        return lookup.addCallback(self._filter)

    def real_path(self, store_path: str) -> str:
        """See :meth:`IStore.real_path`."""
        return self.store.real_path(store_path)

    def find_log(self, drv_basename: str) -> Deferred[str | None]:
        """
        See :meth:`IStore.find_log`: the log of a derivation whose own
        ``.drv`` path is shared, else ``None`` (a missing ``.drv`` included).
        Fails with :class:`ValueError` for a name that is not a ``.drv``
        basename.
        """
        if self.policy.shares_everything:
            return self.store.find_log(drv_basename)
        try:
            parsed = parse_basename(drv_basename)
        except StorePathError as e:
            return fail(ValueError(str(e)))
        if not drv_basename.endswith(".drv"):
            return fail(ValueError(f"{drv_basename!r} is not a derivation"))
        drv_path = f"{STORE_DIR}/{drv_basename}"

        def found(info: PathInfo | None) -> Deferred[str | None]:
            if info is None or info.path != drv_path:
                return succeed(None)
            return self.store.find_log(drv_basename)

        lookup = self.query_path_info(parsed.hash_part)
        return lookup.addCallback(found)

    # -- the verdicts -----------------------------------------------------------

    def _filter(self, info: PathInfo | None) -> PathInfo | None:
        if info is None:
            return None
        return info if self.shares(info) else None

    def shares(self, info: PathInfo) -> bool:
        """:returns: whether peers may see ``info`` (cached :meth:`SharePolicy.shares`)."""
        key = (info.path, info.nar_hash, info.nar_size, info.references, info.sigs)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self.policy.shares(info)
            verdicts = self._verdicts
            if len(verdicts) >= VERDICT_CACHE_SIZE:
                # The oldest first: insertion order.
                del verdicts[next(iter(verdicts))]
            verdicts[key] = verdict
        return verdict

    # -- the status page ------------------------------------------------------------

    def share_status(self) -> ShareStatus:
        """
        :returns: the mode and the last count; starts a new count on the
            store's worker thread when none ran in the last
            ``count_interval`` seconds (the first call starts the first).
            Never waits for it.
        """
        now = self._clock.seconds()
        if self._tally is not None and not self._counting and now - self._count_started >= self._count_interval:
            self._counting = True
            self._count_started = now
            counting = self._tally(self.policy.classify)
            counting.addCallbacks(self._counted, self._count_failed)
        return ShareStatus(mode=self.policy.mode, counts=self._counts, counting=self._counting)

    def _counted(self, tally: dict[str, int]) -> None:
        self._counting = False
        withheld = {reason: n for reason, n in sorted(tally.items()) if reason != SHARED and n}
        self._counts = ShareCounts(tally.get(SHARED, 0), withheld, self._clock.seconds())

    def _count_failed(self, failure: Failure) -> None:
        # The last count stays on the page; the next is tried after the interval.
        self._counting = False
        _log.failure("Counting shared and withheld paths failed", failure)
