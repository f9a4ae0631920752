"""
The contracts where peernix's components meet.

Data flows one way: web -> peers (:class:`IUpstream`) -> store
(:class:`IStore`); discovery -> registry (:class:`IPeerRegistry`).  Every test
double implements one of these and is checked with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from peernix.nix.narinfo import NarInfo
    from peernix.nix.pathinfo import PathInfo
    from peernix.peers.peer import Peer
    from peernix.sources import Found
    from peernix.store.scan import PathScan


class IStore(Interface):
    """
    A read-only view of one Nix store (``/nix/store`` or a chroot store).

    Methods never block the reactor thread for long: database and filesystem
    work runs in a worker thread or is provably short.  Answers may come from
    a cache of a few seconds at most, so a garbage-collected path stops being
    served quickly.
    """

    store_dir = Attribute("The logical store directory, always ``/nix/store``.")

    def query_path_info(hash_part: str) -> Deferred[PathInfo | None]:
        """
        Look a path up by its 32-character hash part, as Nix does.

        :param hash_part: an already validated nix32 hash part.
        :returns: a Deferred firing with the path's info, or ``None`` when no
            valid path has that hash part, the path is being written (its
            ``.lock`` exists) or is missing on disk.  It never fails for a
            miss.
        """

    def real_path(store_path: str) -> str:
        """
        :param store_path: a full ``/nix/store/...`` path.
        :returns: where that path's files are on this machine's filesystem
            (below the store root of a chroot store).
        """

    def find_log(drv_basename: str) -> Deferred[str | None]:
        """
        Find the build log of a derivation.

        :param drv_basename: ``<hash>-<name>.drv``, already validated.
        :returns: a Deferred firing with the filesystem path of the log (a
            name ending in ``.bz2`` means bzip2-compressed), or ``None``.
        """


class IUpstream(Interface):
    """
    Where a local client's miss goes: the peers of this node (and, after
    them, fetching for the LAN from upstream caches; see
    :mod:`peernix.upstream`).

    Implementations ask every healthy peer at once and only ever return
    answers that are *trusted* (a signature by a trusted key, or CA).
    """

    def lookup(hash_part: str) -> Deferred[NarInfo | None]:
        """
        Find a trusted narinfo for ``hash_part`` on some peer.

        :returns: a Deferred firing with the peer's narinfo (signatures
            untouched, URL as the peer gave it) or ``None`` for a miss, a
            timeout or no peers.  It never fails; cancelling it cancels only
            this caller's wait.
        """

    def find(hash_part: str) -> Deferred[Found | None]:
        """
        :meth:`lookup`, also saying where the answer came from.

        :returns: a Deferred firing with the narinfo and its source (the
            peer whose answer won), or ``None``; same contract as
            :meth:`lookup` otherwise.
        """

    def relay_nar(info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """
        Stream the uncompressed NAR of ``info`` from a peer that holds exactly
        ``info.nar_hash`` into ``consumer`` (an ``IConsumer`` such as a
        ``twisted.web`` request), with backpressure, verifying hash and size.

        ``on_peer``, when given, is called with the base URL of the peer
        whose NAR is about to be written, before its first byte reaches
        ``consumer`` (again with another URL when that peer failed before
        any byte and the next one takes over): the caller names the source
        in the response headers.  Fetching for the LAN calls it with the
        whole :class:`~peernix.sources.Source` instead (``upstream URL``,
        with ``via`` the fetching node), just before the first byte.

        :returns: a Deferred firing when every byte has been written and
            verified.  It fails with ``peernix.peers.errors.NarUnavailable``
            before any byte was written when no peer can serve it, and with
            ``peernix.peers.errors.NarVerificationFailed`` (or another error)
            after bytes were written; the caller must then abort the client
            connection, never finish the response.  It fails with
            ``peernix.peers.errors.NarClientGone`` when the consumer stopped
            it (the client left), which is nobody's fault.  The last chunk is held
            back until the NAR verified.
        """


class IPeerRegistry(Interface):
    """
    The one place that knows every peer, where it was found, and its health.

    Bounded in size.  Discovery feeds it; the fan-out reads it.
    """

    def add(url: str, source: str, public_key: str | None = None, verified: bool = False) -> Peer | None:
        """
        Note that a peer at base URL ``url`` (``http://host:port``) was seen
        by ``source`` (``"static"``, ``"udp"``, ``"mdns"``), refreshing its
        last-seen time.  ``verified``: the sighting is a signed announcement
        that verified against a trusted key (marks the peer verified;
        ``False`` never clears the mark).

        :returns: the peer, or ``None`` when the table is full and it was not
            admitted.
        """

    def remove(url: str, source: str) -> None:
        """Forget that ``source`` knows the peer; a peer no source knows is dropped."""

    def expire() -> None:
        """Drop discovered (non-static) peers not heard from within the TTL."""

    def peers() -> list[Peer]:
        """:returns: every known peer."""

    def healthy_peers() -> list[Peer]:
        """
        :returns: peers to ask now: healthy ones, and unhealthy ones whose
            backoff has passed; never peers that said they do not serve.
        """

    def record_success(peer: Peer, latency: float) -> None:
        """A request to ``peer`` succeeded after ``latency`` seconds."""

    def record_failure(peer: Peer, kind: str) -> None:
        """
        A request to ``peer`` failed; ``kind`` is ``"timeout"``,
        ``"connection"``, ``"http"``, ``"untrusted"``, ``"verification"`` or
        ``"digest"`` (its store digest claims paths it lacks).
        """

    def subscribe(callback: object) -> None:
        """Call ``callback(peer)`` whenever a new peer is added."""

    def record_serving(peer: Peer, serving: bool) -> None:
        """
        ``peer`` said (in an announcement or a health probe answer) whether
        it serves peers; one that does not (``--serve-peers no``) is left out
        of :meth:`healthy_peers` until it says it does again.
        """


class IDiscovery(Interface):
    """A way of finding peers that feeds an :class:`IPeerRegistry`; an ``IService``."""

    name = Attribute("Short name of the mechanism, used as the registry source.")


class IStoreScanner(Interface):
    """
    A store whose valid paths can be listed in bulk, for the store digest
    (:mod:`peernix.store.digest`).  Both methods run their work on a
    worker thread and never block the reactor thread.
    """

    def database_state() -> Deferred[object]:
        """
        :returns: a Deferred firing with an opaque value that compares equal
            as long as the store's database did not change (its files'
            inode, size and modification time).
        """

    def scan_paths(after_id: int, accept: Callable[[PathInfo], bool]) -> Deferred[PathScan]:
        """
        List the valid paths registered after row ``after_id`` (0: all).

        :param after_id: the ``max_id`` of an earlier scan, or 0.
        :param accept: ``accept(info) -> bool`` called on the worker thread
            for every servable path; only accepted paths are listed.
        :returns: a Deferred firing with a
            :class:`~peernix.store.local.PathScan`: the accepted hash parts,
            the rows looked at, and the row count and highest row id of the
            whole table when the scan started, so a caller can tell that
            rows were deleted (``rows`` less than the earlier count plus
            ``scanned``).
        """


class IPeerDigests(Interface):
    """
    The digests of peers' stores, kept in memory: which peers may hold a
    path (:mod:`peernix.peers.digests`).  A digest is a hint, never trust.
    """

    def candidates(peers: list[Peer], hash_part: str) -> list[Peer]:
        """
        :param peers: the peers that could be asked (healthy ones, in order).
        :param hash_part: a valid hash part.
        :returns: the peers among ``peers`` worth asking for ``hash_part``,
            in the same order: those whose digest may hold it, and those
            without a digest (none published, or not fetched yet).
        """

    def record_miss(peer: Peer, hash_part: str) -> None:
        """
        ``peer`` answered that it lacks ``hash_part``; if its digest claimed
        it, that is a false claim (counted; far more of them than the
        false-positive rate explains costs the peer score).
        """

    def subscribe(callback: object) -> None:
        """
        Call ``callback(peer, contains)`` whenever a peer's digest changed;
        ``contains(hash_part) -> bool`` says whether the new digest may hold
        a hash part (the fan-out forgets cached misses it now holds).
        """
