"""Tests for :mod:`peernix.peers.prefetch` and the fan-out's NAR prefetch (no sockets)."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from collections.abc import Callable

import attrs
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import NarInfo
from peernix.peers.errors import NarVerificationFailed
from peernix.peers.prefetch import NarPrefetch
from peernix.test.peerfakes import file_nar, hash_part_of, make_info, store_path_for
from peernix.test.test_peers_fanout import HONEST, TRUSTED, FanoutTestMixin

PEER = "http://peer:9999"


class FakeFetch:
    """A fetch function whose downloads the test finishes by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[NarInfo, IConsumer, Callable[[str], object], Deferred[None]]] = []
        self.cancelled = 0

    def __call__(self, info: NarInfo, consumer: IConsumer, on_peer: Callable[[str], object]) -> Deferred[None]:
        def cancel(_: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.calls.append((info, consumer, on_peer, d))
        return d

    def finish(self, index: int, nar: bytes, peer: str = PEER) -> None:
        """Finish download ``index`` with ``nar`` from ``peer``."""
        _, consumer, on_peer, d = self.calls[index]
        on_peer(peer)
        consumer.write(nar)
        d.callback(None)

    def fail(self, index: int, error: Exception) -> None:
        self.calls[index][3].errback(error)


def nar_and_info(name: str, size: int = 100) -> tuple[bytes, NarInfo]:
    nar = file_nar(name.encode() * (size // len(name)))
    return nar, make_info(store_path_for(name), nar, key=TRUSTED)


class NarPrefetchTests(SynchronousTestCase):
    """The prefetcher alone, with a fake download and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.outcomes = Counter("prefetches", "test", ["outcome"], registry=self.registry)
        self.fetch = FakeFetch()

    def make(self, **kw: object) -> NarPrefetch:
        return NarPrefetch(self.fetch, self.clock, self.outcomes, **kw)  # type: ignore[arg-type]

    def expected(self, **kw: object) -> tuple[NarPrefetch, bytes, NarInfo, str]:
        """:returns: a prefetcher (made with ``kw``) told to expect a small NAR, that NAR, its narinfo and hash part."""
        prefetch = self.make(**kw)
        nar, info = nar_and_info("a")
        h = hash_part_of(info.store_path)
        prefetch.expect(h, info)
        return prefetch, nar, info, h

    def outcome(self, name: str) -> float:
        return self.registry.get_sample_value("prefetches_total", {"outcome": name}) or 0.0

    def test_held_nar_handed_over_once(self) -> None:
        """A fetched NAR is handed over with its peer, then dropped: memory is held only until the client asks."""
        prefetch, nar, info, h = self.expected()
        self.assertEqual(len(self.fetch.calls), 1)
        self.assertEqual(prefetch.reserved, info.nar_size)
        self.fetch.finish(0, nar)
        self.assertEqual(self.successResultOf(prefetch.take(h, info)), (nar, PEER))
        self.assertEqual(self.outcome("used"), 1)
        self.assertEqual(len(prefetch), 0)
        self.assertEqual(prefetch.reserved, 0)
        self.assertIsNone(self.successResultOf(prefetch.take(h, info)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_nar_expected_twice_fetched_once(self) -> None:
        """A second narinfo answer for the same NAR starts no second download."""
        prefetch, _, info, h = self.expected()
        prefetch.expect(h, info)
        self.assertEqual(len(self.fetch.calls), 1)

    def test_other_nar_hash_not_handed_over(self) -> None:
        """A request for another version of the path gets nothing from here."""
        prefetch, nar, info, h = self.expected()
        self.fetch.finish(0, nar)
        other = attrs.evolve(info, nar_hash=nar_and_info("b")[1].nar_hash)
        self.assertIsNone(self.successResultOf(prefetch.take(h, other)))
        self.assertEqual(len(prefetch), 1)

    def test_request_waits_for_download_under_way(self) -> None:
        """A NAR request arriving mid-download gets that download's bytes, not a second download."""
        prefetch, nar, info, h = self.expected()
        first = prefetch.take(h, info)
        second = prefetch.take(h, info)
        self.assertNoResult(first)
        self.fetch.finish(0, nar)
        self.assertEqual(self.successResultOf(first), (nar, PEER))
        self.assertEqual(self.successResultOf(second), (nar, PEER))
        self.assertEqual(len(self.fetch.calls), 1)
        self.assertEqual(len(prefetch), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_download_gives_up_waiting(self) -> None:
        """A request waits at most ``wait`` seconds for a download, then goes its own way."""
        prefetch, _, info, h = self.expected(wait=5.0)
        d = prefetch.take(h, info)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(d))

    def test_cancelled_wait_leaves_download(self) -> None:
        """A client leaving while it waits cancels its wait only; the download goes on."""
        prefetch, nar, info, h = self.expected()
        d = prefetch.take(h, info)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.fetch.cancelled, 0)
        self.fetch.finish(0, nar)
        self.assertEqual(self.successResultOf(prefetch.take(h, info)), (nar, PEER))

    def test_failed_download_leaves_nothing(self) -> None:
        """A download that fails verification is dropped and counted; its waiter fetches the NAR itself."""
        prefetch, _, info, h = self.expected()
        d = prefetch.take(h, info)
        self.fetch.fail(0, NarVerificationFailed("bad"))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(prefetch), 0)
        self.assertEqual(prefetch.reserved, 0)
        self.assertEqual(self.outcome("failed"), 1)

    def test_wrong_length_not_kept(self) -> None:
        """Bytes that are not NarSize long are never handed over."""
        prefetch, nar, info, h = self.expected()
        self.fetch.finish(0, nar[:-8])
        self.assertIsNone(self.successResultOf(prefetch.take(h, info)))
        self.assertEqual(prefetch.reserved, 0)

    def test_unused_dropped_after_ttl(self) -> None:
        """A NAR nobody asked for is dropped after ``ttl`` and counted unused."""
        prefetch, nar, info, h = self.expected(ttl=30.0)
        self.fetch.finish(0, nar)
        self.clock.advance(30)
        self.assertEqual(len(prefetch), 0)
        self.assertEqual(prefetch.reserved, 0)
        self.assertEqual(self.outcome("unused"), 1)
        self.assertIsNone(self.successResultOf(prefetch.take(h, info)))

    def test_big_nar_not_prefetched(self) -> None:
        """A NAR over ``max_size`` is left to the relay."""
        prefetch = self.make(max_size=1000)
        _, info = nar_and_info("big", 2000)
        prefetch.expect(hash_part_of(info.store_path), info)
        self.assertEqual(self.fetch.calls, [])
        self.assertEqual(len(prefetch), 0)

    def test_budget_bounds_memory(self) -> None:
        """NARs past the byte budget (held or reserved) are skipped and counted."""
        _, probe = nar_and_info("p0", 1000)
        prefetch = self.make(budget=2 * probe.nar_size + 10)
        infos = [nar_and_info(f"p{i}", 1000)[1] for i in range(3)]
        for info in infos:
            prefetch.expect(hash_part_of(info.store_path), info)
        self.assertEqual(len(prefetch), 2)
        self.assertLessEqual(prefetch.reserved, 2 * probe.nar_size + 10)
        self.assertEqual(self.outcome("skipped"), 1)

    def test_concurrency_and_queued_requests(self) -> None:
        """At most ``concurrency`` downloads run; a request for a queued one is answered at once and drops it."""
        prefetch = self.make(concurrency=2)
        pairs = [nar_and_info(f"q{i}") for i in range(4)]
        for _, info in pairs:
            prefetch.expect(hash_part_of(info.store_path), info)
        self.assertEqual(len(self.fetch.calls), 2)
        queued = pairs[3][1]
        self.assertIsNone(self.successResultOf(prefetch.take(hash_part_of(queued.store_path), queued)))
        self.fetch.finish(0, pairs[0][0])
        # The freed slot goes to the next queued NAR, not the dropped one.
        self.assertEqual(len(self.fetch.calls), 3)
        self.assertEqual(self.fetch.calls[2][0], pairs[2][1])

    def test_close_cancels_everything(self) -> None:
        """close() cancels downloads and timers and answers waiters: nothing is left pending."""
        prefetch = self.make()
        nar, info = nar_and_info("a")
        _, other = nar_and_info("b")
        prefetch.expect(hash_part_of(info.store_path), info)
        prefetch.expect(hash_part_of(other.store_path), other)
        self.fetch.finish(0, nar)
        waiting = prefetch.take(hash_part_of(other.store_path), other)
        prefetch.close()
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(self.fetch.cancelled, 1)
        self.assertEqual(len(prefetch), 0)
        self.assertEqual(prefetch.reserved, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FanoutNarPrefetchTests(FanoutTestMixin, SynchronousTestCase):
    """The fan-out prefetching small NARs for its callers."""

    def relay(self, info: NarInfo | None = None) -> tuple[Deferred[None], StringTransport, list[str]]:
        consumer = StringTransport()
        peers: list[str] = []
        d = self.fanout.relay_nar(info or self.info, consumer, peers.append)
        self.agent.flush()
        return d, consumer, peers

    def find(self) -> None:
        d = self.fanout.find(self.h)
        self.agent.flush()
        self.assertEqual(self.successResultOf(d).info, self.info)  # type: ignore[union-attr]
        self.agent.flush()

    def test_nar_prefetched_after_find(self) -> None:
        """The NAR is fetched right after the narinfo; the relay then costs no request to the peer."""
        self.make([HONEST], nar_prefetch_max=64 * 1024)
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.find()
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 1)
        d, consumer, peers = self.relay()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertEqual(peers, [f"http://{HONEST}"])
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 1)
        self.assertEqual(self.metric("peernix_nar_prefetches_total", outcome="used"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_prefetch_relayed_again(self) -> None:
        """A prefetched NAR failing verification is never handed over; the relay asks the peers again."""
        self.make([HONEST], nar_prefetch_max=64 * 1024)
        peer = self.lan.peer(HONEST)
        bad = bytearray(self.nar)
        bad[-20] ^= 1
        peer.serve(self.info, bytes(bad))
        self.find()
        self.assertEqual(self.metric("peernix_nar_prefetches_total", outcome="failed"), 1)
        peer.serve(self.info, self.nar)
        d, consumer, _ = self.relay()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), self.nar)
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 2)

    def test_lookup_of_references_fetches_no_nar(self) -> None:
        """Only the path a client asked about has its NAR prefetched, not its references."""
        self.make([HONEST], nar_prefetch_max=64 * 1024, prefetch_concurrency=2)
        dep_nar = file_nar(b"dep\n")
        dep = make_info(store_path_for("dep"), dep_nar, key=TRUSTED, compression="zstd")
        top = make_info(
            self.info.store_path, self.nar, key=TRUSTED, compression="zstd", references=[dep.store_path.rsplit("/", 1)[1]]
        )
        peer = self.lan.peer(HONEST)
        peer.serve(top, self.nar)
        peer.serve(dep, dep_nar)
        self.info = top
        self.find()
        self.assertEqual(self.narinfo_requests(HONEST), 2)
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 1)

    def test_off_by_default(self) -> None:
        """Without nar_prefetch_max nothing but the narinfo is fetched."""
        self.make([HONEST])
        self.lan.peer(HONEST).serve(self.info, self.nar)
        self.find()
        self.assertEqual(self.lan.count(HONEST, ".nar.zst"), 0)

    def test_close_stops_prefetch(self) -> None:
        """close() leaves no prefetch download or timer behind."""
        self.make([HONEST], nar_prefetch_max=64 * 1024)
        peer = self.lan.peer(HONEST)
        peer.serve(self.info, self.nar)
        peer.hold.add(self.info.url)
        self.find()
        self.assertEqual(len(peer.pending), 1)
        self.fanout.close()
        self.agent.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
