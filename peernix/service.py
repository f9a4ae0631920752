"""
The one place where peernix's objects are assembled.

:func:`build_service` turns a :class:`~peernix.options.Config` and a reactor
into one ``MultiService``, in a plain sequence of ``make_...`` steps; each
step takes what earlier steps made.  Collaborators can be passed in (tests
pass fakes), everything else is built here.  Children start in the order
they are added and stop in reverse: the store and thread pool are up before
the first request can arrive, and the listener is closed before they stop.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any, Literal

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource
from twisted.web.http import Request, combinedLogFormatter
from twisted.web.server import Site

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

import peernix

from peernix.discovery.addresses import host_addresses
from peernix.discovery.nodeinfo import NodeInfo, detect_node_info
from peernix.discovery.signed import AnnounceKeys
from peernix.discovery.static import StaticPeersService
from peernix.discovery.digesttag import DigestHooks
from peernix.discovery.udp import UdpDiscoveryService
from peernix.memory import IdleTrimmer
from peernix.interfaces import IPeerRegistry, IStore, IStoreScanner, IUpstream
from peernix.nix.signing import PublicKey, SecretKey, load_secret_key_file, parse_public_key
from peernix.options import Config
from peernix.peers import prefetch
from peernix.peers.client import PeerClient
from peernix.peers.digests import PeerDigests
from peernix.peers.fanout import Fanout
from peernix.peers.health import HealthChecker
from peernix.peers.linkspeed import LinkSpeeds
from peernix.peers.registry import PeerRegistry
from peernix.peers.trust import TrustPolicy, read_nix_substituters, read_nix_trusted_keys
from peernix.store.digest import DigestPublisher
from peernix.store.local import LocalStore
from peernix.store.share import SharedStore, make_share_policy
from peernix.tcp import LargeReadReactor
from peernix.upstream.chain import FirstOf
from peernix.upstream.fetch import LanFetcher, StagedFirst
from peernix.upstream.service import LanFetchService, make_lan_fetcher
from peernix.upstream.tls import UpstreamEndpointFactory
from peernix.web.app import WebApp
from peernix.web.digest import DigestResource
from peernix.web.limits import (
    HEADER_TIMEOUT,
    ConnectionLimiter,
    ConnectionLimits,
    LimitedHTTPChannel,
    RefusalProtocol,
    ensure_file_limit,
)
from peernix.web.metrics import Metrics
from peernix.web.ratelimit import UploadLimiter
from peernix.web.savings import Savings, SavingsService, SavingsStateFile
from peernix.sources import SOURCE_HEADER
from peernix.web.streaming import DeferToThread, call_directly, thread_pool_runner
from peernix.web.transport import TurnFlushTCPEndpoint

__all__ = [
    "ListenError",
    "PeernixService",
    "build_service",
    "probe_ip_stack",
]

_log = Logger()

#: Close an HTTP connection idle (no request or no progress) this long.
REQUEST_IDLE_TIMEOUT = 60.0

#: Worker threads for CPU-heavy work (hashing, compression): the machines
#: peernix runs on are often small, and the reactor needs a core too.
CPU_THREADS = 2

#: How this machine's kernel does IPv6, for the default "all addresses":
#: ``"dual"``: one socket on ``::`` also takes IPv4; ``"separate"``: IPv6
#: sockets are IPv6-only by default (``net.ipv6.bindv6only=1``), so listen on
#: ``::`` and ``0.0.0.0``; ``"ipv4"``: no IPv6 at all.
IPStack = Literal["dual", "separate", "ipv4"]

#: A reactor providing ``IReactorTCP``, ``IReactorTime`` and
#: ``IReactorFromThreads``: the real one; tests pass a ``MemoryReactorClock``
#: with an injected store.
Reactor = Any


class ListenError(Exception):
    """The HTTP port could not be opened; the message says why and what to do."""


def probe_ip_stack() -> IPStack:
    """
    Find out how this kernel does IPv6 (blocking but instant: one socket,
    no traffic).

    :returns: see :data:`IPStack`.
    """
    if not socket.has_ipv6:
        return "ipv4"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            v6only = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:
        # EAFNOSUPPORT: IPv6 disabled in the kernel (ipv6.disable=1).
        return "ipv4"
    return "separate" if v6only else "dual"


# --------------------------------------------------------------------------
# Small services around things with a start/stop life cycle.


class LocalStoreService(Service):
    """Starts and stops a :class:`LocalStore`'s worker threads."""

    name = "store"

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> Deferred[None] | None:
        # Blocks briefly: waits for running lookups to finish.
        self.store.stop()
        return super().stopService()  # type: ignore[no-any-return]


class ThreadPoolService(Service):
    """Starts and stops a ``ThreadPool``."""

    def __init__(self, pool: ThreadPool, name: str) -> None:
        self.pool = pool
        self.setName(name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None] | None:
        # ThreadPool.stop joins its threads: queued work finishes first.
        self.pool.stop()
        return super().stopService()  # type: ignore[no-any-return]


class ListenerService(Service):
    """
    Listens on one stream endpoint while running, and logs where.

    Listening happens in :meth:`privilegedStartService` (before twistd drops
    privileges, so ports below 1024 work) or, when nothing called that (as
    under ``twist``), in :meth:`startService`.

    :ivar port: the listening port while running, else ``None``.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: Site,
        description: str,
        on_listening: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        """
        :param description: where it listens, for messages (``"[::]:9999"``).
        :param on_listening: called with the port once listening.
        """
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.on_listening = on_listening
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        """
        Start listening.

        :raises ListenError: when the endpoint fails right away (a TCP port
            in use, an address not on this machine).
        """
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Start listening unless :meth:`privilegedStartService` did; see there."""
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self.endpoint.listen(self.factory)
        outcome: list[IListeningPort | Failure] = []
        self._listening.addBoth(outcome.append)
        if outcome:
            result = outcome[0]
            if isinstance(result, Failure):
                self._listening = None
                raise ListenError(self._explain(result))
            self._listened(result)
        else:
            # An endpoint that answers later (not TCP): report its outcome
            # when it comes; stopService cancels it if it never does.
            self._listening.addCallbacks(self._listened, self._failed)

    def _explain(self, failure: Failure) -> str:
        error = failure.value
        reason = str(getattr(error, "socketError", None) or error)
        hint = "choose another --port, or stop the program using it"
        if "in use" not in reason:
            hint = "check --port and --interface"
        return f"cannot listen on {self.description}: {reason} ({hint})"

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.on_listening is not None:
            self.on_listening(port)
        return port

    def _failed(self, failure: Failure) -> None:
        _log.failure("peernix: {message}", failure, message=self._explain(failure))

    def stopService(self) -> Deferred[None] | None:
        """:returns: a Deferred firing once the port is closed."""
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None


class PeerClientService(Service):
    """
    Owns the peer side's network resources: on stop, cancels the fan-outs in
    flight and closes the persistent HTTP connections to peers.
    """

    name = "peer-client"

    def __init__(self, pool: HTTPConnectionPool, fanout: Fanout) -> None:
        self.pool = pool
        self.fanout = fanout

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.fanout.close()
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


class DigestService(Service):
    """
    Keeps this node's store digest up to date and peers' digests fetched
    (either may be ``None``); stops both on stop.
    """

    name = "digests"

    def __init__(self, publisher: DigestPublisher | None, peer_digests: PeerDigests | None) -> None:
        self.publisher = publisher
        self.peer_digests = peer_digests

    def startService(self) -> None:
        super().startService()
        if self.publisher is not None:
            self.publisher.start()
        if self.peer_digests is not None:
            self.peer_digests.start()

    def stopService(self) -> Deferred[None] | None:
        if self.publisher is not None:
            self.publisher.stop()
        if self.peer_digests is not None:
            self.peer_digests.stop()
        return super().stopService()  # type: ignore[no-any-return]


class PeernixSite(Site):
    """
    The HTTP server: a ``Site`` with an idle timeout on the injected reactor,
    quiet unless ``access_log`` is on, and the bounds of
    :mod:`peernix.web.limits`: a header timeout and size limits on every
    request (:class:`LimitedHTTPChannel`), connection caps for peers (a
    refused peer gets ``503`` with ``Retry-After``), none for local clients.

    :ivar limiter: the connection counts.
    """

    noisy = False
    # Plain HTTP/1.1 channels: without TLS there is no HTTP/2 to negotiate,
    # so twisted's negotiating proxy around the channel would only add a hop.
    protocol = LimitedHTTPChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, *, reactor: Reactor, access_log: bool = False,
                 timeout: float = REQUEST_IDLE_TIMEOUT, header_timeout: float | None = HEADER_TIMEOUT,
                 limits: ConnectionLimits = ConnectionLimits(),
                 metrics_registry: CollectorRegistry | None = None) -> None:
        """
        :param timeout: the idle timeout, seconds (see ``twisted.web``'s ``timeOut``).
        :param header_timeout: seconds a request has to arrive whole (see
            :class:`LimitedHTTPChannel`); ``None``: no limit.
        :param limits: the connection caps; ``limits.exempt`` are the local
            clients (``--proxy-client``).
        :param metrics_registry: where the connection metrics go (a private
            registry when ``None``).
        """
        super().__init__(resource, timeout=timeout, reactor=reactor, logFormatter=access_log_line)
        self.access_log = access_log
        self.header_timeout = header_timeout
        self.limiter = ConnectionLimiter(limits, metrics_registry=metrics_registry)

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        """
        :returns: an HTTP channel for an admitted connection; a
            :class:`RefusalProtocol` (503) for a peer over a cap; ``None``
            (the connection is closed at once) when too many refusals are in
            progress already.
        """
        admitted = self.limiter.admit(addr)
        if isinstance(admitted, str):
            if not self.limiter.start_refusal(admitted):
                return None
            refusal = RefusalProtocol(self.limiter.limits.retry_after, self.reactor,
                                      on_lost=self.limiter.end_refusal)
            refusal.factory = self
            return refusal
        try:
            channel = super().buildProtocol(addr)
        except BaseException:
            self.limiter.release(admitted)
            raise
        assert isinstance(channel, LimitedHTTPChannel)
        channel.header_timeout = self.header_timeout
        channel.clock = self.reactor
        channel.limiter = self.limiter
        # Called once, when the connection closes.
        channel.on_lost = functools.partial(self.limiter.release, admitted)
        return channel

    def log(self, request: Request) -> None:
        """Write an access log line, only when access logging is on."""
        if self.access_log:
            super().log(request)


def access_log_line(timestamp: str, request: Request) -> str:
    """
    The access log's line format: the combined log format, then where the
    answer came from (``X-Peernix-Source``: ``local``, ``peer URL``, ...;
    ``-`` for answers without a source, such as misses).
    """
    line = combinedLogFormatter(timestamp, request)
    source = request.responseHeaders.getRawHeaders(SOURCE_HEADER)
    shown = source[0].decode("ascii", "replace").replace('"', "'") if source else "-"
    return f'{line} source="{shown}"'


class PeernixService(MultiService):
    """
    The daemon: the ``MultiService`` :func:`build_service` returns, with
    handles on the parts it assembled (for tests and later wiring steps).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.store: IStore | None = None
        self.metrics: Metrics | None = None
        self.secret_key: SecretKey | None = None
        self.app: WebApp | None = None
        self.site: PeernixSite | None = None
        self.listeners: list[ListenerService] = []
        self.registry: IPeerRegistry | None = None
        self.upstream: IUpstream | None = None
        self.node: NodeInfo | None = None
        #: What peers see of :attr:`store` (``--share``).
        self.peer_store: SharedStore | None = None
        #: What the LAN saves this node (kept under ``--state-dir``).
        self.savings: Savings | None = None
        #: ``--max-upload-rate``'s bucket; ``None``: unlimited.
        self.upload_limiter: UploadLimiter | None = None
        #: This node's store digest (``None`` with ``--no-digest`` or a
        #: store that cannot be scanned).
        self.digest: DigestPublisher | None = None
        #: Peers' digests (``None`` with ``--no-digest`` or no peer side).
        self.peer_digests: PeerDigests | None = None
        #: UDP discovery, once made.
        self.udp: UdpDiscoveryService | None = None
        #: The HTTP agent over the peers' connection pool (``None`` without a peer side).
        self.http_agent: Agent | None = None
        #: The peers' persistent connection pool (``None`` without a peer side).
        self.http_pool: HTTPConnectionPool | None = None
        #: Fetching for the LAN (``None`` when off).
        self.lan_fetcher: LanFetcher | None = None


# --------------------------------------------------------------------------
# The steps.


def make_store(config: Config, reactor: Reactor, parent: MultiService) -> LocalStore:
    """
    Open the local store, checking it now so a wrong ``--store-root`` stops
    start-up with a clear message.

    :raises peernix.store.local.StoreError: the store is missing or unreadable.
    """
    store = LocalStore(config.store_root, reactor, revalidate=True)
    store.check()
    LocalStoreService(store).setServiceParent(parent)
    return store


def make_cpu_pool(reactor: Reactor, parent: MultiService) -> DeferToThread:
    """
    Make the thread pool for CPU-heavy work (NAR serialisation, hashing,
    compression), started and stopped by a child service.

    :returns: ``defer_to_thread(f)``, running ``f`` on that pool and firing
        with its result on the reactor thread.
    """
    pool = ThreadPool(minthreads=0, maxthreads=CPU_THREADS, name="peernix-cpu")
    ThreadPoolService(pool, "cpu-threads").setServiceParent(parent)
    return thread_pool_runner(reactor, pool)


def load_secret_key(config: Config) -> SecretKey | None:
    """
    :returns: the key of ``--secret-key-file``, or ``None`` without one.
    :raises peernix.nix.signing.KeyFormatError: the file is missing,
        unreadable or not a Nix secret key.
    """
    if config.secret_key_file is None:
        return None
    return load_secret_key_file(config.secret_key_file)


#: The key name every zw3rk/peernix node signs with by default.  Nix keeps
#: one trusted key per name, so two machines sharing it cannot both be trusted.
SHARED_KEY_NAME = "peernix-1"


def warn_about_key_name(key: SecretKey | None) -> None:
    """
    Log a warning when ``key`` is named :data:`SHARED_KEY_NAME`: Nix's
    ``trusted-public-keys`` holds one key per name (the first one wins), so
    on a LAN where several machines use that name, clients trust only one of
    them and silently reject the others' signatures.  The warning names the
    key, never its material.
    """
    if key is not None and key.name == SHARED_KEY_NAME:
        _log.warn(
            "The signing key is named {key_name!r}, the shared default of zw3rk/peernix."
            " Nix trusts only one key per name, so other machines' keys with this name"
            " are ignored; make a key with a name unique to this host:"
            " nix-store --generate-binary-cache-key \"$(hostname)-peernix-1\" SECRET PUBLIC",
            key_name=key.name,
            public_key=key.public_key.to_string(),
        )


def trusted_keys(config: Config) -> list[PublicKey]:
    """
    :returns: the keys a peer's narinfo must be signed by:
        ``--trusted-public-key`` when given, else the local Nix's
        ``trusted-public-keys`` (``$NIX_CONF_DIR/nix.conf``).
    :raises peernix.nix.signing.KeyFormatError: a configured key is malformed.
    :raises peernix.peers.trust.NixConfError: nix.conf cannot be read.
    """
    if config.trusted_public_keys is not None:
        return [parse_public_key(k) for k in config.trusted_public_keys]
    return read_nix_trusted_keys()


def make_peers(config: Config, reactor: Reactor, metrics: Metrics,
               parent: PeernixService) -> tuple[PeerRegistry, Fanout]:
    """
    Make the peer side: the registry discovery feeds, one persistent
    connection pool for every peer request, the trusted fan-out (the web
    layer's upstream) and the health checker.

    Blocking: reads nix.conf for the default trusted keys.
    """
    registry = PeerRegistry(reactor, ttl=config.peer_ttl)
    pool = HTTPConnectionPool(reactor, persistent=True)
    # Nix runs up to 16 substitutions at once, each a narinfo then a NAR.
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = 120
    # Connections to peers read up to 1 MiB a turn (see peernix.tcp).
    agent = Agent(LargeReadReactor(reactor), pool=pool, connectTimeout=config.peer_timeout)
    parent.http_agent = agent
    parent.http_pool = pool
    client = PeerClient(HTTPClient(agent), reactor, timeout=config.peer_timeout, agent=agent)
    if config.digest:
        parent.peer_digests = PeerDigests(
            registry, client, reactor, interval=config.digest_interval, fp_rate=config.digest_fp_rate,
            metrics_registry=metrics.registry,
        )
    fanout = Fanout(
        registry,
        client,
        TrustPolicy(trusted_keys(config)),
        reactor,
        negative_ttl=config.negative_ttl,
        lookup_timeout=max(config.peer_timeout * 1.5, config.peer_timeout + 0.5),
        metrics_registry=metrics.registry,
        digests=parent.peer_digests,
        link_speeds=LinkSpeeds(reactor),
        nar_prefetch_max=prefetch.MAX_SIZE,
    )
    PeerClientService(pool, fanout).setServiceParent(parent)
    HealthChecker(registry, client, reactor).setServiceParent(parent)
    return registry, fanout


def make_discovery(config: Config, reactor: Reactor, registry: IPeerRegistry, store: IStore,
                   node: NodeInfo, metrics: Metrics, parent: PeernixService,
                   on_fetch_offer: Callable[[str, str | None, bool], None] | None = None) -> None:
    """
    Add the ways of finding peers: the static list, UDP (always listening,
    to answer announcements and ``has_path`` queries; broadcasting unless
    ``--no-broadcast``), mDNS (unless ``--no-mdns``), DNS-SD and the
    tailnet (see :func:`make_wide_area_discovery`).  They start after
    the HTTP listener, so a node announces itself only once it can serve.

    :param on_fetch_offer: told which peers announce fetching for the LAN.
    """
    StaticPeersService(registry, list(config.peers)).setServiceParent(parent)
    digest_hooks = None
    if parent.digest is not None or parent.peer_digests is not None:
        publisher, peer_digests = parent.digest, parent.peer_digests
        digest_hooks = DigestHooks(
            tag=(lambda: publisher.tag) if publisher is not None else (lambda: None),
            announced=peer_digests.announced if peer_digests is not None else (lambda url, tag: None),
        )
    udp = parent.udp = UdpDiscoveryService(
        udp=reactor,
        clock=reactor,
        registry=registry,
        store=store,
        node=node,
        http_port=config.port,
        udp_port=config.effective_udp_port,
        broadcast=config.broadcast,
        announce_interval=config.announce_interval,
        metrics=metrics.registry,
        # Sign our announces; verify others' against the fan-out's trusted keys.
        keys=AnnounceKeys(parent.secret_key, trusted_keys(config)),
        digest=digest_hooks,
        on_fetch_offer=on_fetch_offer,
    )
    udp.setServiceParent(parent)
    if parent.digest is not None:
        # A changed digest is announced at once (at most once a second), so
        # peers learn of a new path within seconds, not an announce interval.
        parent.digest.subscribe(udp.announce_soon)
    if config.mdns:
        # Imported here: zeroconf costs about 3 MB of memory, paid only
        # when mDNS is on.
        from peernix.discovery.mdns import MdnsDiscoveryService, make_zeroconf

        # zeroconf's blocking calls (construction, resolving, close) run on
        # a small pool of their own, so they never wait behind NAR work.
        pool = ThreadPool(minthreads=0, maxthreads=2, name="peernix-mdns")
        ThreadPoolService(pool, "mdns-threads").setServiceParent(parent)
        mdns = MdnsDiscoveryService(
            registry=registry,
            node=node,
            http_port=config.port,
            clock=reactor,
            zeroconf_factory=make_zeroconf,
            defer_to_thread=thread_pool_runner(reactor, pool),
            call_from_thread=reactor.callFromThread,
            digest=digest_hooks,
            on_fetch_offer=on_fetch_offer,
        )
        mdns.setServiceParent(parent)
        if parent.digest is not None:
            parent.digest.subscribe(mdns.digest_changed)
    make_wide_area_discovery(config, reactor, registry, node, parent)


def make_wide_area_discovery(config: Config, reactor: Reactor, registry: IPeerRegistry,
                             node: NodeInfo, parent: PeernixService) -> None:
    """
    Add the ways of finding peers beyond the broadcast domain: unicast
    DNS-SD in the ``--dns-sd`` domains (:mod:`peernix.discovery.dnssd`,
    asking the nameservers of ``/etc/resolv.conf``) and the peers of this
    machine's tailnet with ``--tailscale``
    (:mod:`peernix.discovery.tailscale`).
    """
    if config.dns_sd:
        from peernix.discovery.dnssd import DnsSdDiscoveryService, system_resolver

        DnsSdDiscoveryService(
            registry,
            config.dns_sd,
            config.port,
            reactor,
            functools.partial(system_resolver, reactor),
            node_id=node.node_id,
            interval=config.dns_sd_interval,
        ).setServiceParent(parent)
    if config.tailscale:
        from peernix.discovery.tailscale import TailscaleDiscoveryService, run_command

        TailscaleDiscoveryService(
            registry,
            config.port,
            reactor,
            functools.partial(run_command, reactor),
            tags=config.tailscale_tags,
            interval=config.tailscale_interval,
        ).setServiceParent(parent)


def make_peer_store(config: Config, reactor: Reactor, store: IStore,
                    secret_key: SecretKey | None) -> SharedStore:
    """
    :returns: the view of ``store`` peers get (HTTP and UDP ``has_path``):
        under ``--share trusted`` only paths whose database signature
        verifies against the fan-out's trusted keys or ``secret_key``'s
        public half; under ``--share all`` everything.  Its status-page
        counts scan the database on the store's worker threads when
        ``store`` is a :class:`LocalStore`.

    Blocking under ``trusted``: reads nix.conf for the default trusted keys.

    :raises peernix.nix.signing.KeyFormatError: a configured key is malformed.
    :raises peernix.peers.trust.NixConfError: nix.conf cannot be read.
    """
    keys = trusted_keys(config) if config.share == "trusted" else []
    policy = make_share_policy(config.share, keys, secret_key)
    tally = store.tally_path_infos if isinstance(store, LocalStore) else None
    return SharedStore(store, policy, clock=reactor, tally=tally)


def connect_staging(lan_fetcher: LanFetcher, digest: DigestPublisher | None, savings: Savings | None) -> None:
    """
    Wire fetching for the LAN to the savings and the digest: NAR bytes
    another node fetched for the LAN count as got from peers, staged NAR
    bytes sent to peers as given to them; the verified NARs staged here
    that ``--share`` lets peers have are in this node's digest (added when
    staged, rebuilt without them when they leave).
    """
    if savings is not None:
        lan_fetcher.on_peer_bytes = savings.add_from_peers
        lan_fetcher.on_bytes_to_peers = savings.add_to_peers
    if digest is not None:
        publisher = digest
        publisher.include(lan_fetcher.staged_hash_parts)
        lan_fetcher.on_staged = lambda hash_part: publisher.add([hash_part])
        lan_fetcher.on_unstaged = lambda hash_part: publisher.rebuild_soon()


def make_savings(config: Config, reactor: Reactor, parent: MultiService) -> Savings:
    """
    :returns: the savings counters, loaded from ``--state-dir`` when the
        service starts and written there every minute and at stop.
    """
    savings = Savings(reactor)
    SavingsService(savings, SavingsStateFile(config.state_dir), reactor).setServiceParent(parent)
    return savings


def make_upload_limiter(config: Config, reactor: Reactor) -> UploadLimiter | None:
    """:returns: the bucket of ``--max-upload-rate``, or ``None`` when unlimited."""
    if config.max_upload_rate is None:
        return None
    return UploadLimiter(config.max_upload_rate, reactor)


def make_digest(config: Config, reactor: Reactor, store: IStore, peer_store: SharedStore,
                metrics: Metrics | None = None) -> DigestPublisher | None:
    """
    :returns: this node's store digest over what ``peer_store`` shares, or
        ``None`` with ``--no-digest``, ``--serve-peers no`` or a store that cannot be scanned
        (not an :class:`~peernix.interfaces.IStoreScanner`).
    """
    if not config.digest or not config.serve_peers or not IStoreScanner.providedBy(store):
        # A consume-only node (--serve-peers no) gives peers nothing to look up.
        return None
    policy = peer_store.policy
    # The pure policy, not SharedStore.shares: the scan runs on a worker thread.
    accept = (lambda info: True) if policy.shares_everything else policy.shares
    return DigestPublisher(IStoreScanner(store), accept, reactor, fp_rate=config.digest_fp_rate,
                           metrics_registry=metrics.registry if metrics is not None else None)


def digest_status(publisher: DigestPublisher | None, peer_digests: PeerDigests | None) -> dict[str, object]:
    """:returns: the ``"digests"`` section of ``/status.json``."""
    own: dict[str, object] | None = None
    if publisher is not None:
        snap = publisher.snapshot()
        own = {
            "tag": snap.tag,
            "paths": snap.paths,
            "capacity": snap.capacity,
            "size_bytes": snap.size_bytes,
            "fp_rate": snap.fp_rate,
            "builds": snap.builds,
            "updates": snap.updates,
        }
    return {
        "own": own,
        "peers": peer_digests.document() if peer_digests is not None else None,
    }


def make_web_app(config: Config, reactor: Reactor, store: IStore, *,
                 defer_to_thread: DeferToThread, call_from_thread: Callable[..., object],
                 secret_key: SecretKey | None,
                 metrics: Metrics, upstream: IUpstream | None,
                 registry: IPeerRegistry | None = None,
                 peer_store: IStore | None = None,
                 savings: Savings | None = None,
                 upload_limiter: UploadLimiter | None = None,
                 digest: DigestPublisher | None = None,
                 peer_digests: PeerDigests | None = None,
                 lan_fetcher: LanFetcher | None = None) -> WebApp:
    """
    :returns: the HTTP application: the cache protocol, status page and metrics.
    :param registry: the peer table, shown on the status page (``None``: no peer side).
    :param peer_store: what peers see of ``store`` (``None``: all of it).
    :param savings: what the LAN saves this node (``None``: not counted).
    :param upload_limiter: ``--max-upload-rate`` (``None``: unlimited).
    :param digest: this node's store digest, served at ``/peernix/digest``.
    :param peer_digests: peers' digests, shown on the status page.
    :param lan_fetcher: fetching for the LAN: its ``/peernix/fetch/`` route
        and status section (``None``: off).
    """
    with_digests = config.digest and (digest is not None or peer_digests is not None)
    return WebApp(
        store,
        reactor=reactor,
        defer_to_thread=defer_to_thread,
        call_from_thread=call_from_thread,
        trimmer=IdleTrimmer(reactor),
        secret_key=secret_key,
        priority=config.priority,
        metrics=metrics,
        upstream=upstream,
        proxy_clients=config.proxy_clients,
        store_root=config.store_root,
        version=peernix.__version__,
        registry=registry,
        peer_store=peer_store,
        savings=savings,
        upload_limiter=upload_limiter,
        serve_peers=config.serve_peers,
        digest=DigestResource(digest) if digest is not None else None,
        digest_status=(lambda: digest_status(digest, peer_digests)) if with_digests else None,
        lan_fetcher=lan_fetcher,
    )


def make_lan_fetch(config: Config, reactor: Reactor, parent: PeernixService, node: NodeInfo) -> LanFetcher | None:
    """
    Add fetching for the LAN when upstreams are configured (see
    :func:`peernix.upstream.service.make_lan_fetcher`), through the peers'
    connection pool.

    Blocking: may read nix.conf; creates and empties the staging directory.
    """
    if parent.http_pool is None:
        return None
    keys = trusted_keys(config)
    # The same pool as the peers', with endpoints that can do https and
    # read up to 1 MiB a turn (see peernix.tcp).
    agent = Agent.usingEndpointFactory(
        reactor, UpstreamEndpointFactory(LargeReadReactor(reactor), connect_timeout=config.peer_timeout),
        pool=parent.http_pool)
    own = [parent.secret_key.public_key] if parent.secret_key is not None else []
    # A consume-only node (--serve-peers no) fetches for itself only.
    fetcher = make_lan_fetcher(
        attrs.evolve(config, fetch_for_lan=config.fetch_for_lan and config.serve_peers), reactor,
        agent=agent,
        registry=parent.registry,
        node_id=node.node_id,
        trusted_keys=keys,
        share_keys=[*keys, *own],
        metrics_registry=parent.metrics.registry if parent.metrics is not None else CollectorRegistry(),
        read_substituters=read_nix_substituters,
        own_addresses=host_addresses,
    )
    if fetcher is not None:
        LanFetchService(fetcher, reactor).setServiceParent(parent)
    return fetcher


def make_site(config: Config, reactor: Reactor, app: WebApp, metrics: Metrics) -> PeernixSite:
    """
    :returns: the HTTP server of ``app``, with the header timeout and the
        connection caps of ``config``; local clients (``--proxy-client``)
        are exempt from the caps.

    Raises this process's limit of open files to fit ``--max-connections``
    where the hard limit allows (see :func:`ensure_file_limit`).
    """
    limits = ConnectionLimits(
        max_connections=config.max_connections,
        max_per_client=config.max_connections_per_client,
        exempt=tuple(config.proxy_clients),
    )
    ensure_file_limit(config.max_connections)
    return PeernixSite(app.resource(), reactor=reactor, access_log=config.access_log,
                       header_timeout=config.header_timeout, limits=limits,
                       metrics_registry=metrics.registry)


def listen_addresses(config: Config, stack: IPStack) -> list[str]:
    """
    :returns: the addresses to listen on: ``--interface``, or every address
        of this machine (``::``, which takes IPv4 too on a dual-stack kernel).
    """
    if config.interface is not None:
        return [config.interface]
    return {"dual": ["::"], "separate": ["::", "0.0.0.0"], "ipv4": ["0.0.0.0"]}[stack]


def local_cache_url(config: Config, port: int) -> str:
    """:returns: the URL the local Nix should use as its substituter."""
    host = config.interface
    if host is None or host in ("::", "0.0.0.0"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/nix-cache"


#: Connections the kernel completes before we accept them (capped by
#: ``net.core.somaxconn``).  Twisted's default, 50, overflows when hundreds
#: of clients connect at once: the kernel then drops their handshakes' last
#: ACK, and a client that already sent its request waits for the SYN-ACK to
#: be retransmitted (1, 2, 4, 8 s...) before it is even read.
LISTEN_BACKLOG = 1024


def make_listeners(config: Config, reactor: Reactor, site: PeernixSite, stack: IPStack,
                   parent: PeernixService) -> list[ListenerService]:
    """Add one TCP listener service per address of :func:`listen_addresses`."""
    listeners = []
    for address in listen_addresses(config, stack):
        endpoint = TurnFlushTCPEndpoint(reactor, config.port, backlog=LISTEN_BACKLOG, interface=address)
        shown = f"[{address}]:{config.port}" if ":" in address else f"{address}:{config.port}"
        listener = ListenerService(
            endpoint, site, shown,
            on_listening=functools.partial(_log_listening, config, stack, address),
        )
        listener.setName(f"http {shown}")
        listener.setServiceParent(parent)
        listeners.append(listener)
    return listeners


def _log_listening(config: Config, stack: IPStack, address: str, port: IListeningPort) -> None:
    number: int = getattr(port.getHost(), "port", config.port)
    if address == "::":
        where = "all addresses, IPv6 and IPv4" if stack == "dual" else "all IPv6 addresses"
    elif address == "0.0.0.0":
        where = "all IPv4 addresses"
    else:
        where = address
    _log.info(
        "peernix {version} serving the Nix store of {store_root} on {where}, port {port};"
        " put this in nix.conf: substituters = {url}",
        version=peernix.__version__,
        store_root=config.store_root,
        where=where,
        address=address,
        port=number,
        url=local_cache_url(config, number),
    )


def build_service(
    config: Config,
    reactor: Reactor,
    *,
    store: IStore | None = None,
    secret_key: SecretKey | None = None,
    metrics: Metrics | None = None,
    defer_to_thread: DeferToThread | None = None,
    call_from_thread: Callable[..., object] = call_directly,
    upstream: IUpstream | None = None,
    ip_stack: IPStack | None = None,
    node: NodeInfo | None = None,
) -> PeernixService:
    """
    Assemble the daemon.

    Blocking (reads the store database header and the key file); call it at
    start-up, before the reactor runs.

    :param config: the settings.
    :param reactor: see :data:`Reactor`; every component gets this one.
    :param store: the store to serve; by default a :class:`LocalStore` at
        ``config.store_root``, checked now and started with the service.
    :param secret_key: the signing key; by default the one of
        ``config.secret_key_file`` (none without it).
    :param metrics: the metrics; by default a fresh :class:`Metrics`.
    :param defer_to_thread: runs CPU-heavy work off the reactor thread; by
        default on a pool of :data:`CPU_THREADS` threads started with the
        service.
    :param call_from_thread: how work in a given ``defer_to_thread`` hands
        results to the reactor thread (the default, calling at once, suits a
        synchronous runner); with the default pool, ``reactor.callFromThread``.
    :param upstream: where local clients' misses go; by default the peer
        fan-out, with its registry fed by the discovery services.  Passing
        one leaves out the peer side and discovery (tests).
    :param node: this node's self-description for announcements; by
        default detected now (runs ``nix-store --version``).  Its
        ``serve_peers`` and ``max_upload_rate`` are taken from ``config``
        either way.
    :param ip_stack: how the kernel does IPv6; by default probed now
        (:func:`probe_ip_stack`).
    :returns: the ``MultiService`` to start.
    :raises peernix.store.local.StoreError: the default store is unusable.
    :raises peernix.nix.signing.KeyFormatError: the key file or a trusted
        key is unusable.
    :raises peernix.peers.trust.NixConfError: nix.conf cannot be read.
    """
    top = PeernixService(config)
    top.secret_key = secret_key if secret_key is not None else load_secret_key(config)
    warn_about_key_name(top.secret_key)
    top.store = store if store is not None else make_store(config, reactor, top)
    if defer_to_thread is None:
        defer_to_thread = make_cpu_pool(reactor, top)
        call_from_thread = reactor.callFromThread
    top.metrics = metrics if metrics is not None else Metrics()
    if upstream is None:
        top.registry, top.upstream = make_peers(config, reactor, top.metrics, top)
        if node is not None:
            # What the announcements say of serving follows the settings.
            top.node = attrs.evolve(node, serve_peers=config.serve_peers, max_upload_rate=config.max_upload_rate)
        else:
            top.node = detect_node_info(
                public_key=top.secret_key.public_key.to_string() if top.secret_key is not None else "",
                serve_peers=config.serve_peers, max_upload_rate=config.max_upload_rate)
        top.lan_fetcher = make_lan_fetch(config, reactor, top, top.node)
        if top.lan_fetcher is not None:
            # Peers first; the LAN's fetcher only for what no peer has.  What
            # this node holds staged before either: never fetched again.
            top.upstream = StagedFirst(top.lan_fetcher, FirstOf([top.upstream, top.lan_fetcher], reactor))
            top.node = attrs.evolve(top.node, fetch_for_lan=top.lan_fetcher.table.fetch_for_lan)
    else:
        top.upstream = upstream
    top.peer_store = make_peer_store(config, reactor, top.store, top.secret_key)
    top.savings = make_savings(config, reactor, top)
    top.upload_limiter = make_upload_limiter(config, reactor)
    top.digest = make_digest(config, reactor, top.store, top.peer_store, top.metrics)
    if top.lan_fetcher is not None:
        connect_staging(top.lan_fetcher, top.digest, top.savings)
    if top.digest is not None or top.peer_digests is not None:
        DigestService(top.digest, top.peer_digests).setServiceParent(top)
    top.app = make_web_app(config, reactor, top.store, defer_to_thread=defer_to_thread,
                           call_from_thread=call_from_thread,
                           secret_key=top.secret_key, metrics=top.metrics, upstream=top.upstream,
                           registry=top.registry, peer_store=top.peer_store,
                           savings=top.savings, upload_limiter=top.upload_limiter,
                           digest=top.digest, peer_digests=top.peer_digests,
                           lan_fetcher=top.lan_fetcher)
    top.site = make_site(config, reactor, top.app, top.metrics)
    stack = ip_stack if ip_stack is not None else probe_ip_stack()
    top.listeners = make_listeners(config, reactor, top.site, stack, top)
    if top.registry is not None and top.node is not None:
        # has_path answers come from what peers may download, nothing more.
        make_discovery(config, reactor, top.registry, top.peer_store, top.node, top.metrics, top,
                       on_fetch_offer=top.lan_fetcher.table.note if top.lan_fetcher is not None else None)
    return top

