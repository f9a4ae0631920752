"""
HTTP requests to one peer: narinfo lookups, health probes, NAR downloads.

Every request carries ``X-Peernix-Peer: 1`` so the peer answers from its own
store only (no second hop), and every wait is bounded: each call has an
overall deadline and every body is read with a byte cap, never with
``treq.content``.
"""

from __future__ import annotations

from typing import Any, Coroutine, TypeVar, cast
from urllib.parse import quote, urljoin, urlsplit

from attrs import frozen

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from peernix.nix.narinfo import NarInfo, NarInfoError, parse_narinfo
from peernix.nix.storepath import is_hash_part
from peernix.peers.errors import (
    PeerConnectionError,
    PeerError,
    PeerHTTPError,
    PeerProtocolError,
    PeerTimeout,
)
from peernix.peers.registry import Peer

#: The largest 404/410 body read (so its connection can be reused); a larger
#: one closes the connection.
MAX_MISS_BODY_BYTES = 4096

#: The request header that marks a request as coming from a peernix peer; the
#: web layer answers such requests from the local store only.
PEER_HEADER = "X-Peernix-Peer"
_PEER_HEADER_BYTES = PEER_HEADER.encode("ascii")

#: The ``nix-cache-info`` response header by which a peernix node says
#: whether it serves peers (``no``: ``--serve-peers no``, do not ask it).
SERVE_PEERS_HEADER = "X-Peernix-Serve-Peers"
_SERVE_PEERS_HEADER_BYTES = SERVE_PEERS_HEADER.encode("ascii")

_T = TypeVar("_T")


@frozen
class Probe:
    """
    What a health probe learnt.

    :ivar latency: the round-trip time in seconds.
    :ivar serving: ``False`` when the peer said it serves no peers
        (:data:`SERVE_PEERS_HEADER` ``no``); peers that do not say (the Go
        peernix) serve.
    """

    latency: float
    serving: bool = True


class _LimitedBody(Protocol):
    """
    Collect a response body of at most ``max_bytes`` bytes into ``done``.

    Too many bytes, or a body that falls silent for ``silence`` seconds,
    stops the peer connection and fails ``done``; cancelling ``done`` does
    the same.
    """

    def __init__(self, max_bytes: int, clock: IReactorTime, silence: float) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._max = max_bytes
        self._clock = clock
        self._silence = silence
        self._chunks: list[bytes] = []
        self._size = 0
        # Cancelled whenever the body ends (see _finish).
        self._timer: IDelayedCall | None = clock.callLater(silence, self._silent)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._max:
            self._abort(PeerProtocolError(f"response body larger than {self._max} bytes"))
            return
        self._chunks.append(data)
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._silence)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._finish()
            self.done.callback(b"".join(self._chunks))
        else:
            self._finish()
            self.done.errback(PeerConnectionError(f"body interrupted: {reason.getErrorMessage()}"))

    def _silent(self) -> None:
        self._timer = None
        self._abort(PeerTimeout(f"body silent for {self._silence} s"))

    def _abort(self, error: PeerError) -> None:
        self._finish()
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()
        if not self.done.called:
            self.done.errback(error)

    def _cancel(self, _d: Deferred[bytes]) -> None:
        self._finish()
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def read_limited(response: IResponse, max_bytes: int, clock: IReactorTime, silence: float) -> Deferred[bytes]:
    """
    Read a whole (small) response body with a byte cap and a silence timeout.

    :returns: a Deferred firing with the body; failing with
        :class:`PeerProtocolError` (too large), :class:`PeerTimeout` (silent)
        or :class:`PeerConnectionError`.  Cancelling it stops the connection.
    """
    body = _LimitedBody(max_bytes, clock, silence)
    response.deliverBody(body)  # type: ignore[no-untyped-call]
    return body.done


def discard_body(response: IResponse) -> None:
    """Throw a response's body away by closing the connection (no reading of unwanted bodies)."""

    class _Discard(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            cast(IPushProducer, self.transport).stopProducing()

    response.deliverBody(_Discard())  # type: ignore[no-untyped-call]


def clean_cancel(inner: Deferred[_T]) -> Deferred[_T]:
    """
    :returns: a Deferred following ``inner`` whose cancellation cancels
        ``inner`` and always ends in ``CancelledError``.  (A cancelled
        ``Agent`` request fails with ``ResponseNeverReceived`` instead, which
        would hide both timeouts and a caller's cancellation.)
    """
    cancelled = False

    def cancel(_d: Deferred[_T]) -> None:
        nonlocal cancelled
        cancelled = True
        inner.cancel()

    outer: Deferred[_T] = Deferred(cancel)

    def forward(result: _T | Failure) -> None:
        if outer.called:
            return
        if cancelled and isinstance(result, Failure):
            outer.errback(CancelledError())
        elif isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(forward)
    return outer


def _translate(failure: Failure) -> Failure:
    """Map any failure but a caller's cancellation to a :class:`PeerError`."""
    if isinstance(failure.value, (PeerError, CancelledError)):
        return failure
    if isinstance(failure.value, TimeoutError):
        raise PeerTimeout("peer did not answer in time")
    raise PeerConnectionError(failure.getErrorMessage())


class PeerClient:
    """
    Talks HTTP to peers.

    :param http: a treq client over the process's one persistent
        ``HTTPConnectionPool``.
    :param clock: for deadlines and latency measurement.
    :param timeout: deadline of a narinfo or probe request, headers and body
        together, and the time to the headers of a NAR download.
    :param max_narinfo_bytes: the largest narinfo body accepted.
    :param agent: the ``IAgent`` under ``http``, used for peers at IPv6
        literals (treq cannot parse those); by default the agent ``http``
        wraps.
    """

    def __init__(
        self,
        http: HTTPClient,
        clock: IReactorTime,
        *,
        timeout: float = 2.0,
        max_narinfo_bytes: int = 64 * 1024,
        agent: IAgent | None = None,
    ) -> None:
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self._max_narinfo_bytes = max_narinfo_bytes
        # treq parses URLs with hyperlink, which rejects IPv6 literals
        # ("[fd00::1]", and zone ids like "[fe80::1%eth0]" that mDNS finds
        # on a LAN).  Those requests go to the Agent under the treq client
        # directly (the same connection pool), whose URI parser accepts them.
        self._agent: IAgent | None = agent if agent is not None else getattr(http, "_agent", None)

    def _bounded(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> Deferred[_T]:
        d = clean_cancel(Deferred.fromCoroutine(coro))
        # addTimeout cancels the request (and so the connection) at the
        # deadline and cancels its own timer when d fires first.
        d.addTimeout(self.timeout if timeout is None else timeout, self._clock)
        d.addErrback(_translate)
        return d

    def _get(self, url: str, extra: dict[bytes, bytes] | None = None) -> Deferred[IResponse]:
        if self._agent is not None:
            # The agent directly, whenever there is one: treq's wrappers
            # would follow redirects (to hosts nar_url never checked), ask
            # for gzip and inflate it unbounded, and cost a URL parse per
            # request on the proxy's hot path.
            raw = Headers({_PEER_HEADER_BYTES: [b"1"]})
            for name, value in (extra or {}).items():
                raw.setRawHeaders(name, [value])
            return self._agent.request(b"GET", url.encode("ascii"), raw)
        if "[" in urlsplit(url).netloc:
            raise PeerConnectionError(f"cannot request {url}: IPv6 peers need an agent")
        headers: dict[bytes | str, bytes | str] = {PEER_HEADER: "1"}
        for name, value in (extra or {}).items():
            headers[name] = value
        return cast("Deferred[IResponse]", self._http.get(url, headers=headers, unbuffered=True))

    def fetch_narinfo(
        self, peer: Peer, hash_part: str, *, prefer_zstd: bool | None = None
    ) -> Deferred[NarInfo | None]:
        """
        Ask ``peer`` for the narinfo of ``hash_part``.

        :param prefer_zstd: ask for ``?compression=zstd`` (a peernix peer
            then offers a ``.nar.zst`` URL for a NAR big enough to gain from
            it; the Go peernix ignores it).  By default, yes unless the peer
            is on this machine: across a LAN zstd multiplies what the wire
            carries, through loopback it only costs both sides CPU.
        :returns: a Deferred firing with the parsed narinfo (not checked for
            trust or identity), or ``None`` if the peer does not have it
            (404/410).  It fails with :class:`PeerTimeout`,
            :class:`PeerConnectionError`, :class:`PeerHTTPError` (other
            statuses) or :class:`PeerProtocolError` (malformed or too large);
            with ``CancelledError`` when cancelled.
        """
        if not is_hash_part(hash_part):
            raise ValueError(f"invalid hash part {hash_part!r}")
        if prefer_zstd is None:
            prefer_zstd = not peer.on_loopback
        query = "?compression=zstd" if prefer_zstd else ""
        return self._bounded(self._fetch_narinfo(f"{peer.nix_cache_url}{hash_part}.narinfo{query}"))

    async def _fetch_narinfo(self, url: str) -> NarInfo | None:
        response = await self._get(url)
        if response.code in (404, 410):
            # Read the (small) miss body instead of closing the connection:
            # a fully read response returns its connection to the pool, so
            # the next lookup of a miss costs no new TCP connection (and no
            # name resolution in a thread).  Bounded like any body; a peer
            # that sends too much or stalls only loses the connection.
            try:
                await read_limited(response, MAX_MISS_BODY_BYTES, self._clock, self.timeout)
            except PeerError:
                pass
            return None
        if response.code != 200:
            discard_body(response)
            raise PeerHTTPError(response.code)
        body = await read_limited(response, self._max_narinfo_bytes, self._clock, self.timeout)
        try:
            return parse_narinfo(body)
        except NarInfoError as e:
            raise PeerProtocolError(f"malformed narinfo: {e}") from None

    def probe(self, peer: Peer) -> Deferred[float]:
        """
        Check that ``peer`` answers ``nix-cache-info``.

        :returns: a Deferred firing with the round-trip time in seconds, or
            failing like :meth:`fetch_narinfo` (a non-200 status is a
            :class:`PeerHTTPError`).
        """
        return self.check(peer).addCallback(lambda probe: probe.latency)

    def check(self, peer: Peer) -> Deferred[Probe]:
        """
        :meth:`probe`, also reading whether the peer serves peers (its
        ``nix-cache-info``'s :data:`SERVE_PEERS_HEADER`).

        :returns: a Deferred firing with a :class:`Probe`, or failing like
            :meth:`probe`.
        """
        return self._bounded(self._probe(f"{peer.nix_cache_url}nix-cache-info"))

    async def _probe(self, url: str) -> Probe:
        start = self._clock.seconds()
        response = await self._get(url)
        if response.code != 200:
            discard_body(response)
            raise PeerHTTPError(response.code)
        said = response.headers.getRawHeaders(_SERVE_PEERS_HEADER_BYTES) or []
        serving = not any(value.strip().lower() == b"no" for value in said)
        await read_limited(response, 4096, self._clock, self.timeout)
        return Probe(self._clock.seconds() - start, serving)

    def nar_url(self, peer: Peer, url: str) -> str:
        """
        Resolve a narinfo ``URL:`` of ``peer`` against its cache URL.

        :raises PeerProtocolError: if it points to another host or scheme:
            a peer must not make us fetch from elsewhere.
        """
        resolved = urljoin(peer.nix_cache_url, url)
        base, target = urlsplit(peer.nix_cache_url), urlsplit(resolved)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or target.fragment:
            raise PeerProtocolError(f"NAR URL {url!r} leaves the peer")
        return resolved

    def open_nar(self, peer: Peer, url: str) -> Deferred[IResponse]:
        """
        Start downloading a NAR: the response headers, body not read.

        :param url: the narinfo's ``URL:`` (relative to the peer's cache URL).
        :returns: a Deferred firing with a 200 response whose body the caller
            must read (``deliverBody``) or discard; failing with
            :class:`PeerError` (timeout to headers, non-200, bad URL) or
            ``CancelledError``.
        """
        try:
            target = self.nar_url(peer, url)
        except PeerProtocolError as e:
            failed: Deferred[IResponse] = Deferred()
            failed.errback(e)
            return failed
        return self._bounded(self._open_nar(target))

    async def _open_nar(self, url: str) -> IResponse:
        response = await self._get(url)
        if response.code != 200:
            discard_body(response)
            raise PeerHTTPError(response.code)
        return response

    def fetch_digest(
        self, peer: Peer, tag: str | None, *, max_bytes: int, timeout: float
    ) -> Deferred[DigestAnswer]:
        """
        Fetch ``peer``'s store digest (``GET /peernix/digest``), or what
        changed since version ``tag`` (``?since=`` and ``If-None-Match``).

        :param tag: the version held (``"<generation>-<version>"``), if any.
        :param max_bytes: the largest body accepted.
        :param timeout: deadline of the whole request, body included.
        :returns: a Deferred firing with a :class:`DigestAnswer` for 200,
            304 and 404/410 (no digest published); failing like
            :meth:`fetch_narinfo` otherwise.
        """
        url = f"{peer.url}/peernix/digest"
        extra: dict[bytes, bytes] = {}
        if tag is not None:
            url += f"?since={quote(tag, safe='-')}"
            extra[b"If-None-Match"] = f'"{tag}"'.encode("ascii")
        return self._bounded(self._fetch_digest(url, extra, max_bytes, timeout), timeout)

    async def _fetch_digest(
        self, url: str, extra: dict[bytes, bytes], max_bytes: int, timeout: float
    ) -> DigestAnswer:
        response = await self._get(url, extra)
        if response.code in (304, 404, 410):
            try:
                await read_limited(response, MAX_MISS_BODY_BYTES, self._clock, timeout)
            except PeerError:
                pass
            return DigestAnswer(response.code, _header(response, b"ETag"), None, b"", None)
        if response.code != 200:
            discard_body(response)
            raise PeerHTTPError(response.code)
        body = await read_limited(response, max_bytes, self._clock, timeout)
        return DigestAnswer(
            200,
            _header(response, b"ETag"),
            _header(response, b"Content-Type"),
            body,
            _header(response, b"X-Peernix-Digest-Base"),
        )


@frozen
class DigestAnswer:
    """A peer's answer to ``GET /peernix/digest`` (see :meth:`PeerClient.fetch_digest`)."""

    #: 200, 304 (unchanged) or 404/410 (none published).
    code: int
    #: The ``ETag`` header, quotes included, if any.
    etag: str | None
    #: The ``Content-Type`` header (a whole digest or a delta).
    content_type: str | None
    body: bytes
    #: ``X-Peernix-Digest-Base``: the version a delta applies to.
    base: str | None


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    try:
        return str(values[0].decode("ascii"))
    except UnicodeDecodeError:
        return None
