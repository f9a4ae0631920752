"""A real-socket test of :mod:`peernix.web.app`: a real Site on 127.0.0.1, a real thread pool, a multi-MB NAR."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Site

from peernix.nix.nar import NarVerifier
from peernix.test.fakes import MemoryStore
from peernix.web.app import WebApp
from peernix.web.metrics import Metrics
from peernix.web.streaming import thread_pool_runner


class _Verify(Protocol):
    """Feeds a response body to a NarVerifier chunk by chunk (never holding the whole NAR)."""

    def __init__(self, verifier: NarVerifier, done: Deferred[int]) -> None:
        self.verifier = verifier
        self.done = done
        self.chunks = 0

    def dataReceived(self, data: bytes) -> None:
        self.chunks += 1
        self.verifier.feed(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.chunks)
        else:
            self.done.errback(reason)


class RealSocketTests(TestCase):
    """The web app over a real TCP socket and thread pool."""

    def setUp(self) -> None:
        # Only here, in a real-socket test, is the global reactor used.
        from twisted.internet import reactor

        self.reactor = reactor
        assert IReactorTCP.providedBy(reactor) and IReactorTime.providedBy(reactor)
        assert IReactorFromThreads.providedBy(reactor) and IReactorCore.providedBy(reactor)
        root = self.mktemp()
        os.makedirs(root)
        self.store = MemoryStore(root)
        self.pool = ThreadPool(1, 2, name="peernix-web-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        app = WebApp(
            self.store,
            reactor=reactor,  # type: ignore[arg-type]
            defer_to_thread=thread_pool_runner(reactor, self.pool),  # type: ignore[arg-type]
            call_from_thread=reactor.callFromThread,  # type: ignore[attr-defined]
            secret_key=None,
            priority=40,
            metrics=Metrics(),
            version="test",
        )
        self.site = Site(app.resource())
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(self.port.stopListening)
        self.http_pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.http_pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.http_pool)  # type: ignore[arg-type]
        self.base = b"http://127.0.0.1:%d" % self.port.getHost().port  # type: ignore[attr-defined]

    async def _fetch_verified(self, url: bytes, info_hash: object, size: int, headers: Headers | None = None) -> tuple[IResponse, int]:
        response = await self.agent.request(b"GET", self.base + url, headers)
        done: Deferred[int] = Deferred()
        verifier = NarVerifier(info_hash, size)  # type: ignore[arg-type]
        response.deliverBody(_Verify(verifier, done))
        chunks = await done
        verifier.finish()
        return response, chunks

    async def test_multi_mb_nar(self) -> None:
        """A 12 MB NAR streams over a real socket in many chunks and verifies against its NarHash."""
        info = self.store.add_tree(
            "big",
            {"a": os.urandom(6 * 1024 * 1024), "dir": {"b": b"\0" * (6 * 1024 * 1024), "c": b"x"}},
        )
        self.assertGreater(info.nar_size, 12 * 1024 * 1024)
        url = b"/nix-cache/nar/%s-%s.nar" % (info.hash_part.encode(), info.nar_hash.nix32().encode())
        response, chunks = await self._fetch_verified(url, info.nar_hash, info.nar_size)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, info.nar_size)
        self.assertGreater(chunks, 1)
        narinfo = await self.agent.request(b"GET", self.base + b"/nix-cache/%s.narinfo" % info.hash_part.encode())
        self.assertEqual(narinfo.code, 200)
        from twisted.web.client import readBody

        body = await readBody(narinfo)
        self.assertIn(info.nar_hash.nix32().encode(), body)
