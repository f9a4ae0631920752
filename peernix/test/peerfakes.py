"""
Test doubles for the peer side: a fake registry, a whole fake LAN of peers
behind one ``twisted.web`` resource (dispatching on the ``Host`` header), and
a hand-rolled response/transport pair for NAR streaming tests.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, cast

import attrs
import zstandard
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from peernix.interfaces import IPeerRegistry
from peernix.nix import nix32
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo, render_narinfo
from peernix.nix.signing import SecretKey, sign_narinfo
from peernix.nix.storepath import STORE_DIR
from peernix.peers.registry import Peer


@implementer(IPeerRegistry)
class FakeRegistry:
    """
    An :class:`IPeerRegistry` that records what it is told.  Every peer is
    healthy unless its URL is in :attr:`unhealthy`.
    """

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._peers: dict[str, Peer] = {}
        self.unhealthy: set[str] = set()
        self.successes: list[tuple[str, float]] = []
        self.failures: list[tuple[str, str]] = []
        self.expired = 0
        self._subscribers: list[Callable[[Peer], object]] = []
        for url in urls:
            self.add(url, "static")

    def add(self, url: str, source: str, public_key: str | None = None, verified: bool = False) -> Peer | None:
        peer = self._peers.get(url)
        if peer is None:
            peer = Peer(url=url, first_seen=0.0, last_seen=0.0, sources={source}, public_key=public_key)
            self._peers[url] = peer
            for callback in list(self._subscribers):
                callback(peer)
        peer.sources.add(source)
        if verified:
            peer.verified = True
        return peer

    def remove(self, url: str, source: str) -> None:
        peer = self._peers.get(url)
        if peer is not None:
            peer.sources.discard(source)
            if not peer.sources:
                del self._peers[url]

    def expire(self) -> None:
        self.expired += 1

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def healthy_peers(self) -> list[Peer]:
        return [p for p in self._peers.values() if p.url not in self.unhealthy and p.serving]

    def record_success(self, peer: Peer, latency: float) -> None:
        self.successes.append((peer.url, latency))
        peer.successes += 1

    def record_failure(self, peer: Peer, kind: str) -> None:
        self.failures.append((peer.url, kind))

    def record_serving(self, peer: Peer, serving: bool) -> None:
        peer.serving = serving

    def subscribe(self, callback: object) -> None:
        assert callable(callback)
        self._subscribers.append(callback)

    def failure_kinds(self, url: str) -> list[str]:
        """:returns: the failure kinds recorded for ``url``, in order."""
        return [kind for u, kind in self.failures if u == url]


# -- NARs and narinfos -----------------------------------------------------


def _nar_str(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def file_nar(contents: bytes) -> bytes:
    """:returns: the NAR of a regular file holding ``contents``."""
    return b"".join(
        _nar_str(t) for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")")
    )


def store_path_for(name: str) -> str:
    """:returns: a made-up but valid store path for ``name`` (deterministic)."""
    digest = hashlib.sha256(name.encode()).digest()[:20]
    return f"{STORE_DIR}/{nix32.encode(digest)}-{name}"


def hash_part_of(store_path: str) -> str:
    """:returns: the 32-character hash part of a store path."""
    return store_path.rsplit("/", 1)[-1][:32]


def make_info(
    store_path: str,
    nar: bytes,
    *,
    references: Iterable[str] = (),
    key: SecretKey | None = None,
    url: str | None = None,
    compression: str = "none",
    ca: str | None = None,
) -> NarInfo:
    """
    :returns: a narinfo describing ``nar`` at ``store_path``, signed by
        ``key`` if given.  ``references`` are basenames.
    """
    nar_hash = Hash.sha256_of(nar)
    basename = store_path.rsplit("/", 1)[-1]
    if url is None:
        # An older peernix's form for zstd, the Go peernix's (and today's
        # peernix's) form otherwise.
        if compression == "zstd":
            url = f"nar/{basename[:32]}-{nar_hash.nix32()}.nar.zst"
        else:
            url = f"{basename[:32]}-{nar_hash.nix32()}.nar"
    info = NarInfo(
        store_path=store_path,
        url=url,
        compression=compression,
        nar_hash=nar_hash,
        nar_size=len(nar),
        references=tuple(references),
        ca=ca,
    )
    return sign_narinfo(info, key) if key is not None else info


def zstd(data: bytes) -> bytes:
    """:returns: ``data`` as one zstd frame."""
    return bytes(zstandard.ZstdCompressor().compress(data))


# -- a whole LAN in one resource -------------------------------------------


@attrs.define
class FakePeer:
    """
    One fake peer.

    :ivar narinfos: narinfo bodies by hash part (404 when absent).
    :ivar files: other bodies by path below ``/nix-cache/`` (NARs).
    :ivar mode: ``"normal"``, ``"slow"`` (never answers), ``"error"``
        (500 for everything) or ``"down"`` (connection dropped).
    :ivar hold: substrings of paths that are held open like a slow peer's
        (e.g. some hash parts), whatever the mode.
    :ivar pending: requests held open (slow mode or ``hold``).
    :ivar serving: what its ``nix-cache-info`` says in
        ``X-Peernix-Serve-Peers`` (``None``: no header, as the Go peernix).
    :ivar digest: answers ``/peernix/digest`` (404 when ``None``, as the Go
        peernix and older peernix do).
    """

    narinfos: dict[str, bytes] = attrs.field(factory=dict)
    files: dict[str, bytes] = attrs.field(factory=dict)
    mode: str = "normal"
    hold: set[str] = attrs.field(factory=set)
    pending: list[Request] = attrs.field(factory=list)
    serving: bool | None = None
    digest: Resource | None = None

    def serve(self, info: NarInfo, nar: bytes | None = None) -> None:
        """Serve ``info`` (and ``nar`` at its URL, compressed as it says)."""
        self.narinfos[hash_part_of(info.store_path)] = render_narinfo(info).encode()
        if nar is not None:
            self.files[info.url.removeprefix("/nix-cache/")] = zstd(nar) if info.compression == "zstd" else nar


class FakeLan(Resource):
    """
    Every fake peer behind one resource, told apart by the ``Host`` header
    (``host:port``).  Records every request as ``(host, path, headers)``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: dict[str, FakePeer] = {}
        self.requests: list[tuple[str, str, Headers]] = []

    def peer(self, hostport: str) -> FakePeer:
        """:returns: the fake peer at ``hostport``, created on first use."""
        return self.hosts.setdefault(hostport, FakePeer())

    def count(self, hostport: str, suffix: str = "") -> int:
        """:returns: how many requests ``hostport`` got whose path ends in ``suffix``."""
        return sum(1 for h, p, _ in self.requests if h == hostport and p.endswith(suffix))

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader("host") or "").lower()
        path = request.path.decode()
        self.requests.append((host, path, request.requestHeaders))
        peer = self.hosts.get(host)
        if peer is None or peer.mode == "down":
            assert request.channel is not None and request.channel.transport is not None
            cast(ITCPTransport, request.channel.transport).abortConnection()
            return NOT_DONE_YET
        if peer.mode == "slow" or any(h in path for h in peer.hold):
            peer.pending.append(request)
            return NOT_DONE_YET
        if peer.mode == "error":
            request.setResponseCode(500)
            return b"boom"
        if path == "/peernix/digest" and peer.digest is not None:
            result: bytes | int = peer.digest.render(request)
            return result
        if not path.startswith("/nix-cache/"):
            request.setResponseCode(404)
            return b""
        rest = path[len("/nix-cache/"):]
        if rest == "nix-cache-info":
            if peer.serving is not None:
                request.setHeader("X-Peernix-Serve-Peers", "yes" if peer.serving else "no")
            return b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        if rest.endswith(".narinfo") and rest[:-8] in peer.narinfos:
            request.setHeader("content-type", "text/x-nix-narinfo")
            return peer.narinfos[rest[:-8]]
        if rest in peer.files:
            return peer.files[rest]
        request.setResponseCode(404)
        return b""


def lan_client(lan: FakeLan) -> tuple[HTTPClient, RequestTraversalAgent]:
    """:returns: a treq client whose requests all go to ``lan``, and its agent (to ``flush()``)."""
    agent = RequestTraversalAgent(lan)
    return HTTPClient(agent), agent


# -- hand-rolled responses for streaming tests ------------------------------


@implementer(IPushProducer)
class FakePeerTransport:
    """The transport a body protocol sees: records pause, resume and stop."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True

    def loseConnection(self) -> None:
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """
    An ``IResponse`` whose body the test drives: ``deliverBody`` connects the
    protocol to a :class:`FakePeerTransport`; the test then calls
    :meth:`send`, :meth:`finish` or :meth:`lose`.
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    length = UNKNOWN_LENGTH
    request = None
    previousResponse = None

    def __init__(self, code: int = 200) -> None:
        self.code = code
        self.headers = Headers()
        self.transport = FakePeerTransport()
        self.protocol: Protocol | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response  # type: ignore[assignment]

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def send(self, *chunks: bytes) -> None:
        """Deliver body bytes (unless the receiver stopped the transport)."""
        assert self.protocol is not None
        for chunk in chunks:
            if not self.transport.stopped:
                self.protocol.dataReceived(chunk)

    def finish(self) -> None:
        """End the body cleanly."""
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))  # type: ignore[no-untyped-call]

    def lose(self, error: Exception) -> None:
        """End the body with ``error``."""
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(error))  # type: ignore[no-untyped-call]


def chunks_of(data: bytes, size: int) -> list[bytes]:
    """:returns: ``data`` cut into ``size``-byte pieces."""
    return [data[i:i + size] for i in range(0, len(data), size)]
