"""
Test doubles for the upstream side: a fake binary cache (as ``nix copy
--to file://...`` lays one out, served over HTTP) behind a ``twisted.web``
resource, and helpers to make signed, compressed paths for it.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
from typing import cast

import attrs
from twisted.internet.interfaces import ITCPTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo, render_narinfo
from peernix.nix.signing import SecretKey, sign_narinfo
from peernix.test.peerfakes import file_nar, hash_part_of, store_path_for, zstd

#: A fixed test key (never a real one).
UPSTREAM_KEY = SecretKey("upstream.test-1", bytes(range(32)))


def compress(data: bytes, compression: str) -> bytes:
    """:returns: ``data`` compressed as a narinfo's ``Compression:`` says."""
    if compression == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if compression == "zstd":
        return zstd(data)
    if compression == "bzip2":
        return bz2.compress(data)
    assert compression == "none"
    return data


@attrs.frozen
class UpstreamPath:
    """One path of a fake upstream: its narinfo, NAR and the file served."""

    info: NarInfo
    nar: bytes
    file: bytes

    @property
    def hash_part(self) -> str:
        return hash_part_of(self.info.store_path)


def make_upstream_path(
    name: str,
    contents: bytes,
    *,
    compression: str = "xz",
    key: SecretKey | None = UPSTREAM_KEY,
    lie: bool = False,
) -> UpstreamPath:
    """
    :returns: a path as ``nix copy --to file://DIR?compression=...`` would
        store it: ``URL: nar/<filehash>.nar.<ext>``, FileHash, FileSize,
        signed by ``key``.  ``lie``: the narinfo's NarHash is of other bytes.
    """
    nar = file_nar(contents)
    file = compress(nar, compression)
    file_hash = Hash.sha256_of(file)
    ext = {"xz": ".xz", "zstd": ".zst", "bzip2": ".bz2", "none": ""}[compression]
    nar_hash = Hash.sha256_of(nar + b"x" if lie else nar)
    info = NarInfo(
        store_path=store_path_for(name),
        url=f"nar/{file_hash.nix32()}.nar{ext}",
        compression=compression,
        nar_hash=nar_hash,
        nar_size=len(nar),
        file_hash=file_hash,
        file_size=len(file),
    )
    if key is not None:
        info = sign_narinfo(info, key)
    return UpstreamPath(info, nar, file)


class FakeUpstreamCache(Resource):
    """
    A binary cache at any host: ``/<hash>.narinfo`` and ``/nar/...`` files
    below ``prefix``.  Records every request path; ``hold`` holds requests
    whose path contains one of its strings open (a slow upstream); ``down``
    drops every connection.
    """

    isLeaf = True

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hold: set[str] = set()
        self.pending: list[Request] = []
        self.down = False
        self.code_override: int | None = None

    def add(self, path: UpstreamPath) -> None:
        """Serve ``path``'s narinfo and file."""
        self.files[f"{path.hash_part}.narinfo"] = render_narinfo(path.info).encode()
        self.files[path.info.url] = path.file

    def count(self, suffix: str) -> int:
        """:returns: requests whose path ends in ``suffix``."""
        return sum(1 for p, _ in self.requests if p.endswith(suffix))

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((path, headers))
        if self.down:
            assert request.channel is not None and request.channel.transport is not None
            cast(ITCPTransport, request.channel.transport).abortConnection()
            return NOT_DONE_YET
        if any(h in path for h in self.hold):
            self.pending.append(request)
            return NOT_DONE_YET
        if self.code_override is not None:
            request.setResponseCode(self.code_override)
            return b"error"
        rest = path[len(self.prefix) + 1:] if path.startswith(self.prefix + "/") else None
        if rest is None or rest not in self.files:
            request.setResponseCode(404)
            return b"404"
        return self.files[rest]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
