"""Tests for :mod:`peernix.web.app`: the cache protocol, status pages and metrics, socket-free."""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
from collections.abc import Sequence
from typing import Any

import zstandard
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from peernix.interfaces import IPeerRegistry, IStore, IUpstream
from peernix.memory import TRIM_DELAY, IdleTrimmer
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo, parse_narinfo
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import SecretKey, parse_secret_key
from peernix.peers.errors import NarClientGone, NarUnavailable, NarVerificationFailed
from peernix.peers.metrics import PeerMetrics
from peernix.peers.registry import PeerRegistry
from peernix.peers.relay import NarRelay
from peernix.test.peerfakes import FakeResponse, chunks_of, file_nar
from peernix.test.fakes import FakeUpstream, MemoryStore, fake_hash_part, nar_bytes, run_synchronously
from peernix.web.app import (
    COMPRESS_MIN_SIZE,
    DEFAULT_PROXY_CLIENTS,
    SMALL_NAR_SIZE,
    TINY_NAR_SIZE,
    WebApp,
    client_ip,
)
from peernix.web.metrics import Metrics
from peernix.web.streaming import AHEAD_BYTES, BIG_CHUNK

#: The throwaway test key of nix-protocol.md §1.5.
TEST_KEY = "test-1:7PkklNGdFMvOC2stB1+EhT9Gfh4hBLvpx+HFrKMNWyRYWr4KHNuWa9PDSBHZCGpq6EBYZZdg3RQhSEhSAOKgkA=="
#: A well-formed signature by some other key (as cache.nixos.org's would be in the DB).
OTHER_SIG = "cache.example.org-1:" + "A" * 86 + "=="
BIG = 200 * 1024


class Harness:
    """A WebApp over a MemoryStore, queried in memory through RequestTraversalAgent (127.0.0.1)."""

    def __init__(
        self,
        testcase: SynchronousTestCase,
        *,
        key: SecretKey | None = None,
        upstream: FakeUpstream | None = None,
        proxy_clients: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = DEFAULT_PROXY_CLIENTS,
        defer_to_thread: Any = run_synchronously,
        registry: PeerRegistry | None = None,
        clock: Clock | None = None,
        trimmer: IdleTrimmer | None = None,
        **app_options: Any,
    ) -> None:
        """``app_options``: more keyword arguments of :class:`WebApp`."""
        root = testcase.mktemp()
        os.makedirs(root)
        self.store = MemoryStore(root)
        self.clock = clock if clock is not None else Clock()
        self.metrics = Metrics()
        self.key = key
        self.app = WebApp(
            self.store,
            reactor=self.clock,
            defer_to_thread=defer_to_thread,
            secret_key=key,
            priority=30,
            metrics=self.metrics,
            upstream=upstream,
            proxy_clients=proxy_clients,
            store_root=root,
            version="9.9.9-test",
            registry=registry,
            trimmer=trimmer,
            **app_options,
        )
        self.resource = self.app.resource()
        self.agent = RequestTraversalAgent(self.resource)

    def request(self, method: bytes, path: str | bytes, headers: dict[bytes, list[bytes]] | None = None) -> tuple[IResponse, bytes]:
        """:returns: the response and its (de-chunked, still encoded) body."""
        if isinstance(path, str):
            path = path.encode("ascii")
        out: list[Any] = []
        d = self.agent.request(method, b"http://peernix" + path, Headers(headers or {}))

        def body(response: IResponse) -> Deferred[tuple[IResponse, bytes]]:
            return readBody(response).addCallback(lambda data: (response, data))

        d.addCallback(body)
        d.addBoth(out.append)
        self.agent.flush()
        assert len(out) == 1, "no response"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        result: tuple[IResponse, bytes] = out[0]
        return result

    def get(self, path: str | bytes, **headers: str) -> tuple[IResponse, bytes]:
        return self.request(b"GET", path, {k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})

    def head(self, path: str | bytes) -> tuple[IResponse, bytes]:
        return self.request(b"HEAD", path)

    def raw(self, request: bytes, peer: str = "127.0.0.1") -> tuple[StringTransport, Any]:
        """Send raw request bytes to a real HTTPChannel over a StringTransport; returns (transport, channel)."""
        site = Site(self.resource, reactor=self.clock)
        address = IPv6Address("TCP", peer, 4321) if ":" in peer else IPv4Address("TCP", peer, 4321)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(request)
        return transport, channel


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if values is None else ",".join(values)


def content_length(response: IResponse) -> str | None:
    """:returns: the Content-Length sent (twisted's client moves it from the headers of a GET to ``length``)."""
    value = header(response, "Content-Length")
    if value is not None:
        return value
    return None if response.length is UNKNOWN_LENGTH else str(response.length)


def nar_url(info: PathInfo, suffix: str = ".nar", prefix: str = "/nix-cache/nar/") -> str:
    return f"{prefix}{info.hash_part}-{info.nar_hash.nix32()}{suffix}"


class RelayingUpstream(FakeUpstream):
    """
    A :class:`FakeUpstream` whose :meth:`relay_nar` runs a real
    :class:`~peernix.peers.relay.NarRelay` (hashing, holding back the last
    chunk) fed by a :class:`FakeResponse` the test drives, one per relay in
    ``responses``.
    """

    def __init__(self, hold_back: int = 0) -> None:
        super().__init__()
        self.responses: list[FakeResponse] = []
        self.hold_back = hold_back
        self.clock = Clock()

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """See :meth:`peernix.interfaces.IUpstream.relay_nar`."""
        self.relays.append(info)
        if callable(on_peer):
            on_peer(self.peer_url)
        relay = NarRelay(IConsumer(consumer), info.nar_hash, info.nar_size, "none", self.clock, hold_back=self.hold_back)
        response = FakeResponse()
        response.deliverBody(relay)
        self.responses.append(response)
        return relay.done


def big_contents() -> bytes:
    return (os.urandom(1024) + b"\0" * 3072) * (BIG // 4096)


class FakesTests(SynchronousTestCase):
    """The test doubles implement the interfaces they stand for."""

    def test_memory_store(self) -> None:
        """MemoryStore provides IStore."""
        root = self.mktemp()
        os.makedirs(root)
        verifyObject(IStore, MemoryStore(root))

    def test_fake_upstream(self) -> None:
        """FakeUpstream provides IUpstream."""
        verifyObject(IUpstream, FakeUpstream())

    def test_relaying_upstream(self) -> None:
        """RelayingUpstream provides IUpstream."""
        verifyObject(IUpstream, RelayingUpstream())

    def test_memory_store_hash_matches_nix(self) -> None:
        """MemoryStore's NAR hash of a 'hello' file is the vector of nix-protocol.md §1.4."""
        root = self.mktemp()
        os.makedirs(root)
        info = MemoryStore(root).add_file("f", b"hello\n")
        self.assertEqual(info.nar_hash.to_string(), "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
        self.assertEqual(info.nar_size, 120)


class CacheInfoTests(SynchronousTestCase):
    """/nix-cache/nix-cache-info describes the cache."""

    def test_cache_info(self) -> None:
        """It names the store dir, mass query and the configured priority."""
        h = Harness(self)
        response, body = h.get("/nix-cache/nix-cache-info")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
        self.assertEqual(header(response, "Content-Type"), "text/x-nix-cache-info")
        head, head_body = h.head("/nix-cache/nix-cache-info")
        self.assertEqual((head.code, head_body), (200, b""))
        self.assertEqual(content_length(head), str(len(body)))


class NarInfoTests(SynchronousTestCase):
    """/nix-cache/<hash>.narinfo serves local paths, signed, and validates the hash."""

    def setUp(self) -> None:
        self.key = parse_secret_key(TEST_KEY)
        self.h = Harness(self, key=self.key)
        dep = self.h.store.add_file("dep", b"dep")
        self.info = self.h.store.add_tree(
            "withref",
            {"a": b"x", "bin": {"run": b"#!/bin/sh\n"}, "l": ("symlink", "a")},
            references=(dep.path,),
            sigs=(OTHER_SIG,),
            deriver=f"/nix/store/{fake_hash_part('d')}-withref.drv",
        )
        self.info = self.h.store.evolve(self.info.hash_part, references=(dep.path, self.info.path))

    def test_local_hit(self) -> None:
        """A local path gives 200 with our URL, Compression none, the DB sigs, and our valid signature."""
        response, body = self.h.get(f"/nix-cache/{self.info.hash_part}.narinfo")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "Content-Type"), "text/x-nix-narinfo")
        self.assertEqual(content_length(response), str(len(body)))
        narinfo = parse_narinfo(body)
        self.assertEqual(narinfo.store_path, self.info.path)
        self.assertEqual(narinfo.url, f"{self.info.hash_part}-{self.info.nar_hash.nix32()}.nar")
        self.assertEqual(narinfo.compression, "none")
        self.assertEqual(narinfo.nar_hash, self.info.nar_hash)
        self.assertEqual(narinfo.nar_size, self.info.nar_size)
        self.assertEqual(len(narinfo.references), 2)
        self.assertEqual(narinfo.deriver, f"{fake_hash_part('d')}-withref.drv")
        self.assertEqual(narinfo.sigs[0], OTHER_SIG)
        ours = [s for s in narinfo.sigs if s.startswith("test-1:")]
        self.assertEqual(len(ours), 1)
        self.assertTrue(self.key.public_key.verify(narinfo.fingerprint(), ours[0]))
        # The file is the NAR (Compression: none), as nix copy --to file://...?compression=none says.
        self.assertEqual((narinfo.file_hash, narinfo.file_size), (self.info.nar_hash, self.info.nar_size))
        self.assertIn(f"FileHash: sha256:{self.info.nar_hash.nix32()}\nFileSize: {self.info.nar_size}\n".encode(), body)

    def test_urls_are_served(self) -> None:
        """Each narinfo's URL, taken relative to /nix-cache/ (no nar/ prefix, zw3rk's form), serves its NAR."""
        big = self.h.store.add_file("big", b"z" * COMPRESS_MIN_SIZE)
        for info, query, headers in (
            (self.info, "", {}),
            (big, "", {"accept_encoding": "zstd"}),
            (big, "?compression=zstd", {"X_Peernix_Peer": "1"}),
        ):
            _, body = self.h.get(f"/nix-cache/{info.hash_part}.narinfo{query}", **headers)
            narinfo = parse_narinfo(body)
            self.assertNotIn("/", narinfo.url)
            response, nar = self.h.get(f"/nix-cache/{narinfo.url}", **headers)
            self.assertEqual(response.code, 200, narinfo.url)
            self.assertIsNone(header(response, "Content-Encoding"))
            if narinfo.compression == "zstd":
                nar = zstandard.ZstdDecompressor().decompressobj().decompress(nar)
            self.assertEqual(nar, nar_bytes(self.h.store.real_path(info.path)))
            self.assertEqual(Hash.sha256_of(nar), narinfo.nar_hash)
            if narinfo.compression == "none":
                self.assertEqual((narinfo.file_hash, narinfo.file_size), (narinfo.nar_hash, len(nar)))

    def test_without_key(self) -> None:
        """Without a key only the database signatures are served."""
        h = Harness(self)
        info = h.store.add_file("f", b"f", sigs=(OTHER_SIG,))
        _, body = h.get(f"/nix-cache/{info.hash_part}.narinfo")
        self.assertEqual(parse_narinfo(body).sigs, (OTHER_SIG,))

    def test_zstd_query(self) -> None:
        """?compression=zstd points a NAR of COMPRESS_MIN_SIZE or more at the .nar.zst URL, Compression: zstd."""
        info = self.h.store.add_file("big", b"z" * COMPRESS_MIN_SIZE)
        _, body = self.h.get(f"/nix-cache/{info.hash_part}.narinfo?compression=zstd")
        narinfo = parse_narinfo(body)
        self.assertEqual(narinfo.url, f"{info.hash_part}-{info.nar_hash.nix32()}.nar.zst")
        self.assertEqual(narinfo.compression, "zstd")
        # The compressed file is made on the fly: its hash is not known.
        self.assertEqual((narinfo.file_hash, narinfo.file_size), (None, None))
        _, plain = self.h.get(f"/nix-cache/{info.hash_part}.narinfo")
        self.assertEqual(parse_narinfo(plain).compression, "none")

    def test_zstd_query_small_nar(self) -> None:
        """?compression=zstd still offers a NAR smaller than COMPRESS_MIN_SIZE raw (.nar, Compression: none)."""
        self.assertLess(self.info.nar_size, COMPRESS_MIN_SIZE)
        _, body = self.h.get(f"/nix-cache/{self.info.hash_part}.narinfo?compression=zstd")
        narinfo = parse_narinfo(body)
        self.assertEqual(narinfo.url, f"{self.info.hash_part}-{self.info.nar_hash.nix32()}.nar")
        self.assertEqual(narinfo.compression, "none")
        self.assertEqual(narinfo.file_size, self.info.nar_size)

    def test_head_matches_get(self) -> None:
        """HEAD gives GET's status and Content-Length, without a body, for hits, misses and bad hashes."""
        for path in (
            f"/nix-cache/{self.info.hash_part}.narinfo",
            f"/nix-cache/{fake_hash_part('absent')}.narinfo",
            "/nix-cache/short.narinfo",
        ):
            get, get_body = self.h.get(path)
            head, head_body = self.h.head(path)
            self.assertEqual(head.code, get.code, path)
            self.assertEqual(head_body, b"")
            self.assertEqual(content_length(head), str(len(get_body)))

    def test_miss_is_404(self) -> None:
        """An unknown hash is 404 (with no upstream)."""
        response, _ = self.h.get(f"/nix-cache/{fake_hash_part('absent')}.narinfo")
        self.assertEqual(response.code, 404)

    def test_invalid_hash_is_400(self) -> None:
        """A hash part that is not 32 nix32 characters is 400, without asking the store."""
        for bad in ("short", "e" * 32, "0" * 31, "0" * 33, "0" * 31 + "E", "%30" * 32, "0" * 31 + "%00"):
            response, body = self.h.get(f"/nix-cache/{bad}.narinfo")
            self.assertEqual(response.code, 400, bad)
            self.assertTrue(body)
        self.assertEqual(self.h.store.lookups, [])

    def test_cached_briefly(self) -> None:
        """A rendered narinfo is reused for a moment, then looked up again."""
        path = f"/nix-cache/{self.info.hash_part}.narinfo"
        _, first = self.h.get(path)
        _, second = self.h.get(path)
        self.assertEqual(first, second)
        self.assertEqual(len(self.h.store.lookups), 1)
        self.h.clock.advance(5)
        self.h.store.remove(self.info.hash_part)
        response, _ = self.h.get(path)
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.h.store.lookups), 2)

    def test_cache_bounded(self) -> None:
        """The narinfo cache never holds more than its bound."""
        from peernix.web import app as app_module

        self.patch(app_module, "NARINFO_CACHE_SIZE", 5)
        for i in range(12):
            info = self.h.store.add_file(f"p{i}", b"%d" % i)
            self.assertEqual(self.h.get(f"/nix-cache/{info.hash_part}.narinfo")[0].code, 200)
        self.assertLessEqual(len(self.h.app._narinfo_cache), 5)

    def test_store_error_is_404(self) -> None:
        """A store lookup that fails unexpectedly is answered 404, never 5xx, and logged."""

        def broken(hash_part: str) -> Deferred[PathInfo | None]:
            raise RuntimeError("database is locked")

        self.patch(self.h.store, "query_path_info", broken)
        response, _ = self.h.get(f"/nix-cache/{self.info.hash_part}.narinfo")
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ProxyTests(SynchronousTestCase):
    """Local misses go to the upstream only for proxy clients, and never re-signed."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.nar = b"peer nar bytes, pretend"
        self.peer_hash = fake_hash_part("peerpath")
        self.peer_info = NarInfo(
            store_path=f"/nix/store/{self.peer_hash}-peerpath",
            url="nar/somewhere.nar.zst",
            compression="zstd",
            nar_hash=Hash.sha256_of(self.nar),
            nar_size=len(self.nar),
            references=(f"{self.peer_hash}-peerpath",),
            sigs=(OTHER_SIG,),
            file_hash=Hash.sha256_of(b"compressed"),
            file_size=10,
        )
        self.upstream.add(self.peer_info, self.nar)

    def test_local_client_gets_peer_narinfo(self) -> None:
        """A loopback client's miss returns the peer narinfo with our URL, the raw NAR's FileHash/FileSize, sigs untouched."""
        h = Harness(self, key=parse_secret_key(TEST_KEY), upstream=self.upstream)
        response, body = h.get(f"/nix-cache/{self.peer_hash}.narinfo")
        self.assertEqual(response.code, 200)
        narinfo = parse_narinfo(body)
        self.assertEqual(narinfo.url, f"{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar")
        self.assertEqual(narinfo.compression, "none")
        # The peer's FileHash (of its zstd file) is replaced: we relay the raw NAR.
        self.assertEqual(narinfo.file_hash, self.peer_info.nar_hash)
        self.assertEqual(narinfo.file_size, len(self.nar))
        self.assertEqual(narinfo.sigs, (OTHER_SIG,))
        self.assertEqual(narinfo.fingerprint(), self.peer_info.fingerprint())
        self.assertEqual(self.upstream.lookups, [self.peer_hash])
        relayed, nar = h.get(f"/nix-cache/{narinfo.url}")
        self.assertEqual((relayed.code, nar), (200, self.nar))

    def test_peer_client_never_fans_out(self) -> None:
        """A client outside proxy_clients gets 404 for a miss and the upstream is never asked."""
        h = Harness(self, upstream=self.upstream, proxy_clients=[ipaddress.ip_network("10.0.0.0/8")])
        self.assertEqual(h.get(f"/nix-cache/{self.peer_hash}.narinfo")[0].code, 404)
        self.assertEqual(h.head(f"/nix-cache/{self.peer_hash}.narinfo")[0].code, 404)
        url = f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        self.assertEqual(h.get(url)[0].code, 404)
        self.assertEqual(self.upstream.lookups, [])

    def test_peernix_peer_header_never_fans_out(self) -> None:
        """A loopback request marked X-Peernix-Peer (another daemon on this host) is answered locally only."""
        h = Harness(self, upstream=self.upstream)
        self.assertEqual(h.get(f"/nix-cache/{self.peer_hash}.narinfo", X_Peernix_Peer="1")[0].code, 404)
        url = f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        self.assertEqual(h.get(url, X_Peernix_Peer="1")[0].code, 404)
        self.assertEqual(self.upstream.lookups, [])

    def test_peer_address_over_the_wire(self) -> None:
        """A request from a LAN address with the default proxy_clients gets 404 without an upstream call."""
        h = Harness(self, upstream=self.upstream)
        transport, _ = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % self.peer_hash.encode(), peer="192.0.2.7")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "))
        self.assertEqual(self.upstream.lookups, [])
        transport, _ = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % self.peer_hash.encode(), peer="::ffff:127.0.0.1")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_upstream_failure_is_404(self) -> None:
        """An upstream that fails gives 404 and a logged failure."""
        self.upstream.lookup_error = RuntimeError("fan-out bug")
        h = Harness(self, upstream=self.upstream)
        self.assertEqual(h.get(f"/nix-cache/{self.peer_hash}.narinfo")[0].code, 404)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_upstream_wrong_path_ignored(self) -> None:
        """A peer narinfo naming another store path is not served."""
        self.upstream.narinfos[fake_hash_part("other")] = self.peer_info
        h = Harness(self, upstream=self.upstream)
        self.assertEqual(h.get(f"/nix-cache/{fake_hash_part('other')}.narinfo")[0].code, 404)

    def test_client_gone_cancels_lookup(self) -> None:
        """When the client disconnects during a fan-out, the upstream wait is cancelled."""
        self.upstream.hold_lookups = True
        h = Harness(self, upstream=self.upstream)
        transport, channel = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % self.peer_hash.encode())
        self.assertEqual(len(self.upstream.held), 1)
        channel.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(self.upstream.cancelled, 1)
        self.assertEqual(transport.value(), b"")

    def test_relay_nar(self) -> None:
        """A loopback client's NAR miss is relayed from the upstream with the NAR's Content-Length."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        response, body = h.get(url)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.nar)
        self.assertEqual(content_length(response), str(len(self.nar)))
        self.assertEqual(header(response, "Content-Type"), "application/x-nix-nar")
        head, _ = h.head(url)
        self.assertEqual(head.code, 200)
        self.assertEqual(len(self.upstream.relays), 1)
        for response in (response, head):
            self.assertEqual(header(response, "Accept-Ranges"), "bytes")
            self.assertIsNone(header(response, "Content-Encoding"))
        self.assertEqual(content_length(head), str(len(self.nar)))

    def test_relay_ignores_accept_encoding(self) -> None:
        """A relayed NAR is identity even for Nix >= 2.14's Accept-Encoding, so it can be resumed."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        response, body = h.get(url, accept_encoding="zstd, br, gzip, deflate, bzip2, xz")
        self.assertEqual((response.code, body), (200, self.nar))
        self.assertIsNone(header(response, "Content-Encoding"))
        self.assertEqual(header(response, "Accept-Ranges"), "bytes")

    def test_relay_ranges(self) -> None:
        """A Range on a relayed NAR is answered here with 206, the exact slice, Content-Range; HEAD agrees."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        size = len(self.nar)
        for spec, first, last in (
            ("bytes=0-0", 0, 0),
            ("bytes=5-", 5, size - 1),
            ("bytes=2-9", 2, 9),
            ("bytes=-3", size - 3, size - 1),
            ("bytes=7-999999", 7, size - 1),
            (f"bytes={size - 1}-", size - 1, size - 1),
        ):
            relays = len(self.upstream.relays)
            response, body = h.get(url, range=spec, accept_encoding="zstd")
            self.assertEqual(response.code, 206, spec)
            self.assertEqual(body, self.nar[first : last + 1], spec)
            self.assertEqual(header(response, "Content-Range"), f"bytes {first}-{last}/{size}", spec)
            self.assertEqual(content_length(response), str(last - first + 1), spec)
            self.assertEqual(header(response, "Accept-Ranges"), "bytes")
            self.assertIsNone(header(response, "Content-Encoding"))
            # The whole NAR came from the peer (it is verified from byte 0).
            self.assertEqual(len(self.upstream.relays), relays + 1)
            head, head_body = h.request(b"HEAD", url, {b"Range": [spec.encode()]})
            self.assertEqual((head.code, head_body), (206, b""), spec)
            self.assertEqual(header(head, "Content-Range"), f"bytes {first}-{last}/{size}")
            self.assertEqual(content_length(head), str(last - first + 1))
            self.assertEqual(len(self.upstream.relays), relays + 1)

    def test_relay_range_unsatisfiable(self) -> None:
        """A range past the end of a relayed NAR is 416 with Content-Range: bytes */size, and nothing is relayed."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        size = len(self.nar)
        for method in (b"GET", b"HEAD"):
            response, _ = h.request(method, url, {b"Range": [b"bytes=%d-" % size]})
            self.assertEqual(response.code, 416)
            self.assertEqual(header(response, "Content-Range"), f"bytes */{size}")
        self.assertEqual(self.upstream.relays, [])

    def test_relay_multi_range_whole(self) -> None:
        """Several ranges (or If-Range) on a relayed NAR get the whole NAR with 200."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        for headers in ({b"Range": [b"bytes=0-1,5-6"]}, {b"Range": [b"bytes=0-1"], b"If-Range": [b'"x"']}):
            response, body = h.request(b"GET", url, headers)
            self.assertEqual((response.code, body), (200, self.nar))

    def relay_raw(self, upstream: RelayingUpstream, nar: bytes, headers: bytes = b"") -> tuple[StringTransport, Any, FakeResponse]:
        """Ask for ``nar`` (served by ``upstream``'s peer) over a real channel; :returns: transport, channel and the peer's response."""
        info = attrs_evolve_nar(self.peer_info, nar)
        upstream.add(info)
        h = Harness(self, upstream=upstream)
        transport, channel = h.raw(
            b"GET /nix-cache/%s-%s.nar HTTP/1.1\r\nHost: x\r\n%s\r\n"
            % (self.peer_hash.encode(), info.nar_hash.nix32().encode(), headers)
        )
        [response] = upstream.responses
        return transport, channel, response

    def test_relay_range_held_until_verified(self) -> None:
        """A relayed range skips the bytes before it, and its last bytes leave only once the whole NAR verified."""
        nar = file_nar(os.urandom(20000))
        for spec, first, last in ((b"bytes=1000-", 1000, len(nar) - 1), (b"bytes=1000-4999", 1000, 4999)):
            upstream = RelayingUpstream()
            transport, _, response = self.relay_raw(upstream, nar, b"Range: %s\r\n" % spec)
            response.send(*chunks_of(nar, 1000))
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 206 "), spec)
            self.assertIn(b"Content-Range: bytes %d-%d/%d" % (first, last, len(nar)), head)
            self.assertIn(b"Accept-Ranges: bytes", head)
            # All of the NAR came from the peer, but not all of the range left.
            self.assertTrue(nar[first : last + 1].startswith(body), spec)
            self.assertLess(len(body), last + 1 - first, spec)
            self.assertGreater(len(body), 0, spec)
            response.finish()
            self.assertEqual(transport.value().partition(b"\r\n\r\n")[2], nar[first : last + 1], spec)
            self.assertFalse(transport.disconnected)

    def test_relay_range_bad_nar_aborts(self) -> None:
        """A relayed range of a NAR that fails verification never sends its last bytes: the connection is aborted."""
        nar = file_nar(os.urandom(20000))
        bad = bytearray(nar)
        bad[-100] ^= 1
        for spec, first, last in ((b"bytes=1000-", 1000, len(nar) - 1), (b"bytes=1000-4999", 1000, 4999)):
            upstream = RelayingUpstream()
            transport, _, response = self.relay_raw(upstream, nar, b"Range: %s\r\n" % spec)
            response.send(*chunks_of(bytes(bad), 1000))
            response.finish()
            body = transport.value().partition(b"\r\n\r\n")[2]
            self.assertTrue(transport.disconnected, spec)
            self.assertLess(len(body), last + 1 - first, spec)
            self.assertTrue(nar[first : last + 1].startswith(body), spec)
        self.assertEqual(len(self.flushLoggedErrors(NarVerificationFailed)), 2)

    def test_relay_client_left_is_one_info_line(self) -> None:
        """A client leaving mid relay is logged as one info line: no failure, no traceback, nothing above info."""
        nar = file_nar(os.urandom(20000))
        upstream = RelayingUpstream()
        with capturedLogs() as events:
            transport, channel, response = self.relay_raw(upstream, nar)
            response.send(*chunks_of(nar[:5000], 1000))
            self.assertTrue(transport.value().partition(b"\r\n\r\n")[2])
            # What a TCP transport does when the client goes away: stop its
            # producer (the channel, which stops the relay), then tell the protocol.
            channel_producer = transport.producer
            assert channel_producer is not None
            channel_producer.stopProducing()
            channel.connectionLost(Failure(ConnectionError("client left")))
        self.assertTrue(response.transport.stopped)
        ours = [e for e in events if e.get("log_namespace", "").startswith("peernix")]
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertEqual([e["log_level"] for e in ours], [LogLevel.info])
        self.assertEqual(ours[0]["route"], "nar")
        self.assertEqual(self.flushLoggedErrors(NarClientGone), [])

    def test_relay_client_left_after_cancel_is_quiet(self) -> None:
        """A client gone before its relay was stopped (the request cancelled first) logs no failure either."""
        nar = file_nar(os.urandom(20000))
        upstream = RelayingUpstream()
        with capturedLogs() as events:
            transport, channel, response = self.relay_raw(upstream, nar)
            response.send(nar[:3000])
            channel.connectionLost(Failure(ConnectionError("client left")))
        self.assertTrue(response.transport.stopped)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertEqual(
            [e for e in events if e.get("log_namespace", "").startswith("peernix") and e["log_level"] > LogLevel.info], []
        )

    def test_hash_only_url_relayed(self) -> None:
        """zw3rk's older <hash>.nar names a path by hash part; a local client's miss is relayed, ranges too."""
        h = Harness(self, upstream=self.upstream)
        for url in (f"/nix-cache/{self.peer_hash}.nar", f"/nix-cache/nar/{self.peer_hash}.nar"):
            response, body = h.get(url)
            self.assertEqual((response.code, body), (200, self.nar), url)
            response, body = h.get(url, range="bytes=3-")
            self.assertEqual((response.code, body), (206, self.nar[3:]), url)
        self.assertEqual(h.get(f"/nix-cache/{fake_hash_part('nowhere')}.nar")[0].code, 404)

    def test_relay_counts_as_a_stream(self) -> None:
        """A relayed NAR tells the trimmer it runs; freed memory is given back a second after it ended."""
        clock = Clock()
        trims: list[float] = []
        trimmer = IdleTrimmer(clock, trim=lambda: trims.append(clock.seconds()))
        h = Harness(self, upstream=self.upstream, clock=clock, trimmer=trimmer)
        response, body = h.get(f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar")
        self.assertEqual((response.code, body), (200, self.nar))
        self.assertEqual(trimmer.active, 0)
        clock.advance(TRIM_DELAY)
        self.assertEqual(trims, [TRIM_DELAY])

    def test_relay_other_narhash_404(self) -> None:
        """A NAR URL whose NarHash differs from the peer's narinfo is 404 without relaying."""
        h = Harness(self, upstream=self.upstream)
        url = f"/nix-cache/nar/{self.peer_hash}-{Hash.sha256_of(b'x').nix32()}.nar"
        self.assertEqual(h.get(url)[0].code, 404)
        self.assertEqual(self.upstream.relays, [])

    def test_relay_unavailable_404(self) -> None:
        """NarUnavailable before any byte becomes a clean 404."""
        del self.upstream.nars[self.peer_info.nar_hash.to_string()]
        h = Harness(self, upstream=self.upstream)
        response, body = h.get(f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar")
        self.assertEqual(response.code, 404)
        self.assertEqual(content_length(response), str(len(body)))

    def test_relay_failure_aborts(self) -> None:
        """A relay failing after bytes were sent aborts the connection and never finishes the response."""
        self.upstream.relay_error = NarVerificationFailed("hash mismatch")
        self.upstream.relay_error_after = 5
        h = Harness(self, upstream=self.upstream)
        transport, _ = h.raw(
            b"GET /nix-cache/nar/%s-%s.nar HTTP/1.1\r\nHost: x\r\n\r\n"
            % (self.peer_hash.encode(), self.peer_info.nar_hash.nix32().encode())
        )
        value = transport.value()
        self.assertTrue(value.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"Content-Length: %d" % len(self.nar), value)
        self.assertTrue(value.endswith(b"\r\n\r\n" + self.nar[:5]))
        self.assertTrue(transport.disconnected)  # StringTransport: abortConnection() was called
        self.assertEqual(len(self.flushLoggedErrors(NarVerificationFailed)), 1)

    def test_relay_unavailable_after_bytes_aborts(self) -> None:
        """Even NarUnavailable aborts once bytes went out."""
        self.upstream.relay_error = NarUnavailable("peer vanished")
        self.upstream.relay_error_after = 3
        h = Harness(self, upstream=self.upstream)
        transport, _ = h.raw(
            b"GET /nix-cache/nar/%s-%s.nar HTTP/1.1\r\nHost: x\r\n\r\n"
            % (self.peer_hash.encode(), self.peer_info.nar_hash.nix32().encode())
        )
        self.assertTrue(transport.disconnected)
        self.flushLoggedErrors(NarUnavailable)


def attrs_evolve_nar(info: NarInfo, nar: bytes) -> NarInfo:
    """:returns: ``info`` describing ``nar`` instead (hash and size)."""
    return NarInfo(
        store_path=info.store_path,
        url=info.url,
        compression="none",
        nar_hash=Hash.sha256_of(nar),
        nar_size=len(nar),
        references=info.references,
        sigs=info.sigs,
    )


class NarTests(SynchronousTestCase):
    """NAR URLs stream the local path's NAR, compressed or sliced as negotiated."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.small = self.h.store.add_file("small", b"hello\n")
        self.big = self.h.store.add_tree("big", {"data": big_contents(), "exe": b"#!"})
        self.big_nar = nar_bytes(self.h.store.real_path(self.big.path))

    def test_raw_nar(self) -> None:
        """A raw NAR has the exact bytes, Content-Length, Accept-Ranges and Vary."""
        response, body = self.h.get(nar_url(self.big))
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.big_nar)
        self.assertEqual(content_length(response), str(len(self.big_nar)))
        self.assertEqual(header(response, "Accept-Ranges"), "bytes")
        self.assertEqual(header(response, "Vary"), "Accept-Encoding")
        self.assertEqual(header(response, "Content-Type"), "application/x-nix-nar")
        self.assertIsNone(header(response, "Content-Encoding"))

    def test_tiny_nar_without_worker(self) -> None:
        """A NAR up to TINY_NAR_SIZE is made on the reactor thread; a bigger small one takes one worker call."""
        from peernix.test.test_web_streaming import ManualThreads

        threads = ManualThreads()
        h = Harness(self, defer_to_thread=threads)
        tiny = h.store.add_file("tiny", b"t" * (TINY_NAR_SIZE - 200))
        self.assertLessEqual(tiny.nar_size, TINY_NAR_SIZE)
        response, body = h.get(nar_url(tiny))
        self.assertEqual((response.code, body), (200, nar_bytes(h.store.real_path(tiny.path))))
        self.assertEqual(threads.queue, [])
        small = h.store.add_file("small", b"s" * (TINY_NAR_SIZE + 1))
        transport, _channel = h.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % nar_url(small).encode())
        self.assertEqual(len(threads.queue), 1)
        self.assertEqual(transport.value(), b"")
        threads.run_all()
        self.assertTrue(transport.value().endswith(nar_bytes(h.store.real_path(small.path))))

    def test_tiny_nar_changed_on_disk(self) -> None:
        """A tiny NAR whose files differ from the database's NarSize is 404, as a bigger one is."""
        h = Harness(self)
        tiny = h.store.add_file("tiny", b"abc")
        with open(h.store.real_path(tiny.path), "ab") as f:
            f.write(b"more than the database says")
        response, _ = h.get(nar_url(tiny))
        self.assertEqual(response.code, 404)

    def test_streams_tell_the_trimmer(self) -> None:
        """A streamed NAR counts as running while it streams; the trim follows its end, once."""
        clock = Clock()
        trims: list[float] = []
        trimmer = IdleTrimmer(clock, trim=lambda: trims.append(clock.seconds()))
        from peernix.test.test_web_streaming import ManualThreads

        threads = ManualThreads()
        h = Harness(self, defer_to_thread=threads, clock=clock, trimmer=trimmer)
        big = h.store.add_tree("big", {"data": os.urandom(SMALL_NAR_SIZE + 1)})  # streamed, not made whole
        transport, _channel = h.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % nar_url(big).encode())
        # The store answered at once; the stream has started, no chunk made yet.
        self.assertEqual(trimmer.active, 1)
        clock.advance(10)
        self.assertEqual(trims, [])
        threads.run_all()
        self.assertEqual(trimmer.active, 0)
        self.assertTrue(transport.value().endswith(nar_bytes(h.store.real_path(big.path))))
        clock.advance(TRIM_DELAY)
        self.assertEqual(trims, [10 + TRIM_DELAY])

    def test_url_forms(self) -> None:
        """The nar/ form, zw3rk's form under the cache root, and harmonia's ?hash= form all work."""
        for url in (
            nar_url(self.small),
            nar_url(self.small, prefix="/nix-cache/"),
            f"/nix-cache/nar/{self.small.nar_hash.nix32()}.nar?hash={self.small.hash_part}",
            f"/nix-cache/{self.small.hash_part}.nar",
            f"/nix-cache/nar/{self.small.hash_part}.nar",
        ):
            response, body = self.h.get(url)
            self.assertEqual((response.code, body), (200, b"".join([nar_bytes(self.h.store.real_path(self.small.path))])), url)

    def test_nar_zst(self) -> None:
        """.nar.zst is the zstd-compressed NAR, without Content-Encoding."""
        for info, expected in ((self.big, self.big_nar), (self.small, nar_bytes(self.h.store.real_path(self.small.path)))):
            response, body = self.h.get(nar_url(info, ".nar.zst"), accept_encoding="gzip")
            self.assertEqual(response.code, 200)
            self.assertIsNone(header(response, "Content-Encoding"))
            self.assertIsNone(header(response, "Accept-Ranges"))
            self.assertEqual(zstandard.ZstdDecompressor().decompressobj().decompress(body), expected)

    def test_local_client_gets_identity(self) -> None:
        """A local client gets the identity NAR with Content-Length and Accept-Ranges, even offering zstd as Nix >= 2.14 does."""
        for info in (self.big, self.small):
            for accept in ("zstd, br, gzip, deflate, bzip2, xz", "gzip", "*"):
                for method in (b"GET", b"HEAD"):
                    response, body = self.h.request(method, nar_url(info), {b"Accept-Encoding": [accept.encode()]})
                    self.assertEqual(response.code, 200)
                    self.assertIsNone(header(response, "Content-Encoding"), accept)
                    self.assertEqual(content_length(response), str(info.nar_size))
                    self.assertEqual(header(response, "Accept-Ranges"), "bytes")
                    if method == b"GET":
                        self.assertEqual(body, nar_bytes(self.h.store.real_path(info.path)))

    def test_lan_peer_gets_transport_compression(self) -> None:
        """A client on another machine (outside proxy_clients) accepting zstd gets Content-Encoding: zstd."""
        h = Harness(self, proxy_clients=[ipaddress.ip_network("10.0.0.0/8")])
        info = h.store.add_tree("big", {"data": big_contents()})
        response, body = h.get(nar_url(info), accept_encoding="zstd, br, gzip, deflate, bzip2, xz")
        self.assertEqual(header(response, "Content-Encoding"), "zstd")
        self.assertEqual(
            zstandard.ZstdDecompressor().decompressobj().decompress(body), nar_bytes(h.store.real_path(info.path))
        )
        # A range is never compressed, for peers either.
        response, body = h.get(nar_url(info), accept_encoding="zstd", range="bytes=10-")
        self.assertEqual(response.code, 206)
        self.assertIsNone(header(response, "Content-Encoding"))

    def test_transport_zstd(self) -> None:
        """A peer accepting zstd gets Content-Encoding: zstd that decodes to the exact NAR."""
        response, body = self.h.get(nar_url(self.big), accept_encoding="zstd, br, gzip, deflate, bzip2, xz", X_Peernix_Peer="1")
        self.assertEqual(header(response, "Content-Encoding"), "zstd")
        self.assertIsNone(content_length(response))
        self.assertIsNone(header(response, "Accept-Ranges"))
        self.assertEqual(header(response, "Vary"), "Accept-Encoding")
        self.assertEqual(zstandard.ZstdDecompressor().decompressobj().decompress(body), self.big_nar)

    def test_transport_gzip(self) -> None:
        """A peer accepting only gzip gets gzip that decodes to the exact NAR."""
        response, body = self.h.get(nar_url(self.big), accept_encoding="gzip;q=0.9, zstd;q=0", X_Peernix_Peer="1")
        self.assertEqual(header(response, "Content-Encoding"), "gzip")
        self.assertEqual(gzip.decompress(body), self.big_nar)

    def test_encoding_matrix(self) -> None:
        """Absent, identity-only, refusing or unsupported Accept-Encoding gives the raw NAR without Content-Encoding."""
        for value in (None, "", "identity", "br, xz", "*;q=0", "identity;q=0", "zstd;q=0, gzip;q=0", "identity, gzip;q=0.5"):
            headers = {"X_Peernix_Peer": "1"}
            if value is not None:
                headers["accept_encoding"] = value
            response, body = self.h.get(nar_url(self.big), **headers)
            self.assertEqual(response.code, 200, value)
            self.assertIsNone(header(response, "Content-Encoding"), value)
            self.assertEqual(body, self.big_nar, value)
        for value, expected in (("*", "zstd"), ("GZIP", "gzip"), ("gzip;q=1, zstd;q=0.5", "gzip")):
            response, _ = self.h.get(nar_url(self.big), accept_encoding=value, X_Peernix_Peer="1")
            self.assertEqual(header(response, "Content-Encoding"), expected, value)

    def test_small_nar_never_compressed(self) -> None:
        """A NAR under 64 KiB is sent raw even to a peer accepting zstd."""
        response, body = self.h.get(nar_url(self.small), accept_encoding="zstd", X_Peernix_Peer="1")
        self.assertIsNone(header(response, "Content-Encoding"))
        self.assertEqual(content_length(response), "120")

    def test_ranges(self) -> None:
        """Single ranges give 206 with the exact slice, Content-Range and no Content-Encoding."""
        size = len(self.big_nar)
        for spec, first, last in (
            ("bytes=0-0", 0, 0),
            ("bytes=100-199", 100, 199),
            ("bytes=1000-", 1000, size - 1),
            ("bytes=-77", size - 77, size - 1),
            ("bytes=5-999999999", 5, size - 1),
            (f"bytes={size - 1}-", size - 1, size - 1),
        ):
            response, body = self.h.get(nar_url(self.big), range=spec, accept_encoding="zstd, gzip")
            self.assertEqual(response.code, 206, spec)
            self.assertEqual(body, self.big_nar[first : last + 1], spec)
            self.assertEqual(header(response, "Content-Range"), f"bytes {first}-{last}/{size}")
            self.assertEqual(content_length(response), str(last - first + 1))
            self.assertIsNone(header(response, "Content-Encoding"))

    def test_range_unsatisfiable(self) -> None:
        """A range past the end is 416 with Content-Range: bytes */size; HEAD agrees."""
        size = len(self.big_nar)
        response, _ = self.h.get(nar_url(self.big), range=f"bytes={size}-")
        self.assertEqual(response.code, 416)
        self.assertEqual(header(response, "Content-Range"), f"bytes */{size}")
        head = self.h.request(b"HEAD", nar_url(self.big), {b"Range": [b"bytes=%d-" % size]})[0]
        self.assertEqual(head.code, 416)

    def test_multi_range_full(self) -> None:
        """Several ranges, or a Range with If-Range, get the full NAR with 200, uncompressed."""
        for headers in (
            {b"Range": [b"bytes=0-1,5-6"], b"Accept-Encoding": [b"zstd"]},
            {b"Range": [b"bytes=0-1"], b"If-Range": [b'"x"']},
        ):
            response, body = self.h.request(b"GET", nar_url(self.big), headers)
            self.assertEqual(response.code, 200)
            self.assertEqual(body, self.big_nar)
            self.assertIsNone(header(response, "Content-Encoding"))

    def test_head_nar(self) -> None:
        """HEAD of a NAR gives GET's status and Content-Length without streaming."""
        response, body = self.h.head(nar_url(self.big))
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(content_length(response), str(len(self.big_nar)))

    def test_narhash_mismatch_404(self) -> None:
        """A NAR URL with another NarHash than the database's is 404."""
        url = f"/nix-cache/nar/{self.small.hash_part}-{Hash.sha256_of(b'other').nix32()}.nar"
        self.assertEqual(self.h.get(url)[0].code, 404)
        self.assertEqual(self.h.head(url)[0].code, 404)

    def test_disk_differs_from_db_404(self) -> None:
        """A path whose NAR size on disk differs from the database is 404, not a wrong NAR."""
        self.h.store.evolve(self.small.hash_part, nar_size=121)
        self.assertEqual(self.h.get(nar_url(self.small))[0].code, 404)

    def test_missing_files_404(self) -> None:
        """A path in the database whose files are gone is 404 (nothing was sent yet)."""
        os.chmod(self.h.store.real_path(self.small.path), 0o644)
        os.unlink(self.h.store.real_path(self.small.path))
        self.assertEqual(self.h.get(nar_url(self.small))[0].code, 404)
        self.flushLoggedErrors(FileNotFoundError)

    def test_invalid_nar_urls_400(self) -> None:
        """Malformed hashes in NAR URLs are 400."""
        good = self.small.nar_hash.nix32()
        for url in (
            f"/nix-cache/nar/{'0' * 31}-{good}.nar",
            f"/nix-cache/nar/{self.small.hash_part}-{good[:-1]}.nar",
            f"/nix-cache/nar/{self.small.hash_part}_{good}.nar",
            f"/nix-cache/nar/{self.small.hash_part}-{'z' * 52}.nar",
            f"/nix-cache/nar/{good}.nar?hash=abc",
            f"/nix-cache/nar/{good}.nar?hash={self.small.hash_part}&hash={self.small.hash_part}",
            f"/nix-cache/nar/{'z' * 52}.nar?hash={self.small.hash_part}",
            f"/nix-cache/{'0' * 31}.nar",
            f"/nix-cache/{'0' * 31}e.nar",
            f"/nix-cache/{'0' * 33}.nar",
            f"/nix-cache/{self.small.hash_part}-{good}-x.nar",
            "/nix-cache/x.nar",
        ):
            self.assertEqual(self.h.get(url)[0].code, 400, url)
            self.assertEqual(self.h.head(url)[0].code, 400, url)

    def test_well_formed_absent_404(self) -> None:
        """Every well-formed NAR URL of a path we do not have is 404, never 400 (Nix treats 400 as a hard error)."""
        absent = fake_hash_part("absent")
        good = self.small.nar_hash.nix32()
        for url in (
            f"/nix-cache/{absent}.nar",
            f"/nix-cache/nar/{absent}.nar",
            f"/nix-cache/{absent}.nar.zst",
            f"/nix-cache/{absent}-{good}.nar",
            f"/nix-cache/{absent}-{good}.nar.zst",
            f"/nix-cache/nar/{absent}-{good}.nar",
            f"/nix-cache/nar/{absent}-{good}.nar.zst",
            f"/nix-cache/nar/{good}.nar?hash={absent}",
            # harmonia's form without ?hash= names no path we can look up.
            f"/nix-cache/nar/{good}.nar",
            f"/nix-cache/{good}.nar",
            # Nix's own file cache form (nar/<filehash>.nar.xz): not ours, not malformed.
            f"/nix-cache/nar/{good}.nar.xz",
        ):
            self.assertEqual(self.h.get(url)[0].code, 404, url)
            self.assertEqual(self.h.head(url)[0].code, 404, url)

    def test_hash_only_url(self) -> None:
        """zw3rk's older <hash>.nar serves the path's current NAR (Nix checks its NarHash), ranges included."""
        for url in (f"/nix-cache/{self.big.hash_part}.nar", f"/nix-cache/nar/{self.big.hash_part}.nar"):
            response, body = self.h.get(url)
            self.assertEqual((response.code, body), (200, self.big_nar), url)
            self.assertEqual(header(response, "Accept-Ranges"), "bytes")
            response, body = self.h.get(url, range="bytes=100-")
            self.assertEqual((response.code, body), (206, self.big_nar[100:]), url)

    def test_metrics_count_bytes(self) -> None:
        """Streamed NAR bytes and the stream duration are recorded."""
        self.h.get(nar_url(self.big))
        registry = self.h.metrics.registry
        self.assertEqual(registry.get_sample_value("peernix_http_response_bytes_total", {"route": "nar"}), len(self.big_nar))
        self.assertEqual(registry.get_sample_value("peernix_http_requests_total", {"route": "nar", "status": "200"}), 1)
        self.assertEqual(registry.get_sample_value("peernix_nar_stream_seconds_count"), 1)


class StreamingOverHTTPTests(SynchronousTestCase):
    """NAR streaming through a real HTTPChannel honours transport backpressure and disconnects."""

    def setUp(self) -> None:
        from peernix.test.test_web_streaming import ManualThreads

        self.threads = ManualThreads()
        self.h = Harness(self, defer_to_thread=self.threads)
        self.info = self.h.store.add_file("big", os.urandom(2 * 1024 * 1024))
        self.nar = nar_bytes(self.h.store.real_path(self.info.path))

    def _start_paused(self) -> tuple[StringTransport, Any]:
        """Send the request with the transport's buffer full, then run the first worker call."""
        transport, channel = self.h.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % nar_url(self.info).encode())
        self.assertEqual(len(self.threads.queue), 1)
        channel_producer = transport.producer  # the HTTPChannel
        assert channel_producer is not None
        channel_producer.pauseProducing()
        self.threads.run_one()
        return transport, channel

    def test_pause_bounds_reads(self) -> None:
        """While the transport is paused the worker makes at most AHEAD_BYTES (plus a chunk) and sends nothing."""
        transport, channel = self._start_paused()
        # The worker call stopped once AHEAD_BYTES were waiting: nothing
        # queued, nothing written (not even the headers).
        self.assertEqual(self.threads.queue, [])
        self.assertEqual(transport.value(), b"")
        channel_producer = transport.producer
        assert channel_producer is not None
        # Resuming writes what was made at once, and asks for more.
        channel_producer.resumeProducing()
        sent = len(transport.value())
        self.assertGreaterEqual(sent, AHEAD_BYTES)
        self.assertLess(sent, AHEAD_BYTES + BIG_CHUNK + 1024)
        self.assertEqual(len(self.threads.queue), 1)
        self.threads.run_all()
        self.assertTrue(transport.value().endswith(self.nar))

    def test_disconnect_stops_and_closes(self) -> None:
        """A client disconnect stops the stream: no more reads, the generator is closed, nothing finished."""
        transport, channel = self._start_paused()
        transport.loseConnection()
        channel.connectionLost(Failure(ConnectionError("client left")))
        self.threads.run_all()  # the close
        self.assertEqual(self.threads.queue, [])
        self.assertEqual(transport.value(), b"")
        counts = self.h.metrics.request_counts()
        self.assertEqual(counts, {("nar", 200): 1})


class LsAndLogTests(SynchronousTestCase):
    """.ls listings and build logs."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.info = self.h.store.add_tree("t", {"B": b"x", "run.sh": b"echo", "sub": {"a": b"data"}, "link": ("symlink", "sub/a")})
        self.drv = f"{fake_hash_part('drv')}-hello-1.0.drv"

    def test_listing(self) -> None:
        """.ls gives the JSON listing of a local path; HEAD agrees; unknown is 404."""
        response, body = self.h.get(f"/nix-cache/{self.info.hash_part}.ls")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "Content-Type"), "application/json")
        document = json.loads(body)
        self.assertEqual(document["version"], 1)
        self.assertEqual(set(document["root"]["entries"]), {"B", "run.sh", "sub", "link"})
        self.assertEqual(self.h.head(f"/nix-cache/{self.info.hash_part}.ls")[0].code, 200)
        self.assertEqual(self.h.get(f"/nix-cache/{fake_hash_part('x')}.ls")[0].code, 404)
        self.assertEqual(self.h.get("/nix-cache/bad.ls")[0].code, 400)

    def test_plain_log(self) -> None:
        """A plain build log is served as text."""
        self.h.store.add_log(self.drv, b"building...\ndone\n")
        response, body = self.h.get(f"/nix-cache/log/{self.drv}")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"building...\ndone\n")
        self.assertTrue(header(response, "Content-Type", ).startswith("text/plain"))  # type: ignore[union-attr]

    def test_bz2_log(self) -> None:
        """A bzip2 log is decompressed while streaming."""
        text = b"line\n" * 100000
        self.h.store.add_log(self.drv, text, compress=True)
        response, body = self.h.get(f"/nix-cache/log/{self.drv}")
        self.assertEqual((response.code, body), (200, text))
        self.assertEqual(self.h.head(f"/nix-cache/log/{self.drv}")[0].code, 200)

    def test_log_absent_or_invalid(self) -> None:
        """An absent log is 404; a name that is not a .drv store path basename is 400."""
        self.assertEqual(self.h.get(f"/nix-cache/log/{self.drv}")[0].code, 404)
        for bad in ("x.drv", f"{fake_hash_part('a')}-a", f"{fake_hash_part('a')}-..%2fetc.drv", "..%2f..%2fetc%2fpasswd", f"{fake_hash_part('a')}-%00.drv", "%ff"):
            self.assertEqual(self.h.get(f"/nix-cache/log/{bad}")[0].code, 400, bad)

    def test_log_name_percent_decoded(self) -> None:
        """A percent-encoded '?' or '=' in a derivation name is decoded before the lookup."""
        drv = f"{fake_hash_part('q')}-a?b=c.drv"
        self.h.store.add_log(drv, b"ok\n")
        response, body = self.h.get(f"/nix-cache/log/{drv.replace('?', '%3F').replace('=', '%3d')}")
        self.assertEqual((response.code, body), (200, b"ok\n"))


class RoutingTests(SynchronousTestCase):
    """Everything else: 404s, 405s, 414s, traversal attempts, status pages and metrics."""

    def setUp(self) -> None:
        self.h = Harness(self, key=parse_secret_key(TEST_KEY))

    def test_unknown_under_cache_404(self) -> None:
        """Unknown paths under /nix-cache/ (including the realisation endpoints) are 404."""
        for path in ("/nix-cache/", "/nix-cache", "/nix-cache/foo", "/nix-cache/realisations/x.doi", "/nix-cache/nar/", "/nix-cache/debuginfo/ab"):
            self.assertEqual(self.h.get(path)[0].code, 404, path)
            self.assertEqual(self.h.head(path)[0].code, 404, path)

    def test_writes_are_405(self) -> None:
        """PUT, POST, DELETE and PATCH under /nix-cache/ are 405 with Allow: GET, HEAD."""
        for method in (b"PUT", b"POST", b"DELETE", b"PATCH", b"OPTIONS"):
            for path in ("/nix-cache/nix-cache-info", f"/nix-cache/{fake_hash_part('a')}.narinfo", "/nix-cache/x/y"):
                response, _ = self.h.request(method, path)
                self.assertEqual(response.code, 405, (method, path))
                self.assertEqual(header(response, "Allow"), "GET, HEAD")

    def test_long_uri_414(self) -> None:
        """A URI over 1 KiB is 414, anywhere."""
        self.assertEqual(self.h.get("/nix-cache/" + "a" * 2000)[0].code, 414)
        self.assertEqual(self.h.get("/?" + "a" * 2000)[0].code, 414)

    def test_traversal(self) -> None:
        """Traversal attempts are 400 or 404 and never reach the filesystem outside the store."""
        for path in (
            b"/nix-cache/../../etc/passwd",
            b"/nix-cache/%2e%2e/%2e%2e/etc/passwd",
            b"/nix-cache//etc/passwd",
            b"/nix-cache/nar/../../../etc/passwd.nar",
            b"/nix-cache/nar//etc.nar",
            b"/nix-cache/log/../../etc/passwd",
            b"/nix-cache/%00.narinfo",
            b"/nix-cache/nix-cache-info%00",
        ):
            response, _ = self.h.request(b"GET", path)
            self.assertIn(response.code, (400, 404), path)
        self.assertEqual(self.h.store.lookups, [])

    def test_nul_on_the_wire(self) -> None:
        """A raw NUL or non-ASCII byte in the request line never causes a 500."""
        for line in (b"GET /nix-cache/\x00.narinfo HTTP/1.1", b"GET /nix-cache/\xc3\xa9.narinfo HTTP/1.1", b"GET /\xc3\xa9 HTTP/1.1"):
            transport, _ = self.h.raw(line + b"\r\nHost: x\r\n\r\n")
            status = transport.value()[:12]
            self.assertIn(status, (b"HTTP/1.1 400", b"HTTP/1.1 404"), line)

    def test_status_page(self) -> None:
        """/ shows version, store root, key name and public key, path count, and request counters, escaped."""
        self.h.store.add_file("a", b"a")
        self.h.get("/nix-cache/nix-cache-info")
        response, body = self.h.get("/")
        self.assertEqual(response.code, 200)
        self.assertTrue(header(response, "Content-Type").startswith("text/html"))  # type: ignore[union-attr]
        text = body.decode()
        for expected in ("9.9.9-test", "test-1", "test-1:WFq+ChzblmvTw0gR2QhqauhAWGWXYN0UIUhIUgDioJA=", "cache-info"):
            self.assertIn(expected, text)
        self.assertEqual(self.h.head("/")[0].code, 200)

    def test_status_html_escaped(self) -> None:
        """Values on the status page are HTML-escaped."""
        from peernix.web.status import Status, render_html

        page = render_html(Status("<v>", "/tmp/<script>", "/nix/store", 1, "k&1", None, None, {("a<b", 200): 1}))
        self.assertNotIn(b"<script>", page)
        self.assertIn(b"/tmp/&lt;script&gt;", page)
        self.assertIn(b"k&amp;1", page)
        self.assertIn(b"a&lt;b", page)

    def test_status_json(self) -> None:
        """/status.json is the JSON twin of the status page."""
        self.h.store.add_file("a", b"a")
        self.h.get(f"/nix-cache/{fake_hash_part('none')}.narinfo")
        response, body = self.h.get("/status.json")
        self.assertEqual(response.code, 200)
        document = json.loads(body)
        self.assertEqual(document["version"], "9.9.9-test")
        self.assertEqual(document["valid_paths"], 1)
        self.assertEqual(document["key_name"], "test-1")
        self.assertEqual(document["requests"]["narinfo"], {"404": 1})

    def test_status_without_path_count(self) -> None:
        """A store without path_count shows an unknown count instead of failing."""
        h = Harness(self)
        self.patch(h.store, "path_count", None)
        response, body = h.get("/status.json")
        self.assertEqual(response.code, 200)
        self.assertIsNone(json.loads(body)["valid_paths"])

    def test_metrics(self) -> None:
        """/metrics exposes the app's own registry in the Prometheus text format."""
        self.h.get("/nix-cache/nix-cache-info")
        response, body = self.h.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn("text/plain", header(response, "Content-Type"))  # type: ignore[arg-type]
        self.assertIn(b'peernix_http_requests_total{route="cache-info",status="200"} 1.0', body)
        self.assertIn(b"peernix_nar_stream_seconds_bucket", body)
        self.assertIn(b"peernix_store_lookups_total", body)

    def test_other_paths(self) -> None:
        """Unknown paths outside the cache are 404; writes to the status page are 405."""
        self.assertEqual(self.h.get("/nope")[0].code, 404)
        self.assertEqual(self.h.request(b"POST", "/")[0].code, 405)

    def test_stubtreq(self) -> None:
        """The resource works with treq's StubTreq, as other components' tests use it."""
        treq = StubTreq(self.h.resource)
        out: list[Any] = []
        treq.get("http://peernix/nix-cache/nix-cache-info").addCallback(treq.content).addBoth(out.append)  # type: ignore[attr-defined]
        treq.flush()
        self.assertEqual(out, [b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"])


class PeerStatusTests(SynchronousTestCase):
    """The status page and status.json show the peer table and the peer-side counters."""

    KEY = "bob-peernix-1:" + "B" * 43 + "="

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = PeerRegistry(self.clock)
        verifyObject(IPeerRegistry, self.registry)
        self.h = Harness(self, registry=self.registry, clock=self.clock)
        # The fan-out registers these on the web metrics' registry (service.make_peers).
        self.peer_metrics = PeerMetrics(self.h.metrics.registry)
        good = self.registry.add("http://10.0.0.2:9999", "static")
        assert good is not None
        self.registry.add("http://10.0.0.2:9999", "udp", public_key=self.KEY)
        self.registry.record_success(good, 0.025)
        bad = self.registry.add("http://[fd00::3]:9999", "mdns")
        assert bad is not None
        self.clock.advance(7)
        self.registry.record_failure(bad, "untrusted")
        self.registry.record_failure(bad, "timeout")
        self.clock.advance(3)
        self.peer_metrics.peer_hits.inc(2)
        self.peer_metrics.fanout_misses.inc(5)
        self.peer_metrics.proxied_bytes.inc(123456)
        self.peer_metrics.verification_failures.inc()
        self.peer_metrics.peer_requests.labels("untrusted").inc(3)
        self.peer_metrics.peer_requests.labels("hit").inc(2)
        self.h.metrics.count_narinfo("peer")
        self.h.metrics.count_narinfo("peer")
        self.h.metrics.count_narinfo("local")

    def test_status_json_peers(self) -> None:
        """status.json lists every peer with sources, health, backoff, score, latency, last seen, failures and key."""
        response, body = self.h.get("/status.json")
        self.assertEqual(response.code, 200)
        peers = json.loads(body)["peers"]
        self.assertEqual([p["url"] for p in peers], ["http://10.0.0.2:9999", "http://[fd00::3]:9999"])
        good, bad = peers
        self.assertEqual(good["sources"], ["static", "udp"])
        self.assertTrue(good["healthy"])
        self.assertEqual(good["backoff_seconds"], 0)
        self.assertEqual(good["latency"], 0.025)
        self.assertEqual(good["last_seen_ago"], 10.0)
        self.assertEqual(good["failures"], {})
        self.assertEqual(good["public_key"], self.KEY)
        self.assertAlmostEqual(good["score"], -0.025)
        self.assertEqual(bad["sources"], ["mdns"])
        self.assertFalse(bad["healthy"])
        # 1 consecutive failure + 2 strikes = 3 weighted failures: 4 s backoff from t=1007.
        self.assertEqual(bad["backoff_seconds"], 1.0)
        self.assertEqual(bad["failures"], {"timeout": 1, "untrusted": 1})
        self.assertIsNone(bad["latency"])
        self.assertIsNone(bad["public_key"])
        self.assertEqual(bad["last_seen_ago"], 10.0)

    def test_status_json_counters(self) -> None:
        """status.json shows narinfos served from peers, hits, misses, bytes proxied, verification failures and untrusted answers."""
        counters = json.loads(self.h.get("/status.json")[1])["peer_counters"]
        self.assertEqual(counters, {
            "narinfos_from_peers": 2,
            "peer_hits": 2,
            "misses": 5,
            "bytes_proxied": 123456,
            "verification_failures": 1,
            "untrusted_answers": 3,
        })

    def test_backoff_ends(self) -> None:
        """A backing-off peer shows healthy again once its backoff has passed."""
        self.clock.advance(1.5)
        peers = json.loads(self.h.get("/status.json")[1])["peers"]
        self.assertTrue(peers[1]["healthy"])
        self.assertEqual(peers[1]["backoff_seconds"], 0)

    def test_status_html_peers(self) -> None:
        """The HTML page has a peer table (state, latency, failures, key) and the counters."""
        response, body = self.h.get("/")
        self.assertEqual(response.code, 200)
        text = body.decode()
        for expected in (
            "http://10.0.0.2:9999", "static, udp", "healthy", "25.0 ms", self.KEY,
            "http://[fd00::3]:9999", "backing off (1.0 s left)", "timeout: 1, untrusted: 1",
            "NAR bytes proxied from peers</th><td>123456", "peer NARs failing verification</th><td>1",
            "narinfos served from peers</th><td>2", "(misses)</th><td>5",
        ):
            self.assertIn(expected, text)

    def test_peer_values_escaped(self) -> None:
        """An announced public key (network input) is HTML-escaped on the page."""
        self.registry.add("http://10.0.0.9:9999", "udp", public_key="<script>x</script>")
        body = self.h.get("/")[1]
        self.assertNotIn(b"<script>", body)
        self.assertIn(b"&lt;script&gt;", body)

    def test_counters_absent_are_zero(self) -> None:
        """Without the fan-out's collectors on the registry every counter reads 0."""
        h = Harness(self, registry=PeerRegistry(Clock()))
        document = json.loads(h.get("/status.json")[1])
        self.assertEqual(document["peers"], [])
        self.assertEqual(set(document["peer_counters"].values()), {0})
        self.assertIn(b"none known", h.get("/")[1])

    def test_no_peer_side(self) -> None:
        """Without a registry the peer table and counters are null, and the page says so."""
        h = Harness(self)
        document = json.loads(h.get("/status.json")[1])
        self.assertIsNone(document["peers"])
        self.assertIsNone(document["peer_counters"])
        self.assertIn(b"No peer side", h.get("/")[1])


class ClientIPTests(SynchronousTestCase):
    """client_ip normalises addresses for the proxy-client check."""

    class _Request:
        def __init__(self, address: object) -> None:
            self._address = address

        def getClientAddress(self) -> object:
            return self._address

    def test_forms(self) -> None:
        """IPv4, IPv6, IPv4-mapped IPv6 and non-IP addresses."""
        cases = [
            (IPv4Address("TCP", "127.0.0.1", 1), ipaddress.ip_address("127.0.0.1")),
            (IPv6Address("TCP", "::1", 1), ipaddress.ip_address("::1")),
            (IPv6Address("TCP", "::ffff:127.0.0.1", 1), ipaddress.ip_address("127.0.0.1")),
            (IPv6Address("TCP", "fe80::1%lo", 1), ipaddress.ip_address("fe80::1%lo")),
            (object(), None),
        ]
        for address, expected in cases:
            self.assertEqual(client_ip(self._Request(address)), expected)  # type: ignore[arg-type]


class MetricsTests(SynchronousTestCase):
    """Metrics owns its registry and accepts other components' collectors."""

    def test_own_registry(self) -> None:
        """Two Metrics coexist (never the global registry) and others can register on metrics.registry."""
        from prometheus_client import REGISTRY, Counter

        first, second = Metrics(), Metrics()
        self.assertIsNot(first.registry, second.registry)
        self.assertIsNot(first.registry, REGISTRY)
        Counter("peernix_other_total", "another component", registry=first.registry).inc()
        first.count_request("narinfo", 200, 10)
        first.count_store_lookup(False)
        first.count_narinfo("peer")
        registry = first.registry
        self.assertEqual(registry.get_sample_value("peernix_other_total"), 1)
        self.assertEqual(registry.get_sample_value("peernix_http_response_bytes_total", {"route": "narinfo"}), 10)
        self.assertEqual(registry.get_sample_value("peernix_store_lookups_total", {"result": "miss"}), 1)
        self.assertEqual(registry.get_sample_value("peernix_narinfo_served_total", {"source": "peer"}), 1)
        self.assertIsNone(second.registry.get_sample_value("peernix_other_total"))
        self.assertEqual(first.request_counts(), {("narinfo", 200): 1})
