"""Tests of :mod:`peernix.upstream.rendezvous`: one fetcher per path, stable under churn."""

from __future__ import annotations

import hashlib
import random

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.nix32 import encode as nix32
from peernix.upstream.rendezvous import fetcher_order, weight


def _hash_parts(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [nix32(hashlib.sha256(rng.randbytes(16)).digest()[:20]) for _ in range(count)]


NODES = [f"{i:016x}" for i in range(0x1000, 0x1008)]


class FetcherOrderTests(SynchronousTestCase):
    def test_deterministic(self) -> None:
        """The same nodes in any order give the same fetcher order."""
        for hash_part in _hash_parts(50):
            shuffled = list(NODES)
            random.Random(hash_part).shuffle(shuffled)
            self.assertEqual(fetcher_order(hash_part, shuffled), fetcher_order(hash_part, NODES))

    def test_known_vector(self) -> None:
        """The weight is sha256(key NUL hash part), first 8 bytes, big-endian: fixed across versions."""
        expected = int.from_bytes(hashlib.sha256(b"node-a\x00abc").digest()[:8], "big")
        self.assertEqual(weight("node-a", "abc"), expected)

    def test_every_node_listed_once(self) -> None:
        """The order lists every candidate exactly once (for fallback), duplicates collapsed."""
        order = fetcher_order(_hash_parts(1)[0], NODES + NODES[:3])
        self.assertEqual(sorted(order), sorted(NODES))

    def test_empty(self) -> None:
        """No candidates, no fetcher."""
        self.assertEqual(fetcher_order(_hash_parts(1)[0], []), [])

    def test_balanced(self) -> None:
        """Over many paths every node fetches about its share."""
        parts = _hash_parts(8000)
        counts = {n: 0 for n in NODES}
        for hash_part in parts:
            counts[fetcher_order(hash_part, NODES)[0]] += 1
        share = len(parts) / len(NODES)
        for node, count in counts.items():
            self.assertTrue(0.8 * share < count < 1.2 * share, (node, count))

    def test_leaving_moves_only_its_share(self) -> None:
        """A node leaving moves only the paths it fetched; every other path keeps its fetcher."""
        parts = _hash_parts(4000)
        before = {h: fetcher_order(h, NODES)[0] for h in parts}
        gone = NODES[3]
        rest = [n for n in NODES if n != gone]
        after = {h: fetcher_order(h, rest)[0] for h in parts}
        moved = [h for h in parts if before[h] != after[h]]
        self.assertEqual(set(moved), {h for h in parts if before[h] == gone})
        self.assertTrue(0.8 / len(NODES) < len(moved) / len(parts) < 1.2 / len(NODES))
        # The paths it fetched go to their old second choice: fallback order agrees.
        for h in moved:
            self.assertEqual(after[h], fetcher_order(h, NODES)[1])

    def test_joining_takes_only_its_share(self) -> None:
        """A node joining takes about 1/(n+1) of the paths, from everyone, and moves nothing else."""
        parts = _hash_parts(4000)
        before = {h: fetcher_order(h, NODES)[0] for h in parts}
        newcomer = "feedfacecafebeef"
        after = {h: fetcher_order(h, NODES + [newcomer])[0] for h in parts}
        moved = [h for h in parts if before[h] != after[h]]
        self.assertTrue(all(after[h] == newcomer for h in moved))
        share = 1 / (len(NODES) + 1)
        self.assertTrue(0.8 * share < len(moved) / len(parts) < 1.2 * share)

    def test_fallback_order_stable(self) -> None:
        """Removing the fetcher leaves the rest of the order as it was."""
        for hash_part in _hash_parts(100):
            order = fetcher_order(hash_part, NODES)
            self.assertEqual(fetcher_order(hash_part, order[1:]), order[1:])


class FetcherTableTests(SynchronousTestCase):
    def test_only_announcing_peers(self) -> None:
        """Only healthy peers that announced fetch_for_lan with a node id are fetchers, plus this node."""
        from peernix.upstream.rendezvous import SELF, FetcherTable

        table = FetcherTable("me", True)
        table.note("http://a:9999", "id-a", True)
        table.note("http://b:9999", "id-b", False)
        table.note("http://c:9999", None, True)
        table.note("http://d:9999", "id-d", True)
        healthy = ["http://a:9999", "http://b:9999", "http://c:9999", "http://go:9999"]
        for h in _hash_parts(20):
            order = table.order(h, healthy)
            self.assertEqual(sorted(order), sorted([SELF, "http://a:9999"]))
            self.assertEqual(order, [{"me": SELF, "id-a": "http://a:9999"}[k]
                                     for k in fetcher_order(h, ["me", "id-a"])])

    def test_not_fetching_self(self) -> None:
        """A node with --fetch-for-lan no is never in its own order."""
        from peernix.upstream.rendezvous import SELF, FetcherTable

        table = FetcherTable("me", False)
        table.note("http://a:9999", "id-a", True)
        self.assertEqual(table.order(_hash_parts(1)[0], ["http://a:9999"]), ["http://a:9999"])
        self.assertNotIn(SELF, table.order(_hash_parts(1)[0], []))

    def test_same_order_on_every_node(self) -> None:
        """Nodes that see each other compute the same fetcher for every path."""
        from peernix.upstream.rendezvous import SELF, FetcherTable

        ids = {"http://n1:9999": "id1", "http://n2:9999": "id2", "http://n3:9999": "id3"}
        tables = {}
        for url, node_id in ids.items():
            table = FetcherTable(node_id, True)
            for other, other_id in ids.items():
                if other != url:
                    table.note(other, other_id, True)
            tables[url] = table
        for h in _hash_parts(200):
            firsts = set()
            for url, table in tables.items():
                first = table.order(h, [u for u in ids if u != url])[0]
                firsts.add(url if first == SELF else first)
            self.assertEqual(len(firsts), 1)

    def test_withdrawn_and_bounded(self) -> None:
        """A later announce without fetching withdraws the offer; the table is bounded."""
        from peernix.upstream.rendezvous import FetcherTable

        table = FetcherTable("me", True, max_entries=2)
        table.note("http://a:9999", "id-a", True)
        table.note("http://a:9999", "id-a", False)
        self.assertFalse(table.offers("http://a:9999"))
        table.note("http://b:9999", "id-b", True)
        table.note("http://c:9999", "id-c", True)
        self.assertFalse(table.offers("http://a:9999"))
        self.assertTrue(table.offers("http://b:9999") and table.offers("http://c:9999"))
