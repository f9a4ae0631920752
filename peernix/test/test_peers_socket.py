"""
Real-socket tests of the peer side on 127.0.0.1: a peer served by
``twisted.web``, our fan-out over a persistent treq pool, and the NAR relayed
into a real ``twisted.web`` request with backpressure.
"""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from typing import Any, cast

import treq
from prometheus_client import CollectorRegistry
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from peernix.nix.signing import SecretKey
from peernix.peers.client import PeerClient
from peernix.peers.fanout import Fanout
from peernix.peers.registry import PeerRegistry
from peernix.peers.trust import TrustPolicy
from peernix.test.peerfakes import FakeLan, file_nar, hash_part_of, make_info, store_path_for

KEY = SecretKey("socket-1", b"\x05" * 32)


class _RelayResource(Resource):
    """A minimal client-facing NAR endpoint: relays the one NAR it knows."""

    isLeaf = True

    def __init__(self, fanout: Fanout, info: Any) -> None:
        super().__init__()
        self.fanout = fanout
        self.info = info

    def render_GET(self, request: Request) -> int:
        d = self.fanout.relay_nar(self.info, request)

        def done(_: object) -> None:
            request.finish()

        def failed(_: object) -> None:
            # Bytes may have gone out: never finish a bad response.
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.abortConnection()  # type: ignore[attr-defined]

        d.addCallbacks(done, failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class SocketRelayTests(TestCase):
    """The fan-out and relay over real loopback sockets."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = cast(Any, reactor)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.lan = FakeLan()
        self.peer_port: Any = self.reactor.listenTCP(0, Site(self.lan), interface="127.0.0.1")
        self.addCleanup(self.peer_port.stopListening)
        self.peer_host = f"127.0.0.1:{self.peer_port.getHost().port}"
        self.registry = PeerRegistry(reactor)
        self.registry.add(f"http://{self.peer_host}", "static")
        http = HTTPClient(Agent(reactor, pool=self.pool))
        client = PeerClient(http, reactor, timeout=5.0)
        self.fanout = Fanout(
            self.registry, client, TrustPolicy([KEY.public_key]), reactor, metrics_registry=CollectorRegistry()
        )
        self.addCleanup(self.fanout.close)

    async def _lookup_and_fetch(self, compression: str) -> None:
        # 3 MiB of varied bytes: many chunks, so backpressure really acts.
        nar = file_nar(bytes(range(251)) * (3 * 4096 + 7))
        info = make_info(store_path_for("big"), nar, key=KEY, compression=compression)
        self.lan.peer(self.peer_host).serve(info, nar)
        found = await self.fanout.lookup(hash_part_of(info.store_path))
        self.assertEqual(found, info)
        site_port = self.reactor.listenTCP(0, Site(_RelayResource(self.fanout, info)), interface="127.0.0.1")
        self.addCleanup(site_port.stopListening)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.get(f"http://127.0.0.1:{site_port.getHost().port}/nar", pool=pool)
        body = await treq.content(response)
        self.assertEqual(len(body), len(nar))
        self.assertEqual(body, nar)

    def test_zstd_relay(self) -> Deferred[None]:
        """A zstd NAR found by fan-out streams verified into a real web request."""
        return Deferred.fromCoroutine(self._lookup_and_fetch("zstd"))

    def test_raw_relay(self) -> Deferred[None]:
        """A raw NAR (the Go peer's form) streams verified into a real web request."""
        return Deferred.fromCoroutine(self._lookup_and_fetch("none"))

    async def _corrupt(self) -> None:
        nar = file_nar(bytes(range(251)) * (3 * 4096 + 7))
        info = make_info(store_path_for("bad"), nar, key=KEY)
        bad = bytearray(nar)
        bad[-100] ^= 0xFF
        peer = self.lan.peer(self.peer_host)
        peer.serve(info, bytes(bad))
        self.assertEqual(await self.fanout.lookup(hash_part_of(info.store_path)), info)
        site_port = self.reactor.listenTCP(0, Site(_RelayResource(self.fanout, info)), interface="127.0.0.1")
        self.addCleanup(site_port.stopListening)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.get(f"http://127.0.0.1:{site_port.getHost().port}/nar", pool=pool)
        try:
            body = await treq.content(response)
        except Exception:
            body = None
        # Either the body was cut off or it is short: never the whole (bad) NAR.
        self.assertTrue(body is None or len(body) < len(nar))
        self.assertEqual(self.registry.peers()[0].failures.get("verification"), 1)

    def test_corrupt_never_completes(self) -> Deferred[None]:
        """A corrupted NAR from the peer makes the client response abort, never complete."""
        return Deferred.fromCoroutine(self._corrupt())
