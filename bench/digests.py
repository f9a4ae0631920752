"""
Store digests at N nodes: real peernix daemons in network namespaces (one
bridge, broadcast discovery, ``--share all``), each with its own paths
(``nix-store --add``), exchanging digests (see
:mod:`peernix.test.digestnet`).  From the daemons' own counters: narinfo
requests (and UDP queries) all other nodes received per local miss and per
local hit of node 1's local client; node 1's miss latency as its local
client sees it; digest size and memory per node.

Needs root and ``ip`` (network namespaces); otherwise the rows are not
measured.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from peernix.nix import nix32
from peernix.test.digestnet import DigestCluster, hash_part
from peernix.test.netns import netns_unavailable
from peernix.test.nixenv import remove_tree


class Unavailable(Exception):
    """Network namespaces cannot be made here."""


def _sum(metrics: dict[str, dict[str, float] | None], bases: list[str], key: str) -> float:
    total = 0.0
    for base in bases:
        values = metrics.get(base)
        if values is None:
            raise RuntimeError(f"{base} did not answer /metrics")
        total += values[key]
    return total


def measure(nodes: int, paths: int, misses: int, hits: int, repetitions: int, workdir: str,
            log: Callable[[str], None]) -> list[dict[str, float]]:
    """
    Start ``nodes`` daemons with ``paths`` paths each, wait until they hold
    each other's digests, then, ``repetitions`` times, ask node 1's daemon
    (as its local Nix would) for ``misses`` hash parts nobody has and
    ``hits`` paths one other node has (new ones each time; fewer when the
    other nodes do not have that many paths for every repetition).

    :returns: per repetition, the figures: ``miss_requests``, ``miss_udp``,
        ``hit_requests``, ``hit_udp`` (per lookup, received by all other
        nodes), miss latency ``miss_p50_ms``/``miss_p99_ms``, ``hit_p50_ms``,
        ``digest_bytes`` and ``digest_paths`` (node 1's),
        ``rss_mb_max``/``rss_mb_mean`` and ``converge_s`` (start-up to
        digests exchanged).
    :raises Unavailable: without network namespaces.
    """
    why = netns_unavailable()
    if why is not None:
        raise Unavailable(why)
    tmp = tempfile.mkdtemp(prefix=f"digests-{nodes}-", dir=workdir)
    log(f"digests: {nodes} nodes x {paths} paths, building stores")
    cluster = DigestCluster(tmp, nodes, paths, letter=f"b{nodes}")
    try:
        converge = cluster.wait_converged(timeout=120 + 5 * nodes)
        log(f"digests: {nodes} nodes exchanged digests {converge:.1f}s after their start")
        others = cluster.bases[1:]
        rng = random.Random(nodes)
        # Warm node 1's connections to its peers (first requests pay the connects).
        warm = [hash_part(cluster.paths[1 + i % (nodes - 1)][i % paths]) for i in range(nodes - 1)]
        cluster.lookups(0, warm)
        # Every hit a path asked for the first time (node 1 caches what it
        # found), each on a random other node: a shuffled pool of them all.
        pool = [hash_part(p) for node_paths in cluster.paths[1:] for p in node_paths]
        pool = [h for h in pool if h not in set(warm)]
        rng.shuffle(pool)
        per_repetition = min(hits, len(pool) // repetitions)
        results = []
        for rep in range(repetitions):
            log(f"digests: {nodes} nodes, {misses} misses and {per_repetition} hits (repetition {rep + 1})")
            before = cluster.metrics()
            miss_hashes = [nix32.encode(rng.randbytes(20)) for _ in range(misses)]
            miss_results = cluster.lookups(0, miss_hashes)
            middle = cluster.metrics()
            hit_hashes = pool[rep * per_repetition:(rep + 1) * per_repetition]
            hit_results = cluster.lookups(0, hit_hashes)
            after = cluster.metrics()
            bad = [c for c, _ in miss_results if c != 404] + [c for c, _ in hit_results if c != 200]
            if bad:
                raise RuntimeError(f"unexpected answers {sorted(set(bad))}:{cluster.logs()[-3000:]}")
            own = cluster.status()[cluster.base(0)]["own"]
            rss = cluster.rss_bytes()
            miss_lat = sorted(s for _, s in miss_results)
            hit_lat = sorted(s for _, s in hit_results)
            results.append({
                "miss_requests": (_sum(middle, others, "narinfo") - _sum(before, others, "narinfo")) / misses,
                "miss_udp": (_sum(middle, others, "udp_queries") - _sum(before, others, "udp_queries")) / misses,
                "hit_requests": (_sum(after, others, "narinfo") - _sum(middle, others, "narinfo")) / len(hit_hashes),
                "hit_udp": (_sum(after, others, "udp_queries") - _sum(middle, others, "udp_queries")) / len(hit_hashes),
                "hits": float(len(hit_hashes)),
                "misses": float(misses),
                "miss_p50_ms": 1000 * statistics.median(miss_lat),
                "miss_p99_ms": 1000 * miss_lat[min(len(miss_lat) - 1, int(0.99 * len(miss_lat)))],
                "hit_p50_ms": 1000 * statistics.median(hit_lat),
                "digest_bytes": float(own["size_bytes"]),
                "digest_paths": float(own["paths"]),
                "rss_mb_max": max(rss) / 1e6,
                "rss_mb_mean": statistics.mean(rss) / 1e6,
                "converge_s": converge,
            })
        return results
    finally:
        cluster.destroy()
        remove_tree(tmp)
