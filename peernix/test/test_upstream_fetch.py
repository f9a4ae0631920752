"""
Tests of :mod:`peernix.upstream.fetch` (and the fetch route of
:mod:`peernix.web.fetch`): several nodes and an upstream in one in-memory
LAN, a ``Clock`` for every timer.
"""

from __future__ import annotations

import json
import os
from typing import cast

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from peernix.interfaces import IUpstream
from peernix.nix.narinfo import NarInfo
from peernix.peers.errors import NarUnavailable, NarVerificationFailed
from peernix.peers.trust import TrustPolicy
from peernix.test.peerfakes import FakeRegistry
from peernix.test.test_upstream_staging import ChunkConsumer
from peernix.test.upstreamfakes import UPSTREAM_KEY, FakeUpstreamCache, UpstreamPath, make_upstream_path
from peernix.upstream.client import UpstreamClient
from peernix.upstream.fetch import LanFetcher, make_share_filter, peer_fetch_url
from peernix.upstream.metrics import UpstreamMetrics
from peernix.upstream.rendezvous import SELF, FetcherTable
from peernix.upstream.staging import Staging
from peernix.web.fetch import FetchResource
from zope.interface.verify import verifyObject

UPSTREAM = "http://upstream.test/cache"


class Lan(Resource):
    """The upstream and every node's fetch route, told apart by ``Host``."""

    isLeaf = True

    def __init__(self, cache: FakeUpstreamCache) -> None:
        super().__init__()
        self.cache = cache
        self.nodes: dict[str, Resource] = {}
        #: host -> "down" (connection dropped), "hold" (never answers),
        #: "partial" (sends ``partial_bytes`` of a NAR, then dies).
        self.modes: dict[str, str] = {}
        self.partial_bytes = 1000
        self.pending: list[Request] = []
        self.requests: list[tuple[str, str, str]] = []

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader("host") or "").lower()
        self.requests.append((host, request.path.decode(), request.getHeader("range") or ""))
        mode = self.modes.get(host)
        transport = cast(ITCPTransport, request.channel.transport)  # type: ignore[union-attr]
        if mode == "down":
            transport.abortConnection()
            return NOT_DONE_YET
        if mode == "hold":
            self.pending.append(request)
            return NOT_DONE_YET
        target = self.target(host)
        if mode == "partial":
            # Serve normally into a buffer, then send only the first bytes.
            original_write = request.write
            sent = [0]

            def write(data: bytes) -> None:
                room = self.partial_bytes - sent[0]
                if room > 0:
                    original_write(data[:room])
                    sent[0] += min(room, len(data))
                if sent[0] >= self.partial_bytes:
                    transport.abortConnection()

            request.write = write  # type: ignore[method-assign]
        result: bytes | int = target.render(request)
        return result

    def target(self, host: str) -> Resource:
        return self.cache if host == "upstream.test" else self.nodes[host]

    def release(self) -> None:
        """Answer the held requests now."""
        held, self.pending = self.pending, []
        for request in held:
            host = (request.getHeader("host") or "").lower()
            body = self.target(host).render(request)
            if isinstance(body, bytes):
                request.write(body)  # type: ignore[no-untyped-call]
                request.finish()  # type: ignore[no-untyped-call]


@attrs.define
class Node:
    name: str
    url: str
    fetcher: LanFetcher
    registry: FakeRegistry
    metrics: UpstreamMetrics


class LanTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = FakeUpstreamCache("/cache")
        self.lan = Lan(self.cache)
        self.agent = RequestTraversalAgent(self.lan)
        self.nodes: dict[str, Node] = {}

    def node(self, name: str, *, fetch_for_lan: bool = True, shares: bool = True) -> Node:
        url = f"http://{name}:9999"
        staging = Staging(self.mktemp(), 100_000_000, self.clock)
        staging.start()
        self.addCleanup(staging.close)
        metrics = UpstreamMetrics()
        registry = FakeRegistry()
        fetcher = LanFetcher(
            upstreams=[UPSTREAM],
            client=UpstreamClient(self.agent, self.clock, TrustPolicy([UPSTREAM_KEY.public_key])),
            staging=staging,
            table=FetcherTable(name, fetch_for_lan),
            registry=registry,
            clock=self.clock,
            metrics=metrics,
            shares=(lambda info: True) if shares else (lambda info: False),
        )
        node = Node(name, url, fetcher, registry, metrics)
        self.lan.nodes[f"{name}:9999"] = FetchResource(fetcher)
        for other in self.nodes.values():
            other.registry.add(url, "udp")
            other.fetcher.table.note(url, name, fetch_for_lan)
            registry.add(other.url, "udp")
            fetcher.table.note(other.url, other.name, other.fetcher.table.fetch_for_lan)
        self.nodes[name] = node
        return node

    def settle(self) -> None:
        for _ in range(30):
            self.agent.flush()

    def serve(self, name: str = "hello", size: int = 300_000, **kwargs: object) -> UpstreamPath:
        path = make_upstream_path(name, os.urandom(size // 2) + bytes(size // 2), **kwargs)  # type: ignore[arg-type]
        self.cache.add(path)
        return path

    def fetch(self, node: Node, path: UpstreamPath) -> tuple[Deferred[None], ChunkConsumer]:
        """Look the path up on ``node`` and stream its NAR to a local consumer."""
        d_info = node.fetcher.lookup(path.hash_part)
        self.settle()
        info = self.successResultOf(d_info)
        assert info is not None
        consumer = ChunkConsumer()
        d = node.fetcher.relay_nar(info, consumer)
        self.settle()
        return d, consumer

    def order(self, path: UpstreamPath) -> list[str]:
        """:returns: node names in fetcher order for ``path``."""
        any_node = next(iter(self.nodes.values()))
        names = {n.url: n.name for n in self.nodes.values()}
        return [any_node.name if u == SELF else names[u]
                for u in any_node.fetcher.table.order(path.hash_part, [n.url for n in self.nodes.values()
                                                                        if n is not any_node])]


class LookupTests(LanTestCase):
    def test_interface(self) -> None:
        """LanFetcher is an IUpstream."""
        verifyObject(IUpstream, self.node("a").fetcher)

    def test_trusted_narinfo(self) -> None:
        """A lookup gives the upstream's trusted narinfo, untouched."""
        a = self.node("a")
        path = self.serve()
        d = a.fetcher.lookup(path.hash_part)
        self.settle()
        self.assertEqual(self.successResultOf(d), path.info)

    def test_once_per_path_within_ttl(self) -> None:
        """Concurrent lookups coalesce, and within the TTL a path's narinfo is asked once per node."""
        a = self.node("a")
        path = self.serve()
        ds = [a.fetcher.lookup(path.hash_part) for _ in range(5)]
        self.settle()
        for d in ds:
            self.assertEqual(self.successResultOf(d), path.info)
        d = a.fetcher.lookup(path.hash_part)
        self.assertEqual(self.successResultOf(d), path.info)
        self.assertEqual(self.cache.count(".narinfo"), 1)
        self.clock.advance(301)
        d = a.fetcher.lookup(path.hash_part)
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.cache.count(".narinfo"), 2)

    def test_miss_remembered(self) -> None:
        """A miss is remembered for the negative TTL."""
        a = self.node("a")
        path = make_upstream_path("absent", b"x")
        for _ in range(3):
            d = a.fetcher.lookup(path.hash_part)
            self.settle()
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.cache.count(".narinfo"), 1)

    def test_upstream_down_is_a_fast_miss(self) -> None:
        """An upstream that never answers is a miss at the lookup deadline (< 5 s), never an error."""
        a = self.node("a")
        self.lan.modes["upstream.test"] = "hold"
        path = make_upstream_path("slow", b"x")
        d = a.fetcher.lookup(path.hash_part)
        self.settle()
        self.clock.advance(a.fetcher.lookup_timeout - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d))
        self.assertLess(a.fetcher.lookup_timeout, 5)

    def test_upstream_reaching_a_peer_skipped(self) -> None:
        """An upstream that is a known peer's cache is not asked (filtered at use time)."""
        a = self.node("a")
        a.fetcher.upstreams = ("http://b:9999/nix-cache",)
        a.registry.add("http://b:9999", "udp")
        d = a.fetcher.lookup(make_upstream_path("p", b"x").hash_part)
        self.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.lan.requests, [])


class FetchTests(LanTestCase):
    def test_single_node_one_download_for_all(self) -> None:
        """Concurrent local clients of one node cost one upstream download and all get the NAR."""
        a = self.node("a")
        path = self.serve()
        d_info = a.fetcher.lookup(path.hash_part)
        self.settle()
        info = self.successResultOf(d_info)
        assert info is not None
        self.lan.modes["upstream.test"] = "hold"
        results = []
        for _ in range(3):
            consumer = ChunkConsumer()
            results.append((a.fetcher.relay_nar(info, consumer), consumer))
        self.settle()
        del self.lan.modes["upstream.test"]
        self.lan.release()
        self.settle()
        for d, consumer in results:
            self.successResultOf(d)
            self.assertEqual(consumer.value(), path.nar)
        self.assertEqual(self.cache.count(".nar.xz"), 1)
        self.assertEqual(a.metrics.registry.get_sample_value(
            "peernix_upstream_download_requests_total", {"source": "upstream"}), 3)
        self.assertEqual(a.metrics.registry.get_sample_value(
            "peernix_upstream_downloads_total", {"source": "upstream", "result": "ok"}), 1)
        self.assertEqual(a.metrics.registry.get_sample_value(
            "peernix_upstream_served_bytes_total", {"to": "local"}), 3 * len(path.nar))

    def test_lan_downloads_once(self) -> None:
        """Every node of the LAN asking at once: one upstream download, through the fetcher."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        results = [self.fetch(node, path) for node in self.nodes.values()]
        self.settle()
        for d, consumer in results:
            self.successResultOf(d)
            self.assertEqual(consumer.value(), path.nar)
        self.assertEqual(self.cache.count(".nar.xz"), 1)
        fetcher = self.nodes[self.order(path)[0]]
        self.assertGreater(fetcher.metrics.registry.get_sample_value("peernix_upstream_fetched_bytes_total") or 0, 0)
        for node in self.nodes.values():
            if node is not fetcher:
                self.assertEqual(node.metrics.registry.get_sample_value("peernix_upstream_fetched_bytes_total"), 0)
        self.assertEqual(fetcher.metrics.registry.get_sample_value(
            "peernix_upstream_served_bytes_total", {"to": "peer"}), 2 * len(path.nar))

    def test_savings_count_what_fetchers_sent(self) -> None:
        """Bytes a node received from a fetcher are reported (savings); the fetcher's own download is not."""
        for name in ("a", "b"):
            self.node(name)
        received: dict[str, list[int]] = {"a": [], "b": []}
        for name, node in self.nodes.items():
            node.fetcher.on_peer_bytes = received[name].append
        path = self.serve()
        for node in self.nodes.values():
            d, _ = self.fetch(node, path)
            self.successResultOf(d)
        first, second = self.order(path)
        self.assertEqual(received[first], [])
        self.assertEqual(sum(received[second]), len(path.nar))

    def test_dead_fetcher_next_in_order(self) -> None:
        """An unreachable fetcher is skipped for the next in rendezvous order; one fallback counted."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        self.lan.modes[f"{first}:9999"] = "down"
        d, consumer = self.fetch(self.nodes[third], path)
        self.successResultOf(d)
        self.assertEqual(consumer.value(), path.nar)
        self.assertEqual(self.cache.count(".nar.xz"), 1)
        asker = self.nodes[third].metrics
        self.assertEqual(asker.registry.get_sample_value("peernix_upstream_fetcher_fallbacks_total"), 1)
        self.assertGreater(self.nodes[second].metrics.registry.get_sample_value(
            "peernix_upstream_fetched_bytes_total") or 0, 0)

    def test_silent_fetcher_replaced_after_10s(self) -> None:
        """A fetcher that sends nothing for 10 s is replaced by the next."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        self.lan.modes[f"{first}:9999"] = "hold"
        d, consumer = self.fetch(self.nodes[third], path)
        self.assertNoResult(d)
        self.clock.advance(9)
        self.settle()
        self.assertNoResult(d)
        self.clock.advance(1.5)
        self.settle()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), path.nar)

    def test_fetcher_dies_mid_nar(self) -> None:
        """A fetcher dying mid-NAR: the next one resumes with Range at the byte reached; the client sees one NAR."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        self.lan.modes[f"{first}:9999"] = "partial"
        self.lan.partial_bytes = 100_000
        d, consumer = self.fetch(self.nodes[third], path)
        self.successResultOf(d)
        self.assertEqual(consumer.value(), path.nar)
        ranges = [r for host, _, r in self.lan.requests if host == f"{second}:9999"]
        self.assertEqual(ranges, ["bytes=100000-"])
        # The dead fetcher's download and the second's: at most two from the upstream.
        self.assertLessEqual(self.cache.count(".nar.xz"), 2)

    def test_no_fetcher_left_fetches_itself(self) -> None:
        """With every other fetcher dead, a node that does not fetch for the LAN fetches for itself."""
        self.node("a")
        self.node("b")
        laptop = self.node("laptop", fetch_for_lan=False)
        self.lan.modes["a:9999"] = self.lan.modes["b:9999"] = "down"
        path = self.serve()
        d, consumer = self.fetch(laptop, path)
        self.successResultOf(d)
        self.assertEqual(consumer.value(), path.nar)
        self.assertEqual(laptop.metrics.registry.get_sample_value("peernix_upstream_fetcher_fallbacks_total"), 2)

    def test_laptop_never_chosen(self) -> None:
        """A node with --fetch-for-lan no is never a fetcher, and does not download for others."""
        self.node("a")
        laptop = self.node("laptop", fetch_for_lan=False)
        for n in range(30):
            path = make_upstream_path(f"p{n}", b"x")
            self.assertEqual(self.nodes["a"].fetcher.table.order(path.hash_part, [laptop.url]), [SELF])
        path = self.serve()
        consumer = ChunkConsumer()
        d_info = laptop.fetcher.record(path.hash_part)
        self.settle()
        self.successResultOf(d_info)
        d = laptop.fetcher.serve_peer(path.hash_part, path.info.nar_hash, consumer)
        self.failureResultOf(d, NarUnavailable)

    def test_lying_upstream_never_finished(self) -> None:
        """A wrong NarHash: the client's stream is failed (never finished), nothing staged, counted."""
        a = self.node("a")
        path = self.serve(lie=True)
        d, consumer = self.fetch(a, path)
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(NarVerificationFailed, NarUnavailable))
        self.assertLess(len(consumer.value()), len(path.nar))
        self.assertEqual(a.fetcher.staging.usage, 0)
        self.assertEqual([n for n in os.listdir(a.fetcher.staging.directory) if n != ".lock"], [])
        self.assertEqual(a.metrics.registry.get_sample_value("peernix_upstream_verification_failures_total"), 1)

    def test_lying_upstream_through_fetcher(self) -> None:
        """A lying upstream's NAR reaches no node's client whole, through the fetcher either."""
        for name in ("a", "b"):
            self.node(name)
        path = self.serve(lie=True)
        for node in self.nodes.values():
            d, consumer = self.fetch(node, path)
            self.failureResultOf(d)
            self.assertLess(len(consumer.value()), len(path.nar))

    def test_lying_fetcher_penalised(self) -> None:
        """A fetcher whose NAR fails verification is recorded as misbehaving (skipped for a while)."""
        for name in ("a", "b"):
            self.node(name)
        path = self.serve()
        first, second = self.order(path)
        liar = self.nodes[first]

        def lie(hash_part: str, nar_hash: object, consumer: object, offset: int = 0) -> Deferred[None]:
            consumer.write(b"\0" * len(path.nar))  # type: ignore[attr-defined]
            return Deferred.fromCoroutine(_done())

        async def _done() -> None:
            return None

        liar.fetcher.serve_peer = lie  # type: ignore[method-assign, assignment]
        d, consumer = self.fetch(self.nodes[second], path)
        self.failureResultOf(d)
        self.assertNotEqual(consumer.value(), path.nar)
        self.assertEqual(self.nodes[second].registry.failure_kinds(liar.url), ["verification"])

    def test_bad_file_hash(self) -> None:
        """A compressed file that does not match FileHash is never finished."""
        a = self.node("a")
        path = self.serve()
        self.cache.files[path.info.url] = path.file[:-1] + bytes([path.file[-1] ^ 1])
        d, consumer = self.fetch(a, path)
        self.failureResultOf(d)
        self.assertEqual(a.metrics.registry.get_sample_value("peernix_upstream_verification_failures_total"), 1)

    def test_upstream_nar_missing_is_unavailable(self) -> None:
        """An upstream that lost the NAR: the client gets a miss (nothing written)."""
        a = self.node("a")
        path = self.serve()
        del self.cache.files[path.info.url]
        d, consumer = self.fetch(a, path)
        self.failureResultOf(d, NarUnavailable)
        self.assertEqual(consumer.value(), b"")

    def test_disk_failure_is_not_a_lie(self) -> None:
        """A staging disk failing fails the readers as unavailable: not a verification failure, nor the fetcher's fault."""
        for name in ("a", "b"):
            self.node(name)
        path = self.serve()
        first, second = self.order(path)
        node = self.nodes[second]
        staging = node.fetcher.staging
        original = staging.begin

        def begin(*args: object) -> object:
            download = original(*args)  # type: ignore[arg-type]

            def broken(data: bytes) -> None:
                download.fail(OSError(28, "No space left on device"))
                raise OSError(28, "No space left on device")

            download.append = broken  # type: ignore[method-assign]
            return download

        staging.begin = begin  # type: ignore[method-assign, assignment]
        d, consumer = self.fetch(node, path)
        self.failureResultOf(d, NarUnavailable)
        self.assertEqual(node.metrics.registry.get_sample_value("peernix_upstream_verification_failures_total"), 0)
        self.assertEqual(node.metrics.registry.get_sample_value("peernix_upstream_fetcher_fallbacks_total"), 0)
        self.assertEqual(node.metrics.registry.get_sample_value(
            "peernix_upstream_downloads_total", {"source": "peer", "result": "failed"}), 1)

    def test_status(self) -> None:
        """The status lists active fetches with their progress, staging usage and counters."""
        a = self.node("a")
        path = self.serve()
        self.lan.modes["upstream.test"] = "hold"
        # The narinfo first (held requests never answer), then the NAR held.
        self.lan.modes.pop("upstream.test")
        d_info = a.fetcher.lookup(path.hash_part)
        self.settle()
        info = self.successResultOf(d_info)
        assert info is not None
        self.lan.modes["upstream.test"] = "hold"
        d = a.fetcher.relay_nar(info, ChunkConsumer())
        self.settle()
        status = a.fetcher.status()
        self.assertEqual(status["upstreams"], [UPSTREAM])
        active = status["active_fetches"]
        assert isinstance(active, list)
        self.assertEqual([f["store_path"] for f in active], [path.info.store_path])
        self.assertEqual(status["staging"]["bytes"], path.info.nar_size)  # type: ignore[index]
        self.clock.advance(11)
        self.settle()
        self.failureResultOf(d, NarUnavailable)
        self.assertEqual(a.fetcher.status()["active_fetches"], [])


class FetchRouteTests(LanTestCase):
    def _get(self, url: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
        from treq.client import HTTPClient
        from twisted.web.http_headers import Headers
        client = HTTPClient(self.agent)
        d = client.get(url, headers=Headers({b"X-Peernix-Peer": [b"1"]} if headers is None else headers))
        self.settle()
        response = self.successResultOf(d)
        body_d = response.content()
        self.settle()
        body = self.successResultOf(body_d)
        return response.code, body, dict(response.headers.getAllRawHeaders())

    def test_node(self) -> None:
        """/peernix/fetch/node says who the node is and whether it fetches for the LAN."""
        self.node("a")
        code, body, _ = self._get("http://a:9999/peernix/fetch/node")
        self.assertEqual((code, json.loads(body)), (200, {"node_id": "a", "fetch_for_lan": True}))
        code, _, _ = self._get("http://a:9999/peernix/fetch/node", {})
        self.assertEqual(code, 403)

    def test_only_for_peers(self) -> None:
        """Without X-Peernix-Peer the route answers 403."""
        self.node("a")
        path = self.serve()
        code, _, _ = self._get(peer_fetch_url("http://a:9999", path.hash_part, path.info.nar_hash), {})
        self.assertEqual(code, 403)

    def test_only_upstream_paths(self) -> None:
        """A path the upstream does not have (a node's own build, say) is 404: never fetched or staged."""
        a = self.node("a")
        path = make_upstream_path("private", b"mine")
        code, _, _ = self._get(peer_fetch_url("http://a:9999", path.hash_part, path.info.nar_hash))
        self.assertEqual(code, 404)
        self.assertEqual(a.fetcher.staging.usage, 0)

    def test_wrong_nar_hash(self) -> None:
        """Another NarHash than the upstream's is 404."""
        self.node("a")
        path = self.serve()
        other = make_upstream_path("other", b"x")
        code, _, _ = self._get(peer_fetch_url("http://a:9999", path.hash_part, other.info.nar_hash))
        self.assertEqual(code, 404)

    def test_share_filter(self) -> None:
        """A staged path --share withholds from peers answers 404 on the route."""
        self.node("a", shares=False)
        path = self.serve()
        code, _, _ = self._get(peer_fetch_url("http://a:9999", path.hash_part, path.info.nar_hash))
        self.assertEqual(code, 404)

    def test_malformed(self) -> None:
        """A malformed name is 400."""
        self.node("a")
        code, _, _ = self._get("http://a:9999/peernix/fetch/nonsense.nar")
        self.assertEqual(code, 400)

    def test_whole_and_range(self) -> None:
        """The route serves the identity NAR, and from an offset with 206 and Content-Range."""
        self.node("a")
        path = self.serve()
        url = peer_fetch_url("http://a:9999", path.hash_part, path.info.nar_hash)
        code, body, headers = self._get(url)
        self.assertEqual((code, body), (200, path.nar))
        code, body, headers = self._get(url, {b"X-Peernix-Peer": [b"1"], b"Range": [b"bytes=1000-"]})
        self.assertEqual((code, body), (206, path.nar[1000:]))
        self.assertEqual(headers[b"Content-Range"], [b"bytes 1000-%d/%d" % (len(path.nar) - 1, len(path.nar))])
        self.assertEqual(self.cache.count(".nar.xz"), 1)


class SilentPeerTests(LanTestCase):
    def test_static_peers_asked(self) -> None:
        """Peers that announce nothing (static ones) are asked who they are, and become fetchers if they say so."""
        a = self.node("a")
        b = self.node("b")
        laptop = self.node("laptop", fetch_for_lan=False)
        # Forget what "announcements" told a: it knows b and the laptop as static peers only.
        a.fetcher.table = FetcherTable("a", True)
        d = a.fetcher.ask_silent_peers()
        self.settle()
        self.successResultOf(d)
        self.assertTrue(a.fetcher.table.offers(b.url))
        self.assertTrue(a.fetcher.table.known(laptop.url))
        self.assertFalse(a.fetcher.table.offers(laptop.url))
        self.assertEqual([r for r in self.lan.requests if r[1].endswith("/node")],
                         [("b:9999", "/peernix/fetch/node", ""), ("laptop:9999", "/peernix/fetch/node", "")])

    def test_go_peer_asked_once_a_minute(self) -> None:
        """A peer that does not answer (a Go node: 404) stays out and is asked again only after a minute."""
        a = self.node("a")
        a.registry.add("http://go:9999", "static")
        self.lan.nodes["go:9999"] = Resource()
        for _ in range(3):
            d = a.fetcher.ask_silent_peers()
            self.settle()
            self.successResultOf(d)
        self.assertFalse(a.fetcher.table.known("http://go:9999"))
        self.assertEqual(len([r for r in self.lan.requests if r[0] == "go:9999"]), 1)
        self.clock.advance(61)
        self.successResultOf(a.fetcher.ask_silent_peers())
        self.settle()
        self.assertEqual(len([r for r in self.lan.requests if r[0] == "go:9999"]), 2)


class ShareFilterTests(SynchronousTestCase):
    def test_trusted_mode(self) -> None:
        """Under --share trusted a staged NAR needs a signature by a trusted (or our own) key."""
        path = make_upstream_path("s", b"x")
        self.assertTrue(make_share_filter("trusted", [UPSTREAM_KEY.public_key])(path.info))
        self.assertFalse(make_share_filter("trusted", [])(path.info))
        unsigned = attrs.evolve(path.info, sigs=())
        self.assertFalse(make_share_filter("trusted", [UPSTREAM_KEY.public_key])(unsigned))
        self.assertTrue(make_share_filter("all", [])(unsigned))


class FirstOfTests(SynchronousTestCase):
    def setUp(self) -> None:
        from peernix.test.fakes import FakeUpstream
        from peernix.upstream.chain import FirstOf

        self.clock = Clock()
        self.peers = FakeUpstream()
        self.lan = FakeUpstream()
        self.chain = FirstOf([self.peers, self.lan], self.clock, budget=4.5, min_share=1.0)
        self.path = make_upstream_path("c", b"x")

    def test_interface(self) -> None:
        """FirstOf is an IUpstream."""
        verifyObject(IUpstream, self.chain)

    def test_first_answer_wins(self) -> None:
        """A peer's answer wins and the LAN fetcher is not asked."""
        self.peers.add(self.path.info, self.path.nar)
        self.lan.add(self.path.info, self.path.nar)
        self.assertEqual(self.successResultOf(self.chain.lookup(self.path.hash_part)), self.path.info)
        self.assertEqual(self.lan.lookups, [])
        consumer = ChunkConsumer()
        self.successResultOf(self.chain.relay_nar(self.path.info, consumer))
        self.assertEqual(len(self.peers.relays), 1)
        self.assertEqual(self.lan.relays, [])

    def test_miss_goes_on(self) -> None:
        """A peers' miss goes to the LAN fetcher, whose NAR is then relayed."""
        self.lan.add(self.path.info, self.path.nar)
        self.assertEqual(self.successResultOf(self.chain.lookup(self.path.hash_part)), self.path.info)
        consumer = ChunkConsumer()
        self.successResultOf(self.chain.relay_nar(self.path.info, consumer))
        self.assertEqual(consumer.value(), self.path.nar)
        self.assertEqual(self.peers.relays, [])

    def test_nobody(self) -> None:
        """No link has it: None, and a NAR is unavailable."""
        self.assertIsNone(self.successResultOf(self.chain.lookup(self.path.hash_part)))
        self.failureResultOf(self.chain.relay_nar(self.path.info, ChunkConsumer()), NarUnavailable)

    def test_budget(self) -> None:
        """A later link gets what is left of the budget (at least min_share): a slow upstream is a miss in time."""
        self.lan.hold_lookups = True
        d = self.chain.lookup(self.path.hash_part)
        self.clock.advance(4.4)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.lan.cancelled, 1)

    def test_recent_answer_reused(self) -> None:
        """The NAR request after a narinfo walks no link again; after recent_ttl the links are asked anew."""
        self.lan.add(self.path.info, self.path.nar)
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.chain.lookup(self.path.hash_part)), self.path.info)
        self.assertEqual((self.peers.lookups, self.lan.lookups), ([self.path.hash_part], [self.path.hash_part]))
        self.clock.advance(30.1)
        self.successResultOf(self.chain.lookup(self.path.hash_part))
        self.assertEqual(len(self.peers.lookups), 2)
        # Misses are not remembered here (the links have their own negative caches).
        other = make_upstream_path("other", b"y")
        for _ in range(2):
            self.assertIsNone(self.successResultOf(self.chain.lookup(other.hash_part)))
        self.assertEqual(self.peers.lookups.count(other.hash_part), 2)

    def test_cancel(self) -> None:
        """Cancelling a lookup cancels the link being asked."""
        self.peers.hold_lookups = True
        d = self.chain.lookup(self.path.hash_part)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.peers.cancelled, 1)


class SourceViaTests(LanTestCase):
    """``X-Peernix-Source: upstream URL via FETCHER`` where another node fetches the path."""

    def named(self, node: Node, path: UpstreamPath, fetcher_down: str | None = None) -> tuple[list[object], bytes]:
        """Relay ``path``'s NAR on ``node``; :returns: what ``on_peer`` was told, and the bytes."""
        d_info = node.fetcher.lookup(path.hash_part)
        self.settle()
        info = self.successResultOf(d_info)
        assert info is not None
        told: list[object] = []
        consumer = ChunkConsumer()
        d = node.fetcher.relay_nar(info, consumer, told.append)
        self.settle()
        self.successResultOf(d)
        return told, consumer.value()

    def test_narinfo_names_the_fetcher(self) -> None:
        """A path another node will fetch: ``upstream URL via <that node>``; the fetcher itself: no via."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        d = self.nodes[third].fetcher.find(path.hash_part)
        self.settle()
        found = self.successResultOf(d)
        assert found is not None
        self.assertEqual(str(found.source), f"upstream {UPSTREAM} via {self.nodes[first].url}")
        d = self.nodes[first].fetcher.find(path.hash_part)
        self.settle()
        found = self.successResultOf(d)
        assert found is not None
        self.assertEqual(str(found.source), f"upstream {UPSTREAM}")

    def test_nar_names_the_fetcher_that_sent_it(self) -> None:
        """The NAR's source names the fetcher whose bytes were written; the fetcher's own says no via."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        told, nar = self.named(self.nodes[third], path)
        self.assertEqual(nar, path.nar)
        self.assertEqual([str(s) for s in told], [f"upstream {UPSTREAM} via {self.nodes[first].url}"])
        # Staged now: a later narinfo and NAR still name the node it came through.
        d = self.nodes[third].fetcher.find(path.hash_part)
        found = self.successResultOf(d)
        assert found is not None
        self.assertEqual(found.source.via, self.nodes[first].url)
        told, _ = self.named(self.nodes[first], path)
        self.assertEqual([str(s) for s in told], [f"upstream {UPSTREAM}"])

    def test_fallback_names_the_fetcher_that_took_over(self) -> None:
        """The first fetcher dead before any byte: the source names the one that sent the bytes."""
        for name in ("a", "b", "c"):
            self.node(name)
        path = self.serve()
        first, second, third = self.order(path)
        self.lan.modes[f"{first}:9999"] = "down"
        told, nar = self.named(self.nodes[third], path)
        self.assertEqual(nar, path.nar)
        self.assertEqual([str(s) for s in told], [f"upstream {UPSTREAM} via {self.nodes[second].url}"])

    def test_alone_no_via(self) -> None:
        """A node with no fetching peer fetches itself: plain ``upstream URL``."""
        a = self.node("a")
        path = self.serve()
        told, nar = self.named(a, path)
        self.assertEqual(nar, path.nar)
        self.assertEqual([str(s) for s in told], [f"upstream {UPSTREAM}"])
