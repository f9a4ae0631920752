"""
Fetching for the LAN: the coordinator.

:class:`LanFetcher` is an :class:`~peernix.interfaces.IUpstream` tried after
the peers' fan-out (see :mod:`peernix.upstream.chain`):

* **Narinfos** come from the upstreams directly (every node may ask them
  itself; a path's narinfo is asked at most once per node within the cache
  TTL, concurrent lookups coalesced), through the same trust filter as a
  peer's.  Only paths whose narinfo came from an upstream are ever fetched
  or staged for the LAN.
* **NARs** come through the path's fetcher: the nodes that offer fetching
  (:class:`~peernix.upstream.rendezvous.FetcherTable`) in rendezvous order.
  A node that is first in that order downloads from the upstream; any other
  node streams from the fetcher's ``/peernix/fetch/`` route
  (:func:`peer_fetch_url`).  Either way the bytes go into this node's
  staging area (:mod:`peernix.upstream.staging`), from which every local
  client and every asking peer reads, so one download serves everyone.
  A fetcher that is unreachable, fails or sends nothing for ``silence``
  seconds is replaced by the next in order, resuming at the byte reached
  (``Range``); a node downloads from the upstream itself only when its turn
  comes or no fetcher is left.
* A NAR failing FileSize/FileHash/NarSize/NarHash is never finished to any
  client: the staging download fails, every reader's connection is aborted,
  the file goes, and it is counted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.interfaces import IPeerRegistry, IUpstream
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo
from peernix.nix.signing import PublicKey, verify_any
from peernix.peers.errors import NarClientGone, NarRelayInterrupted, NarUnavailable, NarVerificationFailed
from peernix.sources import Found, Source
from peernix.upstream.client import (
    NarBodyDecoder,
    SourceFailed,
    UpstreamClient,
    UpstreamError,
    VerificationFailed,
    nar_url,
)
from peernix.upstream.config import reaches_peer
from peernix.upstream.metrics import UpstreamMetrics
from peernix.upstream.rendezvous import SELF, FetcherTable
from peernix.upstream.staging import ConsumerGone, Download, Key, StagedReader, Staging, staging_key

_log = Logger()

#: The route a node asks a fetcher for a NAR on: ``<prefix><hash>-<narhash>.nar``.
FETCH_PREFIX = "/peernix/fetch/"

#: Narinfo lookups remembered (hits and misses), most recent kept.
MAX_CACHED_NARINFOS = 4096

#: Seconds between two questions to a peer that announces nothing (see
#: :meth:`LanFetcher.ask_silent_peers`): a Go node is asked this often.
NODE_QUERY_INTERVAL = 60.0


def peer_fetch_url(peer_url: str, hash_part: str, nar_hash: Hash) -> str:
    """:returns: the URL of a NAR on a fetching peer's ``/peernix/fetch/`` route."""
    return f"{peer_url}{FETCH_PREFIX}{hash_part}-{nar_hash.nix32()}.nar"


def make_share_filter(mode: str, keys: Sequence[PublicKey]) -> Callable[[NarInfo], bool]:
    """
    :param mode: the ``--share`` mode.
    :param keys: the keys whose signatures make a path shared (the trusted
        keys and this node's own).
    :returns: whether peers may get a staged NAR of a narinfo: under
        ``all`` always; under ``trusted`` only with a signature verifying
        against ``keys`` (as for paths in the store; an unsigned
        content-addressed path is withheld there too).
    """
    if mode == "all":
        return lambda info: True
    by_name: dict[str, PublicKey] = {}
    for key in keys:
        by_name.setdefault(key.name, key)

    def shares(info: NarInfo) -> bool:
        try:
            return verify_any(info.fingerprint(), info.sigs, by_name)
        except (ValueError, TypeError):
            return False

    return shares


@attrs.frozen
class UpstreamRecord:
    """A trusted narinfo and the upstream it came from."""

    base: str
    info: NarInfo


@attrs.define
class ActiveFetch:
    """A NAR this node is downloading into its staging area now."""

    store_path: str
    nar_size: int
    download: Download
    source: str = ""
    started: float = 0.0
    #: The fetching peer the bytes come from now (``None``: the upstream).
    via: str | None = None


@implementer(IConsumer)
class _NamingConsumer:
    """
    Passes everything to ``consumer``; calls ``name()`` once, just before
    the first byte is written, so the caller can name the answer's source
    as it stands then (the fetcher may have changed since the request came).
    """

    def __init__(self, consumer: Any, name: Callable[[], object]) -> None:
        self._consumer = consumer
        self._name: Callable[[], object] | None = name

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        name, self._name = self._name, None
        if name is not None:
            name()
        self._consumer.write(data)


def _first_found(ds: list[Deferred[NarInfo | None]]) -> Deferred[tuple[int, NarInfo] | None]:
    """
    :returns: a Deferred firing with ``(index, narinfo)`` of the first of
        ``ds`` to find one (the others are cancelled), or ``None`` once all
        missed or failed.  Cancelling it cancels them all.
    """
    def cancel(_d: Deferred[tuple[int, NarInfo] | None]) -> None:
        for d in ds:
            d.cancel()

    result: Deferred[tuple[int, NarInfo] | None] = Deferred(cancel)
    left = len(ds)

    def one(value: NarInfo | None | Failure, index: int) -> None:
        nonlocal left
        left -= 1
        if result.called:
            return
        if isinstance(value, NarInfo):
            result.callback((index, value))
            for other in ds:
                other.cancel()
        elif left == 0:
            result.callback(None)

    for index, d in enumerate(ds):
        d.addBoth(one, index)
    if not ds:
        result.callback(None)
    return result


@implementer(IUpstream)
class LanFetcher:
    """
    The coordinator of fetching for the LAN.

    :param upstreams: base URLs of the upstream caches (filtered again at
        each use against the peers' URLs).
    :param client: requests to upstreams and to fetching peers.
    :param staging: this node's staging area (started).
    :param table: who offers fetching, and whether this node does.
    :param registry: the peer table (healthy peers are fetcher candidates);
        ``None``: no peers, this node fetches for itself.
    :param clock: for the narinfo cache and timers.
    :param metrics: the ``peernix_upstream_*`` metrics.
    :param shares: whether peers may get a staged NAR (the ``--share``
        filter, see :func:`make_share_filter`).
    :param narinfo_ttl: seconds a found narinfo is remembered.
    :param negative_ttl: seconds a miss (or a failed lookup) is remembered.
    :param lookup_timeout: deadline of a narinfo lookup at the upstreams:
        a local client's miss is answered well within 5 s even when every
        upstream is down.
    :param silence: seconds a fetcher may send nothing (or take to answer)
        before the next one is asked.
    """

    def __init__(
        self,
        *,
        upstreams: Sequence[str],
        client: UpstreamClient,
        staging: Staging,
        table: FetcherTable,
        registry: IPeerRegistry | None,
        clock: IReactorTime,
        metrics: UpstreamMetrics,
        shares: Callable[[NarInfo], bool] = lambda info: True,
        narinfo_ttl: float = 300.0,
        negative_ttl: float = 10.0,
        lookup_timeout: float = 4.0,
        silence: float = 10.0,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self._client = client
        self.staging = staging
        self.table = table
        self._registry = registry
        self._clock = clock
        self.metrics = metrics
        self._shares = shares
        self._narinfo_ttl = narinfo_ttl
        self._negative_ttl = negative_ttl
        self.lookup_timeout = lookup_timeout
        self._silence = silence
        # hash part -> (expiry, record or None for a miss)
        self._cache: OrderedDict[str, tuple[float, UpstreamRecord | None]] = OrderedDict()
        # hash part -> the one lookup under way, observed by every asker.
        self._lookups: dict[str, Deferred[UpstreamRecord | None]] = {}
        self._lookup_waiters: dict[str, list[Deferred[UpstreamRecord | None]]] = {}
        self.active: dict[Key, ActiveFetch] = {}
        # The coroutines filling downloads; cancelled by stop().
        self._fills: dict[Key, Deferred[None]] = {}
        # peer URL -> when it was last asked who it is (ask_silent_peers).
        self._node_queries: dict[str, float] = {}
        # Staged NAR -> the fetching peer its bytes came from (None: the
        # upstream itself), for the source of later answers.
        self._vias: OrderedDict[Key, str | None] = OrderedDict()
        # hash part -> the record of the verified NAR staged for it, while
        # it stays staged (served to peers on the normal routes, and in
        # this node's digest when --share lets peers have it).
        self._staged: dict[str, UpstreamRecord] = {}
        staging.on_dropped = self._unstaged
        #: Told the hash part of every verified NAR staged here that peers
        #: may have (after the ``--share`` filter): the digest adds it.
        self.on_staged: Callable[[str], object] | None = None
        #: Told the hash part of every such NAR when it leaves the staging
        #: area: the digest is rebuilt without it.
        self.on_unstaged: Callable[[str], object] | None = None
        #: Told the size of every chunk of staged NAR sent to a peer (the
        #: savings' "to peers").
        self.on_bytes_to_peers: Callable[[int], object] | None = None
        #: Told the size of every chunk of NAR received from a fetching
        #: peer: bytes the LAN saved this node (the savings' "from peers").
        self.on_peer_bytes: Callable[[int], object] | None = None

    # -- narinfos -------------------------------------------------------------

    def _peer_urls(self) -> list[str]:
        return [p.url for p in self._registry.peers()] if self._registry is not None else []

    def _healthy_urls(self) -> list[str]:
        return [p.url for p in self._registry.healthy_peers()] if self._registry is not None else []

    def record(self, hash_part: str) -> Deferred[UpstreamRecord | None]:
        """
        :returns: a Deferred (this caller's own) firing with the trusted
            upstream narinfo of ``hash_part`` and its upstream, or ``None``
            (a miss, or every upstream failed or was slow).  Never fails;
            cancelling it stops only this caller's wait.
        """
        now = self._clock.seconds()
        cached = self._cache.get(hash_part)
        if cached is not None and cached[0] > now:
            done: Deferred[UpstreamRecord | None] = Deferred()
            done.callback(cached[1])
            return done

        def forget(d: Deferred[UpstreamRecord | None]) -> None:
            # Only this caller stops waiting; the shared lookup goes on.
            waiters = self._lookup_waiters.get(hash_part, [])
            if d in waiters:
                waiters.remove(d)

        waiter: Deferred[UpstreamRecord | None] = Deferred(forget)
        self._lookup_waiters.setdefault(hash_part, []).append(waiter)
        if hash_part not in self._lookups:
            shared = Deferred.fromCoroutine(self._ask_upstreams(hash_part))
            self._lookups[hash_part] = shared
            shared.addBoth(self._lookup_done, hash_part)
        return waiter

    async def _ask_upstreams(self, hash_part: str) -> UpstreamRecord | None:
        peers = self._peer_urls()
        bases = [b for b in self.upstreams if not reaches_peer(b, peers)]
        ds = [self._client.fetch_narinfo(base, hash_part, timeout=self.lookup_timeout) for base in bases]
        for base, d in zip(bases, ds):
            d.addErrback(self._lookup_failed, base, hash_part)
        found = await _first_found(ds)
        if found is None:
            self.metrics.narinfo_requests.labels("miss").inc()
            return None
        self.metrics.narinfo_requests.labels("hit").inc()
        return UpstreamRecord(bases[found[0]], found[1])

    def _lookup_failed(self, failure: Failure, base: str, hash_part: str) -> None:
        if not isinstance(failure.value, CancelledError):
            self.metrics.narinfo_requests.labels("error").inc()
            _log.info("Upstream {upstream} did not answer for {hash_part}: {error}",
                      upstream=base, hash_part=hash_part, error=failure.getErrorMessage())
        return None

    def _lookup_done(self, result: UpstreamRecord | None | Failure, hash_part: str) -> None:
        del self._lookups[hash_part]
        if isinstance(result, Failure):
            if not isinstance(result.value, CancelledError):
                _log.failure("Upstream lookup of {hash_part} failed", failure=result, hash_part=hash_part)
            result = None
        ttl = self._narinfo_ttl if result is not None else self._negative_ttl
        self._cache.pop(hash_part, None)
        self._cache[hash_part] = (self._clock.seconds() + ttl, result)
        while len(self._cache) > MAX_CACHED_NARINFOS:
            self._cache.popitem(last=False)
        for waiter in self._lookup_waiters.pop(hash_part, []):
            waiter.callback(result)

    def lookup(self, hash_part: str) -> Deferred[NarInfo | None]:
        """See :meth:`IUpstream.lookup`: the upstream's narinfo, untouched."""
        d = self.record(hash_part)
        return d.addCallback(lambda record: record.info if record is not None else None)

    def find(self, hash_part: str) -> Deferred[Found | None]:
        """
        See :meth:`IUpstream.find`: the source is ``upstream <its URL>``,
        with ``via <fetcher base URL>`` when another node fetches (or
        fetched) the NAR for this one (see :meth:`source_of`).
        """
        d = self.record(hash_part)
        return d.addCallback(lambda record: Found(record.info, self.source_of(record)) if record is not None else None)

    def source_of(self, record: UpstreamRecord) -> Source:
        """
        :returns: where the NAR of ``record`` comes from for this node:
            ``upstream <URL>``, plus ``via <peer>`` when a fetching peer
            sends the bytes: the one a running download reads from now,
            the one a staged NAR came from, else the first in rendezvous
            order (the fetcher the NAR would be asked of), unless that is
            this node.
        """
        info = record.info
        hash_part = info.store_path[len("/nix/store/"):][:32]
        key = staging_key(hash_part, info.nar_hash)
        active = self.active.get(key)
        via: str | None
        if active is not None:
            via = active.via
        elif key in self._vias and self.staging.staged(key):
            via = self._vias[key]
        else:
            order = self.table.order(hash_part, self._healthy_urls())
            via = order[0] if order and order[0] != SELF else None
        return Source("upstream", record.base, via)

    # -- NARs -----------------------------------------------------------------

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """
        See :meth:`IUpstream.relay_nar`: stream the NAR of ``info`` from the
        staging area into a local client's ``consumer``, starting (or
        joining) its download.  The last byte goes only after the NAR
        verified.  Fails with :class:`NarUnavailable` when nothing was
        written (the caller answers 404).  ``on_peer``, when given, is
        called with the answer's :class:`~peernix.sources.Source` (see
        :meth:`source_of`) just before the first byte is written.
        """
        if on_peer is not None and not callable(on_peer):
            raise TypeError("on_peer must be callable")
        return Deferred.fromCoroutine(self._serve(info.store_path[len("/nix/store/"):][:32], info.nar_hash,
                                                  consumer, 0, for_peer=False, on_source=on_peer))

    def serve_peer(self, hash_part: str, nar_hash: Hash, consumer: IConsumer, offset: int = 0) -> Deferred[None]:
        """
        Serve a NAR to a peer on the fetch route: from the staging area,
        downloading it from the upstream (this node being asked as the
        fetcher) if it is not staged.  Only paths whose narinfo came from an
        upstream, with that NarHash, and that ``--share`` lets peers have;
        a node that does not fetch for the LAN serves only what it has
        staged already.

        :returns: like :meth:`relay_nar`.
        """
        return Deferred.fromCoroutine(self._serve(hash_part, nar_hash, consumer, offset, for_peer=True))

    async def _serve(self, hash_part: str, nar_hash: Hash, consumer: Any, offset: int, for_peer: bool,
                     on_source: Callable[[Source], object] | None = None) -> None:
        # A NAR held here needs no narinfo lookup, even after its cache entry expired.
        record = self.held_record(hash_part)
        if record is None or record.info.nar_hash != nar_hash:
            record = await self.record(hash_part)
        if record is None or record.info.nar_hash != nar_hash:
            raise NarUnavailable(f"{hash_part} did not come from an upstream with that NarHash")
        if for_peer and not self._shares(record.info):
            raise NarUnavailable(f"{hash_part} is not shared with peers")
        if on_source is not None:
            named = on_source
            consumer = _NamingConsumer(consumer, lambda: named(self.source_of(record)))
        to = "peer" if for_peer else "local"
        reader = self._reader(record, consumer, offset, to, start_as_fetcher=for_peer)
        if reader is None:
            raise NarUnavailable(f"{hash_part} is not staged here and this node does not fetch for the LAN")
        await self._read(reader)

    @staticmethod
    async def _read(reader: StagedReader) -> None:
        """Run ``reader``, its errors mapped to the ``relay_nar`` contract's."""
        try:
            await reader.start()
        except CancelledError:
            raise
        except ConsumerGone:
            raise NarClientGone("the client stopped the transfer") from None
        except Exception as e:
            if reader.sent == 0:
                raise NarUnavailable(str(e)) from None
            if isinstance(e, VerificationFailed):
                raise NarVerificationFailed(str(e)) from None
            raise NarRelayInterrupted(str(e)) from None

    def _reader(self, record: UpstreamRecord, consumer: Any, offset: int, to: str,
                start_as_fetcher: bool) -> StagedReader | None:
        info = record.info
        hash_part = info.store_path[len("/nix/store/"):][:32]
        on_bytes = self._sent_to_peer if to == "peer" else self.metrics.served_bytes.labels(to).inc
        reader = self.staging.open_reader(hash_part, info.nar_hash, consumer, offset=offset, on_bytes=on_bytes)
        if reader is not None:
            return reader
        if start_as_fetcher and not self.table.fetch_for_lan:
            return None
        download = self.staging.begin(hash_part, info.nar_hash, info.nar_size)
        # The reader first, then the download: it counts as one of the
        # download's requests even if the download completes at once.
        reader = self.staging.open_reader(hash_part, info.nar_hash, consumer, offset=offset, on_bytes=on_bytes)
        self._start(download, record, as_fetcher=start_as_fetcher)
        return reader

    def _start(self, download: Download, record: UpstreamRecord, as_fetcher: bool) -> None:
        info = record.info
        key = download.key
        self.active[key] = ActiveFetch(info.store_path, info.nar_size, download, started=self._clock.seconds())
        fill = Deferred.fromCoroutine(self._fill(download, record, as_fetcher))
        self._fills[key] = fill
        fill.addErrback(self._fill_crashed, download)
        fill.addBoth(self._fill_over, key)

    def _fill_crashed(self, failure: Failure, download: Download) -> None:
        if not isinstance(failure.value, CancelledError):
            _log.failure("Fetching {key} for the LAN failed", failure=failure, key=download.key)
        download.fail(failure.value if isinstance(failure.value, Exception) else UpstreamError("failed"))

    def _fill_over(self, _: object, key: Key) -> None:
        self._fills.pop(key, None)
        self.active.pop(key, None)

    async def _fill(self, download: Download, record: UpstreamRecord, as_fetcher: bool) -> None:
        """
        Fill ``download``: from the fetchers in rendezvous order (unless
        this node is asked as the fetcher), from the upstream when this
        node's turn comes or no fetcher is left.
        """
        info = record.info
        hash_part = download.key[0]
        order: list[str] = [] if as_fetcher else self.table.order(hash_part, self._healthy_urls())
        # Where the bytes come from (for the metrics): a fetching peer, or the upstream.
        fetched_from = "upstream"
        from_peer = False
        current_fetcher: str | None = None
        try:
            for fetcher in order:
                if fetcher == SELF or download.state != "running":
                    break
                active = self.active.get(download.key)
                if active is not None:
                    active.source = fetcher
                    active.via = fetcher
                fetched_from = "peer"
                current_fetcher = fetcher
                try:
                    await self._from_peer(fetcher, download, info)
                except SourceFailed as e:
                    if download.state != "running":
                        # Our side gave up (the staging disk), not the fetcher.
                        raise
                    self.metrics.fallbacks.inc()
                    _log.info("Fetcher {fetcher} failed for {store_path} ({error}); trying the next",
                              fetcher=fetcher, store_path=info.store_path, error=str(e))
                    continue
                from_peer = True
                break
            else:
                if order and order[-1] != SELF:
                    _log.info("No fetcher left for {store_path}; fetching it for ourselves",
                              store_path=info.store_path)
            if download.state != "running":
                # Given up under us (the staging disk failed): nothing more to try.
                raise SourceFailed(str(download.error or "the download was given up"))
            if not from_peer:
                fetched_from = "upstream"
                active = self.active.get(download.key)
                if active is not None:
                    active.source = record.base
                    active.via = None
                await self._from_upstream(record, download)
            download.finish()
            self._note_staged(record, download.key)
            self._vias.pop(download.key, None)
            self._vias[download.key] = current_fetcher if from_peer else None
            while len(self._vias) > MAX_CACHED_NARINFOS:
                self._vias.popitem(last=False)
        except VerificationFailed as e:
            if current_fetcher is not None:
                # A fetcher's bytes failed (it lied, or its upstream did):
                # it is skipped for a while, so the next download of this
                # path goes through another one.
                self._penalise(current_fetcher)
            self.metrics.verification_failures.inc()
            self.metrics.downloads.labels(fetched_from, "verification").inc()
            _log.warn("NAR of {store_path} failed verification ({error}); dropped, never served",
                      store_path=info.store_path, error=str(e))
            download.fail(e)
            return
        except SourceFailed as e:
            self.metrics.downloads.labels(fetched_from, "failed").inc()
            _log.info("Cannot fetch {store_path} from {upstream}: {error}",
                      store_path=info.store_path, upstream=record.base, error=str(e))
            download.fail(e)
            return
        except CancelledError:
            download.fail(UpstreamError("stopped"))
            raise
        self.metrics.downloads.labels(fetched_from, "ok").inc()
        self.metrics.download_requests.labels(fetched_from).inc(download.readers)

    def _penalise(self, url: str) -> None:
        if self._registry is None:
            return
        for peer in self._registry.peers():
            if peer.url == url:
                self._registry.record_failure(peer, "verification")

    async def _from_peer(self, fetcher: str, download: Download, info: NarInfo) -> None:
        url = peer_fetch_url(fetcher, download.key[0], info.nar_hash)
        offset = download.written
        response = await self._client.open(url, offset=offset, peer=True, timeout=self._silence)
        decoder = NarBodyDecoder(
            download.append, "none", self._clock,
            silence=self._silence,
            skip=offset if response.code == 200 else 0,
            on_bytes=self._received_from_peer,
        )
        response.deliverBody(decoder)  # type: ignore[no-untyped-call]
        await decoder.done

    def _received_from_peer(self, nbytes: int) -> None:
        self.metrics.peer_bytes.inc(nbytes)
        if self.on_peer_bytes is not None:
            self.on_peer_bytes(nbytes)

    async def _from_upstream(self, record: UpstreamRecord, download: Download) -> None:
        info = record.info
        url = nar_url(record.base, info.url)
        response = await self._client.open(url, timeout=self._silence)
        decoder = NarBodyDecoder(
            download.append, info.compression, self._clock,
            file_hash=info.file_hash,
            file_size=info.file_size,
            silence=self._silence,
            # Bytes an earlier source already gave are in the file (and the
            # NarHash check runs over the file's bytes, whatever gave them).
            skip=download.written,
            on_bytes=self.metrics.fetched_bytes.inc,
        )
        response.deliverBody(decoder)  # type: ignore[no-untyped-call]
        await decoder.done

    # -- what stays staged ------------------------------------------------------

    def _note_staged(self, record: UpstreamRecord, key: Key) -> None:
        if not self.staging.staged(key):
            return  # larger than the staging area: streamed through, not kept
        self._staged[key[0]] = record
        if self.on_staged is not None and self._shares(record.info):
            self.on_staged(key[0])

    def _unstaged(self, key: Key) -> None:
        record = self._staged.get(key[0])
        if record is None or record.info.nar_hash.nix32() != key[1]:
            return
        del self._staged[key[0]]
        if self.on_unstaged is not None and self._shares(record.info):
            self.on_unstaged(key[0])

    def staged_record(self, hash_part: str) -> UpstreamRecord | None:
        """
        :returns: the upstream record of a verified NAR staged here that
            peers may have (the ``--share`` filter), else ``None``.  Peers
            get it on the normal routes while it stays staged.
        """
        record = self._staged.get(hash_part)
        if record is None or not self._shares(record.info):
            return None
        if not self.staging.staged(staging_key(hash_part, record.info.nar_hash)):
            return None
        return record

    def held_record(self, hash_part: str) -> UpstreamRecord | None:
        """
        :returns: the upstream record of a NAR this node holds for
            ``hash_part``: verified and staged, or being downloaded now;
            else ``None``.  For this node's own clients (no ``--share``
            filter): see :class:`StagedHere`.
        """
        record = self._staged.get(hash_part)
        if record is not None and self.staging.staged(staging_key(hash_part, record.info.nar_hash)):
            return record
        cached = self._cache.get(hash_part)
        if cached is not None and cached[1] is not None:
            if staging_key(hash_part, cached[1].info.nar_hash) in self.active:
                return cached[1]
        return None

    def staged_hash_parts(self) -> list[str]:
        """:returns: the hash parts of :meth:`staged_record`'s paths (what the digest covers)."""
        return [hash_part for hash_part in list(self._staged) if self.staged_record(hash_part) is not None]

    def serve_staged(self, hash_part: str, consumer: IConsumer, offset: int = 0) -> Deferred[None]:
        """
        Serve a verified staged NAR (see :meth:`staged_record`) to a peer
        on the normal NAR route, from byte ``offset``.  Never downloads.
        Counted in the metrics, not in :attr:`on_bytes_to_peers` (the web
        layer counts what it sends).

        :returns: like :meth:`relay_nar`.
        """
        return Deferred.fromCoroutine(self._serve_staged(hash_part, consumer, offset))

    async def _serve_staged(self, hash_part: str, consumer: IConsumer, offset: int) -> None:
        record = self.staged_record(hash_part)
        reader = None
        if record is not None:
            # The caller counts what the peer gets (it may cut a range).
            reader = self.staging.open_reader(hash_part, record.info.nar_hash, consumer, offset=offset,
                                              on_bytes=self.metrics.served_bytes.labels("peer").inc)
        if reader is None:
            raise NarUnavailable(f"{hash_part} is not staged here")
        await self._read(reader)

    def _sent_to_peer(self, nbytes: int) -> None:
        self.metrics.served_bytes.labels("peer").inc(nbytes)
        if self.on_bytes_to_peers is not None:
            self.on_bytes_to_peers(nbytes)

    # -- peers that do not announce themselves --------------------------------

    def ask_silent_peers(self) -> Deferred[None]:
        """
        Ask the healthy peers the fetcher table knows nothing about (static
        peers beyond the broadcast domain never announce) who they are and
        whether they fetch for the LAN, at most once per
        :data:`NODE_QUERY_INTERVAL` each.  Go nodes answer 404 and stay out.

        :returns: a Deferred firing when every answer is in (never fails).
        """
        now = self._clock.seconds()
        asked = []
        for url in self._healthy_urls():
            if self.table.known(url):
                continue
            if now - self._node_queries.get(url, -NODE_QUERY_INTERVAL) < NODE_QUERY_INTERVAL:
                continue
            self._node_queries[url] = now
            d = self._client.fetch_node(url)
            d.addCallback(self._node_answered, url)
            asked.append(d)
        while len(self._node_queries) > MAX_CACHED_NARINFOS:
            del self._node_queries[next(iter(self._node_queries))]
        return DeferredList(asked, consumeErrors=True).addCallback(lambda _: None)

    def _node_answered(self, answer: tuple[str, bool] | None, url: str) -> None:
        if answer is not None:
            self.table.note(url, answer[0], answer[1])

    # -- status and life cycle ------------------------------------------------

    def status(self) -> dict[str, object]:
        """:returns: the ``upstream`` section of ``/status.json``."""
        def value(name: str, labels: dict[str, str] | None = None) -> int | float:
            found = self.metrics.registry.get_sample_value(name, labels)
            number = 0.0 if found is None else float(found)
            # Counters are floats in Prometheus; whole numbers read better as such.
            return int(number) if number.is_integer() else number

        return {
            "upstreams": list(self.upstreams),
            "fetch_for_lan": self.table.fetch_for_lan,
            "fetching_peers": sorted(self.table.offering()),
            "active_fetches": [
                {
                    "store_path": fetch.store_path,
                    "nar_size": fetch.nar_size,
                    "received": fetch.download.written,
                    "requests": fetch.download.readers,
                    "source": fetch.source,
                }
                for fetch in self.active.values()
            ],
            "staging": {
                "dir": self.staging.directory,
                "bytes": self.staging.usage,
                "max_bytes": self.staging.max_size,
                "nars": self.staging.complete_count,
            },
            "bytes_fetched": value("peernix_upstream_fetched_bytes_total"),
            "bytes_from_fetchers": value("peernix_upstream_from_fetcher_bytes_total"),
            "bytes_served_to_peers": value("peernix_upstream_served_bytes_total", {"to": "peer"}),
            "bytes_served_to_local_clients": value("peernix_upstream_served_bytes_total", {"to": "local"}),
            "fetcher_fallbacks": value("peernix_upstream_fetcher_fallbacks_total"),
            "verification_failures": value("peernix_upstream_verification_failures_total"),
        }

    def stop(self) -> None:
        """Cancel every download under way (their readers fail); called when the service stops."""
        for fill in list(self._fills.values()):
            fill.cancel()
        for lookup in list(self._lookups.values()):
            lookup.cancel()


@implementer(IUpstream)
class StagedFirst:
    """
    The daemon's upstream for local misses: the NARs this node holds for
    the LAN first, then ``rest`` (the :class:`~peernix.upstream.chain.FirstOf`
    of the peers' fan-out and fetching for the LAN).  A path staged here, or
    being downloaded here, is served to this node's clients from its own
    staging area, never again over the LAN, even when a peer's digest (which
    covers staged paths too) names it.  Anything else goes to ``rest``
    unchanged (its budget and deadlines included); the check costs no
    network.
    """

    def __init__(self, fetcher: LanFetcher, rest: IUpstream) -> None:
        self._fetcher = fetcher
        self._rest = rest

    def lookup(self, hash_part: str) -> Deferred[NarInfo | None]:
        """See :meth:`IUpstream.lookup`."""
        return self.find(hash_part).addCallback(lambda found: found.info if found is not None else None)

    def find(self, hash_part: str) -> Deferred[Found | None]:
        """See :meth:`IUpstream.find`: held here (with its source, see :meth:`LanFetcher.source_of`), else ``rest``'s."""
        record = self._fetcher.held_record(hash_part)
        if record is None:
            return self._rest.find(hash_part)
        d: Deferred[Found | None] = Deferred()
        d.callback(Found(record.info, self._fetcher.source_of(record)))
        return d

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """See :meth:`IUpstream.relay_nar`: from this node's staging area when held here, else through ``rest``."""
        record = self._fetcher.held_record(info.store_path[len("/nix/store/"):][:32])
        if record is not None and record.info.nar_hash == info.nar_hash:
            return self._fetcher.relay_nar(info, consumer, on_peer)
        return self._rest.relay_nar(info, consumer, on_peer)
