"""
mDNS discovery: register ``_peernix._tcp`` and browse for other nodes.

python-zeroconf runs its own asyncio loop in a thread and its calls
``Zeroconf()``, ``register_service``, ``unregister_service``,
``get_service_info`` and ``close`` block.  :class:`MdnsDiscoveryService`
runs each of them through the injected ``defer_to_thread`` and receives
zeroconf's browse callbacks (made on zeroconf's thread) through the injected
``call_from_thread``, so registry updates happen on the reactor thread only.

TXT records, as the Go predecessor: ``version=``, ``platform=``,
``features=`` (comma-separated), ``pubkey=`` (only with a key); plus
``id=<node id>`` to recognise ourselves, ``serve=0`` from a node that
serves no peers (``--serve-peers no``), which is then never asked,
``upload_rate=<bytes per second>`` from a node with ``--max-upload-rate``,
and ``digest=<version>`` (our store digest's version, see
:mod:`peernix.store.digest`; the record is updated when it changes, at
most once a ``digest_update_gap``).

Addresses: IPv4 only when the host has any, else routable IPv6; never
link-local IPv6 (see :func:`~peernix.discovery.addresses.publishable_addresses`:
a Go node keeps whichever address record it reads last and can use only an
IPv4 one).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf
from zope.interface import Interface, implementer

from peernix.discovery.addresses import host_addresses, peer_url, publishable_addresses
from peernix.discovery.datagrams import is_valid_public_key
from peernix.discovery.digesttag import DigestHooks, is_digest_tag
from peernix.discovery.nodeinfo import NodeInfo
from peernix.interfaces import IDiscovery, IPeerRegistry

#: The registry source name of mDNS discovery.
SOURCE = "mdns"
#: The DNS-SD service type.
SERVICE_TYPE = "_peernix._tcp.local."
_MAX_LABEL = 63

#: Runs a blocking callable in a thread: ``deferToThreadPool(reactor, pool, f)``.
DeferToThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
#: ``reactor.callFromThread``.
CallFromThread = Callable[..., None]


class IZeroconf(Interface):
    """
    The part of ``zeroconf.Zeroconf`` we use.  Every method but the listener
    ones may block (network waits) and is called in a worker thread.
    """

    def register_service(info: ServiceInfo) -> None:
        """Announce ``info`` without waiting out conflict probing (our names are unique)."""

    def unregister_service(info: ServiceInfo) -> None:
        """Send goodbyes for ``info``."""

    def update_service(info: ServiceInfo) -> None:
        """Announce the changed records (TXT) of a registered service."""

    def add_service_listener(type_: str, listener: object) -> None:
        """Browse ``type_``; ``listener.add_service/update_service/remove_service(zc, type_, name)`` are called on zeroconf's thread."""

    def remove_service_listener(listener: object) -> None:
        """Stop browsing for ``listener``."""

    def get_service_info(type_: str, name: str, timeout: int) -> ServiceInfo | None:
        """Resolve ``name`` (SRV, TXT, addresses), waiting up to ``timeout`` ms; ``None`` if not found."""

    def close() -> None:
        """Stop zeroconf and its threads."""


@implementer(IZeroconf)
class ZeroconfAdapter:
    """:class:`IZeroconf` over a real ``zeroconf.Zeroconf``."""

    def __init__(self, zc: Zeroconf) -> None:
        self._zc = zc

    def register_service(self, info: ServiceInfo) -> None:
        # cooperating_responders skips the ~1.2 s of probing: our instance
        # names are unique per node (host name, port and random node id).
        self._zc.register_service(info, cooperating_responders=True)

    def unregister_service(self, info: ServiceInfo) -> None:
        self._zc.unregister_service(info)

    def update_service(self, info: ServiceInfo) -> None:
        self._zc.update_service(info)

    def add_service_listener(self, type_: str, listener: object) -> None:
        self._zc.add_service_listener(type_, listener)  # type: ignore[arg-type]

    def remove_service_listener(self, listener: object) -> None:
        self._zc.remove_service_listener(listener)  # type: ignore[arg-type]

    def get_service_info(self, type_: str, name: str, timeout: int) -> ServiceInfo | None:
        return self._zc.get_service_info(type_, name, timeout)

    def close(self) -> None:
        self._zc.close()


def make_zeroconf(interfaces: Sequence[str] | None = None) -> IZeroconf:
    """
    Create a real zeroconf instance.  Blocking: call it in a thread.

    :param interfaces: addresses of the interfaces to use; all when ``None``.
    """
    choice: Any = list(interfaces) if interfaces is not None else InterfaceChoice.All
    return ZeroconfAdapter(Zeroconf(interfaces=choice))


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")


def instance_name(hostname: str, http_port: int, node_id: str) -> str:
    """
    :returns: a DNS label unique per node: ``<host>-<port>-<node id>``,
        at most 63 characters (the host name is shortened, never the rest).
    """
    tail = f"-{http_port}-{_label(node_id)[:16]}"
    host = _label(hostname.split(".", 1)[0]) or "peernix"
    return host[: _MAX_LABEL - len(tail)].rstrip("-") + tail


def build_service_info(node: NodeInfo, http_port: int, instance: str, addresses: Sequence[str],
                       digest: str | None = None) -> ServiceInfo:
    """
    :param instance: from :func:`instance_name`.
    :param addresses: this host's addresses; only those
        :func:`~peernix.discovery.addresses.publishable_addresses` keeps
        are published (IPv4 when there is any, else routable IPv6; never an
        unscoped link-local ``fe80::``, which no client can use, nor
        loopback unless that is all there is, as in tests on one host).
    :param digest: our store digest's version (``None``: no ``digest=`` record).
    :returns: the ``ServiceInfo`` we register.
    """
    properties = {
        "version": node.peernix_version,
        "platform": node.platform,
        "features": ",".join(node.features),
        "id": node.node_id,
    }
    if node.public_key:
        properties["pubkey"] = node.public_key
    if node.fetch_for_lan:
        properties["fetch"] = "1"
    if not node.serve_peers:
        # Consume only: do not ask this node (absent means it serves).
        properties["serve"] = "0"
    if node.max_upload_rate is not None:
        properties["upload_rate"] = str(node.max_upload_rate)
    published = publishable_addresses(addresses)
    if digest is not None:
        properties["digest"] = digest
    if not published:
        # Tests on one host register loopback only; keep it rather than nothing.
        published = [a for a in addresses if _is_loopback(a)]
    return ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=http_port,
        properties=properties,
        server=f"{instance}.local.",
        parsed_addresses=published,
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@frozen
class ResolvedPeer:
    """
    What a resolved ``ServiceInfo`` tells us.

    :ivar urls: the base URL at the peer's preferred address (see
        :func:`resolved_peer`), or none when it has no usable address.
    :ivar public_key: ``name:base64`` or ``None`` (absent or malformed).
    :ivar node_id: the TXT ``id``, ``None`` for nodes without one (Go).
    :ivar serving: ``False`` when the TXT says ``serve=0`` (the node serves
        no peers).
    :ivar digest: the TXT ``digest`` (store digest version), ``None`` when
        absent or malformed.
    :ivar fetch_for_lan: TXT ``fetch=1``: the node fetches for the LAN.
    """

    urls: tuple[str, ...]
    public_key: str | None
    node_id: str | None
    serving: bool = True
    digest: str | None = None
    fetch_for_lan: bool = False


def _txt(properties: dict[bytes, bytes | None], key: bytes) -> str | None:
    value = properties.get(key)
    if value is None:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def resolved_peer(info: ServiceInfo, skip_loopback: bool = True) -> ResolvedPeer:
    """
    Turn a resolved service into the peer's URL.

    A host announces every address it has; one URL per host keeps the
    fan-out from asking the same machine several times.  The preferred
    address is IPv4, then a global (or ULA) IPv6 one, then link-local ones,
    which need a zone and break when interfaces change.  (peernix publishes
    no link-local IPv6 address, but other and older nodes may.)  zeroconf
    gives a link-local address the zone of the interface the answer came in
    on; one without a zone cannot be connected to and is skipped.

    :param info: as ``get_service_info`` returns it.
    :param skip_loopback: drop loopback addresses (a misconfigured host name
        can resolve to ``127.0.1.1``, which would point at ourselves).
    """
    candidates: list[tuple[int, str]] = []
    port = info.port
    if port is not None and 1 <= port <= 65535:
        for address in info.parsed_scoped_addresses():
            try:
                parsed = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                continue
            if parsed.is_unspecified or parsed.is_multicast or (skip_loopback and parsed.is_loopback):
                continue
            if parsed.version == 6 and parsed.is_link_local and "%" not in address:
                # No zone (the answer's interface is unknown): unusable.
                continue
            try:
                url = peer_url(address, port)
            except ValueError:
                continue
            rank = (0 if parsed.version == 4 else 1) + (2 if parsed.is_link_local else 0)
            candidates.append((rank, url))
    urls = [min(candidates)[1]] if candidates else []
    properties = info.properties
    public_key = _txt(properties, b"pubkey")
    if public_key is not None and not is_valid_public_key(public_key):
        public_key = None
    digest = _txt(properties, b"digest")
    return ResolvedPeer(
        tuple(dict.fromkeys(urls)),
        public_key,
        _txt(properties, b"id"),
        serving=_txt(properties, b"serve") != "0",
        digest=digest if is_digest_tag(digest) else None,
        fetch_for_lan=_txt(properties, b"fetch") == "1",
    )


class _Listener:
    """zeroconf's ServiceListener; hops every event to the reactor thread."""

    def __init__(self, call_from_thread: CallFromThread, on_change: Callable[[str], None], on_remove: Callable[[str], None]) -> None:
        self._call = call_from_thread
        self._on_change = on_change
        self._on_remove = on_remove

    def add_service(self, zc: object, type_: str, name: str) -> None:
        self._call(self._on_change, name)

    def update_service(self, zc: object, type_: str, name: str) -> None:
        self._call(self._on_change, name)

    def remove_service(self, zc: object, type_: str, name: str) -> None:
        self._call(self._on_remove, name)


class _Made:
    """
    What the start-up thread jobs made, for the shutdown job.  Pool threads
    read and write it only while holding :attr:`lock`, which also makes the
    shutdown wait for a start-up step in progress.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.zc: IZeroconf | None = None
        self.info: ServiceInfo | None = None
        self.browsing = False
        #: Set by the shutdown job; start-up steps after it do nothing.
        self.closed = False


@implementer(IDiscovery)
class MdnsDiscoveryService(Service):
    """
    Register this node by mDNS and feed the registry with the nodes found.

    Known services are resolved again every ``refresh_interval`` seconds:
    found ones refresh their peers' last-seen time (so the registry's TTL
    does not drop live peers that mDNS has no news about), vanished ones are
    removed.
    """

    name = SOURCE
    log = Logger()

    def __init__(
        self,
        registry: IPeerRegistry,
        node: NodeInfo,
        http_port: int,
        clock: IReactorTime,
        zeroconf_factory: Callable[[], IZeroconf],
        defer_to_thread: DeferToThread,
        call_from_thread: CallFromThread,
        addresses: Callable[[], list[str]] = host_addresses,
        hostname: str | None = None,
        refresh_interval: float = 30.0,
        resolve_timeout: float = 2.0,
        max_pending: int = 16,
        max_services: int = 256,
        skip_loopback: bool = True,
        digest: DigestHooks | None = None,
        digest_update_gap: float = 5.0,
        on_fetch_offer: Callable[[str, str | None, bool], None] | None = None,
    ) -> None:
        """
        :param on_fetch_offer: told ``(peer URL, node id, fetch_for_lan)``
            of every resolved node with a TXT ``id``, for the fetcher table.
        :param registry: where peers go (source ``"mdns"``).
        :param node: our self-description (TXT records, node id).
        :param http_port: the port we register.
        :param clock: schedules the refresh.
        :param zeroconf_factory: makes the zeroconf instance; blocking,
            called in a thread (production: :func:`make_zeroconf`).
        :param defer_to_thread: runs blocking calls off the reactor thread.
        :param call_from_thread: ``reactor.callFromThread``.
        :param addresses: this host's addresses to register; called in a
            thread.
        :param hostname: for the instance name; ``socket.gethostname()``
            when ``None``.
        :param refresh_interval: seconds between re-resolutions.
        :param resolve_timeout: seconds one resolution may wait.
        :param max_pending: resolutions in flight at most.
        :param max_services: services remembered at most.
        :param skip_loopback: see :func:`resolved_peer`.
        :param digest: our store digest's version for our TXT record, and
            where peers' versions go; ``None``: neither.
        :param digest_update_gap: :meth:`digest_changed` updates our TXT
            record at most once in this many seconds (each update is a
            multicast to the whole LAN).
        """
        self._registry = registry
        self._node = node
        self._http_port = http_port
        self._clock = clock
        self._zeroconf_factory = zeroconf_factory
        self._defer_to_thread = defer_to_thread
        self._addresses = addresses
        self._refresh_interval = refresh_interval
        self._resolve_timeout_ms = int(resolve_timeout * 1000)
        self._max_pending = max_pending
        self._max_services = max_services
        self._skip_loopback = skip_loopback
        self._on_fetch_offer = on_fetch_offer
        self.instance = instance_name(hostname if hostname is not None else socket.gethostname(), http_port, node.node_id)
        self.service_name = f"{self.instance}.{SERVICE_TYPE}"
        self._listener = _Listener(call_from_thread, self._on_change, self._on_remove)
        self._zc: IZeroconf | None = None
        # What the start-up jobs made, for the shutdown job; shared between
        # pool threads, so only touched while holding its lock.
        self._made = _Made()
        self._starting: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._known: dict[str, tuple[str, ...]] = {}
        self._resolving: dict[str, Deferred[Any]] = {}
        self._again: set[str] = set()
        self._digest = digest
        self._digest_gap = digest_update_gap
        self._digest_updated = float("-inf")
        self._digest_timer: IDelayedCall | None = None
        self._registered_addresses: list[str] | None = None

    def known_urls(self) -> dict[str, tuple[str, ...]]:
        """:returns: service name -> URLs added to the registry for it."""
        return dict(self._known)

    def startService(self) -> None:
        """Start zeroconf, register and browse, all off the reactor thread; failures are logged."""
        super().startService()  # type: ignore[no-untyped-call]
        self._made = _Made()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        if not isinstance(failure.value, CancelledError):
            self.log.failure("mDNS discovery could not start", failure)

    async def _start(self) -> None:
        made = self._made

        def create() -> IZeroconf | None:
            with made.lock:
                if made.closed:
                    return None
                made.zc = self._zeroconf_factory()
                return made.zc

        zc = await self._defer_to_thread(create)
        if zc is None or not self.running:
            return
        # Set before browsing starts, so the first browse events are acted on.
        self._zc = zc
        addresses = await self._defer_to_thread(self._addresses)
        info = build_service_info(self._node, self._http_port, self.instance, addresses,
                                  self._digest.tag() if self._digest is not None else None)
        if not self.running:
            return
        if not info.parsed_addresses():
            self.log.warn(
                "mDNS: this host has no IPv4 or routable IPv6 address to publish; "
                "peers find it by UDP broadcast or --peer only"
            )
        self._registered_addresses = addresses
        self._digest_updated = self._clock.seconds()

        def register() -> None:
            with made.lock:
                if not made.closed:
                    zc.register_service(info)
                    made.info = info

        await self._defer_to_thread(register)
        if not self.running:
            return

        def browse() -> None:
            with made.lock:
                if not made.closed:
                    zc.add_service_listener(SERVICE_TYPE, self._listener)
                    made.browsing = True

        await self._defer_to_thread(browse)
        if not self.running:
            return
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = self._clock
        # Stopped in stopService.
        self._loop.start(self._refresh_interval, now=False).addErrback(
            lambda f: self.log.failure("mDNS refresh loop failed", f)
        )
        self.log.info("mDNS: registered {name}", name=self.service_name)

    def stopService(self) -> Deferred[None]:
        """
        Stop browsing, unregister and close zeroconf (in a thread); the
        Deferred fires when done.

        The shutdown job is handed to ``defer_to_thread`` before this
        returns, also when start-up is still under way: the thread pool may
        be stopped right after us (a ``MultiService`` stops its children
        without waiting), and a pool runs only the work it already has.  The
        job waits for a start-up step in progress and undoes what start-up
        made; the remaining steps are skipped.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._digest_timer is not None and self._digest_timer.active():
            self._digest_timer.cancel()
        self._digest_timer = None
        for d in list(self._resolving.values()):
            # The thread finishes on its own (bounded by resolve_timeout);
            # its result is ignored.
            d.cancel()
        self._resolving.clear()
        self._again.clear()
        self._starting = None
        self._zc = None
        for name in list(self._known):
            self._forget(name)
        made = self._made

        def shutdown() -> None:
            with made.lock:
                if made.closed:
                    return
                made.closed = True
                zc, info, browsing = made.zc, made.info, made.browsing
                if zc is None:
                    return
                try:
                    if browsing:
                        zc.remove_service_listener(self._listener)
                    if info is not None:
                        zc.unregister_service(info)
                finally:
                    zc.close()

        return self._defer_to_thread(shutdown).addErrback(self._shutdown_failed)

    def _shutdown_failed(self, failure: Failure) -> None:
        # Whoever cancelled the stop gets the cancellation.
        if isinstance(failure.value, CancelledError):
            failure.raiseException()
        self.log.failure("mDNS shutdown failed", failure)

    def digest_changed(self) -> None:
        """
        Our store digest has a new version: update our ``digest=`` TXT
        record now, or ``digest_update_gap`` seconds after the last update
        (then with the version current at that time).
        """
        if not self.running or self._digest is None or (self._digest_timer is not None and self._digest_timer.active()):
            return
        wait = self._digest_updated + self._digest_gap - self._clock.seconds()
        if wait > 0:
            # Cancelled in stopService.
            self._digest_timer = self._clock.callLater(wait, self._update_digest)
        else:
            self._update_digest()

    def _update_digest(self) -> None:
        self._digest_timer = None
        zc, addresses, made = self._zc, self._registered_addresses, self._made
        if not self.running or self._digest is None or zc is None or addresses is None:
            return
        self._digest_updated = self._clock.seconds()
        info = build_service_info(self._node, self._http_port, self.instance, addresses, self._digest.tag())

        def update() -> None:
            with made.lock:
                if not made.closed and made.info is not None:
                    zc.update_service(info)
                    made.info = info

        self._defer_to_thread(update).addErrback(
            lambda f: None if isinstance(f.value, CancelledError) else self.log.failure("mDNS: updating our TXT record failed", f)
        )

    def _refresh(self) -> None:
        for name in list(self._known):
            self._resolve(name)

    def _on_change(self, name: str) -> None:
        if not self.running or self._zc is None or name == self.service_name:
            return
        self._resolve(name)

    def _on_remove(self, name: str) -> None:
        if not self.running:
            return
        self._forget(name)

    def _forget(self, name: str) -> None:
        for url in self._known.pop(name, ()):
            self._registry.remove(url, SOURCE)

    def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        if name in self._resolving:
            # An answer is on its way; ask once more after it, since the
            # records changed in between.
            self._again.add(name)
            return
        if len(self._resolving) >= self._max_pending:
            self.log.debug("mDNS: too many resolutions in flight, skipping {name}", name=name)
            return
        timeout = self._resolve_timeout_ms
        d = self._defer_to_thread(lambda: zc.get_service_info(SERVICE_TYPE, name, timeout))
        self._resolving[name] = d
        d.addCallbacks(self._resolved, self._resolve_failed, callbackArgs=(name,), errbackArgs=(name,))

    def _resolve_failed(self, failure: Failure, name: str) -> None:
        if isinstance(failure.value, CancelledError):
            return
        self._resolving.pop(name, None)
        self.log.debug("mDNS: resolving {name} failed: {error}", name=name, error=failure.getErrorMessage())
        self._resolve_again(name)

    def _resolve_again(self, name: str) -> None:
        if name in self._again:
            self._again.discard(name)
            self._resolve(name)

    def _resolved(self, info: ServiceInfo | None, name: str) -> None:
        self._resolving.pop(name, None)
        if not self.running:
            return
        if info is None:
            # Gone (or not answering within the timeout): drop its peers.
            self._forget(name)
        else:
            self._update(name, resolved_peer(info, self._skip_loopback))
        self._resolve_again(name)

    def _update(self, name: str, peer: ResolvedPeer) -> None:
        if peer.node_id == self._node.node_id:
            return
        if name not in self._known and len(self._known) >= self._max_services:
            self.log.debug("mDNS: too many services, ignoring {name}", name=name)
            return
        old = self._known.get(name, ())
        for url in old:
            if url not in peer.urls:
                self._registry.remove(url, SOURCE)
        for url in peer.urls:
            added = self._registry.add(url, SOURCE, peer.public_key)
            if added is not None:
                self._registry.record_serving(added, peer.serving)
            if added is not None and peer.digest is not None and self._digest is not None:
                self._digest.announced(url, peer.digest)
            if self._on_fetch_offer is not None and peer.node_id is not None:
                self._on_fetch_offer(url, peer.node_id, peer.fetch_for_lan)
        self._known[name] = peer.urls
        if peer.urls and not old:
            self.log.info("mDNS: found {name} at {urls}", name=name, urls=list(peer.urls))
