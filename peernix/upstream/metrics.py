"""The ``peernix_upstream_*`` metrics: fetching from upstreams for the LAN."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge


class UpstreamMetrics:
    """
    :param registry: where to register (the service's one registry); a
        private one when ``None``.
    :param staging_bytes: read at scrape time: bytes in the staging area.
    :param staged_nars: read at scrape time: verified NARs staged.
    :param active_fetches: read at scrape time: NARs being fetched now.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        staging_bytes: Callable[[], int] | None = None,
        staged_nars: Callable[[], int] | None = None,
        active_fetches: Callable[[], int] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.fetched_bytes = Counter(
            "peernix_upstream_fetched_bytes",
            "Bytes received from upstream caches (as they send them, compressed)",
            registry=self.registry,
        )
        self.peer_bytes = Counter(
            "peernix_upstream_from_fetcher_bytes",
            "NAR bytes received from peers fetching for the LAN",
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "peernix_upstream_served_bytes",
            "NAR bytes served from the staging area, to peers and to local clients",
            ["to"],
            registry=self.registry,
        )
        for to in ("peer", "local"):
            self.served_bytes.labels(to)
        self.downloads = Counter(
            "peernix_upstream_downloads",
            "NAR downloads into the staging area, by source and result",
            ["source", "result"],
            registry=self.registry,
        )
        # With peernix_upstream_downloads_total: requests served per download.
        self.download_requests = Counter(
            "peernix_upstream_download_requests",
            "Requests (local clients and peers) that NAR downloads served while they ran",
            ["source"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "peernix_upstream_fetcher_fallbacks",
            "Times a fetcher failed (unreachable, silent, broke off) and the next one was asked",
            registry=self.registry,
        )
        self.verification_failures = Counter(
            "peernix_upstream_verification_failures",
            "NARs fetched for the LAN that failed FileSize/FileHash/NarSize/NarHash checks",
            registry=self.registry,
        )
        self.narinfo_requests = Counter(
            "peernix_upstream_narinfo_requests",
            "Narinfo lookups sent to upstreams, by result",
            ["result"],
            registry=self.registry,
        )
        self.staging_bytes = Gauge("peernix_upstream_staging_bytes", "Bytes in the staging area",
                                   registry=self.registry)
        self.staged_nars = Gauge("peernix_upstream_staged_nars", "Verified NARs in the staging area",
                                 registry=self.registry)
        self.active = Gauge("peernix_upstream_active_fetches", "NARs being fetched into the staging area now",
                            registry=self.registry)
        if staging_bytes is not None:
            self.staging_bytes.set_function(lambda: float(staging_bytes()))
        if staged_nars is not None:
            self.staged_nars.set_function(lambda: float(staged_nars()))
        if active_fetches is not None:
            self.active.set_function(lambda: float(active_fetches()))
