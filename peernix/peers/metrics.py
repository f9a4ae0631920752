"""
Prometheus metrics of the peer side, on an injected ``CollectorRegistry``
(never the process-global one, so tests and several instances never clash).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class PeerMetrics:
    """
    The peer-side metrics.

    :param registry: where to register; a private registry when ``None``.
    :param peer_count: returns the number of known peers, read at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None, peer_count: Callable[[], int] | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.peer_requests = Counter(
            "peernix_peer_requests",
            "Narinfo requests sent to peers, by result",
            ["result"],
            registry=self.registry,
        )
        self.fanout_seconds = Histogram(
            "peernix_fanout_seconds",
            "Duration of narinfo fan-outs to peers",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0),
            registry=self.registry,
        )
        self.peer_hits = Counter(
            "peernix_peer_hits", "Lookups answered by a trusted peer narinfo", registry=self.registry
        )
        self.fanout_misses = Counter(
            "peernix_fanout_misses", "Lookups no peer answered with a trusted narinfo", registry=self.registry
        )
        self.proxied_bytes = Counter(
            "peernix_proxied_bytes", "NAR bytes received from peers and relayed", registry=self.registry
        )
        self.verification_failures = Counter(
            "peernix_verification_failures",
            "Peer NARs that failed NarHash/NarSize verification",
            registry=self.registry,
        )
        self.nar_prefetches = Counter(
            "peernix_nar_prefetches",
            "Small NARs fetched from peers right after their narinfo, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.peers = Gauge("peernix_peers", "Known peers", registry=self.registry)
        if peer_count is not None:
            self.peers.set_function(lambda: float(peer_count()))
