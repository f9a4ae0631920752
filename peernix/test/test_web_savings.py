"""
Tests of issue 15's web side, socket-free: ``X-Peernix-Source`` on every
narinfo and NAR route, the access log's source field, the savings counted on
the byte path, ``--serve-peers no`` and ``--max-upload-rate``.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
from typing import Any

import zstandard
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo
from peernix.nix.signing import parse_secret_key
from peernix.service import access_log_line
from peernix.sources import LOCAL, Source, parse_source, peer_source
from peernix.test.fakes import FakeUpstream, fake_hash_part, nar_bytes
from peernix.test.test_web_app import OTHER_SIG, TEST_KEY, Harness, big_contents, header, nar_url
from peernix.web.ratelimit import UploadLimiter
from peernix.web.savings import Savings

#: Peers are everyone outside this network in these tests; loopback is a peer.
PEERS_ONLY = [ipaddress.ip_network("10.99.0.0/16")]
PEER = {"X-Peernix-Peer": "1"}


def source(response: Any) -> str | None:
    return header(response, "X-Peernix-Source")


class SourceTypeTests(SynchronousTestCase):
    """The header value type."""

    def test_render_and_parse(self) -> None:
        """local, peer URL and upstream URL [via URL] render as the header says and parse back."""
        cases = {
            "local": LOCAL,
            "peer http://10.0.0.2:9999": peer_source("http://10.0.0.2:9999"),
            "upstream https://cache.nixos.org": Source("upstream", "https://cache.nixos.org"),
            "upstream https://cache.nixos.org via http://10.0.0.3:9999": Source(
                "upstream", "https://cache.nixos.org", "http://10.0.0.3:9999"
            ),
        }
        for text, value in cases.items():
            self.assertEqual(value.header_value(), text.encode())
            self.assertEqual(parse_source(text), value)
        self.assertRaises(ValueError, parse_source, "somewhere")


class SourceHeaderTests(SynchronousTestCase):
    """Every narinfo and NAR answer says where it came from."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.peer_nar = b"peer nar bytes, pretend"
        self.peer_hash = fake_hash_part("peerpath")
        self.peer_info = NarInfo(
            store_path=f"/nix/store/{self.peer_hash}-peerpath",
            url="nar/x.nar",
            compression="none",
            nar_hash=Hash.sha256_of(self.peer_nar),
            nar_size=len(self.peer_nar),
            sigs=(OTHER_SIG,),
        )
        self.upstream.add(self.peer_info, self.peer_nar)
        self.savings = Savings(Clock())
        self.h = Harness(self, key=parse_secret_key(TEST_KEY), upstream=self.upstream, savings=self.savings)
        self.small = self.h.store.add_file("small", b"hello\n")
        self.big = self.h.store.add_tree("big", {"data": big_contents()})

    def test_local_narinfo(self) -> None:
        """A local narinfo says local: GET, HEAD, and the cached fast path alike."""
        url = f"/nix-cache/{self.small.hash_part}.narinfo"
        for _ in range(3):
            response, _ = self.h.get(url)
            self.assertEqual((response.code, source(response)), (200, "local"))
        response, _ = self.h.head(url)
        self.assertEqual((response.code, source(response)), (200, "local"))
        # After the cache entry expired: revalidated, still local.
        self.h.clock.advance(10)
        response, _ = self.h.get(url)
        self.assertEqual((response.code, source(response)), (200, "local"))

    def test_peer_narinfo(self) -> None:
        """A narinfo relayed from a peer names that peer's base URL, on GET and HEAD."""
        for method in (self.h.get, self.h.head):
            response, _ = method(f"/nix-cache/{self.peer_hash}.narinfo")
            self.assertEqual(response.code, 200)
            self.assertEqual(source(response), f"peer {FakeUpstream.PEER_URL}")

    def test_local_nar_every_url_form(self) -> None:
        """Every NAR URL form, HEAD, a Range and every encoding of a local NAR say local."""
        small, big = self.small, self.big
        urls = [
            nar_url(small),
            nar_url(small, prefix="/nix-cache/"),
            f"/nix-cache/nar/{small.nar_hash.nix32()}.nar?hash={small.hash_part}",
            nar_url(big, ".nar.zst"),
            nar_url(big),
        ]
        for url in urls:
            for method in (self.h.get, self.h.head):
                response, _ = method(url)
                self.assertEqual((response.code, source(response)), (200, "local"), url)
        # A local client gets identity whatever it accepts; a peer gets the
        # encoding it asks for: both are local answers.
        response, _ = self.h.get(nar_url(big), accept_encoding="zstd")
        self.assertEqual((header(response, "Content-Encoding"), source(response)), (None, "local"))
        for encoding in ("zstd", "gzip"):
            response, _ = self.h.get(nar_url(big), accept_encoding=encoding, X_Peernix_Peer="1")
            self.assertEqual(header(response, "Content-Encoding"), encoding)
            self.assertEqual(source(response), "local")
        response, body = self.h.get(nar_url(big), range="bytes=0-99")
        self.assertEqual((response.code, len(body), source(response)), (206, 100, "local"))

    def test_relayed_nar(self) -> None:
        """A relayed NAR names the peer that sent it (which may not be the narinfo's winner); HEAD too."""
        url = f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        response, _ = self.h.head(url)
        self.assertEqual((response.code, source(response)), (200, f"peer {FakeUpstream.PEER_URL}"))
        self.upstream.peer_url = "http://192.0.2.50:9999"
        response, body = self.h.get(url)
        self.assertEqual((response.code, body), (200, self.peer_nar))
        self.assertEqual(source(response), "peer http://192.0.2.50:9999")
        go_form = f"/nix-cache/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        self.assertEqual(source(self.h.get(go_form)[0]), "peer http://192.0.2.50:9999")

    def test_listing_and_log(self) -> None:
        """.ls listings and build logs (always this store's) say local too."""
        drv = f"{fake_hash_part('drv')}-x.drv"
        self.h.store.add_log(drv, b"log\n")
        for url in (f"/nix-cache/{self.small.hash_part}.ls", f"/nix-cache/log/{drv}"):
            for method in (self.h.get, self.h.head):
                response, _ = method(url)
                self.assertEqual((response.code, source(response)), (200, "local"), url)

    def test_misses_and_errors_have_no_source(self) -> None:
        """A 404 names no source."""
        response, _ = self.h.get(f"/nix-cache/{fake_hash_part('nothing')}.narinfo")
        self.assertEqual((response.code, source(response)), (404, None))
        response, _ = self.h.get(nar_url(self.big, ".nar").replace(self.big.nar_hash.nix32(), "0" * 52))
        self.assertIsNone(source(response))

    def test_access_log_line(self) -> None:
        """The access log line ends with the answer's source, '-' without one."""
        request = DummyRequest([b""])
        request.code = 200  # type: ignore[attr-defined]
        request.sentLength = 10  # type: ignore[attr-defined]
        request.responseHeaders.setRawHeaders(b"X-Peernix-Source", [b"peer http://10.0.0.2:9999"])
        line = access_log_line("[07/Dec/2026:12:00:00 +0000]", request)  # type: ignore[arg-type]
        self.assertTrue(line.endswith(' source="peer http://10.0.0.2:9999"'), line)
        plain = DummyRequest([b""])
        plain.code = 404  # type: ignore[attr-defined]
        plain.sentLength = 0  # type: ignore[attr-defined]
        self.assertTrue(access_log_line("[x]", plain).endswith(' source="-"'))  # type: ignore[arg-type]


class SavingsCountingTests(SynchronousTestCase):
    """Bytes from and to peers are counted where they are written."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.peer_nar = b"N" * 5000
        self.peer_hash = fake_hash_part("peerpath")
        self.peer_info = NarInfo(
            store_path=f"/nix/store/{self.peer_hash}-peerpath",
            url="nar/x.nar",
            compression="none",
            nar_hash=Hash.sha256_of(self.peer_nar),
            nar_size=len(self.peer_nar),
            sigs=(OTHER_SIG,),
        )
        self.upstream.add(self.peer_info, self.peer_nar)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.savings = Savings(self.clock)

    def harness(self, **kwargs: Any) -> Harness:
        return Harness(self, upstream=self.upstream, savings=self.savings, clock=self.clock, **kwargs)

    def test_relay_to_local_client_counts_from_peers(self) -> None:
        """Every NAR byte relayed to a local client counts as got from peers; HEAD counts nothing."""
        h = self.harness()
        url = f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar"
        h.head(url)
        self.assertEqual(self.savings.total["bytes_from_peers"], 0)
        h.get(url)
        h.get(url)
        self.assertEqual(self.savings.total["bytes_from_peers"], 2 * len(self.peer_nar))
        self.assertEqual(self.savings.total["bytes_to_peers"], 0)
        top = self.savings.snapshot().top
        self.assertEqual((top[0].path, top[0].requests), (f"{self.peer_hash}-peerpath", 2))

    def test_nar_to_peer_counts_nar_bytes_whatever_the_encoding(self) -> None:
        """A peer's NAR download counts its NAR bytes, raw, zstd or gzip, whole or streamed; local clients count nothing."""
        h = self.harness(proxy_clients=PEERS_ONLY)
        small = h.store.add_file("small", b"hello\n")
        big = h.store.add_tree("big", {"data": big_contents()})
        big_nar = nar_bytes(h.store.real_path(big.path))
        h.get(nar_url(small))
        self.assertEqual(self.savings.total["bytes_to_peers"], small.nar_size)
        expected = small.nar_size
        for encoding, decode in (("identity", bytes), ("zstd", None), ("gzip", gzip.decompress)):
            response, body = h.get(nar_url(big), accept_encoding=encoding)
            if encoding == "zstd":
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            elif decode is not None:
                body = decode(body)
            self.assertEqual(body, big_nar)
            expected += len(big_nar)
            self.assertEqual(self.savings.total["bytes_to_peers"], expected, encoding)
        h.get(nar_url(big, ".nar.zst"))
        expected += len(big_nar)
        h.get(nar_url(big), range="bytes=10-109")
        expected += 100
        self.assertEqual(self.savings.total["bytes_to_peers"], expected)
        h.head(nar_url(big))
        self.assertEqual(self.savings.total["bytes_to_peers"], expected)
        local = self.harness()
        local_big = local.store.add_tree("big", {"data": big_contents()})
        local.get(nar_url(local_big))
        self.assertEqual(self.savings.total["bytes_to_peers"], expected)

    def test_request_outcomes_of_local_clients(self) -> None:
        """Local clients' narinfo requests count as local, peer or miss; peers' requests do not count."""
        h = self.harness()
        small = h.store.add_file("small", b"hello\n")
        h.get(f"/nix-cache/{small.hash_part}.narinfo")
        h.get(f"/nix-cache/{small.hash_part}.narinfo")  # the cached fast path
        h.get(f"/nix-cache/{self.peer_hash}.narinfo")
        h.get(f"/nix-cache/{fake_hash_part('none')}.narinfo")
        h.get(f"/nix-cache/{small.hash_part}.narinfo", **{"X_Peernix_Peer": "1"})
        total = self.savings.total
        self.assertEqual((total["local"], total["peer"], total["miss"], total["upstream"]), (2, 1, 1, 0))

    def test_status_json_has_savings(self) -> None:
        """/status.json carries the savings figures and the giving settings."""
        h = self.harness(upload_limiter=UploadLimiter(20_000_000, self.clock), serve_peers=False)
        h.get(f"/nix-cache/nar/{self.peer_hash}-{self.peer_info.nar_hash.nix32()}.nar")
        document = json.loads(h.get("/status.json")[1])
        savings = document["savings"]
        self.assertEqual(savings["bytes_from_peers"], len(self.peer_nar))
        self.assertEqual(savings["bytes_to_peers"], 0)
        self.assertEqual(savings["since"], "2027-01-15T08:00:00Z")
        self.assertEqual(savings["today"]["bytes_from_peers"], len(self.peer_nar))
        self.assertEqual(len(savings["last_24h"]), 24)
        self.assertEqual(savings["last_24h"][-1]["bytes_from_peers"], len(self.peer_nar))
        self.assertEqual(document["giving"], {"serve_peers": False, "max_upload_rate": 20_000_000})
        page = h.get("/")[1].decode()
        self.assertIn('id="savings-chart"', page)
        self.assertIn("What the LAN saves this machine", page)
        self.assertIn("consume only", page)


class ServePeersTests(SynchronousTestCase):
    """--serve-peers no: peers get 404 for everything but nix-cache-info, which says so."""

    def test_consume_only(self) -> None:
        """narinfo, every NAR form, .ls and log answer 404 to peers; local clients are served."""
        h = Harness(self, serve_peers=False, proxy_clients=PEERS_ONLY)
        small = h.store.add_file("small", b"hello\n")
        drv = f"{fake_hash_part('drv')}-x.drv"
        h.store.add_log(drv, b"log\n")
        urls = [f"/nix-cache/{small.hash_part}.narinfo", nar_url(small), nar_url(small, prefix="/nix-cache/"),
                f"/nix-cache/{small.hash_part}.ls", f"/nix-cache/log/{drv}"]
        for url in urls:
            self.assertEqual(h.get(url)[0].code, 404, url)
            self.assertEqual(h.head(url)[0].code, 404, url)
        response, body = h.get("/nix-cache/nix-cache-info")
        self.assertEqual(response.code, 200)
        self.assertIn(b"StoreDir: /nix/store", body)
        self.assertEqual(header(response, "X-Peernix-Serve-Peers"), "no")
        local = Harness(self, serve_peers=False)
        small = local.store.add_file("small", b"hello\n")
        self.assertEqual(local.get(f"/nix-cache/{small.hash_part}.narinfo")[0].code, 200)
        self.assertEqual(local.get(nar_url(small))[0].code, 200)
        # A peer marked by the header is a peer, even from loopback.
        self.assertEqual(local.get(nar_url(small), **{"X_Peernix_Peer": "1"})[0].code, 404)

    def test_serving_says_yes(self) -> None:
        """By default nix-cache-info says the node serves peers."""
        h = Harness(self)
        self.assertEqual(header(h.get("/nix-cache/nix-cache-info")[0], "X-Peernix-Serve-Peers"), "yes")


class UploadLimitTests(SynchronousTestCase):
    """--max-upload-rate holds back answers to peers, never to local clients."""

    def test_peer_nar_takes_its_time(self) -> None:
        """A peer's streamed NAR at 100 kB/s takes its size / rate seconds, in 64 KiB turns."""
        clock = Clock()
        limiter = UploadLimiter(100_000, clock, burst=16_384)
        h = Harness(self, clock=clock, upload_limiter=limiter, proxy_clients=PEERS_ONLY)
        big = h.store.add_tree("big", {"data": big_contents() * 3})
        transport, _ = h.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % nar_url(big).encode(), peer="10.1.2.3")
        # The first 64 KiB chunk went out on the burst; the rest waits.
        self.assertLess(len(transport.value()), 100_000)
        seconds = 0.0
        while not transport.value().endswith(nar_bytes(h.store.real_path(big.path))):
            clock.advance(0.05)
            seconds += 0.05
            self.assertLess(seconds, 60)
        # Every chunk but the last waits until the previous ones are paid for.
        last = big.nar_size % (64 * 1024) or 64 * 1024
        expected = (big.nar_size - last - 16_384) / 100_000
        self.assertApproximates(seconds, expected, 0.11)
        # The last write's debt is paid before the stream ends; then no timer is left.
        clock.advance(1.0)
        self.assertEqual([c for c in clock.getDelayedCalls() if "__timedOut" not in repr(c)], [])

    def test_narinfo_waits_its_turn(self) -> None:
        """A peer's narinfo while the bucket is in debt waits; after the debt it goes out."""
        clock = Clock()
        limiter = UploadLimiter(1000, clock, burst=1000)
        h = Harness(self, clock=clock, upload_limiter=limiter, proxy_clients=PEERS_ONLY)
        small = h.store.add_file("small", b"hello\n")
        limiter.take(6000)  # 5 s of debt
        transport, _ = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % small.hash_part.encode(),
                             peer="10.1.2.3")
        self.assertEqual(transport.value(), b"")
        clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertIn(b"200 OK", transport.value())
        self.assertIn(b"StorePath: ", transport.value())
        # nix-cache-info (the health probe) and local clients never wait.
        limiter.take(5000)
        transport, _ = h.raw(b"GET /nix-cache/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n", peer="10.1.2.3")
        self.assertIn(b"200 OK", transport.value())
        local = Harness(self, clock=clock, upload_limiter=limiter)
        small = local.store.add_file("small", b"hello\n")
        transport, _ = local.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % nar_url(small).encode())
        self.assertIn(b"200 OK", transport.value())

    def test_client_leaving_while_waiting(self) -> None:
        """A peer that disconnects while its answer waits gives its turn away; nothing is written or logged."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        clock = Clock()
        limiter = UploadLimiter(1000, clock, burst=1000)
        h = Harness(self, clock=clock, upload_limiter=limiter, proxy_clients=PEERS_ONLY)
        small = h.store.add_file("small", b"hello\n")
        limiter.take(6000)
        transport, channel = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % small.hash_part.encode(),
                                   peer="10.1.2.3")
        self.assertEqual(limiter.waiting, 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(limiter.waiting, 0)
        sent = limiter.sent
        clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(limiter.sent, sent)
        import gc

        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
