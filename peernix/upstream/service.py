"""
Assembling fetching for the LAN (called by :func:`peernix.service.build_service`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from peernix.interfaces import IPeerRegistry
from peernix.nix.signing import PublicKey
from peernix.options import Config
from peernix.peers.trust import TrustPolicy
from peernix.upstream.client import UpstreamClient
from peernix.upstream.config import choose_upstreams
from peernix.upstream.fetch import LanFetcher, make_share_filter
from peernix.upstream.metrics import UpstreamMetrics
from peernix.upstream.rendezvous import FetcherTable
from peernix.upstream.staging import Staging

_log = Logger()

#: Seconds between sweeps of idle staged NARs.
SWEEP_INTERVAL = 60.0

#: Seconds between looks for peers that announce nothing (static peers).
ASK_INTERVAL = 5.0


class LanFetchService(Service):
    """
    Runs the staging area's idle sweep while running; on stop, cancels the
    downloads under way (their readers' connections are aborted).
    """

    name = "lan-fetch"

    def __init__(self, fetcher: LanFetcher, clock: IReactorTime, sweep_interval: float = SWEEP_INTERVAL) -> None:
        self.fetcher = fetcher
        self._clock = clock
        self._interval = sweep_interval
        self._loop: LoopingCall | None = None
        self._ask: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.fetcher.staging.sweep)
        self._loop.clock = self._clock
        # Stopped by stopService.
        self._loop.start(self._interval, now=False)
        # Static peers announce nothing: ask them who they are (each at
        # most once a minute; the loop itself is cheap).  Stopped by
        # stopService.
        self._ask = LoopingCall(self.fetcher.ask_silent_peers)
        self._ask.clock = self._clock
        self._ask.start(ASK_INTERVAL, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        for loop in (self._loop, self._ask):
            if loop is not None and loop.running:
                loop.stop()
        self._loop = self._ask = None
        self.fetcher.stop()
        self.fetcher.staging.close()
        return None


def make_lan_fetcher(
    config: Config,
    clock: IReactorTime,
    *,
    agent: IAgent,
    registry: IPeerRegistry | None,
    node_id: str,
    trusted_keys: Sequence[PublicKey],
    share_keys: Sequence[PublicKey],
    metrics_registry: CollectorRegistry,
    read_substituters: Callable[[], Sequence[str]],
    own_addresses: Callable[[], Sequence[str]],
) -> LanFetcher | None:
    """
    :returns: the coordinator of fetching for the LAN, or ``None`` when it
        is off: no usable upstream (``--upstream none``, or none of the
        local Nix's substituters is an http(s) cache other than this
        daemon), or a staging directory that cannot be used (logged with
        what to do; the daemon still starts and serves).

    Blocking: may read nix.conf and creates/empties the staging directory.

    :param agent: the HTTP agent over the peers' connection pool.
    :param trusted_keys: the trust filter of upstream narinfos (the same
        as for peers').
    :param share_keys: whose signatures make a staged NAR shareable under
        ``--share trusted`` (the trusted keys and this node's own).
    :param read_substituters: reads the local Nix's substituters.
    :param own_addresses: this machine's addresses.
    """
    upstreams = choose_upstreams(config.upstream, read_substituters, config.port, own_addresses())
    if not upstreams:
        _log.info("Fetching for the LAN is off: no upstream cache (--upstream)")
        return None
    staging = Staging(config.staging_dir, config.staging_max_size, clock)
    try:
        staging.start()
    except OSError as e:
        _log.warn(
            "Fetching for the LAN is off: cannot use the staging directory {directory} ({error});"
            " give a writable one with --staging-dir",
            directory=config.staging_dir, error=e.strerror or str(e),
        )
        return None
    fetcher: LanFetcher | None = None

    def active() -> int:
        return len(fetcher.active) if fetcher is not None else 0

    metrics = UpstreamMetrics(
        metrics_registry,
        staging_bytes=lambda: staging.usage,
        staged_nars=lambda: staging.complete_count,
        active_fetches=active,
    )
    fetcher = LanFetcher(
        upstreams=upstreams,
        client=UpstreamClient(agent, clock, TrustPolicy(trusted_keys)),
        staging=staging,
        table=FetcherTable(node_id, config.fetch_for_lan),
        registry=registry,
        clock=clock,
        metrics=metrics,
        shares=make_share_filter(config.share, share_keys),
    )
    _log.info(
        "Fetching for the LAN from {upstreams}; this node {offers} fetch for others;"
        " staging in {directory} (at most {max_size} bytes)",
        upstreams=", ".join(upstreams),
        offers="does" if config.fetch_for_lan else "does not (--fetch-for-lan no)",
        directory=config.staging_dir,
        max_size=config.staging_max_size,
    )
    return fetcher
