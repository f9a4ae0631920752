"""
The seams between fetching for the LAN and the web side, socket-free: the
``X-Peernix-Source`` of answers another node fetched (``upstream URL via
FETCHER``), the savings' "upstream through the LAN" outcome and bytes, and
staged NARs served to peers on the normal routes and covered by the digest.

Several :class:`~peernix.upstream.fetch.LanFetcher` nodes and an upstream
share one in-memory LAN (:class:`peernix.test.test_upstream_fetch.Lan`); one
node also has a :class:`~peernix.web.app.WebApp` in front of it, behind a
:class:`~peernix.upstream.chain.FirstOf` of an empty fan-out and its fetcher,
as the daemon assembles them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.test.requesthelper import DummyRequest

from peernix.nix.narinfo import parse_narinfo
from peernix.service import access_log_line, connect_staging
from peernix.store.digest import DigestPublisher
from peernix.test.fakes import FakeUpstream
from peernix.test.test_store_digest import FakeScanner
from peernix.test.test_upstream_fetch import UPSTREAM, LanTestCase, Node
from peernix.test.test_web_app import Harness, header
from peernix.test.upstreamfakes import UpstreamPath
from peernix.upstream.chain import FirstOf
from peernix.upstream.fetch import StagedFirst
from peernix.web.savings import Savings

PEER = {b"X-Peernix-Peer": [b"1"]}


class WebLanTestCase(LanTestCase):
    def setUp(self) -> None:
        super().setUp()
        for name in ("a", "b", "c"):
            self.node(name)
        self.path = self.serve(size=400_000)
        self.first, self.second, self.third = (self.nodes[n] for n in self.order(self.path))

    def web(self, node: Node, *, digest: DigestPublisher | None = None, peers: FakeUpstream | None = None
            ) -> Harness:
        """A web app in front of ``node``, wired as the daemon wires it (``peers``: the fan-out)."""
        savings = Savings(self.clock)
        connect_staging(node.fetcher, digest, savings)
        self.peers = peers if peers is not None else FakeUpstream()
        chain = FirstOf([self.peers, node.fetcher], self.clock)  # type: ignore[list-item]
        h = Harness(self, clock=self.clock, savings=savings, lan_fetcher=node.fetcher,
                    upstream=StagedFirst(node.fetcher, chain))  # type: ignore[arg-type]
        self.savings = savings
        return h

    def call(self, h: Harness, method: bytes, path: str, headers: dict[bytes, list[bytes]] | None = None
             ) -> tuple[IResponse, bytes]:
        """A request to ``h``, the in-memory LAN flushed until it is answered."""
        out: list[Any] = []
        d: Deferred[Any] = h.agent.request(method, b"http://peernix" + path.encode(), Headers(headers or {}))
        d.addCallback(lambda response: readBody(response).addCallback(lambda body: (response, body)))
        d.addBoth(out.append)
        for _ in range(100):
            h.agent.flush()
            self.settle()
            if out:
                break
        self.assertTrue(out, "no response")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        result: tuple[IResponse, bytes] = out[0]
        return result

    def nar_path(self, path: UpstreamPath) -> str:
        return f"/nix-cache/nar/{path.hash_part}-{path.info.nar_hash.nix32()}.nar"


class SourceViaWebTests(WebLanTestCase):
    """``X-Peernix-Source: upstream URL via FETCHER`` on narinfo and NAR answers, HEAD too, and in the log."""

    def test_via_the_fetcher(self) -> None:
        """A node whose path another node fetches names both, on every route and method."""
        h = self.web(self.third)
        expected = f"upstream {UPSTREAM} via {self.first.url}"
        narinfo = f"/nix-cache/{self.path.hash_part}.narinfo"
        for method in (b"GET", b"HEAD"):
            response, _ = self.call(h, method, narinfo)
            self.assertEqual((response.code, header(response, "X-Peernix-Source")), (200, expected))
        response, _ = self.call(h, b"HEAD", self.nar_path(self.path))
        self.assertEqual((response.code, header(response, "X-Peernix-Source")), (200, expected))
        response, body = self.call(h, b"GET", self.nar_path(self.path))
        self.assertEqual((response.code, body), (200, self.path.nar))
        self.assertEqual(header(response, "X-Peernix-Source"), expected)
        # The access log's field is the header's value.
        request = DummyRequest([b""])
        request.code = 200  # type: ignore[attr-defined]
        request.sentLength = len(body)  # type: ignore[attr-defined]
        request.responseHeaders.setRawHeaders(b"X-Peernix-Source", [expected.encode()])
        self.assertTrue(access_log_line("[x]", request).endswith(f' source="{expected}"'))  # type: ignore[arg-type]

    def test_fetcher_itself_says_upstream(self) -> None:
        """The path's fetcher downloads it itself: plain ``upstream URL``."""
        h = self.web(self.first)
        for path in (f"/nix-cache/{self.path.hash_part}.narinfo", self.nar_path(self.path)):
            response, _ = self.call(h, b"GET", path)
            self.assertEqual((response.code, header(response, "X-Peernix-Source")), (200, f"upstream {UPSTREAM}"))

    def test_fallback_named(self) -> None:
        """The first fetcher unreachable: the NAR names the one that sent it."""
        h = self.web(self.third)
        self.lan.modes[f"{self.first.name}:9999"] = "down"
        response, body = self.call(h, b"GET", self.nar_path(self.path))
        self.assertEqual((response.code, body), (200, self.path.nar))
        self.assertEqual(header(response, "X-Peernix-Source"), f"upstream {UPSTREAM} via {self.second.url}")


class SavingsUpstreamTests(WebLanTestCase):
    """Local requests answered through the LAN fetch count as 'upstream via the LAN'."""

    def test_outcome_and_bytes(self) -> None:
        """The narinfo counts as upstream; the NAR bytes the fetcher sent as got from peers; status shows both."""
        h = self.web(self.third)
        self.call(h, b"GET", f"/nix-cache/{self.path.hash_part}.narinfo")
        self.call(h, b"GET", self.nar_path(self.path))
        total = self.savings.total
        self.assertEqual((total["local"], total["peer"], total["upstream"], total["miss"]), (0, 0, 1, 0))
        self.assertEqual(total["bytes_from_peers"], len(self.path.nar))
        document = json.loads(self.call(h, b"GET", "/status.json")[1])
        savings = document["savings"]
        self.assertEqual(savings["requests"]["upstream"], 1)
        self.assertEqual(savings["hit_ratio"]["upstream"], 1.0)
        self.assertEqual(savings["today"]["upstream"], 1)
        self.assertEqual(savings["bytes_from_peers"], len(self.path.nar))
        page = self.call(h, b"GET", "/")[1].decode()
        self.assertIn("upstream via the LAN</th><td>100.0 % (1)</td>", page.replace("&nbsp;", ""))

    def test_own_download_saves_no_bytes(self) -> None:
        """The fetcher's own upstream download is an 'upstream' outcome but saved no bytes."""
        h = self.web(self.first)
        self.call(h, b"GET", f"/nix-cache/{self.path.hash_part}.narinfo")
        self.call(h, b"GET", self.nar_path(self.path))
        self.assertEqual(self.savings.total["upstream"], 1)
        self.assertEqual(self.savings.total["bytes_from_peers"], 0)

    def test_staged_sent_to_peers_counts_as_given(self) -> None:
        """Staged NAR bytes a peer gets on the fetch route count as given to peers."""
        h = self.web(self.first)
        d, consumer = self.fetch(self.third, self.path)
        self.successResultOf(d)
        self.assertEqual(self.savings.total["bytes_to_peers"], len(self.path.nar))
        self.assertEqual(consumer.value(), self.path.nar)
        del h


class StagedForPeersTests(WebLanTestCase):
    """A verified staged NAR: peers get it on the normal routes and find it in the digest."""

    def stage(self, node: Node) -> None:
        d, consumer = self.fetch(node, self.path)
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.path.nar)

    def test_narinfo_and_nar_from_staging(self) -> None:
        """narinfo (upstream signatures untouched, our NAR URL), identity NAR, ranges, HEAD."""
        h = self.web(self.third)
        narinfo_url = f"/nix-cache/{self.path.hash_part}.narinfo"
        self.assertEqual(self.call(h, b"GET", narinfo_url, PEER)[0].code, 404)
        self.stage(self.third)
        requests_before = len(self.lan.requests)
        response, body = self.call(h, b"GET", narinfo_url, PEER)
        self.assertEqual(response.code, 200)
        info = parse_narinfo(body.decode())
        self.assertEqual(info.sigs, self.path.info.sigs)
        self.assertEqual(info.store_path, self.path.info.store_path)
        self.assertEqual(info.nar_hash, self.path.info.nar_hash)
        self.assertEqual(info.url, f"{self.path.hash_part}-{self.path.info.nar_hash.nix32()}.nar")
        self.assertEqual(info.compression, "none")
        self.assertEqual(header(response, "X-Peernix-Source"), f"upstream {UPSTREAM} via {self.first.url}")
        for url in (self.nar_path(self.path), f"/nix-cache/{info.url}"):
            response, body = self.call(h, b"GET", url, PEER)
            self.assertEqual((response.code, body), (200, self.path.nar))
            self.assertEqual(header(response, "Accept-Ranges"), "bytes")
            self.assertEqual(response.length, len(self.path.nar))
        response, body = self.call(h, b"GET", self.nar_path(self.path), {**PEER, b"Range": [b"bytes=1000-1999"]})
        self.assertEqual((response.code, body), (206, self.path.nar[1000:2000]))
        response, body = self.call(h, b"GET", self.nar_path(self.path), {**PEER, b"Range": [b"bytes=390000-"]})
        self.assertEqual((response.code, body), (206, self.path.nar[390000:]))
        response, body = self.call(h, b"HEAD", self.nar_path(self.path), PEER)
        self.assertEqual((response.code, body), (200, b""))
        # Nothing went to the upstream or another node for any of it.
        self.assertEqual(self.lan.requests[requests_before:], [])
        self.assertEqual(self.savings.total["bytes_to_peers"], 2 * len(self.path.nar) + 1000 + len(self.path.nar) - 390000)
        # Another NarHash, or the zstd form, is a 404.
        wrong = self.nar_path(self.path).replace(self.path.info.nar_hash.nix32(), "1" * 52)
        self.assertEqual(self.call(h, b"GET", wrong, PEER)[0].code, 404)

    def test_share_filter(self) -> None:
        """A staged NAR --share withholds is neither served on the normal routes nor in the digest."""
        private = self.node("d", shares=False)
        scanner = FakeScanner()
        digest = DigestPublisher(scanner, lambda info: True, self.clock)
        h = self.web(private, digest=digest)
        digest.update()
        self.stage(private)
        self.assertEqual(self.call(h, b"GET", f"/nix-cache/{self.path.hash_part}.narinfo", PEER)[0].code, 404)
        self.assertEqual(self.call(h, b"GET", self.nar_path(self.path), PEER)[0].code, 404)
        self.assertFalse(digest.contains(self.path.hash_part))
        self.assertEqual(private.fetcher.staged_hash_parts(), [])

    def test_digest_follows_staging(self) -> None:
        """Staged: in the digest at once (a delta); evicted: gone from the routes and, rebuilt, the digest."""
        scanner = FakeScanner()
        digest = DigestPublisher(scanner, lambda info: True, self.clock)
        h = self.web(self.third, digest=digest)
        digest.update()
        tag = digest.tag
        assert tag is not None
        self.assertFalse(digest.contains(self.path.hash_part))
        self.stage(self.third)
        self.assertTrue(digest.contains(self.path.hash_part))
        self.assertEqual(digest.delta_since(tag), [self.path.hash_part])
        self.assertEqual(self.third.fetcher.staged_hash_parts(), [self.path.hash_part])
        # A full build (e.g. after a store deletion) keeps it.
        digest.rebuild_soon(0)
        self.clock.advance(0)
        self.assertTrue(digest.contains(self.path.hash_part))
        # Evicted: the staging area is made too small for it.
        staging = self.third.fetcher.staging
        staging.max_size = 0
        staging._make_room(0)
        self.assertEqual(self.third.fetcher.staged_hash_parts(), [])
        self.assertEqual(self.call(h, b"GET", f"/nix-cache/{self.path.hash_part}.narinfo", PEER)[0].code, 404)
        self.clock.advance(2.0)
        self.assertFalse(digest.contains(self.path.hash_part))

    def test_idle_sweep_updates_digest(self) -> None:
        """A staged NAR dropped as idle leaves the digest too."""
        scanner = FakeScanner()
        digest = DigestPublisher(scanner, lambda info: True, self.clock)
        self.web(self.first, digest=digest)
        digest.update()
        self.stage(self.first)
        self.assertTrue(digest.contains(self.path.hash_part))
        self.clock.advance(self.first.fetcher.staging.idle + 1)
        self.assertEqual(self.first.fetcher.staging.sweep(), 1)
        self.clock.advance(2.0)
        self.assertFalse(digest.contains(self.path.hash_part))

    def test_local_clients_unchanged(self) -> None:
        """A local client's miss of a staged path still goes through the fetch chain (and is served)."""
        h = self.web(self.third)
        self.stage(self.third)
        response, body = self.call(h, b"GET", self.nar_path(self.path))
        self.assertEqual((response.code, body), (200, self.path.nar))


class StagedFirstTests(WebLanTestCase):
    """What this node holds staged is served to its clients from here, never fetched again over the LAN."""

    def test_staged_here_beats_a_peer(self) -> None:
        """A peer whose digest names the path (it has it staged too) is not asked; the bytes come from here."""
        peers = FakeUpstream()
        peers.add(self.path.info, self.path.nar)  # a peer offering the same path
        h = self.web(self.third, peers=peers)
        self.stage(self.third)
        requests = len(self.lan.requests)
        self.clock.advance(60)  # past the chain's memory of recent answers
        for url in (f"/nix-cache/{self.path.hash_part}.narinfo", self.nar_path(self.path)):
            response, body = self.call(h, b"GET", url)
            self.assertEqual(response.code, 200)
            self.assertEqual(header(response, "X-Peernix-Source"), f"upstream {UPSTREAM} via {self.first.url}")
        self.assertEqual(body, self.path.nar)
        self.assertEqual((peers.lookups, peers.relays), ([], []))
        self.assertEqual(self.lan.requests[requests:], [])

    def test_not_held_goes_down_the_chain(self) -> None:
        """A path not staged here: the peers are asked first, as before."""
        peers = FakeUpstream()
        peers.add(self.path.info, self.path.nar)
        h = self.web(self.third, peers=peers)
        response, body = self.call(h, b"GET", self.nar_path(self.path))
        self.assertEqual((response.code, body), (200, self.path.nar))
        self.assertEqual(header(response, "X-Peernix-Source"), f"peer {FakeUpstream.PEER_URL}")
        self.assertEqual(len(peers.relays), 1)

    def stage(self, node: Node) -> None:
        d, consumer = self.fetch(node, self.path)
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.path.nar)
