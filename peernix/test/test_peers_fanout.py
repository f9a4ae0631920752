"""Tests for :mod:`peernix.peers.fanout`, against a fake LAN (no sockets)."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from peernix.interfaces import IUpstream
from peernix.nix.narinfo import NarInfo, render_narinfo
from peernix.nix.signing import SecretKey
from peernix.peers.client import PeerClient
from peernix.peers.errors import NarClientGone, NarUnavailable, NarVerificationFailed
from peernix.peers.fanout import Fanout, PeersBusy, PeerSlots
from peernix.peers.registry import Peer, PeerRegistry
from peernix.peers.trust import TrustPolicy
from peernix.test.peerfakes import (
    FakeLan,
    FakeRegistry,
    FakeResponse,
    chunks_of,
    file_nar,
    hash_part_of,
    lan_client,
    make_info,
    store_path_for,
)

TRUSTED = SecretKey("trusted-1", b"\x11" * 32)
UNKNOWN = SecretKey("unknown-1", b"\x22" * 32)

HONEST, FAST_UNTRUSTED, LIAR, BROKEN = "honest:9999", "untrusted:9999", "liar:9999", "broken:9999"


def answer(request: Request, body: bytes, code: int = 200) -> None:
    """Complete a request a slow fake peer held open."""
    request.setResponseCode(code)
    request.write(body)
    request.finish()


class FanoutTestMixin:
    """A fan-out over a fake LAN with a fake registry."""

    clock: Clock
    lan: FakeLan

    def make(self, hosts: list[str], registry_factory: Any = None, **kw: Any) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        http, self.agent = lan_client(self.lan)
        self.http = http
        self.registry = registry_factory(self.clock) if registry_factory is not None else FakeRegistry()
        for host in hosts:
            self.lan.peer(host)
            self.registry.add(f"http://{host}", "static")
        self.client = PeerClient(http, self.clock, timeout=kw.pop("client_timeout", 2.0))
        self.metrics = CollectorRegistry()
        options: dict[str, Any] = {"negative_ttl": 10.0, "lookup_timeout": 3.0, "prefetch_concurrency": 2}
        options.update(kw)
        self.fanout = Fanout(
            self.registry,
            self.client,
            TrustPolicy([TRUSTED.public_key]),
            self.clock,
            metrics_registry=self.metrics,
            **options,
        )
        self.nar = file_nar(b"hello\n")
        self.info = make_info(store_path_for("hello"), self.nar, key=TRUSTED, compression="zstd")
        self.h = hash_part_of(self.info.store_path)

    def lookup(self, hash_part: str | None = None) -> Deferred[NarInfo | None]:
        d = self.fanout.lookup(hash_part or self.h)
        self.agent.flush()
        return d

    def narinfo_requests(self, host: str) -> int:
        return self.lan.count(host, ".narinfo") + sum(
            1 for h, p, _ in self.lan.requests if h == host and ".narinfo" in p and "?" in p
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


class FanoutLookupTests(FanoutTestMixin, SynchronousTestCase):
    """Finding the first trusted narinfo."""

    def test_interface(self) -> None:
        """Fanout provides IUpstream."""
        self.make([HONEST])
        verifyObject(IUpstream, self.fanout)

    def test_honest_peer(self) -> None:
        """A trusted narinfo from a peer is returned as the peer gave it, and counted."""
        self.make([HONEST])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.metric("peernix_peer_hits_total"), 1)
        self.assertEqual(self.metric("peernix_peer_requests_total", result="hit"), 1)
        self.assertEqual(self.metric("peernix_fanout_seconds_count"), 1)
        self.assertEqual(self.metric("peernix_peers"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trusted_wins_over_faster_untrusted(self) -> None:
        """A faster unsigned or foreign-signed answer is ignored until the trusted one arrives."""
        self.make([FAST_UNTRUSTED, HONEST, "unsigned:9999"])
        self.lan.peer(FAST_UNTRUSTED).serve(make_info(self.info.store_path, self.nar, key=UNKNOWN))
        self.lan.peer("unsigned:9999").serve(attrs.evolve(self.info, sigs=()))
        self.lan.peer(HONEST).mode = "slow"
        d = self.lookup()
        self.assertNoResult(d)
        self.assertEqual(self.registry.failure_kinds(f"http://{FAST_UNTRUSTED}"), ["untrusted"])
        self.assertEqual(self.registry.failure_kinds("http://unsigned:9999"), ["untrusted"])
        [request] = self.lan.peer(HONEST).pending
        answer(request, render_narinfo(self.info).encode())
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), self.info)
        self.assertEqual(self.metric("peernix_peer_requests_total", result="untrusted"), 2)

    def test_lying_peer_ignored(self) -> None:
        """A validly signed narinfo for another path is ignored and counted against its peer."""
        self.make([LIAR, HONEST])
        other = make_info(store_path_for("evil"), file_nar(b"evil\n"), key=TRUSTED)
        self.lan.peer(LIAR).narinfos[self.h] = render_narinfo(other).encode()
        self.lan.peer(HONEST).mode = "slow"
        d = self.lookup()
        self.assertNoResult(d)
        self.assertEqual(self.registry.failure_kinds(f"http://{LIAR}"), ["untrusted"])
        answer(self.lan.peer(HONEST).pending[0], render_narinfo(self.info).encode())
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), self.info)

    def test_winner_cancels_others(self) -> None:
        """When one peer wins, requests to the others are cancelled and nothing is left pending."""
        self.make([HONEST, "slow:9999"])
        self.lan.peer("slow:9999").mode = "slow"
        self.lan.peer(HONEST).serve(self.info)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.registry.failure_kinds("http://slow:9999"), [])

    def test_all_bad_is_miss(self) -> None:
        """Untrusted, lying, malformed, failing, absent and dead peers give a miss, each failure recorded."""
        self.make([FAST_UNTRUSTED, LIAR, BROKEN, "error:9999", "absent:9999", "down:9999"])
        self.lan.peer(FAST_UNTRUSTED).serve(attrs.evolve(self.info, sigs=()))
        other = make_info(store_path_for("evil"), file_nar(b"evil\n"), key=TRUSTED)
        self.lan.peer(LIAR).narinfos[self.h] = render_narinfo(other).encode()
        self.lan.peer(BROKEN).narinfos[self.h] = b"garbage"
        self.lan.peer("error:9999").mode = "error"
        self.lan.peer("down:9999").mode = "down"
        self.assertIsNone(self.successResultOf(self.lookup()))
        kinds = {url: self.registry.failure_kinds(url) for url, _ in self.registry.failures}
        self.assertEqual(
            kinds,
            {
                f"http://{FAST_UNTRUSTED}": ["untrusted"],
                f"http://{LIAR}": ["untrusted"],
                f"http://{BROKEN}": ["untrusted"],
                "http://error:9999": ["http"],
                "http://down:9999": ["connection"],
            },
        )
        self.assertIn("http://absent:9999", [u for u, _ in self.registry.successes])
        self.assertEqual(self.metric("peernix_fanout_misses_total"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_peers(self) -> None:
        """Without healthy peers a lookup is a miss at once."""
        self.make([HONEST])
        self.registry.unhealthy.add(f"http://{HONEST}")
        self.assertIsNone(self.successResultOf(self.lookup()))
        self.assertEqual(self.lan.requests, [])

    def test_invalid_hash(self) -> None:
        """An invalid hash part is a miss without any request."""
        self.make([HONEST])
        self.assertIsNone(self.successResultOf(self.fanout.lookup("not-a-hash")))
        self.assertEqual(self.lan.requests, [])

    def test_peer_timeout(self) -> None:
        """A peer that never answers makes a miss after the peer timeout, with no timers left."""
        self.make(["slow:9999"])
        self.lan.peer("slow:9999").mode = "slow"
        d = self.lookup()
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.registry.failure_kinds("http://slow:9999"), ["timeout"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookup_timeout(self) -> None:
        """The whole fan-out ends at lookup_timeout even if peer requests could wait longer."""
        self.make(["slow:9999", "slow2:9999"], client_timeout=30.0)
        self.lan.peer("slow:9999").mode = "slow"
        self.lan.peer("slow2:9999").mode = "slow"
        d = self.lookup()
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Abandoned requests are the fan-out's doing, not the peers' fault.
        self.assertEqual(self.registry.failures, [])


class FanoutCoalescingTests(FanoutTestMixin, SynchronousTestCase):
    """Concurrent lookups share one fan-out."""

    def test_fifty_lookups_one_request_per_peer(self) -> None:
        """50 concurrent identical lookups cost each peer one request and all get the answer."""
        hosts = [HONEST, "absent:9999", "slow:9999"]
        self.make(hosts)
        self.lan.peer(HONEST).serve(self.info)
        self.lan.peer("slow:9999").mode = "slow"
        ds = [self.fanout.lookup(self.h) for _ in range(50)]
        self.assertEqual(len({id(d) for d in ds}), 50)
        self.agent.flush()
        for d in ds:
            self.assertEqual(self.successResultOf(d), self.info)
        for host in hosts:
            self.assertEqual(self.lan.count(host), 1, host)

    def test_cancel_one_waiter(self) -> None:
        """Cancelling one waiter leaves the shared fan-out and the other waiters untouched."""
        self.make([HONEST])
        self.lan.peer(HONEST).mode = "slow"
        d1, d2 = self.fanout.lookup(self.h), self.fanout.lookup(self.h)
        self.agent.flush()
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertNoResult(d2)
        answer(self.lan.peer(HONEST).pending[0], render_narinfo(self.info).encode())
        self.agent.flush()
        self.assertEqual(self.successResultOf(d2), self.info)

    def test_all_waiters_cancelled_fills_cache(self) -> None:
        """With every waiter gone the fan-out still finishes into the cache."""
        self.make([HONEST])
        self.lan.peer(HONEST).mode = "slow"
        d = self.lookup()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        answer(self.lan.peer(HONEST).pending[0], render_narinfo(self.info).encode())
        self.agent.flush()
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.lan.count(HONEST), 1)


    def test_close(self) -> None:
        """close() ends every fan-out in flight as a miss, leaving no timers."""
        self.make(["slow:9999"], client_timeout=30.0)
        self.lan.peer("slow:9999").mode = "slow"
        d = self.lookup()
        self.fanout.close()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.registry.failures, [])


class FanoutCacheTests(FanoutTestMixin, SynchronousTestCase):
    """Positive and negative caches."""

    def test_negative_cache(self) -> None:
        """A miss is remembered for negative_ttl, then asked again."""
        self.make(["absent:9999"])
        self.assertIsNone(self.successResultOf(self.lookup()))
        self.clock.advance(9)
        self.assertIsNone(self.successResultOf(self.lookup()))
        self.assertEqual(self.lan.count("absent:9999"), 1)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(self.lookup()))
        self.assertEqual(self.lan.count("absent:9999"), 2)

    def test_new_peer_flushes_negative_cache(self) -> None:
        """A new peer makes remembered misses be asked again, and it may have the path."""
        self.make(["absent:9999"])
        self.assertIsNone(self.successResultOf(self.lookup()))
        self.lan.peer(HONEST).serve(self.info)
        self.registry.add(f"http://{HONEST}", "udp")
        self.assertEqual(self.successResultOf(self.lookup()), self.info)

    def test_positive_cache(self) -> None:
        """A winner is served from memory for positive_ttl."""
        self.make([HONEST], positive_ttl=30.0)
        self.lan.peer(HONEST).serve(self.info)
        self.successResultOf(self.lookup())
        self.clock.advance(29)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.lan.count(HONEST), 1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        self.assertEqual(self.lan.count(HONEST), 2)

    def test_cache_bounded(self) -> None:
        """The caches keep at most cache_size entries."""
        self.make(["absent:9999"], cache_size=3)
        for i in range(5):
            self.successResultOf(self.lookup(hash_part_of(store_path_for(f"p{i}"))))
        self.assertEqual(len(self.fanout._negative), 3)


class FanoutPrefetchTests(FanoutTestMixin, SynchronousTestCase):
    """Background lookups of a winner's references."""

    def test_prefetch_bounded(self) -> None:
        """References are looked up with bounded concurrency and later lookups come from memory."""
        self.make([HONEST], prefetch_concurrency=2)
        refs = [make_info(store_path_for(f"dep{i}"), file_nar(b"dep %d\n" % i), key=TRUSTED) for i in range(5)]
        basenames = [r.store_path.rsplit("/", 1)[1] for r in refs]
        own = self.info.store_path.rsplit("/", 1)[1]
        top = make_info(self.info.store_path, self.nar, key=TRUSTED, references=[*basenames, own])
        peer = self.lan.peer(HONEST)
        peer.serve(top)
        peer.hold.update(hash_part_of(r.store_path) for r in refs)
        self.assertEqual(self.successResultOf(self.lookup()), top)
        # At most prefetch_concurrency requests at once; the self-reference is not fetched.
        self.assertEqual(len(peer.pending), 2)
        answered = 0
        while peer.pending:
            self.assertLessEqual(len(peer.pending), 2)
            request = peer.pending.pop(0)
            ref = next(r for r in refs if hash_part_of(r.store_path) in request.path.decode())
            answer(request, render_narinfo(ref).encode())
            answered += 1
            self.agent.flush()
        self.assertEqual(answered, 5)
        requests = len(self.lan.requests)
        for ref in refs:
            self.assertEqual(self.successResultOf(self.fanout.lookup(hash_part_of(ref.store_path))), ref)
        self.assertEqual(len(self.lan.requests), requests)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FanoutWithRegistryTests(FanoutTestMixin, SynchronousTestCase):
    """The fan-out with the real registry."""

    def test_liar_backs_off(self) -> None:
        """A lying peer is skipped by the next fan-out while it is in backoff."""
        self.make([LIAR, HONEST], registry_factory=PeerRegistry)
        other = make_info(store_path_for("evil"), file_nar(b"evil\n"), key=TRUSTED)
        self.lan.peer(LIAR).narinfos[self.h] = render_narinfo(other).encode()
        self.lan.peer(HONEST).serve(self.info)
        self.assertEqual(self.successResultOf(self.lookup()), self.info)
        second = make_info(store_path_for("second"), file_nar(b"2\n"), key=TRUSTED)
        self.lan.peer(HONEST).serve(second)
        self.assertEqual(self.successResultOf(self.lookup(hash_part_of(second.store_path))), second)
        self.assertEqual(self.lan.count(LIAR), 1)
        self.assertEqual(self.lan.count(HONEST), 2)


class ScriptedClient(PeerClient):
    """A PeerClient whose NAR downloads are hand-rolled responses, by peer URL."""

    def __init__(self, http: HTTPClient, clock: Clock) -> None:
        super().__init__(http, clock)
        self.responses: dict[str, FakeResponse] = {}
        self.opened: list[tuple[str, str]] = []

    def open_nar(self, peer: Peer, url: str) -> Deferred[IResponse]:
        self.opened.append((peer.url, url))
        return succeed(self.responses[peer.url])  # type: ignore[arg-type]


class FanoutRelayTests(FanoutTestMixin, SynchronousTestCase):
    """Relaying the NAR of a looked-up path."""

    def relay(self, info: NarInfo | None = None) -> tuple[Deferred[None], StringTransport]:
        consumer = StringTransport()
        d = self.fanout.relay_nar(info or self.info, consumer)
        self.agent.flush()
        return d, consumer

    def test_relay_zstd_from_winner(self) -> None:
        """The NAR comes zstd-compressed from the peer that won the lookup, decompressed and verified."""
        self.make([HONEST, "other:9999"])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        d, consumer = self.relay()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 1)
        self.assertEqual(self.lan.count("other:9999"), 1)  # only the narinfo fan-out
        self.assertGreater(self.metric("peernix_proxied_bytes_total"), 0)

    def test_relay_go_form_without_lookup(self) -> None:
        """Without a remembered offer the peers are asked again; the Go form (raw, URL under /nix-cache/) works."""
        self.make(["go:9999"])
        go_info = make_info(self.info.store_path, self.nar, key=TRUSTED)
        self.assertEqual(go_info.url, f"{self.h}-{go_info.nar_hash.nix32()}.nar")
        self.lan.peer("go:9999").serve(go_info, self.nar)
        d, consumer = self.relay(attrs.evolve(go_info, url="nar/ours.nar"))
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)

    def test_relay_every_published_url_form(self) -> None:
        """A peer's NAR is fetched at whatever URL its narinfo names: this version's, an older peernix's, zw3rk's."""
        self.make([])
        nar_hash = self.info.nar_hash.nix32()
        for url, compression in (
            (f"{self.h}-{nar_hash}.nar.zst", "zstd"),  # peernix now, to peers asking ?compression=zstd
            (f"{self.h}-{nar_hash}.nar", "none"),  # peernix now; zw3rk
            (f"nar/{self.h}-{nar_hash}.nar.zst", "zstd"),  # older peernix
            (f"nar/{self.h}-{nar_hash}.nar", "none"),  # older peernix
            (f"{self.h}.nar", "none"),  # older zw3rk
        ):
            self.make(["p:9999"])
            info = make_info(self.info.store_path, self.nar, key=TRUSTED, url=url, compression=compression)
            self.lan.peer("p:9999").serve(info, self.nar)
            self.successResultOf(self.lookup())
            d, consumer = self.relay(info)
            self.successResultOf(d)
            self.assertEqual(consumer.value(), self.nar, url)
            self.assertEqual(self.lan.count("p:9999", "/nix-cache/" + url), 1, url)

    def test_relay_falls_back_to_next_peer(self) -> None:
        """A peer whose NAR is bad before anything was written is penalised and the next peer serves it."""
        self.make([HONEST, "bad:9999"])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        bad = bytearray(self.nar)
        bad[-20] ^= 1
        bad_peer = self.lan.peer("bad:9999")
        bad_peer.serve(self.info, bytes(bad))
        self.lan.peer(HONEST).mode = "slow"
        found = self.lookup()
        # Let the bad peer (same narinfo, bad NAR) win the lookup.
        self.lan.peer(HONEST).mode = "normal"
        self.lan.peer(HONEST).pending.clear()
        self.successResultOf(found)
        d, consumer = self.relay()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertEqual(self.registry.failure_kinds("http://bad:9999"), ["verification"])
        self.assertEqual(self.metric("peernix_verification_failures_total"), 1)

    def test_relay_unavailable(self) -> None:
        """When no peer has the NAR, relaying fails with NarUnavailable and writes nothing."""
        self.make(["absent:9999", "error:9999"])
        self.lan.peer("error:9999").mode = "error"
        d, consumer = self.relay()
        self.failureResultOf(d, NarUnavailable)
        self.assertEqual(consumer.value(), b"")
        self.assertIsNone(consumer.producer)

    def test_relay_other_narhash_refused(self) -> None:
        """A peer offering the path with another NarHash is not used."""
        self.make(["other:9999"])
        other_nar = file_nar(b"different\n")
        self.lan.peer("other:9999").serve(
            make_info(self.info.store_path, other_nar, key=TRUSTED), other_nar
        )
        d, consumer = self.relay()
        self.failureResultOf(d, NarUnavailable)
        self.assertEqual(self.lan.count("other:9999", ".nar"), 0)

    def scripted(self, **options: Any) -> ScriptedClient:
        self.make([HONEST, "b:9999"], **options)
        client = ScriptedClient(self.http, self.clock)
        self.fanout._client = client
        self.info = make_info(self.info.store_path, self.nar, key=TRUSTED)
        for host in (HONEST, "b:9999"):
            self.lan.peer(host).serve(self.info, self.nar)
        return client

    def test_small_corrupted_nar_falls_back_unseen(self) -> None:
        """A small NAR that fails verification is fetched from the next peer; the client sees only good bytes."""
        client = self.scripted()
        client.responses = {f"http://{HONEST}": FakeResponse(), "http://b:9999": FakeResponse()}
        d, consumer = self.relay(self.info)
        [(first, _)] = client.opened
        bad = bytearray(self.nar)
        bad[-20] ^= 1
        client.responses[first].send(bytes(bad))
        client.responses[first].finish()
        self.assertNoResult(d)
        self.assertEqual(consumer.value(), b"")
        self.assertEqual(len(client.opened), 2)
        second = client.opened[1][0]
        self.assertNotEqual(second, first)
        client.responses[second].send(self.nar)
        client.responses[second].finish()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertEqual([k for _, k in self.registry.failures], ["verification"])

    def test_relay_fails_after_write(self) -> None:
        """A streamed NAR that fails verification after bytes went out fails the relay (no fallback)."""
        client = self.scripted(relay_hold_back=0)
        big = file_nar(b"x" * 5000)
        info = make_info(self.info.store_path, big, key=TRUSTED)
        self.lan.peer(HONEST).serve(info)
        self.lan.peer("b:9999").serve(info)
        client.responses = {f"http://{HONEST}": FakeResponse(), "http://b:9999": FakeResponse()}
        d, consumer = self.relay(info)
        [(first, _)] = client.opened
        response = client.responses[first]
        bad = bytearray(big)
        bad[-20] ^= 1
        response.send(*chunks_of(bytes(bad), 1000))
        response.finish()
        self.failureResultOf(d, NarVerificationFailed)
        self.assertGreater(len(consumer.value()), 0)
        self.assertLess(len(consumer.value()), len(big))
        self.assertEqual(len(client.opened), 1)
        self.assertEqual([k for _, k in self.registry.failures], ["verification"])

    def test_relay_cancel(self) -> None:
        """Cancelling the relay (client went away) stops the peer connection."""
        client = self.scripted()
        response = FakeResponse()
        client.responses = {f"http://{HONEST}": response, "http://b:9999": response}
        d, consumer = self.relay()
        response.send(self.nar[:50])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(response.transport.stopped)
        self.assertIsNone(consumer.producer)
        self.assertEqual(self.registry.failures, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_relay_client_gone(self) -> None:
        """The client leaving mid relay fails it with NarClientGone: no warning, nothing held against the peer."""
        client = self.scripted(relay_hold_back=0)
        response = FakeResponse()
        client.responses = {f"http://{HONEST}": response, "http://b:9999": response}
        with capturedLogs() as events:
            d, consumer = self.relay()
            response.send(self.nar[:50])
            producer = consumer.producer
            assert producer is not None
            producer.stopProducing()
        self.failureResultOf(d, NarClientGone)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.registry.failures, [])
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])

    def test_relay_backpressure(self) -> None:
        """The client's pause reaches the peer transport during a relay."""
        client = self.scripted()
        response = FakeResponse()
        client.responses = {f"http://{HONEST}": response, "http://b:9999": response}
        d, consumer = self.relay()
        assert consumer.producer is not None
        consumer.producer.pauseProducing()
        self.assertTrue(response.transport.paused)
        consumer.producer.resumeProducing()
        self.assertFalse(response.transport.paused)
        response.send(self.nar)
        response.finish()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)


class PeerSlotsTests(SynchronousTestCase):
    """:class:`PeerSlots` on its own."""

    def test_per_peer_and_total(self) -> None:
        """Slots are granted up to the per-peer and total caps; the rest wait."""
        slots = PeerSlots(per_peer=2, total=3)
        got = [slots.acquire(k) for k in ("a", "a", "a", "b", "c")]
        self.assertEqual([d.called for d in got], [True, True, False, True, False])
        self.assertEqual((slots.in_flight("a"), slots.in_flight(), slots.waiting), (2, 3, 2))

    def test_release_grants_first_eligible(self) -> None:
        """A released slot goes to the first waiter whose peer is below its cap, not blocked by others."""
        slots = PeerSlots(per_peer=1, total=2)
        slots.acquire("a")
        slots.acquire("b")
        wait_a, wait_c = slots.acquire("a"), slots.acquire("c")
        slots.release("b")
        # "a" is still at its cap: "c" goes first.
        self.assertFalse(wait_a.called)
        self.assertTrue(wait_c.called)
        slots.release("a")
        self.assertTrue(wait_a.called)
        self.assertEqual((slots.in_flight("a"), slots.in_flight("c"), slots.waiting), (1, 1, 0))

    def test_cancel_leaves_queue(self) -> None:
        """A cancelled waiter leaves the queue and never takes a slot."""
        slots = PeerSlots(per_peer=1, total=1)
        slots.acquire("a")
        waiting = slots.acquire("a")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(slots.waiting, 0)
        slots.release("a")
        self.assertEqual(slots.in_flight(), 0)

    def test_queue_bounded(self) -> None:
        """Past max_waiting, acquire fails at once with PeersBusy."""
        slots = PeerSlots(per_peer=1, total=1, max_waiting=1)
        slots.acquire("a")
        slots.acquire("a")
        self.failureResultOf(slots.acquire("b"), PeersBusy)
        self.assertEqual(slots.waiting, 1)

    def test_no_leak(self) -> None:
        """After every granted slot is released, nothing is counted or queued."""
        slots = PeerSlots(per_peer=2, total=3)
        keys = ["a", "b", "a", "c", "b", "a", "c"]
        granted: list[str] = []
        for key in keys:
            slots.acquire(key).addCallback(lambda _, k: granted.append(k), key)
        released = 0
        while released < len(granted):
            slots.release(granted[released])
            released += 1
        self.assertEqual(sorted(granted), sorted(keys))
        self.assertEqual((slots.in_flight(), slots.waiting, slots._in_flight), (0, 0, {}))

    def test_invalid(self) -> None:
        """Caps below 1 are refused."""
        self.assertRaises(ValueError, PeerSlots, per_peer=0)
        self.assertRaises(ValueError, PeerSlots, total=0)


class FanoutConcurrencyTests(FanoutTestMixin, SynchronousTestCase):
    """Bounded concurrency of requests to peers."""

    def hashes(self, n: int) -> list[str]:
        return [hash_part_of(store_path_for(f"c{i}")) for i in range(n)]

    def in_flight(self, host: str) -> int:
        """:returns: the requests ``host`` holds open right now."""
        return sum(1 for r in self.lan.peer(host).pending if not r.finished and not r._disconnected)

    def test_per_peer(self) -> None:
        """At most per_peer_concurrency lookups are in flight to one peer; the others queue and follow."""
        self.make(["slow:9999"], per_peer_concurrency=2, client_timeout=30.0, lookup_timeout=30.0)
        peer = self.lan.peer("slow:9999")
        peer.mode = "slow"
        ds = [self.lookup(h) for h in self.hashes(5)]
        self.assertEqual(self.in_flight("slow:9999"), 2)
        self.assertEqual(self.fanout.slots.waiting, 3)
        for served in range(5):
            request = next(r for r in peer.pending if not r.finished)
            answer(request, b"", 404)
            self.agent.flush()
            self.assertLessEqual(self.in_flight("slow:9999"), 2)
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.lan.count("slow:9999"), 5)
        self.assertEqual((self.fanout.slots.in_flight(), self.fanout.slots.waiting), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_total(self) -> None:
        """At most total_concurrency requests are in flight to all peers together."""
        hosts = [f"p{i}:9999" for i in range(4)]
        self.make(hosts, total_concurrency=3, client_timeout=30.0, lookup_timeout=30.0)
        for host in hosts:
            self.lan.peer(host).mode = "slow"
        d = self.lookup()
        self.assertEqual(sum(self.in_flight(h) for h in hosts), 3)
        first = next(h for h in hosts if self.in_flight(h))
        answer(self.lan.peer(first).pending[0], b"", 404)
        self.agent.flush()
        self.assertEqual(sum(self.in_flight(h) for h in hosts), 3)
        self.assertEqual(sum(self.lan.count(h) for h in hosts), 4)
        self.assertNoResult(d)
        self.fanout.close()
        self.assertIsNone(self.successResultOf(d))

    def test_waiting_lookup_times_out(self) -> None:
        """A lookup waiting for a slot still ends as a miss at lookup_timeout, leaving the queue."""
        self.make(["slow:9999"], per_peer_concurrency=1, client_timeout=30.0, lookup_timeout=3.0)
        self.lan.peer("slow:9999").mode = "slow"
        first = self.lookup(self.hashes(1)[0])
        self.clock.advance(1.0)
        second = self.lookup()
        self.assertEqual(self.fanout.slots.waiting, 1)
        self.clock.advance(2.0)
        self.assertIsNone(self.successResultOf(first))
        # The slot came free at 3 s, but the second lookup had waited only
        # 2 s: it was asked with the second left of its deadline.
        self.assertNoResult(second)
        self.assertEqual(self.lan.count("slow:9999"), 2)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual((self.fanout.slots.in_flight(), self.fanout.slots.waiting), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiter_gives_up_unasked(self) -> None:
        """A lookup whose deadline passes while it waits for a slot is a miss and never reaches the peer."""
        self.make(["slow:9999"], per_peer_concurrency=1, lookup_timeout=3.0)
        # Another request holds the peer's only slot throughout.
        self.successResultOf(self.fanout.slots.acquire("http://slow:9999"))
        d = self.lookup()
        self.assertEqual(self.fanout.slots.waiting, 1)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.fanout.slots.waiting, 0)
        self.assertEqual(self.lan.requests, [])
        self.assertEqual(self.registry.failures, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_prefetch_bounded_per_peer(self) -> None:
        """Prefetching many references never has more than per_peer_concurrency requests at one peer."""
        self.make([HONEST], prefetch_concurrency=10, per_peer_concurrency=3, client_timeout=30.0,
                  lookup_timeout=30.0)
        refs = [make_info(store_path_for(f"dep{i}"), file_nar(b"dep %d\n" % i), key=TRUSTED) for i in range(8)]
        top = make_info(self.info.store_path, self.nar, key=TRUSTED,
                        references=[r.store_path.rsplit("/", 1)[1] for r in refs])
        peer = self.lan.peer(HONEST)
        peer.serve(top)
        peer.hold.update(hash_part_of(r.store_path) for r in refs)
        self.assertEqual(self.successResultOf(self.lookup()), top)
        self.assertEqual(self.in_flight(HONEST), 3)
        for _ in refs:
            request = next(r for r in peer.pending if not r.finished)
            answer(request, b"", 404)
            self.agent.flush()
            self.assertLessEqual(self.in_flight(HONEST), 3)
        self.assertEqual(self.lan.count(HONEST, ".narinfo"), 1 + len(refs))

    def test_relay_opens_bounded(self) -> None:
        """NAR opens take a slot until the response headers arrive."""
        self.make([HONEST], per_peer_concurrency=1)
        self.info = make_info(self.info.store_path, self.nar, key=TRUSTED)
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.successResultOf(self.lookup())
        client = HeldOpenClient(self.http, self.clock)
        self.fanout._client = client
        d1 = self.fanout.relay_nar(self.info, StringTransport())
        d2 = self.fanout.relay_nar(self.info, StringTransport())
        self.assertEqual(len(client.opens), 1)
        response = FakeResponse()
        client.opens[0].callback(response)
        # Headers are in: the slot is free for the second open while the
        # first body is still streaming.
        self.assertEqual(len(client.opens), 2)
        client.opens[1].callback(FakeResponse())
        response.send(self.nar)
        response.finish()
        self.successResultOf(d1)
        self.assertNoResult(d2)
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        self.assertEqual(self.fanout.slots.in_flight(), 0)


class HeldOpenClient(PeerClient):
    """A PeerClient whose NAR opens wait until the test fires them."""

    def __init__(self, http: HTTPClient, clock: Clock) -> None:
        super().__init__(http, clock)
        self.opens: list[Deferred[IResponse]] = []

    def open_nar(self, peer: Peer, url: str) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred()
        self.opens.append(d)
        return d


class FanoutBackoffTests(FanoutTestMixin, SynchronousTestCase):
    """A peer answering badly is asked less and less (real registry)."""

    def liar(self) -> None:
        """Make LIAR answer every lookup with a validly signed narinfo of another path."""
        self.make([LIAR], registry_factory=PeerRegistry, per_peer_concurrency=1)
        self.other = render_narinfo(make_info(store_path_for("evil"), file_nar(b"evil\n"), key=TRUSTED)).encode()
        self.hashes = [hash_part_of(store_path_for(f"b{i}")) for i in range(40)]
        for h in self.hashes:
            self.lan.peer(LIAR).narinfos[h] = self.other

    def test_backoff_grows(self) -> None:
        """Each bad answer doubles (or more) the backoff, up to the cap, and a backed-off peer is not asked."""
        self.liar()
        [peer] = self.registry.peers()
        delays = []
        asked = 0
        for h in self.hashes[:6]:
            self.assertIsNone(self.successResultOf(self.lookup(h)))
            asked += 1
            self.assertEqual(self.lan.count(LIAR), asked)
            delay = peer.backoff_until - self.clock.seconds()
            delays.append(delay)
            # While backed off, lookups do not reach it.
            self.clock.advance(delay / 2)
            self.assertIsNone(self.successResultOf(self.lookup(self.hashes[-1 - asked])))
            self.assertEqual(self.lan.count(LIAR), asked)
            self.clock.advance(delay / 2)
        self.assertEqual(delays, [2.0, 8.0, 32.0, 60.0, 60.0, 60.0])

    def test_queued_requests_skip_a_peer_gone_bad(self) -> None:
        """Lookups queued for a peer are not sent once its first answer put it into backoff."""
        self.liar()
        self.lan.peer(LIAR).mode = "slow"
        ds = [self.lookup(h) for h in self.hashes[:10]]
        self.assertEqual(self.fanout.slots.waiting, 9)
        [request] = self.lan.peer(LIAR).pending
        answer(request, self.other)
        self.agent.flush()
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.lan.count(LIAR), 1)
        self.assertEqual(self.fanout.slots.waiting, 0)
        self.assertEqual(self.fanout.slots.in_flight(), 0)
