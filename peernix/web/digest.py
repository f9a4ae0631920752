"""
``GET /peernix/digest``: this node's store digest (see
:mod:`peernix.store.digest`), for peers.

- ``200`` with the whole digest (``application/x-peernix-digest``, format
  in ``X-Peernix-Digest-Format``) and its ``ETag``;
- ``304`` when ``If-None-Match`` names the current ETag;
- with ``?since=<tag>`` naming an older version of the same generation:
  ``200`` with only the hash parts added since (``text/x-peernix-digest-delta``,
  one a line; ``X-Peernix-Digest-Base`` repeats the version it applies to),
  unless the whole digest is smaller;
- ``404`` before the first build (a peer then treats this node as one
  without a digest and asks it for everything, as before digests).

The digest reveals only what ``--share`` lets peers see, so it is served to
anyone who may ask for narinfos.
"""

from __future__ import annotations

from typing import Final

from twisted.web.resource import Resource
from twisted.web.server import Request

from peernix.store.digest import DELTA_CONTENT_TYPE, DIGEST_CONTENT_TYPE, DIGEST_FORMAT, DigestPublisher

__all__ = ["DIGEST_PATH", "DigestResource", "etag_matches"]

#: Where peers fetch the digest.
DIGEST_PATH: Final = "/peernix/digest"

#: The longest ``since`` value looked at.
_MAX_TAG: Final = 64


def etag_matches(header: bytes | None, etag: str) -> bool:
    """
    :returns: whether an ``If-None-Match`` header value names ``etag``
        (weak comparison, as RFC 9110 says for ``If-None-Match``; ``*``
        matches).
    """
    if header is None:
        return False
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return False
    wanted = etag.removeprefix("W/")
    for item in text.split(","):
        item = item.strip()
        if item == "*" or item.removeprefix("W/") == wanted:
            return True
    return False


class DigestResource(Resource):
    """Serves a :class:`DigestPublisher`'s digest; see the module docstring."""

    isLeaf = True

    def __init__(self, publisher: DigestPublisher) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._publisher = publisher

    def render_GET(self, request: Request) -> bytes:
        publisher = self._publisher
        etag = publisher.etag
        request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-cache"])
        if etag is None:
            request.setResponseCode(404)
            request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
            return b"no digest yet\n"
        request.responseHeaders.setRawHeaders(b"ETag", [etag.encode("ascii")])
        request.responseHeaders.setRawHeaders(b"X-Peernix-Digest-Format", [DIGEST_FORMAT.encode("ascii")])
        request.responseHeaders.setRawHeaders(b"X-Peernix-Digest-Paths", [str(publisher.paths).encode("ascii")])
        if etag_matches(request.getHeader(b"If-None-Match"), etag):
            request.setResponseCode(304)
            return b""
        full = publisher.digest_bytes()
        since = (request.args or {}).get(b"since")
        if since and len(since[0]) <= _MAX_TAG:
            try:
                base = since[0].decode("ascii")
            except UnicodeDecodeError:
                base = ""
            added = publisher.delta_since(base) if base else None
            if added is not None and len(added) * 33 < len(full):
                body = "".join(f"{hash_part}\n" for hash_part in added).encode("ascii")
                request.responseHeaders.setRawHeaders(b"Content-Type", [DELTA_CONTENT_TYPE])
                request.responseHeaders.setRawHeaders(b"X-Peernix-Digest-Base", [base.strip('"').encode("ascii")])
                return body
        request.responseHeaders.setRawHeaders(b"Content-Type", [DIGEST_CONTENT_TYPE])
        return full
