"""
The route on which a node asks a path's fetcher for a NAR:
``GET /peernix/fetch/<hash>-<narhash>.nar``.

Only peers may use it (requests marked ``X-Peernix-Peer``, as every peernix
peer request is; others get 403).  The fetcher answers only for a path whose
narinfo it got from an upstream itself, with that NarHash, and that
``--share`` lets peers have (404 otherwise, as for any miss).  It streams
the NAR's identity bytes from its staging area as they arrive from the
upstream; ``Range: bytes=N-`` resumes at byte N (206), which is how an
asking node carries on with the next fetcher after one died.  The last byte
goes only after the NAR verified; a NAR failing verification is cut off.
"""

from __future__ import annotations

import json
import re

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from peernix.nix.hashes import Hash, HashError, parse_hash
from peernix.peers.client import PEER_HEADER
from peernix.peers.errors import NarRelayInterrupted, NarUnavailable
from peernix.upstream.fetch import FETCH_PREFIX, LanFetcher
from peernix.web.ratelimit import ThrottledConsumer, UploadLimiter
from peernix.web.streaming import RequestConsumer

_log = Logger()

_NAME = re.compile(rb"([0-9a-df-np-sv-z]{32})-([0-9a-df-np-sv-z]{52})\.nar")
_RANGE = re.compile(rb"bytes=([0-9]{1,18})-")


def _abort(request: Request) -> None:
    """Cut the connection: a half-sent NAR must look broken, never short."""
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        getattr(transport, "abortConnection", transport.loseConnection)()


class FetchResource(Resource):
    """
    ``/peernix/fetch/``: NARs fetched for the LAN, for peers.

    :param fetcher: the node's :class:`~peernix.upstream.fetch.LanFetcher`.
    :param upload_limiter: ``--max-upload-rate``: NAR bodies go through it
        (``None``: unlimited).
    """

    isLeaf = True

    def __init__(self, fetcher: LanFetcher, upload_limiter: UploadLimiter | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fetcher = fetcher
        self._upload_limiter = upload_limiter

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.responseHeaders.setRawHeaders(b"Allow", [b"GET, HEAD"])
            return b"method not allowed\n"
        if not request.requestHeaders.hasHeader(PEER_HEADER):
            request.setResponseCode(403)
            return b"only for peernix peers\n"
        name = request.path[len(FETCH_PREFIX):] if request.path.startswith(FETCH_PREFIX.encode()) else b""
        if name == b"node":
            # Who this node is, for peers that learn it by asking (static
            # peers hear no announcements).
            table = self._fetcher.table
            request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
            return json.dumps({"node_id": table.node_id, "fetch_for_lan": table.fetch_for_lan}).encode()
        match = _NAME.fullmatch(name)
        if match is None:
            request.setResponseCode(400)
            return b"invalid NAR name\n"
        try:
            nar_hash = parse_hash(match.group(2).decode("ascii"), "sha256")
        except HashError:
            request.setResponseCode(400)
            return b"invalid NAR hash\n"
        offset = 0
        range_header = request.getHeader(b"range")
        if range_header is not None:
            found = _RANGE.fullmatch(range_header.strip())
            if found is not None:
                offset = int(found.group(1))
        handler = Deferred.fromCoroutine(self._serve(request, match.group(1).decode("ascii"), nar_hash, offset))
        request.notifyFinish().addErrback(lambda _f: handler.cancel())
        handler.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _serve(self, request: Request, hash_part: str, nar_hash: Hash, offset: int) -> None:
        record = await self._fetcher.record(hash_part)
        if record is None or record.info.nar_hash != nar_hash:
            self._not_found(request)
            return
        size = record.info.nar_size
        if offset >= size:
            request.setResponseCode(416)
            request.responseHeaders.setRawHeaders(b"Content-Range", [b"bytes */%d" % size])
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
            request.finish()  # type: ignore[no-untyped-call]
            return
        if offset:
            request.setResponseCode(206)
            request.responseHeaders.setRawHeaders(b"Content-Range", [b"bytes %d-%d/%d" % (offset, size - 1, size)])
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/x-nix-nar"])
        request.responseHeaders.setRawHeaders(b"Accept-Ranges", [b"bytes"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % (size - offset)])
        if request.method == b"HEAD":
            request.finish()  # type: ignore[no-untyped-call]
            return
        try:
            consumer: IConsumer = RequestConsumer(request)
            if self._upload_limiter is not None:
                consumer = ThrottledConsumer(consumer, self._upload_limiter)
            await self._fetcher.serve_peer(hash_part, nar_hash, consumer, offset)
        except NarUnavailable:
            if request.startedWriting:
                raise
            self._not_found(request)
            return
        request.finish()  # type: ignore[no-untyped-call]

    @staticmethod
    def _not_found(request: Request) -> None:
        request.setResponseCode(404)
        request.responseHeaders.removeHeader(b"Content-Range")
        request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain"])
        request.responseHeaders.setRawHeaders(b"Content-Length", [b"10"])
        request.write(b"not found\n")  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]

    @staticmethod
    def _failed(failure: Failure, request: Request) -> None:
        if isinstance(failure.value, CancelledError):
            return
        if isinstance(failure.value, NarRelayInterrupted):
            _log.info("Peer left during a NAR fetched for the LAN: {error}", error=failure.getErrorMessage())
        else:
            _log.info("NAR fetched for the LAN cut off: {error}", error=failure.getErrorMessage())
        if request.finished or request.channel is None:
            return
        if request.startedWriting:
            _abort(request)
        else:
            FetchResource._not_found(request)
