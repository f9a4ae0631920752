"""
Talking to upstream caches: narinfos through the trust filter, NAR bodies
decompressed and checked on the way.

Requests go through the same ``IAgent`` (and so the same persistent
connection pool) as the peer client.  Every wait is bounded: a deadline to
the response headers and for a whole narinfo, a byte cap on narinfo
bodies, and a silence timer on NAR bodies.

:class:`NarBodyDecoder` is the body protocol of a NAR download, from an
upstream (compressed as its narinfo says, checked against ``FileHash`` and
``FileSize`` where given) or from a peer fetching for the LAN (identity
bytes, possibly from an offset with ``Range``).  It hands the decompressed
bytes to a *sink*, the staging download, which checks NarHash and NarSize
over all of them (:class:`peernix.upstream.staging.Download`).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
from typing import Any, Callable, Coroutine, Protocol as TypingProtocol, TypeVar, cast
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from peernix.nix.hashes import Hash
from peernix.nix.narinfo import MAX_NARINFO_SIZE, NarInfo, NarInfoError, parse_narinfo
from peernix.nix.storepath import STORE_DIR, is_hash_part
from peernix.peers.client import clean_cancel, discard_body, read_limited
from peernix.peers.errors import PeerError
from peernix.peers.trust import TrustPolicy
from peernix.zstd import ZstdDecompressor, ZstdError

_log = Logger()
_T = TypeVar("_T")

#: Compressions a NAR may come in from an upstream.
SUPPORTED_COMPRESSIONS = frozenset({"none", "xz", "zstd", "bzip2"})

#: Most decompressed bytes one step produces, whatever the input: an xz or
#: zstd bomb cannot make one step allocate more.
STEP_OUTPUT = 256 * 1024

#: Statuses an upstream answers for a path it does not have: 404 and 410,
#: and 403, which S3-backed caches send for a missing key.
MISS_CODES = frozenset({403, 404, 410})


class UpstreamError(Exception):
    """Fetching from an upstream (or a fetching peer) failed."""


class SourceFailed(UpstreamError):
    """
    A source failed without proving the bytes wrong: unreachable, an HTTP
    error, a connection lost or silent.  Another source may be tried.
    """


class VerificationFailed(UpstreamError):
    """
    The bytes are not what the narinfo promised: FileSize or FileHash
    differ, the compressed stream is corrupt, or NarSize or NarHash differ.
    The download must never be finished to any client.
    """


class _Decompressor(TypingProtocol):
    """What ``lzma``, ``bz2`` and zstd decompressors have in common."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def make_decompressor(compression: str) -> _Decompressor | None:
    """
    :returns: a fresh streaming decompressor for a narinfo ``Compression:``
        value, ``None`` for ``none``.
    :raises ValueError: for a compression peernix cannot decode
        (:data:`SUPPORTED_COMPRESSIONS`).
    """
    if compression == "none":
        return None
    if compression == "xz":
        return cast(_Decompressor, lzma.LZMADecompressor(format=lzma.FORMAT_XZ))
    if compression == "bzip2":
        return cast(_Decompressor, bz2.BZ2Decompressor())
    if compression == "zstd":
        return cast(_Decompressor, ZstdDecompressor())
    raise ValueError(f"unsupported NAR compression {compression!r}")


_DECOMPRESS_ERRORS = (lzma.LZMAError, OSError, EOFError, ZstdError, ValueError)


class NarBodyDecoder(Protocol):
    """
    Body protocol of one NAR download: count and hash the raw bytes,
    decompress them in bounded steps, drop the first ``skip`` decompressed
    bytes, and hand the rest to ``sink``.

    :param sink: called with each decompressed chunk; it may raise (a
        ``ValueError`` for bytes that cannot be right, e.g. more than
        NarSize) to stop the download as a verification failure.
    :param compression: the narinfo's ``Compression:`` (``none`` for a peer).
    :param file_hash: the narinfo's FileHash, checked at the end (only on a
        whole body: ``skip`` is then the offset to resume at).
    :param file_size: the narinfo's FileSize, checked as bytes arrive.
    :param clock: for the silence timer.
    :param silence: seconds the source may send nothing before it counts as
        failed (:class:`SourceFailed`).
    :param skip: decompressed bytes to drop first (the download already has
        them from an earlier source).
    :param on_bytes: told the number of raw bytes of each chunk (metrics).
    :raises ValueError: for an unsupported compression.

    :ivar done: fires with ``None`` when the body ended cleanly and every
        check passed; fails with :class:`SourceFailed` (connection lost,
        silent), :class:`VerificationFailed` (bad bytes) or ``CancelledError``
        (cancelling it stops the connection).
    :ivar received: raw bytes received so far.
    :ivar delivered: bytes handed to ``sink`` so far.
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        compression: str,
        clock: IReactorTime,
        *,
        file_hash: Hash | None = None,
        file_size: int | None = None,
        silence: float = 10.0,
        skip: int = 0,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._decompressor = make_decompressor(compression)
        self._compression = compression
        self.done: Deferred[None] = Deferred(self._cancelled)
        self.received = 0
        self.delivered = 0
        self._sink = sink
        self._clock = clock
        self._silence = silence
        self._skip = skip
        self._on_bytes = on_bytes
        self._file_hash = file_hash
        self._file_size = file_size
        self._hasher = hashlib.new(file_hash.algo) if file_hash is not None else None
        self._finished = False
        # Started by connectionMade, pushed back by every chunk, cancelled
        # by _stop.
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._silence, self._silent)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self.received += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._silence)
        if self._file_size is not None and self.received > self._file_size:
            self._fail(VerificationFailed(f"more than FileSize {self._file_size} bytes"))
            return
        if self._hasher is not None:
            self._hasher.update(data)
        if self._decompressor is None:
            self._deliver(data)
            return
        self._expand(data)

    def _expand(self, data: bytes) -> None:
        """Decompress ``data`` in steps of at most :data:`STEP_OUTPUT` bytes."""
        pending: bytes = data
        while not self._finished:
            decompressor = self._decompressor
            assert decompressor is not None
            if decompressor.eof:
                # Concatenated streams (frames) are valid and Nix reads them.
                rest = decompressor.unused_data + pending
                if not rest:
                    return
                decompressor = self._decompressor = make_decompressor(self._compression)
                assert decompressor is not None
                pending = rest
            if decompressor.needs_input:
                if not pending:
                    return
                chunk, pending = pending, b""
            else:
                chunk = b""
            try:
                out = decompressor.decompress(chunk, max_length=STEP_OUTPUT)
            except _DECOMPRESS_ERRORS as e:
                self._fail(VerificationFailed(f"corrupt {self._compression} stream: {e}"))
                return
            if out:
                self._deliver(out)

    def _deliver(self, data: bytes) -> None:
        if self._finished:
            return
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        try:
            self._sink(data)
        except ValueError as e:
            self._fail(VerificationFailed(str(e)))
            return
        except OSError as e:
            # The staging disk failed: not the source's fault, nor the bytes'.
            self._fail(SourceFailed(f"cannot stage the NAR: {e}"))
            return
        self.delivered += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished:
            return
        if not isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._fail(SourceFailed(f"connection lost: {reason.getErrorMessage()}"), stop=False)
            return
        decompressor = self._decompressor
        if decompressor is not None and (not decompressor.eof or decompressor.unused_data):
            self._fail(VerificationFailed(f"truncated or trailing {self._compression} stream"), stop=False)
            return
        if self._file_size is not None and self.received != self._file_size:
            self._fail(VerificationFailed(f"FileSize {self._file_size} expected, got {self.received} bytes"),
                       stop=False)
            return
        if self._hasher is not None and self._file_hash is not None:
            if self._hasher.digest() != self._file_hash.digest:
                self._fail(VerificationFailed(f"FileHash mismatch: expected {self._file_hash}"), stop=False)
                return
        if self._skip:
            self._fail(SourceFailed("the body ended before the offset to resume at"), stop=False)
            return
        self._stop(stop_transport=False)
        self.done.callback(None)

    def _silent(self) -> None:
        self._timer = None
        self._fail(SourceFailed(f"sent nothing for {self._silence} s"))

    def _fail(self, error: UpstreamError, stop: bool = True) -> None:
        if self._finished:
            return
        self._stop(stop_transport=stop)
        self.done.errback(error)

    def _stop(self, *, stop_transport: bool) -> None:
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if stop_transport and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def _cancelled(self, _d: Deferred[None]) -> None:
        if not self._finished:
            self._stop(stop_transport=True)


def _translate(failure: Failure) -> Failure:
    """Map any failure but a cancellation or our own errors to :class:`SourceFailed`."""
    if isinstance(failure.value, (UpstreamError, CancelledError)):
        return failure
    if isinstance(failure.value, TimeoutError):
        raise SourceFailed("no answer in time")
    raise SourceFailed(failure.getErrorMessage())


def nar_url(base: str, url: str) -> str:
    """
    Resolve a narinfo's ``URL:`` against the upstream's base URL.

    :raises SourceFailed: if it leaves the upstream's scheme and host (an
        unsigned field must not send us elsewhere).
    """
    resolved = urljoin(base.rstrip("/") + "/", url)
    origin, target = urlsplit(base), urlsplit(resolved)
    if (target.scheme, target.netloc) != (origin.scheme, origin.netloc) or target.fragment:
        raise SourceFailed(f"NAR URL {url!r} leaves the upstream {base}")
    return resolved


class UpstreamClient:
    """
    HTTP requests to upstream caches and to peers fetching for the LAN.

    :param agent: the ``IAgent`` over the process's persistent pool (no
        redirects followed, no content decoding).
    :param clock: for deadlines and silence timers.
    :param trust: the same filter as for peers' narinfos.
    :param timeout: deadline of a narinfo request (headers and body), and
        of the response headers of a NAR download.
    """

    def __init__(self, agent: IAgent, clock: IReactorTime, trust: TrustPolicy, *, timeout: float = 4.0) -> None:
        self._agent = agent
        self._clock = clock
        self._trust = trust
        self.timeout = timeout

    def _bounded(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> Deferred[_T]:
        d = clean_cancel(Deferred.fromCoroutine(coro))
        # addTimeout cancels the request at the deadline (closing its
        # connection) and its own timer when d fires first.
        d.addTimeout(self.timeout if timeout is None else timeout, self._clock)
        d.addErrback(_translate)
        return d

    def fetch_narinfo(self, base: str, hash_part: str, timeout: float | None = None) -> Deferred[NarInfo | None]:
        """
        Ask the upstream at ``base`` for the narinfo of ``hash_part``.

        :returns: a Deferred firing with the narinfo if the upstream has it
            and it is *trusted* (a signature by a trusted key, or CA), names
            the asked path, and its compression can be decoded; ``None`` for
            a miss or a narinfo failing any of that (logged).  It fails with
            :class:`SourceFailed` (unreachable, slow, other statuses,
            malformed) or ``CancelledError``.
        """
        if not is_hash_part(hash_part):
            raise ValueError(f"invalid hash part {hash_part!r}")
        return self._bounded(self._fetch_narinfo(base, hash_part), timeout)

    async def _fetch_narinfo(self, base: str, hash_part: str) -> NarInfo | None:
        url = f"{base.rstrip('/')}/{hash_part}.narinfo"
        response = await self._agent.request(b"GET", url.encode("ascii"), Headers())
        if response.code in MISS_CODES:
            try:
                await read_limited(response, 4096, self._clock, self.timeout)
            except PeerError:
                pass
            return None
        if response.code != 200:
            discard_body(response)
            raise SourceFailed(f"{url}: HTTP {response.code}")
        try:
            body = await read_limited(response, MAX_NARINFO_SIZE, self._clock, self.timeout)
        except PeerError as e:
            raise SourceFailed(f"{url}: {e}") from None
        try:
            info = parse_narinfo(body)
        except NarInfoError as e:
            raise SourceFailed(f"{url}: malformed narinfo: {e}") from None
        if not info.store_path.startswith(f"{STORE_DIR}/{hash_part}-"):
            _log.warn("Upstream {url} answered with {store_path}; ignored", url=url, store_path=info.store_path)
            return None
        if not self._trust.is_trusted(info):
            _log.warn("Upstream narinfo {url} is not signed by a trusted key; ignored", url=url)
            return None
        if info.compression not in SUPPORTED_COMPRESSIONS:
            _log.info("Upstream NAR of {url} is {compression}, which peernix cannot decode; ignored",
                      url=url, compression=info.compression)
            return None
        return info

    def fetch_node(self, peer_url: str) -> Deferred[tuple[str, bool] | None]:
        """
        Ask a peer who it is: ``GET <peer>/peernix/fetch/node`` (JSON
        ``{"node_id": "...", "fetch_for_lan": true}``), for peers that never
        announce themselves (static ones, beyond the broadcast domain).

        :returns: a Deferred firing with ``(node id, offers fetching)``, or
            ``None`` when the peer does not say (a Go node, older peernix,
            any error or a malformed answer).  Never fails; bounded in time
            and size.
        """
        d = self._bounded(self._fetch_node(peer_url))
        d.addErrback(lambda failure: None if not isinstance(failure.value, CancelledError) else failure)
        return d

    async def _fetch_node(self, peer_url: str) -> tuple[str, bool] | None:
        headers = Headers({b"X-Peernix-Peer": [b"1"]})
        response = await self._agent.request(b"GET", f"{peer_url}/peernix/fetch/node".encode("ascii"), headers)
        if response.code != 200:
            discard_body(response)
            return None
        try:
            body = await read_limited(response, 1024, self._clock, self.timeout)
            document = json.loads(body)
        except (PeerError, ValueError):
            return None
        node_id = document.get("node_id") if isinstance(document, dict) else None
        offers = document.get("fetch_for_lan") if isinstance(document, dict) else None
        if not isinstance(node_id, str) or not 1 <= len(node_id) <= 64 or not node_id.isprintable():
            return None
        return node_id, offers is True

    def open(self, url: str, *, offset: int = 0, peer: bool = False,
             timeout: float | None = None) -> Deferred[IResponse]:
        """
        Start a NAR download: the response headers, body unread.

        :param offset: ask for the bytes from here on (``Range``); the
            response is then 206, or 200 when the server ignores ranges
            (the caller skips ``offset`` bytes itself).
        :param peer: mark the request as a peernix peer's
            (``X-Peernix-Peer: 1``), for the LAN fetch route.
        :returns: a Deferred firing with a 200 or 206 response whose body the
            caller must read or discard; failing with :class:`SourceFailed`
            (deadline to the headers, another status) or ``CancelledError``.
        """
        return self._bounded(self._open(url, offset, peer), timeout)

    async def _open(self, url: str, offset: int, peer: bool) -> IResponse:
        headers = Headers()
        if peer:
            headers.setRawHeaders(b"X-Peernix-Peer", [b"1"])
        if offset:
            headers.setRawHeaders(b"Range", [b"bytes=%d-" % offset])
        response = await self._agent.request(b"GET", url.encode("ascii"), headers)
        if response.code == 200:
            return response
        if offset and response.code == 206:
            content_range = response.headers.getRawHeaders(b"Content-Range") or [b""]
            if not content_range[0].startswith(b"bytes %d-" % offset):
                discard_body(response)
                raise SourceFailed(f"{url}: 206 for another range: {content_range[0]!r}")
            return response
        discard_body(response)
        raise SourceFailed(f"{url}: HTTP {response.code}")
