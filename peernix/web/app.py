"""
The HTTP face of a peernix node: the Nix binary cache protocol under
``/nix-cache/``, a status page at ``/`` (and ``/status.json``), and
Prometheus metrics at ``/metrics``.

Routing.  Klein routes the status and metrics pages.  The cache protocol,
the hot path (Nix asks for every narinfo of a closure, many thousand per
second on a busy LAN), is dispatched by :class:`_Root` on the raw request
path with a few byte comparisons: no URL decoding, no werkzeug matching and,
for a cached narinfo, not a single Deferred.  Dispatching on the raw bytes
also means a percent-encoded traversal (``%2e%2e``) never becomes ``..``.

Errors.  A malformed request gets a 4xx; a miss, a dead peer or an
unexpected exception while looking something up gets 404, never a 5xx (Nix
treats 5xx as transient and may disable the substituter).  Once bytes of a
NAR have been sent, a failure aborts the connection so Nix never sees a
short-but-complete NAR.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar, Union
from urllib.parse import unquote_to_bytes

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from peernix.interfaces import IPeerRegistry, IStore, IUpstream
from peernix.memory import IdleTrimmer
from peernix.nix import nix32
from peernix.nix.hashes import Hash
from peernix.nix.listing import nar_listing, render_listing
from peernix.nix.nar import DEFAULT_CHUNK_SIZE, nar_chunks, nar_pieces
from peernix.nix.narinfo import NarInfo, render_narinfo
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import SecretKey, sign_narinfo
from peernix.nix.storepath import STORE_DIR, StorePathError, parse_basename
from peernix.peers.client import PEER_HEADER
from peernix.peers.client import SERVE_PEERS_HEADER as _SERVE_PEERS_HEADER_NAME
from peernix.peers.errors import NarClientGone, NarUnavailable
from peernix.sources import LOCAL, SOURCE_HEADER, Found, Source, peer_source
from peernix.store.share import SharedStore
from peernix.web.digest import DIGEST_PATH
from peernix.web.encoding import RangeNotSatisfiable, choose_encoding, parse_range
from peernix.web.metrics import Metrics, MetricsResource
from peernix.upstream.fetch import FETCH_PREFIX, LanFetcher
from peernix.web.fetch import FetchResource
from peernix.web.ranges import RangeConsumer
from peernix.web.ratelimit import ThrottledConsumer, UploadLimiter
from peernix.web.savings import Savings, counting
from peernix.web.status import PeerStatus, Status, render_html, render_json
from peernix.web.streaming import (
    DeferToThread,
    Piece,
    ProducerStopped,
    RequestConsumer,
    AheadBudget,
    SocketSink,
    ThreadedProducer,
    call_directly,
    exact_length,
    file_chunks,
    gzip_chunks,
    slice_chunks,
    zstd_chunks,
)

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Requests from these addresses may trigger a fan-out to peers: the local
#: machine only, so a peer's miss never causes a second hop.
DEFAULT_PROXY_CLIENTS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
#: The longest request URI (path and query) we accept; longer -> 414.  The
#: longest legitimate one, a log of a 211-character drv name, is ~270 bytes.
MAX_URI_LENGTH: Final = 1024
#: NARs smaller than this are never transport-compressed: compressing a
#: small body costs more than sending it on a LAN.  (Local clients, in
#: ``proxy_clients``, never get transport compression at all: on one
#: machine it only costs time, and Nix resumes an interrupted download with
#: ``Range`` only from an identity response.)
COMPRESS_MIN_SIZE: Final = 64 * 1024
#: Seconds a rendered (and signed) local narinfo is reused.  Short, so a
#: garbage-collected path stops being advertised quickly.
NARINFO_CACHE_TTL: Final = 2.0
#: The most rendered narinfos kept (a few MB at most).
NARINFO_CACHE_SIZE: Final = 8192
#: NARs up to this size (by the database) are made whole in one worker call
#: and sent in one write; bigger ones are streamed.  One NAR chunk: a small
#: answer holds no more memory than a streamed one has in flight.
SMALL_NAR_SIZE: Final = 256 * 1024
#: NARs up to this size are made on the reactor thread itself: a few reads
#: of small files (as twisted's static.File and nginx read files in their
#: event loop) cost less than handing the work to a thread and back, which
#: is most of the time of a small path's download.
TINY_NAR_SIZE: Final = 16 * 1024
#: The NAR chunk size of a stream to a peer under ``--max-upload-rate``.
LIMITED_CHUNK_SIZE: Final = 64 * 1024
#: A consumer paused this long (a client that stopped reading) ends the stream.
STALL_TIMEOUT: Final = 300.0
#: Regular files of this size or more in a whole identity NAR are copied to
#: the socket by the kernel (``sendfile``); smaller ones are read with the
#: framing (one chunk holds many of them).
SENDFILE_MIN_FILE: Final = 64 * 1024
#: Client addresses whose "proxy client or peer?" decision is remembered.
CLIENT_DECISION_CACHE_SIZE: Final = 4096

CACHE_PREFIX: Final = b"/nix-cache/"
_DIGEST_PATH_BYTES: Final = DIGEST_PATH.encode("ascii")
_NIX32_BYTES: Final = frozenset(nix32.ALPHABET.encode("ascii"))
_NARHASH_LEN: Final = nix32.encoded_length(32)
_ALLOW: Final = b"GET, HEAD"

NARINFO_TYPE: Final = b"text/x-nix-narinfo"
CACHE_INFO_TYPE: Final = b"text/x-nix-cache-info"
NAR_TYPE: Final = b"application/x-nix-nar"
TEXT_TYPE: Final = b"text/plain; charset=utf-8"
JSON_TYPE: Final = b"application/json"
HTML_TYPE: Final = b"text/html; charset=utf-8"

#: Response headers that describe a body and must not survive into an error
#: answer that replaces it.
_BODY_HEADERS: Final = (b"Content-Encoding", b"Content-Range", b"Accept-Ranges", b"Content-Length", SOURCE_HEADER)
#: The ``nix-cache-info`` response header saying whether this node serves
#: peers (``yes``/``no``): what a peer's health probe reads
#: (:meth:`peernix.peers.client.PeerClient.probe`).
SERVE_PEERS_HEADER: Final = _SERVE_PEERS_HEADER_NAME.encode("ascii")
#: Routes whose answers to peers go through ``--max-upload-rate``.
_LIMITED_ROUTES: Final = frozenset({"narinfo", "nar", "ls", "log"})

_log = Logger(namespace="peernix.web")
_T = TypeVar("_T")

_Handler = Coroutine[Any, Any, "bytes | None"]


def _hash_part(data: bytes) -> str | None:
    """:returns: ``data`` as a store path hash part, or ``None`` if it is not 32 nix32 characters."""
    if len(data) != 32 or not _NIX32_BYTES.issuperset(data):
        return None
    return data.decode("ascii")


def _nar_hash(data: bytes) -> Hash | None:
    """:returns: the sha256 ``data`` encodes in 52 nix32 characters, or ``None``."""
    if len(data) != _NARHASH_LEN or not _NIX32_BYTES.issuperset(data):
        return None
    try:
        return Hash("sha256", nix32.decode(data.decode("ascii")))
    except ValueError:
        # 52 characters can encode 260 bits; a first digit above 1 overflows.
        return None


def _keep(result: _T, into: list[object]) -> _T:
    """A Deferred callback that notes the result (or Failure) in ``into`` and passes it on unchanged."""
    into.append(result)
    return result


def _whole_nar(fs_path: str, limit: int) -> bytes:
    """
    Make the NAR of ``fs_path`` in memory, stopping as soon as it is known
    to be longer than ``limit`` bytes.  Blocking: run it in a worker thread
    (or on the reactor thread for a tiny ``limit``).

    :returns: the NAR, or its first ``limit + 1`` bytes when the NAR is
        longer (the caller compares the length with the size it expects).
    :raises OSError: or :class:`~peernix.nix.nar.NarError` as
        :func:`~peernix.nix.nar.nar_chunks`.
    """
    # Chunks of at most limit + 1 bytes: a path that grew on disk is found
    # out after reading one byte more than expected, not a whole chunk.
    chunks = nar_chunks(fs_path, min(DEFAULT_CHUNK_SIZE, limit + 1))
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in chunks:
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                break
    finally:
        chunks.close()
    return parts[0] if len(parts) == 1 else b"".join(parts)


def client_ip(request: IRequest) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    :returns: the client's IP address, with an IPv4-mapped IPv6 address
        (``::ffff:127.0.0.1``, as a dual-stack socket reports IPv4 clients)
        turned into the IPv4 address; ``None`` for a non-IP transport.
    """
    host = getattr(request.getClientAddress(), "host", None)  # type: ignore[no-untyped-call]
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def abort_connection(request: Request) -> None:
    """
    Cut the client's connection without finishing the response, so a
    half-sent body is seen as an error, never as a complete (short) NAR.
    """
    channel = request.channel
    transport = getattr(channel, "transport", None) if channel is not None else None
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


@attrs.define
class _Exchange:
    """Book-keeping of one asynchronously answered request."""

    request: Request
    route: str
    #: The client connection went away; nothing may be written any more.
    gone: bool = False
    handler: Deferred[bytes | None] | None = None


def _is_head(request: Request) -> bool:
    return request.method == b"HEAD"


def _set_source(request: Request, source: Source) -> None:
    """Name where the answer to ``request`` comes from (``X-Peernix-Source``; the access log reads it)."""
    request.responseHeaders.setRawHeaders(SOURCE_HEADER, [source.header_value()])


@implementer(IConsumer)
class _CountingConsumer:
    """An ``IConsumer`` passing everything to ``consumer``, telling ``count`` the length of each write."""

    def __init__(self, consumer: IConsumer, count: Callable[[int], object]) -> None:
        self._consumer = consumer
        self._count = count

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._consumer.write(data)
        self._count(len(data))


def _begin_nar_answer(
    request: Request, found: Found, nar_hash: Hash | None
) -> tuple[bytes | None, tuple[int, int] | None]:
    """
    Start the answer of a NAR this node passes on (relayed from a peer or
    staged for the LAN): 404 when the URL names another NarHash, 416 for a
    range past the end, else the source header and either 200 with the
    whole length and ``Accept-Ranges: bytes`` or 206 for the asked range.

    :returns: ``(error body, None)`` for an error answer, else ``(None,
        range)`` with the inclusive byte range asked for (``None``: whole).
    """
    info = found.info
    if nar_hash is not None and info.nar_hash != nar_hash:
        return _error_body(request, 404, b"not found\n"), None
    size = info.nar_size
    try:
        byte_range = _requested_range(request, size)
    except RangeNotSatisfiable:
        return _range_not_satisfiable(request, size), None
    _set_source(request, found.source)
    if byte_range is None:
        _set_headers(request, 200, NAR_TYPE, size)
        request.responseHeaders.setRawHeaders(b"Accept-Ranges", [b"bytes"])
    else:
        _partial_headers(request, byte_range[0], byte_range[1], size)
    return None, byte_range


def _set_headers(request: Request, code: int, content_type: bytes, length: int | None) -> None:
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [content_type])
    if length is not None:
        headers.setRawHeaders(b"Content-Length", [b"%d" % length])


def _error_body(request: Request, code: int, message: bytes, extra: dict[bytes, bytes] | None = None) -> bytes:
    """Prepare a short plain-text error answer, dropping headers of a body that will not be sent."""
    for name in _BODY_HEADERS:
        request.responseHeaders.removeHeader(name)
    _set_headers(request, code, TEXT_TYPE, len(message))
    for name, value in (extra or {}).items():
        request.responseHeaders.setRawHeaders(name, [value])
    return message


def _requested_range(request: Request, size: int) -> tuple[int, int] | None:
    """
    :returns: the one byte range ``request`` asks of a ``size``-byte NAR,
        or ``None`` for the whole NAR (no ``Range``, several ranges, another
        unit, or ``If-Range``: we have no validator to compare, so the Range
        is ignored, RFC 9110 §13.1.5).
    :raises RangeNotSatisfiable: for a single range wholly past the end.
    """
    headers = request.requestHeaders
    range_header = headers.getRawHeaders(b"Range")
    if range_header is None or headers.hasHeader(b"If-Range"):
        return None
    return parse_range(b",".join(range_header), size)


def _range_not_satisfiable(request: Request, size: int) -> bytes:
    """Prepare the 416 answer to a range past the end of a ``size``-byte NAR."""
    return _error_body(
        request,
        416,
        b"range not satisfiable\n",
        {b"Content-Range": b"bytes */%d" % size, b"Accept-Ranges": b"bytes"},
    )


def _partial_headers(request: Request, first: int, last: int, size: int) -> None:
    """Set the status and headers of a 206 carrying bytes ``first``-``last`` of ``size``."""
    _set_headers(request, 206, NAR_TYPE, last - first + 1)
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Range", [b"bytes %d-%d/%d" % (first, last, size)])
    headers.setRawHeaders(b"Accept-Ranges", [b"bytes"])


class WebApp:
    """
    The web layer of one peernix node.

    Construct it once, serve :meth:`resource` from a ``twisted.web.server.Site``.

    Threading: every blocking step (NAR serialisation and sizing, compression,
    ``.ls`` listings, log reading and bz2 decompression) runs through
    ``defer_to_thread``; everything else runs on the reactor thread.
    Memory: NARs and logs are streamed with backpressure, about a MiB in
    flight per response whatever their size, and their read-ahead together
    is bounded (:class:`~peernix.web.streaming.AheadBudget`).
    """

    def __init__(
        self,
        store: IStore,
        *,
        reactor: IReactorTime,
        defer_to_thread: DeferToThread,
        call_from_thread: Callable[..., object] = call_directly,
        secret_key: SecretKey | None,
        priority: int,
        metrics: Metrics,
        upstream: IUpstream | None = None,
        proxy_clients: Sequence[IPNetwork] = DEFAULT_PROXY_CLIENTS,
        store_root: str = "/",
        version: str,
        registry: IPeerRegistry | None = None,
        peer_store: IStore | None = None,
        trimmer: IdleTrimmer | None = None,
        savings: Savings | None = None,
        upload_limiter: UploadLimiter | None = None,
        serve_peers: bool = True,
        digest: IResource | None = None,
        digest_status: Callable[[], Mapping[str, object]] | None = None,
        lan_fetcher: LanFetcher | None = None,
        sendfile: bool = True,
    ) -> None:
        """
        :param store: the whole local store, served to local clients
            (``proxy_clients`` without ``X-Peernix-Peer``).  If it also has a
            ``path_count() -> Deferred[int]`` method (``LocalStore`` does),
            the status page shows the number of valid paths.
        :param reactor: a clock: ``seconds()`` for the narinfo cache and the
            NAR stream histogram, ``callLater`` for the stalled-client timer.
        :param defer_to_thread: runs a blocking callable on a worker thread
            and returns a Deferred of its result (production: a
            :func:`~peernix.web.streaming.thread_pool_runner` over a small CPU
            pool; tests: a synchronous runner).
        :param call_from_thread: how streams made in ``defer_to_thread``
            hand chunks to the reactor thread: ``reactor.callFromThread``
            with a real thread pool; the default (calling at once) is only
            right for a synchronous runner.
        :param secret_key: this node's signing key; local narinfos get its
            signature in addition to those in the database.  ``None`` serves
            them with the database signatures only.
        :param priority: the ``Priority:`` of ``nix-cache-info``.
        :param metrics: where request, lookup and streaming metrics go; its
            registry is served at ``/metrics``.
        :param upstream: the fan-out to peers, used for local misses asked by
            a proxy client; ``None`` never fans out.
        :param proxy_clients: client networks whose misses go to
            ``upstream``; everyone else only sees this node's own store, so
            a request never takes a second hop.
        :param store_root: shown on the status page.
        :param version: shown on the status page.
        :param registry: the peer table, shown on the status page with the
            peer-side counters (read from ``metrics.registry``, where the
            fan-out registers its :class:`~peernix.peers.metrics.PeerMetrics`);
            ``None`` (no peer side) shows neither.
        :param peer_store: the view of ``store`` served to peers (requests
            from outside ``proxy_clients`` or marked ``X-Peernix-Peer``): a
            :class:`~peernix.store.share.SharedStore`, whose withheld paths
            answer as missing on every route; the status page then shows
            its counts.  ``None``: peers see ``store``.
        :param trimmer: told when NAR streams and relays start and end, to
            give freed memory back once none runs (``None``: nobody told).
        :param savings: where the bytes from and to peers, local clients'
            request outcomes and NAR downloads per path are counted; the
            status page leads with them (``None``: not counted).
        :param upload_limiter: ``--max-upload-rate``: every answer body to a
            peer on the narinfo, NAR, listing and log routes goes through it
            (``None``: unlimited).  Local clients never do.
        :param serve_peers: ``False`` (``--serve-peers no``): peers get 404
            for everything but ``nix-cache-info``, which says so in
            :data:`SERVE_PEERS_HEADER`.
        :param digest: the resource serving this node's store digest at
            ``/peernix/digest`` (:class:`~peernix.web.digest.DigestResource`);
            ``None``: no digest, that path is a 404 (as on an older node).
        :param digest_status: returns what ``/status.json`` shows under
            ``"digests"`` (this node's digest and its peers'); ``None``:
            nothing.
        :param lan_fetcher: fetching for the LAN (``None``: off): serves the
            ``/peernix/fetch/`` route to peers and the ``upstream`` section
            of the status page.  Local misses reach it through ``upstream``.
        :param sendfile: copy the contents of a whole identity NAR's big
            files to the socket with ``os.sendfile`` where the connection
            allows it (see :class:`~peernix.web.streaming.SocketSink`);
            ``False``: always read them in the worker.
        """
        self._sendfile = sendfile
        self._store = store
        self._peer_store = peer_store if peer_store is not None else store
        #: Whether peers get another view than local clients; without one
        #: no request pays for telling them apart.
        self._split = self._peer_store is not store
        #: Client host -> whether it is in ``proxy_clients``: decided once
        #: per address, a dict lookup on the hot path afterwards.
        self._local_hosts: dict[object, bool] = {}
        self._reactor = reactor
        self._defer_to_thread = defer_to_thread
        self._call_from_thread = call_from_thread
        self._trimmer = trimmer
        #: The read-ahead shared by all NAR and log streams.
        self._ahead_budget = AheadBudget()
        self._secret_key = secret_key
        self._priority = priority
        self._metrics = metrics
        self._upstream = upstream
        self._proxy_clients = tuple(proxy_clients)
        self._store_root = store_root
        self._savings = savings
        self._upload_limiter = upload_limiter
        self._serve_peers = serve_peers
        self._version = version
        self._registry = registry
        self._lan_fetcher = lan_fetcher
        # NARs for peers on the fetch route are uploads like any other.
        self._fetch_resource: FetchResource | None = (
            FetchResource(lan_fetcher, upload_limiter=upload_limiter) if lan_fetcher is not None else None
        )
        self._cache_info = b"StoreDir: %s\nWantMassQuery: 1\nPriority: %d\n" % (STORE_DIR.encode(), priority)
        # (hash part, zstd URL?, peer view?) -> (expiry, narinfo bytes, the
        # PathInfo it was rendered from).  Insertion order is expiry order
        # since every entry lives NARINFO_CACHE_TTL.  An expired entry is not served, but
        # its body is reused when the store answers with an equal PathInfo:
        # signing and rendering are most of the cost of a narinfo miss.
        self._narinfo_cache: dict[tuple[str, bool, bool], tuple[float, bytes, PathInfo]] = {}
        self._metrics_resource = MetricsResource(metrics.registry)
        self._digest = digest
        self._digest_status = digest_status
        self._klein = self._make_klein()

    def resource(self) -> IResource:
        """:returns: the root resource to serve from a ``Site``."""
        return _Root(self, self._klein.resource())

    # -- status pages (Klein) -------------------------------------------------

    def _make_klein(self) -> Klein:
        app = Klein()
        options: dict[str, Any] = {"methods": ["GET", "HEAD"], "strict_slashes": False, "merge_slashes": False}
        app.route("/", **options)(self._status_html)
        app.route("/status.json", **options)(self._status_json)
        app.route("/metrics", **options)(self._metrics_page)
        if self._digest is not None:
            digest = self._digest
            app.route(DIGEST_PATH, **options)(lambda request: digest)
        return app

    async def _status(self) -> Status:
        valid_paths: int | None = None
        count: Callable[[], Deferred[int]] | None = getattr(self._store, "path_count", None)
        if count is not None:
            try:
                valid_paths = await count()
            except CancelledError:
                raise
            except Exception:
                _log.failure("Counting valid paths for the status page failed")
        key = self._secret_key
        return Status(
            version=self._version,
            store_root=self._store_root,
            store_dir=STORE_DIR,
            priority=self._priority,
            key_name=key.name if key is not None else None,
            public_key=key.public_key.to_string() if key is not None else None,
            valid_paths=valid_paths,
            requests=self._metrics.request_counts(),
            peers=self._peer_rows(),
            peer_counters=self._peer_counters(),
            # Never waits: the count runs on the store's worker thread.
            sharing=self._peer_store.share_status() if isinstance(self._peer_store, SharedStore) else None,
            savings=self._savings.snapshot() if self._savings is not None else None,
            serve_peers=self._serve_peers,
            max_upload_rate=self._upload_limiter.rate if self._upload_limiter is not None else None,
            digests=self._digest_status() if self._digest_status is not None else None,
            upstream=self._lan_fetcher.status() if self._lan_fetcher is not None else None,
        )

    def _peer_rows(self) -> tuple[PeerStatus, ...] | None:
        """:returns: a snapshot of the peer table for the status page, or ``None`` without a registry."""
        if self._registry is None:
            return None
        now = self._reactor.seconds()
        return tuple(
            PeerStatus(
                url=peer.url,
                sources=tuple(sorted(peer.sources)),
                healthy=peer.backoff_until <= now,
                backoff_seconds=max(0.0, peer.backoff_until - now),
                score=peer.score,
                latency=peer.latency,
                last_seen_ago=max(0.0, now - peer.last_seen),
                failures=dict(peer.failures),
                public_key=peer.public_key,
                serving=peer.serving,
            )
            for peer in self._registry.peers()
        )

    def _peer_counters(self) -> dict[str, float] | None:
        """
        :returns: the peer-side counters for the status page, read from the
            Prometheus registry by their exposed names (0 when a collector is
            not registered there), or ``None`` without a peer registry.
        """
        if self._registry is None:
            return None
        registry = self._metrics.registry

        def value(name: str, labels: dict[str, str] | None = None) -> float:
            found = registry.get_sample_value(name, labels)
            return 0.0 if found is None else float(found)

        return {
            "narinfos_from_peers": value("peernix_narinfo_served_total", {"source": "peer"}),
            "peer_hits": value("peernix_peer_hits_total"),
            "misses": value("peernix_fanout_misses_total"),
            "bytes_proxied": value("peernix_proxied_bytes_total"),
            "verification_failures": value("peernix_verification_failures_total"),
            "untrusted_answers": value("peernix_peer_requests_total", {"result": "untrusted"}),
        }

    async def _status_html(self, request: Request) -> bytes:
        body = render_html(await self._status())
        request.responseHeaders.setRawHeaders(b"Content-Type", [HTML_TYPE])
        return body

    async def _status_json(self, request: Request) -> bytes:
        body = render_json(await self._status())
        request.responseHeaders.setRawHeaders(b"Content-Type", [JSON_TYPE])
        return body

    def _metrics_page(self, request: Request) -> IResource:
        return self._metrics_resource

    # -- dispatch -------------------------------------------------------------

    def render_cache(self, request: Request, rest: bytes) -> bytes | int:
        """
        Answer a request for ``/nix-cache/<rest>`` (``rest`` is raw, not
        percent-decoded).

        :returns: the body for ``twisted.web`` to send, or ``NOT_DONE_YET``.
        """
        if request.method not in (b"GET", b"HEAD"):
            return self._reply_error(request, "other", 405, b"method not allowed\n", {b"Allow": _ALLOW})
        if rest == b"nix-cache-info":
            request.responseHeaders.setRawHeaders(SERVE_PEERS_HEADER, [b"yes" if self._serve_peers else b"no"])
            return self._reply(request, "cache-info", 200, CACHE_INFO_TYPE, self._cache_info)
        if not self._serve_peers and self._is_peer(request):
            # Consume only: nothing of this store for peers, whatever they ask.
            return self._reply_error(request, "other", 404, b"not found (this node does not serve peers)\n")
        if rest.endswith(b".narinfo"):
            return self._render_narinfo(request, rest[:-8])
        if rest.startswith(b"nar/"):
            return self._render_nar(request, rest[4:])
        if rest.endswith((b".nar", b".nar.zst")) and b"/" not in rest:
            # <hash>-<narhash>.nar[.zst] directly under the cache (ours and
            # zw3rk/peernix's), and zw3rk's older <hash>.nar.
            return self._render_nar(request, rest)
        if rest.endswith(b".ls") and b"/" not in rest:
            hash_part = _hash_part(rest[:-3])
            if hash_part is None:
                return self._reply_error(request, "ls", 400, b"invalid store path hash\n")
            return self._run(request, "ls", self._listing(request, hash_part))
        if rest.startswith(b"log/"):
            return self._render_log(request, rest[4:])
        return self._reply_error(request, "other", 404, b"not found\n")

    def render_other(self, request: Request, klein: IResource) -> bytes | int:
        """Answer a request outside ``/nix-cache/`` through Klein, counting it."""
        path = request.path
        if self._fetch_resource is not None and path.startswith(FETCH_PREFIX.encode()):
            if not self._serve_peers:
                # Consume only: this node fetches nothing for peers either.
                return self._reply_error(request, "fetch", 404, b"not found (this node does not serve peers)\n")
            request.notifyFinish().addBoth(self._count_finished, request, "fetch")
            return self._fetch_resource.render(request)
        route = "status" if path in (b"/", b"/status.json") else "metrics" if path == b"/metrics" else "other"
        if path == _DIGEST_PATH_BYTES:
            route = "digest"
        request.notifyFinish().addBoth(self._count_finished, request, route)
        result: bytes | int = klein.render(request)  # type: ignore[no-untyped-call]
        return result

    def _count_finished(self, result: object, request: Request, route: str) -> None:
        self._metrics.count_request(route, request.code, request.sentLength)

    # -- synchronous answers ----------------------------------------------------

    def _reply(self, request: Request, route: str, code: int, content_type: bytes, body: bytes) -> bytes | int:
        _set_headers(request, code, content_type, len(body))
        if _is_head(request):
            self._metrics.count_request(route, code, 0)
            return b""
        self._metrics.count_request(route, code, len(body))
        if code < 300 and self._must_wait(request, route, body):
            lost: list[object] = []
            # Consumes the failure (a lost connection is no error here).
            request.notifyFinish().addErrback(lambda f: lost.append(f))
            self._write_in_turn(request, body, lambda: bool(lost))
            return NOT_DONE_YET
        return body

    # -- the upload limit ----------------------------------------------------------

    def _must_wait(self, request: Request, route: str, body: bytes) -> bool:
        """
        :returns: whether the answer ``body`` to ``request`` must wait for
            its turn under ``--max-upload-rate`` (a peer's answer while the
            bucket is in debt or others wait); when it need not, its bytes
            are taken from the bucket now.
        """
        limiter = self._upload_limiter
        if limiter is None or not body or route not in _LIMITED_ROUTES or not self._is_peer(request):
            return False
        if limiter.may_write():
            limiter.take(len(body))
            return False
        return True

    def _write_in_turn(self, request: Request, body: bytes, gone: Callable[[], bool]) -> None:
        """Write ``body`` and finish ``request`` when the upload limiter gives it its turn."""
        limiter = self._upload_limiter
        assert limiter is not None

        def go() -> None:
            if gone() or request.finished:
                return
            limiter.take(len(body))
            request.write(body)  # type: ignore[no-untyped-call]
            request.finish()  # type: ignore[no-untyped-call]

        waiter = limiter.wait(go)
        # A client that leaves while waiting gives its turn away.
        request.notifyFinish().addErrback(lambda _: waiter.cancel())

    def _peer_consumer(self, request: Request, count: Callable[[int], object] | None = None) -> IConsumer:
        """
        :returns: the consumer a stream to ``request`` writes into: the
            request, behind the upload limiter when it is a peer's (and
            ``--max-upload-rate`` is set), counting written bytes into
            ``count`` when given.
        """
        consumer: IConsumer = RequestConsumer(request)
        if self._upload_limiter is not None and self._is_peer(request):
            return ThrottledConsumer(consumer, self._upload_limiter, count)
        if count is not None:
            return _CountingConsumer(consumer, count)
        return consumer

    def _reply_error(
        self, request: Request, route: str, code: int, message: bytes, extra: dict[bytes, bytes] | None = None
    ) -> bytes | int:
        body = _error_body(request, code, message, extra)
        return self._reply(request, route, code, TEXT_TYPE, body)

    # -- asynchronous answers ---------------------------------------------------

    def _run(self, request: Request, route: str, handler: _Handler) -> int:
        """
        Run ``handler`` for ``request``: its result is the body to send and
        finish with, or ``None`` when it answered itself.  A client
        disconnect cancels it; an unexpected failure becomes a 404 or, once
        bytes were sent, an aborted connection.
        """
        exchange = _Exchange(request, route)
        # Registered before the handler starts: a handler that completes at
        # once finishes the request, and a later notifyFinish() never fires.
        request.notifyFinish().addCallbacks(
            self._exchange_done, self._exchange_lost, callbackArgs=(exchange,), errbackArgs=(exchange,)
        )
        d = Deferred.fromCoroutine(handler)
        exchange.handler = d
        d.addCallbacks(self._handler_done, self._handler_failed, callbackArgs=(exchange,), errbackArgs=(exchange,))
        return NOT_DONE_YET

    def _exchange_done(self, _: None, exchange: _Exchange) -> None:
        request = exchange.request
        self._metrics.count_request(exchange.route, request.code, request.sentLength)

    def _exchange_lost(self, reason: Failure, exchange: _Exchange) -> None:
        exchange.gone = True
        request = exchange.request
        self._metrics.count_request(exchange.route, request.code, request.sentLength)
        # Klein-style: the client is gone, so stop whatever the handler waits
        # for (a store query, a peer fan-out, a NAR stream).
        if exchange.handler is not None:
            exchange.handler.cancel()

    def _handler_done(self, body: bytes | None, exchange: _Exchange) -> None:
        if body is None or exchange.gone:
            return
        request = exchange.request
        if request.code < 300 and self._must_wait(request, exchange.route, body):
            self._write_in_turn(request, body, lambda: exchange.gone)
            return
        request.write(body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]

    def _handler_failed(self, failure: Failure, exchange: _Exchange) -> None:
        request = exchange.request
        # A client that leaves mid-NAR (a local stream's ProducerStopped, a
        # relay's NarClientGone) is a normal event: one info line, no
        # traceback.  Which comes first, the transport stopping the producer
        # or the request's notifyFinish errback, is the transport's business.
        left = isinstance(failure.value, (ProducerStopped, NarClientGone))
        if exchange.gone:
            if left:
                _log.info("Client of {route} {uri!r} left", route=exchange.route, uri=request.uri)
            elif not isinstance(failure.value, CancelledError):
                _log.failure("Answering {route} failed after the client left", failure=failure, route=exchange.route)
            return
        if isinstance(failure.value, ProducerStopped):
            _log.info("Client of {route} {uri!r} stopped reading", route=exchange.route, uri=request.uri)
        elif left:
            _log.info("Client of {route} {uri!r} left", route=exchange.route, uri=request.uri)
        else:
            _log.failure(
                "Answering {route} {uri!r} failed", failure=failure, route=exchange.route, uri=request.uri
            )
        if request.startedWriting:
            abort_connection(request)
            return
        body = _error_body(request, 404, b"not found\n")
        self._handler_done(body, exchange)

    # -- narinfo ----------------------------------------------------------------

    def _render_narinfo(self, request: Request, hash_bytes: bytes) -> bytes | int:
        hash_part = _hash_part(hash_bytes)
        if hash_part is None:
            return self._reply_error(request, "narinfo", 400, b"invalid store path hash\n")
        zstd = request.args.get(b"compression") == [b"zstd"]
        # A peer's answer is cached apart: a local client's may name a path
        # peers must not see.
        for_peer = self._split and self._is_peer(request)
        key = (hash_part, zstd, for_peer)
        cached = self._narinfo_cache.get(key)
        if cached is not None and cached[0] > self._reactor.seconds():
            self._metrics.count_store_lookup(True)
            self._metrics.count_narinfo("local")
            self._answered_from(request, LOCAL)
            return self._reply(request, "narinfo", 200, NARINFO_TYPE, cached[1])
        lookup = (self._peer_store if for_peer else self._store).query_path_info(hash_part)
        if cached is not None:
            # Expired.  The store mostly answers at once from its own cache;
            # an unchanged path is then answered here, synchronously, with
            # the body already signed.
            answer: list[object] = []
            lookup.addBoth(_keep, answer)
            if answer and answer[0] == cached[2]:
                self._metrics.count_store_lookup(True)
                self._remember_narinfo(key, cached[1], cached[2])
                self._metrics.count_narinfo("local")
                self._answered_from(request, LOCAL)
                return self._reply(request, "narinfo", 200, NARINFO_TYPE, cached[1])
        return self._run(request, "narinfo", self._narinfo(request, hash_part, zstd, for_peer, lookup))

    async def _narinfo(
        self, request: Request, hash_part: str, zstd: bool, for_peer: bool, lookup: Deferred[PathInfo | None]
    ) -> bytes | None:
        info = await lookup
        self._metrics.count_store_lookup(info is not None)
        if info is not None:
            key = (hash_part, zstd, for_peer)
            previous = self._narinfo_cache.get(key)
            if previous is not None and previous[2] == info:
                # Revalidated: the same database row as when it was signed.
                body = previous[1]
                self._remember_narinfo(key, body, info)
                self._metrics.count_narinfo("local")
                self._answered_from(request, LOCAL)
                _set_headers(request, 200, NARINFO_TYPE, len(body))
                return body
            nar_hash = info.nar_hash.nix32()
            # A peer asking for zstd gets it only where it pays: a small NAR
            # goes raw, in one write with its Content-Length, instead of
            # costing a compressor and chunked encoding for a few bytes saved.
            # URLs are <hash>-<narhash>.nar[.zst] directly under the cache:
            # stateless, and the one form a zw3rk node (which passes a
            # peer's narinfo on verbatim) can route.
            if zstd and info.nar_size >= COMPRESS_MIN_SIZE:
                narinfo = NarInfo.from_path_info(info, f"{hash_part}-{nar_hash}.nar.zst", "zstd")
            else:
                narinfo = NarInfo.from_path_info(info, f"{hash_part}-{nar_hash}.nar", "none")
            if self._secret_key is not None:
                narinfo = sign_narinfo(narinfo, self._secret_key)
            body = render_narinfo(narinfo).encode("utf-8")
            self._remember_narinfo(key, body, info)
            self._metrics.count_narinfo("local")
            self._answered_from(request, LOCAL)
            _set_headers(request, 200, NARINFO_TYPE, len(body))
            return body
        found = await self._ask_upstream(request, hash_part)
        staged = False
        if found is None:
            found = self._staged_for_peer(request, hash_part)
            staged = found is not None
        if found is None:
            self._answered_from(request, None)
            return _error_body(request, 404, b"not found\n")
        peer = found.info
        # Our own URL (stateless: it names both hashes), the NAR relayed raw
        # (so the file is the NAR); signatures exactly as the peer gave
        # them: never re-signed.
        narinfo = attrs.evolve(
            peer,
            url=f"{hash_part}-{peer.nar_hash.nix32()}.nar",
            compression="none",
            file_hash=peer.nar_hash,
            file_size=peer.nar_size,
        )
        body = render_narinfo(narinfo).encode("utf-8")
        self._metrics.count_narinfo("staged" if staged else "peer")
        self._answered_from(request, found.source)
        _set_headers(request, 200, NARINFO_TYPE, len(body))
        return body

    def _answered_from(self, request: Request, source: Source | None) -> None:
        """
        Note where a narinfo answer comes from: the ``X-Peernix-Source``
        header, and for a local client the savings' hit ratio (``None``: a
        miss, no header).
        """
        if source is not None:
            _set_source(request, source)
        if self._savings is not None and not self._is_peer(request):
            self._savings.count_request("miss" if source is None else source.kind)

    def _remember_narinfo(self, key: tuple[str, bool, bool], body: bytes, info: PathInfo) -> None:
        cache = self._narinfo_cache
        now = self._reactor.seconds()
        if len(cache) >= NARINFO_CACHE_SIZE:
            # Drop expired entries (the oldest first); if none expired, the
            # oldest anyway, so the cache stays bounded under any load.
            for old in list(cache):
                if cache[old][0] > now and len(cache) < NARINFO_CACHE_SIZE:
                    break
                del cache[old]
        cache.pop(key, None)
        cache[key] = (now + NARINFO_CACHE_TTL, body, info)

    def _may_proxy(self, request: Request) -> bool:
        """
        :returns: whether a miss of ``request`` may fan out: only for proxy
            clients, and never for another peernix (it marks its requests with
            ``X-Peernix-Peer``), so there is no second hop even when two
            daemons share an address.  A stranger sending the header only
            loses the fan-out.
        """
        return self._upstream is not None and not self._is_peer(request)

    def _is_peer(self, request: Request) -> bool:
        """
        :returns: whether ``request`` is a peer's: marked ``X-Peernix-Peer``
            or from a client outside ``proxy_clients``.  The address part is
            decided once per client address (a bounded cache), so a local
            client's request costs a header check and a dict lookup.
        """
        if request.requestHeaders.hasHeader(PEER_HEADER):
            return True
        host = getattr(request.getClientAddress(), "host", None)  # type: ignore[no-untyped-call]
        local = self._local_hosts.get(host)
        if local is None:
            ip = client_ip(request)
            local = ip is not None and any(ip in net for net in self._proxy_clients)
            if len(self._local_hosts) >= CLIENT_DECISION_CACHE_SIZE:
                self._local_hosts.clear()
            self._local_hosts[host] = local
        return not local

    def _store_for(self, request: Request) -> IStore:
        """:returns: the store ``request`` sees: the peers' view for a peer, else the whole store."""
        if self._split and self._is_peer(request):
            return self._peer_store
        return self._store

    def _staged_for_peer(self, request: Request, hash_part: str) -> Found | None:
        """
        :returns: for a peer's request, the upstream narinfo (signatures
            untouched) of a verified NAR staged here for the LAN that
            ``--share`` lets peers have, and its source; else ``None``.
        """
        fetcher = self._lan_fetcher
        if fetcher is None or not self._is_peer(request):
            return None
        record = fetcher.staged_record(hash_part)
        if record is None:
            return None
        return Found(record.info, fetcher.source_of(record))

    async def _ask_upstream(self, request: Request, hash_part: str) -> Found | None:
        """:returns: a trusted peer narinfo (and its source) for a proxy client's miss, else ``None`` (failures logged)."""
        if self._upstream is None or not self._may_proxy(request):
            return None
        try:
            found = await self._upstream.find(hash_part)
        except CancelledError:
            raise
        except Exception:
            _log.failure("Upstream lookup of {hash_part} failed", hash_part=hash_part)
            return None
        if found is None:
            return None
        if not found.info.store_path.startswith(f"{STORE_DIR}/{hash_part}-"):
            _log.warn(
                "Upstream answered {hash_part} with {store_path}; ignored",
                hash_part=hash_part,
                store_path=found.info.store_path,
            )
            return None
        return found

    # -- NAR ----------------------------------------------------------------------

    def _render_nar(self, request: Request, name: bytes) -> bytes | int:
        """
        Answer a NAR URL; ``name`` (under ``/nix-cache/`` or
        ``/nix-cache/nar/``, ending in ``.nar`` or ``.nar.zst``) is one of
        every form ever published:

        - ``<hash>-<narhash>``: ours (and nix-serve's, and zw3rk's);
        - ``<narhash>`` with ``?hash=<hash>``: harmonia's; without the
          query it names no path we can find (404);
        - ``<hash>``: zw3rk's older form, naming the path by its hash part
          alone (Nix checks the NarHash itself).

        A name that fits none of them, or holds a malformed hash, is 400;
        a well-formed name of something absent is 404.
        """
        zst = name.endswith(b".nar.zst")
        if zst:
            stem = name[:-8]
        elif name.endswith(b".nar"):
            stem = name[:-4]
        else:
            return self._reply_error(request, "nar", 404, b"not found\n")
        nar_hash: Hash | None = None
        if len(stem) == 32:
            hash_part = _hash_part(stem)
        elif len(stem) == _NARHASH_LEN:
            nar_hash = _nar_hash(stem)
            hash_arg = request.args.get(b"hash")
            if nar_hash is None:
                hash_part = None
            elif not hash_arg:
                return self._reply_error(request, "nar", 404, b"not found (no ?hash=)\n")
            else:
                hash_part = _hash_part(hash_arg[0]) if len(hash_arg) == 1 else None
        else:
            hash_part = _hash_part(stem[:32])
            nar_hash = _nar_hash(stem[33:]) if stem[32:33] == b"-" else None
            if nar_hash is None:
                hash_part = None
        if hash_part is None:
            return self._reply_error(request, "nar", 400, b"invalid NAR URL\n")
        return self._run(request, "nar", self._nar(request, hash_part, nar_hash, zst))

    async def _nar(self, request: Request, hash_part: str, nar_hash: Hash | None, zst: bool) -> bytes | None:
        """
        :param nar_hash: the NarHash the URL names, or ``None`` when it
            names the path by hash part only (then any version is served).
        """
        # A path withheld from peers is None here, so it answers as missing.
        info = await self._store_for(request).query_path_info(hash_part)
        self._metrics.count_store_lookup(info is not None)
        if info is None:
            if zst:
                return _error_body(request, 404, b"not found\n")
            staged = self._staged_for_peer(request, hash_part)
            if staged is not None:
                return await self._serve_staged(request, staged, nar_hash)
            return await self._relay(request, hash_part, nar_hash)
        if nar_hash is not None and info.nar_hash != nar_hash:
            # The URL names another version of this path (a stale narinfo):
            # serving the current one would fail Nix's hash check.
            return _error_body(request, 404, b"not found (NAR hash differs)\n")
        _set_source(request, LOCAL)
        # NAR bytes sent to a peer count as given to the LAN.
        to_peer = self._savings is not None and self._is_peer(request)
        fs_path = self._store.real_path(info.path)
        size = info.nar_size
        whole: bytes | None = None
        made = self._reactor.seconds()
        if size <= SMALL_NAR_SIZE:
            # One worker call (none for a tiny NAR) makes the whole NAR, and
            # its length checks the database's size, so a small NAR (most of
            # a closure) costs at most one thread hop and goes out in one
            # write with its Content-Length.
            if size <= TINY_NAR_SIZE:
                whole = _whole_nar(fs_path, size)
            else:
                whole = await self._defer_to_thread(lambda: _whole_nar(fs_path, size))
            if len(whole) != size:
                _log.warn(
                    "{store_path} on disk ({disk_size} bytes of NAR or more) differs from its database"
                    " entry ({db_size}); not served",
                    store_path=info.path,
                    disk_size=len(whole),
                    db_size=size,
                )
                return _error_body(request, 404, b"not found\n")
        # A bigger NAR is not walked twice (sizing it first costs a third
        # of streaming it): exact_length checks the database's size while
        # streaming and the connection is aborted on a mismatch, so Nix
        # never takes a wrong NAR for a complete one.

        chunk_size = self._ahead_budget.chunk_size()
        if self._upload_limiter is not None and self._is_peer(request):
            # Under --max-upload-rate a write is a turn: small turns keep
            # the rate smooth and the peers' shares even.
            chunk_size = min(chunk_size, LIMITED_CHUNK_SIZE)
        # NAR bytes (not wire bytes) made for the client, counted as they
        # are made: before compression, after a Range's slicing.
        made_bytes = [0]

        def raw() -> Iterator[bytes]:
            if whole is not None:
                return iter((whole,))
            return exact_length(nar_chunks(fs_path, chunk_size), size)

        def counted_raw() -> Iterator[bytes]:
            return counting(raw(), made_bytes)

        make_source: Callable[[], Iterator[Piece]]
        sink: SocketSink | None = None
        request.setResponseCode(200)
        headers = request.responseHeaders
        headers.setRawHeaders(b"Content-Type", [NAR_TYPE])
        if zst:
            # NAR-level compression, as the narinfo's "Compression: zstd"
            # declared; no Content-Encoding (that would decode it twice).
            make_source = lambda: zstd_chunks(counted_raw())  # noqa: E731
        else:
            headers.setRawHeaders(b"Vary", [b"Accept-Encoding"])
            try:
                byte_range = _requested_range(request, size)
            except RangeNotSatisfiable:
                return _range_not_satisfiable(request, size)
            encoding = None
            # Transport compression only for peers (clients on other
            # machines), only without any Range (never a compressed 206,
            # which no client could resume from) and only where it pays.
            # A local client always gets the identity NAR with its length
            # and Accept-Ranges, so Nix >= 2.14 (which offers zstd) can
            # resume an interrupted download with Range.
            if (
                size >= COMPRESS_MIN_SIZE
                and not request.requestHeaders.hasHeader(b"Range")
                and self._is_peer(request)
            ):
                accept = request.requestHeaders.getRawHeaders(b"Accept-Encoding")
                encoding = choose_encoding(b",".join(accept) if accept is not None else None)
            if byte_range is not None:
                first, last = byte_range
                _partial_headers(request, first, last, size)
                make_source = lambda: counting(slice_chunks(raw(), first, last), made_bytes)  # noqa: E731
            elif encoding == "zstd":
                headers.setRawHeaders(b"Content-Encoding", [b"zstd"])
                make_source = lambda: zstd_chunks(counted_raw())  # noqa: E731
            elif encoding == "gzip":
                headers.setRawHeaders(b"Content-Encoding", [b"gzip"])
                make_source = lambda: gzip_chunks(counted_raw())  # noqa: E731
            else:
                headers.setRawHeaders(b"Content-Length", [b"%d" % size])
                headers.setRawHeaders(b"Accept-Ranges", [b"bytes"])
                if whole is not None:
                    if _is_head(request):
                        return b""
                    # Written in one go by the caller: the stream's time is
                    # the making of it.
                    self._metrics.nar_stream_seconds.observe(self._reactor.seconds() - made)
                    self._count_nar(info.path, size, len(whole) if to_peer else 0)
                    return whole
                make_source = counted_raw
                sink = self._sendfile_sink(request)
                if sink is not None:
                    # NAR framing made by the worker, file contents copied
                    # by the kernel (see SocketSink).
                    make_source = lambda: counting(  # noqa: E731
                        exact_length(nar_pieces(fs_path, chunk_size, file_min=SENDFILE_MIN_FILE), size), made_bytes
                    )
        if _is_head(request):
            return b""
        started = self._reactor.seconds()
        # The producer is stopped by the transport when the client leaves,
        # and by cancelling start()'s Deferred when this handler is cancelled.
        producer = ThreadedProducer(
            make_source(),
            self._peer_consumer(request),
            self._defer_to_thread,
            call_from_thread=self._call_from_thread,
            budget=self._ahead_budget,
            clock=self._reactor,
            stall_timeout=STALL_TIMEOUT,
            sink=sink,
        )
        try:
            with self._streaming():
                written = await producer.start()
        finally:
            # What was made is what was sent (or in flight when it failed).
            self._count_nar(info.path, size, made_bytes[0] if to_peer else 0)
        self._metrics.nar_stream_seconds.observe(self._reactor.seconds() - started)
        _log.debug("Sent NAR of {store_path}: {written} bytes", store_path=info.path, written=written)
        return b""

    def _sendfile_sink(self, request: Request) -> SocketSink | None:
        """
        :returns: where a whole identity NAR's file contents may be copied
            with ``sendfile``: ``request``'s socket, unless sendfile is off
            or unavailable there, or the stream is a peer's under
            ``--max-upload-rate`` (whose every write must take its turn).
        """
        if not self._sendfile:
            return None
        if self._upload_limiter is not None and self._is_peer(request):
            return None
        return SocketSink.of(request)

    def _count_nar(self, store_path: str, nar_size: int, to_peers: int) -> None:
        """Count a NAR download of ``store_path`` and ``to_peers`` NAR bytes given to a peer."""
        if self._savings is not None:
            self._savings.count_path(store_path, nar_size)
            self._savings.add_to_peers(to_peers)

    @contextmanager
    def _streaming(self) -> Iterator[None]:
        """Tell the trimmer a stream runs for the duration of the block."""
        trimmer = self._trimmer
        if trimmer is None:
            yield
            return
        trimmer.started()
        try:
            yield
        finally:
            trimmer.ended()

    async def _relay(self, request: Request, hash_part: str, nar_hash: Hash | None) -> bytes | None:
        """
        Relay a local client's NAR miss from a peer: the identity NAR with
        its Content-Length and ``Accept-Ranges: bytes``, or the asked range
        as a 206.  A range is cut from the whole NAR, fetched and verified
        from its first byte as always (see :class:`RangeConsumer`), so the
        last byte of any answer leaves only after NarHash and NarSize
        checked out.

        :param nar_hash: the NarHash the URL names (the peer's must equal
            it), or ``None`` for a URL naming the path by hash part only.
        """
        found = await self._ask_upstream(request, hash_part)
        if found is None:
            return _error_body(request, 404, b"not found\n")
        peer = found.info
        # The narinfo's winner as the source; the relay names the peer that
        # really sends it.
        error, byte_range = _begin_nar_answer(request, found, nar_hash)
        if error is not None:
            return error
        if _is_head(request):
            return b""
        upstream = self._upstream
        assert upstream is not None  # _ask_upstream returned a narinfo
        started = self._reactor.seconds()
        savings = self._savings
        consumer: IConsumer = RequestConsumer(request)
        if savings is not None:
            # Bytes relayed to a local client: what the LAN saved it.
            savings.count_path(peer.store_path, peer.nar_size)
            if found.source.kind == "peer":
                consumer = _CountingConsumer(consumer, savings.add_from_peers)
            # Fetched for the LAN: the bytes another node fetched count as
            # they arrive (LanFetcher.on_peer_bytes); this node's own
            # downloads from the upstream saved nothing.
        ranged: RangeConsumer | None = None
        if byte_range is not None:
            # Cut from the whole NAR, which is still fetched and verified
            # from its first byte; the range's last piece waits for finish().
            ranged = RangeConsumer(consumer, byte_range[0], byte_range[1])
            consumer = ranged

        def on_peer(sender: str | Source) -> None:
            # A peer's base URL from the fan-out; the whole source
            # (``upstream URL via fetcher``) from fetching for the LAN.
            if not request.startedWriting:
                _set_source(request, sender if isinstance(sender, Source) else peer_source(sender))

        answer = await self._stream_nar(request, lambda: upstream.relay_nar(peer, consumer, on_peer), ranged)
        if answer is None:
            self._metrics.nar_stream_seconds.observe(self._reactor.seconds() - started)
            return b""
        return answer

    async def _stream_nar(
        self, request: Request, stream: Callable[[], Deferred[None]], ranged: RangeConsumer | None
    ) -> bytes | None:
        """
        Run ``stream`` (it writes a NAR into ``request``, through ``ranged``
        for a range) as one of the streams the trimmer knows of.

        :returns: ``None`` once every byte went out (the range's last piece
            released), or the 404 body when the NAR could not be started.
        :raises NarUnavailable: when it failed after bytes were written
            (the caller aborts the connection).
        """
        try:
            with self._streaming():
                await stream()
        except NarUnavailable:
            if request.startedWriting:
                raise
            return _error_body(request, 404, b"not found\n")
        if ranged is not None:
            # The whole NAR verified: the range's last piece may go.
            ranged.finish()
        return None

    async def _serve_staged(self, request: Request, found: Found, nar_hash: Hash | None) -> bytes | None:
        """
        Serve a peer a NAR staged here for the LAN (verified, shared): the
        identity NAR with its Content-Length and ``Accept-Ranges: bytes``,
        or the asked range as a 206, through the upload limiter like every
        answer to a peer, counted as given to peers.
        """
        info = found.info
        error, byte_range = _begin_nar_answer(request, found, nar_hash)
        if error is not None:
            return error
        if _is_head(request):
            return b""
        fetcher = self._lan_fetcher
        assert fetcher is not None  # _staged_for_peer found it
        if self._savings is not None:
            self._savings.count_path(info.store_path, info.nar_size)
        # The staged file is verified: a range is read from its first byte
        # and cut at its last (RangeConsumer holds the last piece back until
        # finish(), after the reader reached the file's end).
        consumer = self._peer_consumer(request, self._savings.add_to_peers if self._savings is not None else None)
        first = 0
        ranged: RangeConsumer | None = None
        if byte_range is not None:
            first = byte_range[0]
            ranged = RangeConsumer(consumer, 0, byte_range[1] - first)
            consumer = ranged
        hash_part = info.store_path[len(STORE_DIR) + 1:][:32]
        answer = await self._stream_nar(request, lambda: fetcher.serve_staged(hash_part, consumer, first), ranged)
        return b"" if answer is None else answer

    # -- listings and logs --------------------------------------------------------

    async def _listing(self, request: Request, hash_part: str) -> bytes | None:
        info = await self._store_for(request).query_path_info(hash_part)
        self._metrics.count_store_lookup(info is not None)
        if info is None:
            return _error_body(request, 404, b"not found\n")
        fs_path = self._store.real_path(info.path)
        body = await self._defer_to_thread(lambda: render_listing(nar_listing(fs_path)))
        _set_headers(request, 200, JSON_TYPE, len(body))
        _set_source(request, LOCAL)
        return body

    def _render_log(self, request: Request, name: bytes) -> bytes | int:
        try:
            # Store names may contain "?" and "=", which a client may
            # percent-encode; the decoded name is then validated strictly
            # (no "/", no "..", no NUL can pass).
            basename = unquote_to_bytes(name).decode("ascii")
            store_path = parse_basename(basename)
        except (UnicodeDecodeError, StorePathError):
            return self._reply_error(request, "log", 400, b"invalid derivation name\n")
        if not store_path.name.endswith(".drv"):
            return self._reply_error(request, "log", 400, b"invalid derivation name\n")
        return self._run(request, "log", self._log_file(request, basename))

    async def _log_file(self, request: Request, drv_basename: str) -> bytes | None:
        path = await self._store_for(request).find_log(drv_basename)
        if path is None:
            return _error_body(request, 404, b"not found\n")
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"Content-Type", [TEXT_TYPE])
        _set_source(request, LOCAL)
        if _is_head(request):
            return b""
        producer = ThreadedProducer(
            file_chunks(path),
            self._peer_consumer(request),
            self._defer_to_thread,
            call_from_thread=self._call_from_thread,
            budget=self._ahead_budget,
            clock=self._reactor,
            stall_timeout=STALL_TIMEOUT,
        )
        await producer.start()
        return b""


@implementer(IResource)
class _Root(Resource):
    """
    The root resource: guards every request (URI length, methods), sends
    ``/nix-cache/`` to :meth:`WebApp.render_cache` and everything else to
    Klein, and turns any unexpected exception into a 404 instead of a 500.
    """

    isLeaf = True

    def __init__(self, app: WebApp, klein: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._app = app
        self._klein = klein

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        app = self._app
        try:
            if len(request.uri) > MAX_URI_LENGTH:
                return app._reply_error(request, "other", 414, b"URI too long\n")
            path = request.path
            if path.startswith(CACHE_PREFIX):
                return app.render_cache(request, path[len(CACHE_PREFIX) :])
            if path == CACHE_PREFIX[:-1]:
                return app.render_cache(request, b"")
            try:
                path.decode("utf-8")
                # Percent-decoded too: werkzeug decodes %ee as UTF-8 as well.
                unquote_to_bytes(path).decode("utf-8")
            except UnicodeDecodeError:
                # Klein decodes paths as UTF-8; a stranger's bytes get a
                # plain 400 rather than a logged traceback.
                return app._reply_error(request, "other", 400, b"bad request path\n")
            return app.render_other(request, self._klein)
        except CancelledError:
            raise
        except Exception:
            _log.failure("Unexpected error answering {uri!r}", uri=request.uri)
            if request.startedWriting:
                abort_connection(request)
                return NOT_DONE_YET
            return app._reply_error(request, "other", 404, b"not found\n")
