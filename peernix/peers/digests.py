"""
Peers' store digests, kept in memory: which peers may hold a path.

:class:`PeerDigests` implements :class:`~peernix.interfaces.IPeerDigests`.
It fetches every peer's digest (``GET /peernix/digest``, see
:mod:`peernix.store.digest`) when the peer is new, soon after an
announcement names a version other than the one held (at most once a
``min_gap``), and at least every ``interval`` seconds; a peer whose digest
changed by additions only sends those (a delta).  A peer that publishes a
digest but whose announcements we do not hear (a static peer beyond the
broadcast domain, a LAN without broadcast or mDNS) is revalidated every
``quiet_interval`` seconds instead (a ``304`` when unchanged), so a path
added to its store is found within seconds there too.  Every fetch is bounded in
time and size, and at most ``max_fetches`` run at once.

A digest is a hint, never trust: it only decides whom the fan-out asks.  A
peer that publishes none (the Go zw3rk/peernix, an older peernix, a digest
not fetched yet or unreadable) is always asked.  A peer whose digest claims
paths it then does not have, far more often than the false-positive rate
explains, loses score (a ``"digest"`` failure in the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from attrs import define
from prometheus_client import CollectorRegistry, Counter, Gauge
from rbloom import Bloom
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from peernix.interfaces import IPeerDigests, IPeerRegistry
from peernix.peers.client import DigestAnswer, PeerClient
from peernix.peers.errors import PeerError
from peernix.peers.registry import Peer, parse_peer_url
from peernix.store.digest import (
    DELTA_CONTENT_TYPE,
    DIGEST_CONTENT_TYPE,
    MAX_DIGEST_BYTES,
    DigestError,
    digest_key,
    load_digest,
    parse_delta,
)

__all__ = ["PeerDigest", "PeerDigests"]

log = Logger()

#: False claims before a peer's digest is judged at all (a few are the
#: false-positive rate at work).
MIN_FALSE_CLAIMS: Final = 8
#: A digest claiming paths its peer lacks more often than this many times
#: the false-positive rate it should have costs the peer a strike.
FALSE_CLAIM_FACTOR: Final = 5.0
#: The false-positive rate assumed for judging a peer's digest (ours, 1%,
#: unless configured otherwise).
ASSUMED_FP_RATE: Final = 0.01
#: Lookups counted per judgement window; the counts are halved past it so
#: old behaviour fades.
JUDGE_WINDOW: Final = 4096
#: Memory all peers' digests may hold together (a 1% digest of 100k paths
#: is 117 KiB, so this is hundreds of such peers); past it a peer's new
#: digest is not kept and the peer is asked for everything.
MAX_TOTAL_BYTES: Final = 64 * 1024 * 1024


@define
class PeerDigest:
    """What we know of one peer's digest.  Only :class:`PeerDigests` changes it."""

    #: ``"pending"`` (never fetched), ``"ok"``, ``"none"`` (the peer
    #: publishes none), ``"error"`` (the last fetch failed; an older digest
    #: may still be held).
    state: str = "pending"
    bloom: Bloom | None = None
    #: The version held (``"<generation>-<version>"``, unquoted).
    tag: str | None = None
    #: The version the peer last announced, and when (clock time).
    announced: str | None = None
    heard_at: float | None = None
    #: A version whose fetch gave no usable digest: announcing it again does
    #: not make us fetch sooner than the interval.
    rejected: str | None = None
    paths: int | None = None
    size_bytes: int = 0
    fetched_at: float | None = None
    attempted_at: float | None = None
    fetching: bool = False
    fetches: int = 0
    deltas: int = 0
    #: Lookups checked against the digest, and those it claimed the peer
    #: then said it lacked, in the current window.
    checks: int = 0
    false_claims: int = 0
    total_false_claims: int = 0

    def document(self, now: float) -> dict[str, object]:
        """:returns: this peer's digest state for ``/status.json``."""
        return {
            "state": self.state,
            "tag": self.tag,
            "announced": self.announced,
            "paths": self.paths,
            "size_bytes": self.size_bytes,
            "age": None if self.fetched_at is None else round(now - self.fetched_at, 3),
            "fetches": self.fetches,
            "deltas": self.deltas,
            "false_claims": self.total_false_claims,
        }


class DigestMetrics:
    """The digest metrics, on the service's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.avoided = Counter(
            "peernix_digest_requests_avoided",
            "Narinfo requests to peers not sent because the peer's digest lacks the path",
            registry=registry,
        )
        self.skipped_lookups = Counter(
            "peernix_digest_lookups_skipped",
            "Lookups answered as misses with no request at all: no peer's digest holds the path",
            registry=registry,
        )
        self.false_claims = Counter(
            "peernix_digest_false_claims",
            "Peers' 404s for paths their digest claimed (false positives, or lies)",
            registry=registry,
        )
        self.fetches = Counter(
            "peernix_digest_fetches",
            "Fetches of peers' digests, by result",
            ["result"],
            registry=registry,
        )
        self.peer_digest_bytes = Gauge(
            "peernix_peer_digest_bytes", "Memory held by peers' digests (their serialised size)", registry=registry
        )


@implementer(IPeerDigests)
class PeerDigests:
    """
    :param registry: the peer table (whose peers' digests are kept; a lying
        digest is recorded there as a ``"digest"`` failure).
    :param client: fetches digests.
    :param clock: for the schedule.
    :param interval: seconds between two fetches of a peer's digest at most.
    :param min_gap: seconds between two fetches of one peer's digest at least
        (announcements cannot make us fetch more often).
    :param quiet_interval: seconds between two fetches of the digest of a
        peer that publishes one but has announced no version within
        ``quiet_after`` seconds (we have no other way to learn it changed).
    :param quiet_after: see ``quiet_interval``; a peer announces at least
        every 30 s by default.
    :param tick: seconds between two looks at which digests are due.
    :param timeout: deadline of one fetch, body included.
    :param max_bytes: the largest digest accepted.
    :param max_fetches: fetches in flight at most.
    :param max_total_bytes: memory all digests may hold together (their
        serialised size); a digest past it is dropped (its peer is asked
        for everything), so peers serving huge digests cannot exhaust memory.
    :param fp_rate: the false-positive rate a peer's digest is judged by.
    :param metrics_registry: where the metrics go (a private registry when ``None``).
    """

    def __init__(
        self,
        registry: IPeerRegistry,
        client: PeerClient,
        clock: IReactorTime,
        *,
        interval: float = 30.0,
        min_gap: float = 1.0,
        quiet_interval: float = 2.0,
        quiet_after: float = 120.0,
        tick: float = 0.25,
        timeout: float = 10.0,
        max_bytes: int = MAX_DIGEST_BYTES,
        max_fetches: int = 4,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        fp_rate: float = ASSUMED_FP_RATE,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self._registry = registry
        self._client = client
        self._clock = clock
        self._interval = interval
        self._min_gap = min_gap
        self._quiet_interval = min(quiet_interval, interval)
        self._quiet_after = quiet_after
        self._tick_interval = tick
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._max_fetches = max_fetches
        self._max_total_bytes = max_total_bytes
        self._fp_rate = fp_rate
        self.metrics = DigestMetrics(metrics_registry)
        self._digests: dict[str, PeerDigest] = {}
        self._running: set[Deferred[None]] = set()
        self._subscribers: list[Callable[[Peer, Callable[[str], bool]], object]] = []
        self._loop: LoopingCall | None = None

    # -- IPeerDigests ------------------------------------------------------

    def candidates(self, peers: list[Peer], hash_part: str) -> list[Peer]:
        """See :meth:`IPeerDigests.candidates`; counts the requests avoided."""
        digests = self._digests
        key: int | None = None
        chosen: list[Peer] = []
        for peer in peers:
            digest = digests.get(peer.url)
            bloom = digest.bloom if digest is not None else None
            if bloom is None:
                chosen.append(peer)
                continue
            if key is None:
                key = digest_key(hash_part)
            assert digest is not None
            digest.checks += 1
            if key in bloom:
                chosen.append(peer)
        avoided = len(peers) - len(chosen)
        if avoided:
            self.metrics.avoided.inc(avoided)
            if not chosen:
                self.metrics.skipped_lookups.inc()
        return chosen

    def record_miss(self, peer: Peer, hash_part: str) -> None:
        """See :meth:`IPeerDigests.record_miss`."""
        digest = self._digests.get(peer.url)
        if digest is None or digest.bloom is None or digest_key(hash_part) not in digest.bloom:
            return
        digest.false_claims += 1
        digest.total_false_claims += 1
        self.metrics.false_claims.inc()
        if digest.false_claims >= MIN_FALSE_CLAIMS:
            rate = digest.false_claims / max(1, digest.checks)
            if rate > FALSE_CLAIM_FACTOR * self._fp_rate:
                log.warn(
                    "{peer}'s digest claimed {claims} of {checks} paths it did not have: far above"
                    " the false-positive rate; the peer loses score",
                    peer=peer.url,
                    claims=digest.false_claims,
                    checks=digest.checks,
                )
                self._registry.record_failure(peer, "digest")
                digest.false_claims = 0
                digest.checks = 0
        if digest.checks > JUDGE_WINDOW:
            digest.checks //= 2
            digest.false_claims //= 2

    def subscribe(self, callback: object) -> None:
        """See :meth:`IPeerDigests.subscribe`."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._subscribers.append(callback)

    # -- announcements -----------------------------------------------------

    def announced(self, url: str, tag: str) -> None:
        """
        A peer at ``url`` announced that its digest is at version ``tag``;
        fetch it soon (within ``min_gap`` of the last fetch) unless held.
        """
        try:
            norm = parse_peer_url(url)
        except ValueError:
            return
        peer = next((p for p in self._registry.peers() if p.url == norm), None)
        if peer is None:
            return
        digest = self._digests.setdefault(peer.url, PeerDigest())
        digest.announced = tag.strip('"')
        digest.heard_at = self._clock.seconds()
        if digest.tag != digest.announced:
            self._maybe_fetch(peer, digest, self._clock.seconds())

    # -- status ------------------------------------------------------------

    def document(self) -> dict[str, object]:
        """:returns: every known peer's digest state, by URL, for ``/status.json``."""
        now = self._clock.seconds()
        return {url: digest.document(now) for url, digest in sorted(self._digests.items())}

    def get(self, url: str) -> PeerDigest | None:
        """:returns: what we hold of the digest of the peer at (normalised) ``url``."""
        return self._digests.get(url)

    # -- schedule ------------------------------------------------------------

    def start(self) -> None:
        """Look at which digests are due every ``tick`` seconds (stopped by :meth:`stop`)."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._tick_interval, now=True).addErrback(
            lambda f: log.failure("digest refresh loop failed", f)
        )

    def stop(self) -> None:
        """Stop the schedule and cancel the fetches in flight."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        for d in list(self._running):
            d.cancel()

    def _tick(self) -> None:
        now = self._clock.seconds()
        known = {peer.url: peer for peer in self._registry.peers()}
        for url in list(self._digests):
            if url not in known:
                del self._digests[url]
        for url, peer in known.items():
            digest = self._digests.get(url)
            if digest is None:
                digest = self._digests[url] = PeerDigest()
            self._maybe_fetch(peer, digest, now)
        self.metrics.peer_digest_bytes.set(sum(d.size_bytes for d in self._digests.values()))

    def _due(self, digest: PeerDigest, now: float) -> bool:
        if digest.fetching:
            return False
        if digest.attempted_at is None:
            return True
        since = now - digest.attempted_at
        if since < self._min_gap:
            return False
        if digest.announced is not None and digest.announced not in (digest.tag, digest.rejected):
            return True
        quiet = digest.state == "ok" and (digest.heard_at is None or now - digest.heard_at > self._quiet_after)
        return since >= (self._quiet_interval if quiet else self._interval)

    def _maybe_fetch(self, peer: Peer, digest: PeerDigest, now: float) -> None:
        if not peer.serving:
            # A consume-only peer (--serve-peers no) is never asked, not even
            # for its digest: it publishes none.
            return
        if peer.is_static and peer.successes == 0:
            # A static peer announces nothing: whether it serves peers at all
            # is learnt from its first answer (the health probe), so its
            # digest waits for that.
            return
        if not self._due(digest, now) or len(self._running) >= self._max_fetches:
            return
        if peer.backoff_until > now and digest.attempted_at is not None:
            # A failing peer is not asked for its digest either; the
            # interval brings us back to it.
            return
        digest.fetching = True
        digest.attempted_at = now
        d = Deferred.fromCoroutine(self._fetch(peer, digest))
        self._running.add(d)
        d.addBoth(self._fetched, d, digest)

    def _fetched(self, result: object, d: Deferred[None], digest: PeerDigest) -> None:
        self._running.discard(d)
        digest.fetching = False

    async def _fetch(self, peer: Peer, digest: PeerDigest) -> None:
        try:
            answer = await self._client.fetch_digest(
                peer, digest.tag if digest.bloom is not None else None,
                max_bytes=self._max_bytes, timeout=self._timeout,
            )
        except CancelledError:
            raise
        except PeerError as e:
            digest.state = "error"
            self.metrics.fetches.labels("error").inc()
            log.debug("fetching {peer}'s digest failed: {error}", peer=peer.url, error=str(e))
            return
        except Exception:
            digest.state = "error"
            self.metrics.fetches.labels("error").inc()
            log.failure("fetching {peer}'s digest failed", peer=peer.url)
            return
        self._apply(peer, digest, answer)

    def _apply(self, peer: Peer, digest: PeerDigest, answer: DigestAnswer) -> None:
        now = self._clock.seconds()
        tag = answer.etag.removeprefix("W/").strip('"') if answer.etag else None
        if answer.code == 304:
            digest.fetched_at = now
            if digest.bloom is not None:
                digest.state = "ok"
            self.metrics.fetches.labels("unchanged").inc()
            return
        if answer.code != 200:
            # No digest published: ask this peer for everything, as before.
            digest.rejected = digest.announced
            digest.bloom = None
            digest.tag = None
            digest.paths = None
            digest.size_bytes = 0
            digest.state = "none"
            digest.fetched_at = now
            self.metrics.fetches.labels("none").inc()
            return
        content_type = (answer.content_type or "").split(";")[0].strip().encode("ascii", "replace")
        try:
            if content_type == DELTA_CONTENT_TYPE:
                if digest.bloom is None or answer.base is None or answer.base.strip('"') != digest.tag:
                    raise DigestError("delta for a version we do not hold")
                added = parse_delta(answer.body)
                bloom = digest.bloom
                bloom.update(map(digest_key, added))
                digest.paths = (digest.paths or 0) + len(added)
                digest.deltas += 1
                changed: Callable[[str], bool] = _contains(bloom)
            elif content_type == DIGEST_CONTENT_TYPE:
                others = sum(d.size_bytes for d in self._digests.values() if d is not digest)
                if others + len(answer.body) > self._max_total_bytes:
                    raise DigestError(
                        f"keeping its {len(answer.body)} bytes would pass the {self._max_total_bytes}"
                        " bytes all peers' digests may hold"
                    )
                bloom = load_digest(answer.body)
                digest.bloom = bloom
                digest.size_bytes = len(answer.body)
                digest.paths = round(bloom.approx_items)
                changed = _contains(bloom)
            else:
                raise DigestError(f"unknown digest type {answer.content_type!r}")
        except DigestError as e:
            # Unusable: forget what we held, so the next fetch is a whole one
            # and, until then, the peer is asked for everything.
            log.info("ignoring {peer}'s digest: {error}", peer=peer.url, error=str(e))
            digest.rejected = tag or digest.announced
            digest.bloom = None
            digest.tag = None
            digest.size_bytes = 0
            digest.state = "error"
            self.metrics.fetches.labels("invalid").inc()
            return
        digest.tag = tag
        digest.state = "ok"
        digest.fetched_at = now
        digest.fetches += 1
        self.metrics.fetches.labels("delta" if content_type == DELTA_CONTENT_TYPE else "full").inc()
        for callback in list(self._subscribers):
            try:
                callback(peer, changed)
            except Exception:
                log.failure("digest subscriber failed")


def _contains(bloom: Bloom) -> Callable[[str], bool]:
    def contains(hash_part: str) -> bool:
        return digest_key(hash_part) in bloom

    return contains
