"""
Unicast DNS-SD discovery (RFC 6763): peers listed in a DNS zone the site
already runs, so nodes in other subnets and VLANs, which broadcast and mDNS
never reach, find each other.

For each configured domain ``D`` the zone lists one service instance per
node::

    _peernix._tcp.D.                 PTR  alice._peernix._tcp.D.
    alice._peernix._tcp.D.           SRV  0 0 9999 alice.hosts.D.
    alice._peernix._tcp.D.           TXT  "pubkey=alice-peernix-1:..."
    alice.hosts.D.                   A    192.0.2.10

:class:`DnsSdDiscoveryService` resolves every domain at start and then every
``interval`` seconds: PTR, then the SRV and TXT records of each instance,
then the A (else AAAA) records of each SRV target.  Records the server sent
along in a response's additional section (RFC 6763 section 12) are used
without asking again.  Each SRV target is a peer, at
``http://ADDRESS:PORT`` (IPv6 bracketed), one address per target: the
numerically lowest IPv4 one, else the lowest global IPv6 one, so the URL is
stable when a server rotates its answers and matches the URL UDP discovery
finds for the same node.  TXT records carry the fields of the mDNS TXT
records (:mod:`peernix.discovery.mdns`): ``pubkey=`` (informative, like an
announced key) and ``id=`` (our own node id marks our own instance).

Peers found go to the registry as source :data:`SOURCE`; a peer missing
from the zone at a resolution is removed for that source.  Every query is
bounded by ``query_timeout``; a lookup that fails (timeout, SERVFAIL, no
server) is a *failure*, not an answer: what the failed part of the zone
listed before is kept until a resolution succeeds, so a DNS outage does not
empty the peer table.  A name that does not exist (NXDOMAIN) or has no
records of the type asked is an answer: nothing there.  Problems are logged
once when they appear and once when they go away.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.discovery.addresses import host_addresses, peer_url
from peernix.discovery.datagrams import is_valid_public_key
from peernix.interfaces import IDiscovery, IPeerRegistry

#: The registry source name of DNS-SD discovery.
SOURCE = "dns-sd"
#: The service type; instances are listed under ``_peernix._tcp.<domain>``.
SERVICE = "_peernix._tcp"
#: The resolver configuration read by default.
RESOLV_CONF = "/etc/resolv.conf"



def service_name(domain: str) -> str:
    """:returns: the name whose PTR records list the instances in ``domain``."""
    return f"{SERVICE}.{domain.rstrip('.')}"


class _Resolver(client.Resolver):  # type: ignore[misc]
    """
    ``twisted.names``' stub resolver, asking over one UDP socket per address
    family for as long as it lives.

    The stock resolver binds a fresh socket for every query, and Twisted
    logs four lines for each (protocol and port, started and stopped): a
    resolution of a zone of 50 nodes would write hundreds of lines a
    minute.  One socket, bound to a port the kernel picks at random, keeps
    the log quiet.  A fixed source port makes forged answers easier to
    aim, but message ids stay random, answers are only taken from the
    nameserver asked, and a forged answer can do no more than a forged
    broadcast announcement: name a peer, which is trusted only by its
    signatures.
    """

    def _query(self, address: tuple[str, int], *args: Any) -> Deferred[Any]:
        protocols: dict[str, dns.DNSDatagramProtocol] = self.__dict__.setdefault("_peernix_protocols", {})
        interface = "::" if ":" in address[0] else ""
        protocol = protocols.get(interface)
        if protocol is None or protocol.transport is None:
            protocol = dns.DNSDatagramProtocol(self, reactor=self._reactor)  # type: ignore[no-untyped-call]
            protocol.noisy = False
            self._reactor.listenUDP(0, protocol, interface=interface)
            protocols[interface] = protocol
        result: Deferred[Any] = protocol.query(address, *args)
        return result

    def close(self) -> None:
        """Close the sockets and stop re-reading ``resolv.conf``."""
        for protocol in self.__dict__.pop("_peernix_protocols", {}).values():
            if protocol.transport is not None:
                protocol.transport.stopListening()
        # twisted.names offers no public way to stop the re-reading.
        call = getattr(self, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()


def system_resolver(reactor: Any, resolv: str | None = RESOLV_CONF,
                    servers: Sequence[tuple[str, int]] | None = None) -> IResolver:
    """
    :returns: a ``twisted.names`` stub resolver asking the nameservers of
        ``resolv`` (re-read when it changes; a missing file means
        ``127.0.0.1``), after ``servers`` (``(address, port)``, for tests)
        when given.  Without a cache: every resolution asks the nameserver,
        so a record removed from the zone is noticed at the next one.
        Close it with :func:`close_resolver`.
    :raises OSError: ``resolv`` exists but cannot be read.
    """
    resolver: IResolver = _Resolver(resolv=resolv, servers=list(servers) if servers else None,  # type: ignore[no-untyped-call]
                                    reactor=reactor)
    return resolver


def close_resolver(resolver: object) -> None:
    """Close a :func:`system_resolver` (its socket, its re-reading of ``resolv.conf``); others: nothing."""
    if isinstance(resolver, _Resolver):
        resolver.close()


class LookupFailed(Exception):
    """A query got no usable answer (timeout, server failure, no nameserver)."""


def parse_txt(strings: Iterable[bytes]) -> dict[str, str | None]:
    """
    Read DNS-SD TXT strings (RFC 6763 section 6): ``key=value`` pairs, keys
    compared case-insensitively (returned lower-case), the first occurrence
    of a key wins, a key without ``=`` is present without a value
    (``None``), empty strings and strings starting with ``=`` are ignored.
    Values that are not printable UTF-8 are dropped (keys too).

    :returns: key -> value.
    """
    found: dict[str, str | None] = {}
    for item in strings:
        key_bytes, eq, value_bytes = item.partition(b"=")
        try:
            key = key_bytes.decode("ascii").lower()
        except UnicodeDecodeError:
            continue
        if not key or not key.isprintable() or key in found:
            continue
        if not eq:
            found[key] = None
            continue
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if value.isprintable():
            found[key] = value
    return found


@frozen
class Instance:
    """
    What one service instance resolved to.

    :ivar name: the instance's DNS name as :func:`_name` gives it.
    :ivar urls: one base URL per usable SRV target.
    :ivar public_key: TXT ``pubkey`` when well-formed, else ``None``.
    :ivar node_id: TXT ``id``, ``None`` without one.
    :ivar txt: every TXT field (see :func:`parse_txt`).
    """

    name: str
    urls: tuple[str, ...]
    public_key: str | None = None
    node_id: str | None = None
    txt: dict[str, str | None] = field(factory=dict)


def _name(value: object) -> str:
    """
    :returns: a ``dns.Name`` or bytes as text without the final dot, ASCII
        letters lower-cased (DNS compares nothing else case-insensitively).
        Instance labels may hold any bytes (RFC 6763 allows UTF-8, spaces,
        dots); the text maps each byte to one character (Latin-1), so the
        name asked is the name received; :func:`_shown` is for people.
    """
    raw = value.name if isinstance(value, dns.Name) else value
    assert isinstance(raw, bytes)
    return raw.lower().rstrip(b".").decode("latin-1")


def _shown(name: str) -> str:
    """:returns: a name of :func:`_name` as UTF-8 text, for messages."""
    return name.encode("latin-1").decode("utf-8", errors="backslashreplace")


def _records(section: Iterable[dns.RRHeader], name: str, rtype: int) -> list[Any]:
    """
    :returns: the payloads of the records of type ``rtype`` owned by ``name``
        or a name a CNAME chain from it leads to, in ``section``.
    """
    section = list(section)
    names = {name}
    for _ in range(len(section)):
        more = {_name(getattr(r.payload, "name", b"")) for r in section
                if r.type == dns.CNAME and _name(r.name) in names}
        if more <= names:
            break
        names |= more
    return [r.payload for r in section if r.type == rtype and _name(r.name) in names]


class _Round:
    """
    One resolution of every domain: the queries, bounded in time and
    number in flight, and the records responses brought along.
    """

    _LOOKUPS = {
        dns.PTR: "lookupPointer",
        dns.SRV: "lookupService",
        dns.TXT: "lookupText",
        dns.A: "lookupAddress",
        dns.AAAA: "lookupIPV6Address",
    }

    def __init__(self, resolver: IResolver, clock: IReactorTime, timeout: float, parallel: int) -> None:
        self._resolver = resolver
        self._clock = clock
        self._timeout = timeout
        self._semaphore = DeferredSemaphore(parallel)
        #: (name, type) -> payloads, from additional sections.
        self._extra: dict[tuple[str, int], list[Any]] = {}

    def _ask(self, name: str, rtype: int) -> Deferred[Any]:
        lookup = getattr(self._resolver, self._LOOKUPS[rtype])
        # Per-attempt timeouts for the resolver, which asks every nameserver
        # after the first, then after the second: with one nameserver it
        # gives up by itself, within the overall bound.
        attempts = (self._timeout / 3, self._timeout / 2)
        d: Deferred[Any] = lookup(name.encode("latin-1"), timeout=attempts)
        return d.addTimeout(self._timeout, self._clock)

    async def query(self, name: str, rtype: int) -> list[Any]:
        """
        :returns: the records of type ``rtype`` at ``name`` (following
            CNAMEs); ``[]`` when there are none or the name does not exist.
        :raises LookupFailed: no usable answer within the timeout.
        """
        extra = self._extra.get((name, rtype))
        if extra:
            return extra
        try:
            answer, _authority, additional = await self._semaphore.run(self._ask, name, rtype)
        except (error.DNSNameError, error.AuthoritativeDomainError):
            return []
        except error.DomainError as e:
            if type(e) is error.DomainError:
                # An authority used as the resolver: not in its zone.
                return []
            raise LookupFailed(f"{dns.QUERY_TYPES.get(rtype, rtype)} {_shown(name)}: {type(e).__name__}") from None
        except CancelledError:
            raise
        except Exception as e:
            timed_out = isinstance(e, (TimeoutError, defer.TimeoutError))
            reason = "no answer in time" if timed_out else (str(e) or type(e).__name__)
            raise LookupFailed(f"{dns.QUERY_TYPES.get(rtype, rtype)} {_shown(name)}: {reason}") from None
        for record in additional:
            if record.type in self._LOOKUPS:
                self._extra.setdefault((_name(record.name), record.type), []).append(record.payload)
        return _records(answer, name, rtype)


def _cancelled(problem: BaseException | None) -> bool:
    """:returns: whether ``problem`` is a cancellation (possibly inside ``gatherResults``' ``FirstError``)."""
    while isinstance(problem, FirstError):
        problem = problem.subFailure.value
    return isinstance(problem, CancelledError)


def _usable(address: str, *, skip_loopback: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if parsed.is_unspecified or parsed.is_multicast or (skip_loopback and parsed.is_loopback):
        return None
    # A link-local IPv6 address needs a zone, which DNS cannot give.
    if parsed.version == 6 and parsed.is_link_local:
        return None
    return parsed


@implementer(IDiscovery)
class DnsSdDiscoveryService(Service):
    """
    Feed the registry with the peers listed by unicast DNS-SD in
    ``domains``, resolved now and every ``interval`` seconds; see the module
    docstring for what is asked and how failures are treated.
    """

    name = SOURCE
    log = Logger()

    def __init__(
        self,
        registry: IPeerRegistry,
        domains: Sequence[str],
        http_port: int,
        clock: IReactorTime,
        resolver_factory: Callable[[], IResolver],
        *,
        node_id: str | None = None,
        interval: float = 60.0,
        query_timeout: float = 5.0,
        parallel: int = 8,
        own_addresses: Callable[[], Iterable[str]] = host_addresses,
        skip_loopback: bool = True,
        max_instances: int = 256,
        max_targets: int = 8,
    ) -> None:
        """
        :param registry: where peers go (source ``"dns-sd"``).
        :param domains: the DNS-SD domains (``example.com``).
        :param http_port: our HTTP port: an SRV record naming one of our own
            addresses with this port is us.
        :param clock: schedules resolutions and bounds queries.
        :param resolver_factory: makes the resolver at start-up
            (production: :func:`system_resolver`).
        :param node_id: ours; an instance whose TXT ``id`` is this is us.
        :param interval: seconds between resolutions.
        :param query_timeout: seconds one DNS query may take.
        :param parallel: queries in flight at most.
        :param own_addresses: this host's addresses (read once a resolution).
        :param skip_loopback: ignore loopback addresses (a zone pointing at
            ``127.0.0.1`` means whoever asks, never a peer).
        :param max_instances: instances used per domain at most.
        :param max_targets: SRV targets used per instance at most.
        """
        self._registry = registry
        self.domains: tuple[str, ...] = tuple(dict.fromkeys(d.lower().rstrip(".") for d in domains))
        self._http_port = http_port
        self._clock = clock
        self._resolver_factory = resolver_factory
        self._node_id = node_id
        self.interval = interval
        self._query_timeout = query_timeout
        self._parallel = parallel
        self._own_addresses = own_addresses
        self._skip_loopback = skip_loopback
        self._max_instances = max_instances
        self._max_targets = max_targets
        self._resolver: IResolver | None = None
        self._loop: LoopingCall | None = None
        #: Resolutions in flight (the loop's, and any :meth:`resolve` call's).
        self._rounds: set[Deferred[None]] = set()
        #: domain -> instance name -> what it resolved to last.
        self._known: dict[str, dict[str, Instance]] = {}
        #: URL -> public key of every peer we added.
        self._added: dict[str, str | None] = {}
        #: What is wrong now, by subject, to log each problem once.
        self._problems: dict[str, str] = {}
        #: Resolutions finished (for tests and the status of the service).
        self.resolutions = 0

    def known_urls(self) -> dict[str, str | None]:
        """:returns: URL -> announced public key of every peer this service added."""
        return dict(self._added)

    def startService(self) -> None:
        """Make the resolver and resolve now, then every ``interval``; failures are logged."""
        super().startService()  # type: ignore[no-untyped-call]
        try:
            self._resolver = self._resolver_factory()
        except Exception:
            self.log.failure("DNS-SD: cannot make a resolver; DNS-SD discovery is off")
            return
        self._loop = LoopingCall(self.resolve)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("DNS-SD resolution loop failed", f))
        self.log.info("DNS-SD: looking for peers in {domains}, every {interval} s",
                      domains=list(self.domains), interval=self.interval)

    def stopService(self) -> None:
        """Stop resolving and remove every peer this service added."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._rounds):
            d.cancel()
        if self._resolver is not None:
            close_resolver(self._resolver)
        self._resolver = None
        for url in list(self._added):
            self._registry.remove(url, SOURCE)
        self._added.clear()
        self._known.clear()

    def resolve(self) -> Deferred[None]:
        """
        Resolve every domain now and update the registry (the loop calls
        this every ``interval``).

        :returns: a Deferred firing when done; it never fails (errors are
            logged).
        """
        d = Deferred.fromCoroutine(self._resolve_domains())
        self._rounds.add(d)

        def done(result: None | Failure) -> None:
            self._rounds.discard(d)
            if isinstance(result, Failure) and not _cancelled(result.value):
                self.log.failure("DNS-SD resolution failed", result)

        return d.addBoth(done)

    def _problem(self, subject: str, problem: str | None) -> None:
        """Log ``problem`` of ``subject`` if it is new, or that it is gone (``None``)."""
        old = self._problems.get(subject)
        if problem == old:
            return
        if problem is None:
            del self._problems[subject]
            self.log.info("DNS-SD: {subject}: resolved again", subject=subject)
        else:
            self._problems[subject] = problem
            self.log.warn("DNS-SD: {subject}: {problem}", subject=subject, problem=problem)

    async def _resolve_domains(self) -> None:
        resolver = self._resolver
        if resolver is None:
            return
        query = _Round(resolver, self._clock, self._query_timeout, self._parallel)
        try:
            own = {str(a).split("%", 1)[0] for a in self._own_addresses()}
        except Exception as e:
            # Then only the TXT id tells our own instance apart.
            self._problem("this host's addresses", f"cannot be read: {e}")
            own = set()
        else:
            self._problem("this host's addresses", None)
        results = await gatherResults(
            [Deferred.fromCoroutine(self._resolve_domain(query, domain, own)) for domain in self.domains],
            consumeErrors=True,
        )
        if not self.running:
            return
        for domain, instances in zip(self.domains, results):
            if instances is not None:
                self._known[domain] = instances
        self._update_registry()
        self.resolutions += 1

    async def _resolve_domain(self, query: _Round, domain: str, own: set[str]) -> dict[str, Instance] | None:
        """:returns: the domain's instances now, or ``None`` when its PTR lookup failed."""
        subject = service_name(domain)
        try:
            pointers = await query.query(subject, dns.PTR)
        except LookupFailed as e:
            self._problem(subject, f"{e}; keeping the peers it listed before")
            return None
        self._problem(subject, None)
        names = sorted({_name(p.name) for p in pointers})
        if len(names) > self._max_instances:
            self._problem(f"{subject} size", f"{len(names)} instances, using the first {self._max_instances}")
            names = names[: self._max_instances]
        else:
            self._problem(f"{subject} size", None)
        before = self._known.get(domain, {})
        found = await gatherResults(
            [Deferred.fromCoroutine(self._resolve_instance(query, name, own)) for name in names],
            consumeErrors=True,
        )
        instances: dict[str, Instance] = {}
        for name, instance in zip(names, found):
            if instance is None:
                # A failed lookup: keep what it was.
                if name in before:
                    instances[name] = before[name]
            else:
                instances[name] = instance
        return instances

    async def _resolve_instance(self, query: _Round, name: str, own: set[str]) -> Instance | None:
        """:returns: what ``name`` resolves to now, or ``None`` when a lookup failed."""
        try:
            services, texts = await gatherResults(
                [Deferred.fromCoroutine(query.query(name, dns.SRV)),
                 Deferred.fromCoroutine(query.query(name, dns.TXT))],
                consumeErrors=True,
            )
        except FirstError as e:
            self._instance_failed(name, e.subFailure.value)
            return None
        txt = parse_txt(s for record in texts for s in record.data)
        if self._node_id is not None and txt.get("id") == self._node_id:
            self._problem(_shown(name), None)
            return Instance(name, (), node_id=self._node_id, txt=txt)
        urls: list[str] = []
        for target, port in self._targets(name, services):
            try:
                url = await self._target_url(query, target, port, own)
            except LookupFailed as e:
                self._instance_failed(name, e)
                return None
            if url is not None and url not in urls:
                urls.append(url)
        self._problem(_shown(name), None)
        public_key = txt.get("pubkey")
        if public_key is not None and not is_valid_public_key(public_key):
            self._problem(f"{_shown(name)} pubkey", f"malformed TXT pubkey {public_key!r}, ignored")
            public_key = None
        else:
            self._problem(f"{_shown(name)} pubkey", None)
        return Instance(name, tuple(urls), public_key, txt.get("id"), txt)

    def _instance_failed(self, name: str, problem: BaseException | None) -> None:
        """Log a failed lookup of instance ``name``; anything but :class:`LookupFailed` is raised."""
        if not isinstance(problem, LookupFailed):
            # A cancellation (the service stopped) or a bug: not ours to hide.
            raise problem or RuntimeError("lookup failed without an error")
        self._problem(_shown(name), f"{problem}; keeping what it resolved to before")

    def _targets(self, name: str, services: Sequence[Any]) -> list[tuple[str, int]]:
        """:returns: ``(target, port)`` of the usable SRV records, best first (RFC 2782 order, then by name)."""
        usable = []
        for srv in services:
            target = _name(srv.target)
            # "." means the service is decidedly not available there.
            if target and 1 <= srv.port <= 65535:
                usable.append((srv.priority, -srv.weight, target, srv.port))
        usable.sort()
        if len(usable) > self._max_targets:
            self._problem(f"{_shown(name)} size", f"{len(usable)} SRV targets, using the first {self._max_targets}")
            usable = usable[: self._max_targets]
        else:
            self._problem(f"{_shown(name)} size", None)
        return list(dict.fromkeys((target, port) for _p, _w, target, port in usable))

    async def _target_url(self, query: _Round, target: str, port: int, own: set[str]) -> str | None:
        """
        :returns: the peer URL at ``target`` (lowest usable IPv4 address,
            else lowest usable IPv6 one), or ``None`` when it has none or
            is us.
        :raises LookupFailed: an address lookup failed.
        """
        for rtype in (dns.A, dns.AAAA):
            records = await query.query(target, rtype)
            texts = [r.dottedQuad() if rtype == dns.A else socket.inet_ntop(socket.AF_INET6, r.address)
                     for r in records]
            addresses = sorted(a for a in (_usable(t, skip_loopback=self._skip_loopback) for t in texts) if a)
            if addresses:
                best = addresses[0]
                if port == self._http_port and any(str(a) in own for a in addresses):
                    return None
                return peer_url(best.compressed, port)
        return None

    def _update_registry(self) -> None:
        """Add every peer of every domain (refreshing it), remove those no domain lists any more."""
        now: dict[str, str | None] = {}
        for instances in self._known.values():
            for instance in instances.values():
                if self._node_id is not None and instance.node_id == self._node_id:
                    continue
                for url in instance.urls:
                    if now.get(url) is None:
                        now[url] = instance.public_key
        for url in list(self._added):
            if url not in now:
                del self._added[url]
                self._registry.remove(url, SOURCE)
                self.log.info("DNS-SD: {url} is no longer listed", url=url)
        for url, public_key in now.items():
            if url not in self._added:
                self.log.info("DNS-SD: found {url}", url=url)
            self._added[url] = public_key
            self._registry.add(url, SOURCE, public_key)
