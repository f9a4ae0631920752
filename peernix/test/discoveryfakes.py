"""
Verified test doubles for discovery tests: an in-memory UDP reactor, a peer
registry that records calls, a dict-backed store, a zeroconf that records
calls, and thread stand-ins.  Each one is checked with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from zeroconf import ServiceInfo
from zope.interface import implementer

from peernix.discovery.mdns import IZeroconf
from peernix.interfaces import IPeerRegistry, IStore
from peernix.nix.pathinfo import PathInfo
from peernix.peers.registry import Peer

# -- UDP ------------------------------------------------------------------------


@implementer(IListeningPort, IUDPTransport)
class FakeUDPPort:
    """
    A listening UDP port that records what is written.

    :ivar written: ``(datagram, (host, port))`` in order.
    :ivar write_error: raised by :meth:`write` when set (e.g. ``OSError``).
    """

    def __init__(self, port: int, protocol: DatagramProtocol, interface: str, max_packet_size: int) -> None:
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.max_packet_size = max_packet_size
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.write_error: Exception | None = None
        self.broadcast_allowed = False
        self.listening = False
        self.connected_to: tuple[str, int] | None = None

    def startListening(self) -> None:
        """Connect the protocol, as ``udp.Port`` does."""
        self.listening = True
        self.protocol.makeConnection(self)

    def stopListening(self) -> Deferred[None]:
        """Stop the protocol; fires at once."""
        if self.listening:
            self.listening = False
            self.protocol.doStop()
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.port)

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        if self.write_error is not None:
            raise self.write_error
        if addr is None:
            if self.connected_to is None:
                raise ValueError("write without address on an unconnected port")
            addr = self.connected_to
        self.written.append((packet, addr))

    def connect(self, host: str, port: int) -> None:
        self.connected_to = (host, port)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast_allowed = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast_allowed

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        """:returns: what was written since the last call, and forgets it."""
        written, self.written = self.written, []
        return written


@implementer(IReactorUDP)
class MemoryUDPReactor(Clock):
    """
    A ``Clock`` that can also "listen" on UDP: ``listenUDP`` returns a
    :class:`FakeUDPPort` and records it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[FakeUDPPort] = []
        self._next_port = 40000

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        fake = FakeUDPPort(port, protocol, interface, maxPacketSize)
        fake.startListening()
        self.udp_ports.append(fake)
        return fake


# -- registry ---------------------------------------------------------------------


@implementer(IPeerRegistry)
class FakeRegistry:
    """
    A registry that records ``add``/``remove``/``expire`` calls and keeps
    peers by URL, without health logic.

    :ivar calls: ``("add", url, source, public_key)``, ``("remove", url,
        source)``, ``("expire",)`` in order.
    :ivar capacity: ``add`` of a new URL returns ``None`` beyond this.
    :ivar verified: URLs of ``add(..., verified=True)`` calls, in order.
    """

    def __init__(self, capacity: int = 1000) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.capacity = capacity
        self.verified: list[str] = []
        self._peers: dict[str, Peer] = {}
        self._subscribers: list[Callable[[Peer], object]] = []

    def add(self, url: str, source: str, public_key: str | None = None, verified: bool = False) -> Peer | None:
        self.calls.append(("add", url, source, public_key))
        peer = self._peers.get(url)
        if peer is None:
            if len(self._peers) >= self.capacity:
                return None
            peer = Peer(url=url, first_seen=0.0, last_seen=0.0)
            self._peers[url] = peer
            for callback in self._subscribers:
                callback(peer)
        peer.sources.add(source)
        if public_key is not None:
            peer.public_key = public_key
        if verified:
            peer.verified = True
            self.verified.append(url)
        return peer

    def remove(self, url: str, source: str) -> None:
        self.calls.append(("remove", url, source))
        peer = self._peers.get(url)
        if peer is not None:
            peer.sources.discard(source)
            if not peer.sources:
                del self._peers[url]

    def expire(self) -> None:
        self.calls.append(("expire",))

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def healthy_peers(self) -> list[Peer]:
        return [p for p in self._peers.values() if p.serving]

    def record_success(self, peer: Peer, latency: float) -> None:
        self.calls.append(("success", peer.url, latency))

    def record_failure(self, peer: Peer, kind: str) -> None:
        self.calls.append(("failure", peer.url, kind))

    def record_serving(self, peer: Peer, serving: bool) -> None:
        self.calls.append(("serving", peer.url, serving))
        peer.serving = serving

    def subscribe(self, callback: object) -> None:
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._subscribers.append(callback)

    def urls(self, source: str | None = None) -> set[str]:
        """:returns: URLs of peers known (by ``source``, if given)."""
        return {url for url, p in self._peers.items() if source is None or source in p.sources}

    def adds(self) -> list[tuple[Any, ...]]:
        """:returns: the ``add`` calls."""
        return [c for c in self.calls if c[0] == "add"]


# -- store ------------------------------------------------------------------------


@implementer(IStore)
class DictStore:
    """
    A store answering ``query_path_info`` from a dict.

    :ivar queries: hash parts asked, in order.
    :ivar hold: when true, lookups return Deferreds that never fire by
        themselves (kept in :attr:`held`), to test timeouts and cancellation.
    :ivar error: when set, lookups fail with it.
    :ivar cancelled: hash parts whose held lookup was cancelled.
    """

    store_dir = "/nix/store"

    def __init__(self, infos: dict[str, PathInfo] | None = None) -> None:
        self.infos: dict[str, PathInfo] = dict(infos or {})
        self.queries: list[str] = []
        self.hold = False
        self.held: list[Deferred[PathInfo | None]] = []
        self.error: Exception | None = None
        self.cancelled: list[str] = []

    def query_path_info(self, hash_part: str) -> Deferred[PathInfo | None]:
        self.queries.append(hash_part)
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            d: Deferred[PathInfo | None] = Deferred(lambda _: self.cancelled.append(hash_part))
            self.held.append(d)
            return d
        return succeed(self.infos.get(hash_part))

    def real_path(self, store_path: str) -> str:
        return store_path

    def find_log(self, drv_basename: str) -> Deferred[str | None]:
        return succeed(None)


# -- zeroconf ---------------------------------------------------------------------


@implementer(IZeroconf)
class FakeZeroconf:
    """
    Records zeroconf calls; :meth:`fire_add` and friends play the browser.

    :ivar calls: method names (and main argument) in order.
    :ivar infos: what ``get_service_info`` returns per service name.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.infos: dict[str, ServiceInfo | None] = {}
        self.registered: list[ServiceInfo] = []
        self.listeners: list[Any] = []
        self.closed = False
        self.register_error: Exception | None = None

    def register_service(self, info: ServiceInfo) -> None:
        self.calls.append(("register_service", info.name))
        if self.register_error is not None:
            raise self.register_error
        self.registered.append(info)

    def unregister_service(self, info: ServiceInfo) -> None:
        self.calls.append(("unregister_service", info.name))
        self.registered.remove(info)

    def add_service_listener(self, type_: str, listener: object) -> None:
        self.calls.append(("add_service_listener", type_))
        self.listeners.append(listener)

    def remove_service_listener(self, listener: object) -> None:
        self.calls.append(("remove_service_listener",))
        self.listeners.remove(listener)

    def get_service_info(self, type_: str, name: str, timeout: int) -> ServiceInfo | None:
        self.calls.append(("get_service_info", name, timeout))
        return self.infos.get(name)

    def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True

    def fire(self, event: str, type_: str, name: str) -> None:
        """Call ``event`` (``add_service`` ...) on every listener, as zeroconf's thread would."""
        for listener in list(self.listeners):
            getattr(listener, event)(self, type_, name)


@define
class ManualThreads:
    """
    A ``defer_to_thread`` whose work runs only when the test says so.

    :ivar queue: ``(function, deferred)`` not yet run.
    """

    queue: list[tuple[Callable[[], Any], Deferred[Any]]] = field(factory=list)

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((f, d))
        return d

    def run_next(self) -> None:
        """Run the oldest queued function and fire its Deferred."""
        f, d = self.queue.pop(0)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def run_all(self) -> None:
        """Run queued functions (including ones queued meanwhile) until none is left."""
        while self.queue:
            self.run_next()


def call_now(f: Callable[..., object], *args: object) -> None:
    """A ``call_from_thread`` for tests: calls at once."""
    f(*args)
