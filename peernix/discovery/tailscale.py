"""
Tailnet discovery: the peers of this machine's Tailscale (or Headscale)
network, so machines at other sites and behind NAT share their stores.

:class:`TailscaleDiscoveryService` runs ``tailscale status --json`` (the
local ``tailscaled`` answers it; nothing leaves the machine) at start and
every ``interval`` seconds, as a subprocess the reactor watches, killed
after ``timeout`` seconds.  Each peer that is ``Online``, and, when tags are
configured, carries at least one of them (``Tags``, ACL tags such as
``tag:peernix``), is a peer at ``http://ADDRESS:PORT``: the first IPv4
address of its ``TailscaleIPs`` (else the first IPv6 one, bracketed) and
our own HTTP port, since every node of a fleet listens on the same port.

Peers go to the registry as source :data:`SOURCE`; a peer that went
offline, lost its tag or left the tailnet is removed at the next reading.
A reading that fails (the command fails or times out, its output is not
the JSON expected) changes nothing; a ``tailscaled`` that is not running
(``BackendState`` other than ``Running``) means no tailnet peers.  Problems
are logged once when they appear and once when they go away.  A missing
``tailscale`` command is reported once, at start-up; the service keeps
looking for it, quietly, and starts reading once it is installed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.discovery.addresses import peer_url
from peernix.interfaces import IDiscovery, IPeerRegistry

#: The registry source name of tailnet discovery.
SOURCE = "tailscale"
#: The command, found on ``PATH``.
COMMAND = "tailscale"
#: Its arguments.
ARGUMENTS = ("status", "--json")
#: Output read at most: about 2 KiB a peer, so thousands of peers.
MAX_OUTPUT = 16 * 1024 * 1024
#: Peers used at most.
MAX_PEERS = 1024


class StatusError(Exception):
    """The output of ``tailscale status --json`` is not what it should be; the message says how."""


class CommandFailed(Exception):
    """The command could not run, exited with an error, took too long or said too much."""


@frozen
class TailnetPeer:
    """
    One peer of ``tailscale status --json``.

    :ivar host_name: ``HostName``.
    :ivar dns_name: ``DNSName`` (MagicDNS), without the final dot.
    :ivar addresses: ``TailscaleIPs`` that are IP addresses, in order.
    :ivar online: ``Online``.
    :ivar tags: ``Tags`` (ACL tags, ``tag:...``), empty for untagged nodes.
    """

    host_name: str
    dns_name: str
    addresses: tuple[str, ...]
    online: bool
    tags: tuple[str, ...]

    def url(self, port: int) -> str | None:
        """:returns: ``http://ADDRESS:port`` at the first IPv4 address, else the first IPv6 one; ``None`` without one."""
        for version in (4, 6):
            for address in self.addresses:
                if ipaddress.ip_address(address).version == version:
                    return peer_url(address, port)
        return None


@frozen
class TailnetStatus:
    """
    What ``tailscale status --json`` says.

    :ivar backend_state: ``BackendState`` (``Running`` when connected).
    :ivar self_addresses: our own ``TailscaleIPs``.
    :ivar peers: every peer (online or not), sorted by DNS name.
    """

    backend_state: str
    self_addresses: tuple[str, ...]
    peers: tuple[TailnetPeer, ...]


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _addresses(value: object) -> tuple[str, ...]:
    found = []
    for text in _strings(value):
        try:
            found.append(ipaddress.ip_address(text).compressed)
        except ValueError:
            continue
    return tuple(found)


def parse_status(output: bytes) -> TailnetStatus:
    """
    Read ``tailscale status --json``.  Peers that are not JSON objects are
    skipped, as are fields of the wrong type (a missing ``Online`` is
    offline, missing ``Tags`` are none).

    :raises StatusError: the output is not a JSON object with a
        ``BackendState`` string and a ``Peer`` object (or ``null``).
    """
    try:
        data = json.loads(output)
    except (ValueError, UnicodeDecodeError) as e:
        raise StatusError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise StatusError("not a JSON object")
    state = data.get("BackendState")
    if not isinstance(state, str):
        raise StatusError("no BackendState")
    peer_map = data.get("Peer")
    if peer_map is None:
        peer_map = {}
    if not isinstance(peer_map, dict):
        raise StatusError("Peer is not an object")
    own = data.get("Self")
    self_addresses = _addresses(own.get("TailscaleIPs")) if isinstance(own, dict) else ()
    self_addresses += tuple(a for a in _addresses(data.get("TailscaleIPs")) if a not in self_addresses)
    peers = []
    for item in peer_map.values():
        if not isinstance(item, dict):
            continue
        host_name, dns_name = item.get("HostName"), item.get("DNSName")
        peers.append(TailnetPeer(
            host_name=host_name if isinstance(host_name, str) else "",
            dns_name=dns_name.rstrip(".") if isinstance(dns_name, str) else "",
            addresses=_addresses(item.get("TailscaleIPs")),
            online=item.get("Online") is True,
            tags=tuple(_strings(item.get("Tags"))),
        ))
    peers.sort(key=lambda p: (p.dns_name, p.host_name, p.addresses))
    return TailnetStatus(state, self_addresses, tuple(peers))


def peer_urls(status: TailnetStatus, port: int, tags: Iterable[str] = ()) -> dict[str, str]:
    """
    :param tags: when not empty, only peers with one of these tags count.
    :returns: URL -> peer name of the peers to use: online, tagged as
        asked, with an address that is not ours; none unless the backend
        is ``Running``; at most :data:`MAX_PEERS`.
    """
    if status.backend_state != "Running":
        return {}
    wanted = set(tags)
    own = set(status.self_addresses)
    urls: dict[str, str] = {}
    for peer in status.peers:
        if not peer.online or (wanted and not wanted.intersection(peer.tags)):
            continue
        if own.intersection(peer.addresses):
            continue
        url = peer.url(port)
        if url is not None and url not in urls:
            urls[url] = peer.dns_name or peer.host_name
        if len(urls) >= MAX_PEERS:
            break
    return urls


class _Collect(ProcessProtocol):
    """Collects a child's stdout (bounded) and the start of its stderr."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out = bytearray()
        self.err = bytearray()
        self.too_much = False
        # Cancelling kills the child.
        self.ended: Deferred[None] = Deferred(lambda _: self.kill())
        #: Why the child ended, once it did.
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        if self.too_much:
            return
        if len(self.out) + len(data) > self.limit:
            self.too_much = True
            self.kill()
            return
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data[: max(0, 1024 - len(self.err))]

    def kill(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        if not self.ended.called:
            self.ended.callback(None)


def run_command(reactor: Any, argv: Sequence[str], timeout: float, limit: int = MAX_OUTPUT) -> Deferred[bytes]:
    """
    Run ``argv`` (``argv[0]`` a path, or a name looked up on ``PATH``)
    without a shell, in this process's environment; the reactor reads its
    output, so nothing blocks.

    :param reactor: ``IReactorProcess`` and ``IReactorTime``.
    :param timeout: seconds before the child is killed.
    :param limit: bytes of output at most; the child is killed past it.
    :returns: its standard output, when it exits with status 0.
    :raises CommandFailed: (as the Deferred's failure) otherwise, saying why.
    """
    executable = shutil.which(argv[0]) or argv[0]
    protocol = _Collect(limit)
    spawner: IReactorProcess = reactor
    clock: IReactorTime = reactor
    try:
        spawner.spawnProcess(protocol, executable, list(argv), env=dict(os.environ))
    except OSError as e:
        return fail(CommandFailed(f"cannot run {executable}: {e}"))
    killed_late: list[bool] = []

    def too_late() -> None:
        killed_late.append(True)
        protocol.kill()

    timer = clock.callLater(timeout, too_late)

    def ended(reason: Failure | None) -> bytes:
        if protocol.too_much:
            raise CommandFailed(f"said more than {limit} bytes")
        if killed_late:
            raise CommandFailed(f"no answer within {timeout:g} s")
        if reason is None or not isinstance(reason.value, ProcessDone):
            message = bytes(protocol.err).decode(errors="replace").strip().splitlines()
            value = reason.value if reason is not None else None
            if isinstance(value, ProcessTerminated) and value.exitCode is not None:
                why = f"exited with status {value.exitCode}"
            elif isinstance(value, ProcessTerminated) and value.signal is not None:
                why = f"killed by signal {value.signal}"
            else:
                why = str(value)
            raise CommandFailed(f"{why}{': ' + message[0] if message else ''}")
        return bytes(protocol.out)

    async def wait() -> bytes:
        try:
            await protocol.ended
        finally:
            if timer.active():
                timer.cancel()
        return ended(protocol.reason)

    return Deferred.fromCoroutine(wait())


#: Runs a command: ``(argv, timeout) -> Deferred[stdout]``, failing with
#: :class:`CommandFailed` (production: :func:`run_command` on the reactor).
RunCommand = Callable[[Sequence[str], float], "Deferred[bytes]"]


@implementer(IDiscovery)
class TailscaleDiscoveryService(Service):
    """
    Feed the registry with the online peers of this machine's tailnet, read
    now and every ``interval`` seconds; see the module docstring.
    """

    name = SOURCE
    log = Logger()

    def __init__(
        self,
        registry: IPeerRegistry,
        http_port: int,
        clock: IReactorTime,
        run: RunCommand,
        *,
        tags: Sequence[str] = (),
        interval: float = 60.0,
        timeout: float = 10.0,
        command: str = COMMAND,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        """
        :param registry: where peers go (source ``"tailscale"``).
        :param http_port: the port peers listen on (ours).
        :param clock: schedules the readings.
        :param run: runs the command (production: :func:`run_command`).
        :param tags: only peers with one of these (``tag:peernix``); all when empty.
        :param interval: seconds between readings.
        :param timeout: seconds one reading may take.
        :param command: the ``tailscale`` command, a name on ``PATH`` or a path.
        :param which: finds ``command`` (``shutil.which``).
        """
        self._registry = registry
        self._http_port = http_port
        self._clock = clock
        self._run = run
        self.tags: tuple[str, ...] = tuple(tags)
        self.interval = interval
        self._timeout = timeout
        self._command = command
        self._which = which
        self._loop: LoopingCall | None = None
        self._reading: Deferred[None] | None = None
        self._added: dict[str, str] = {}
        self._problem_now: str | None = None
        self._missing_reported = False
        #: Readings finished (successful or not), for tests.
        self.readings = 0

    def known_urls(self) -> dict[str, str]:
        """:returns: URL -> tailnet name of every peer this service added."""
        return dict(self._added)

    def startService(self) -> None:
        """Read the tailnet now and every ``interval``; a missing command is reported here, once."""
        super().startService()  # type: ignore[no-untyped-call]
        if self._which(self._command) is None:
            self._missing_reported = True
            self.log.warn(
                "Tailscale: the {command!r} command is not installed (not on PATH);"
                " no tailnet peers until it is",
                command=self._command,
            )
        self._loop = LoopingCall(self.read)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("Tailscale reading loop failed", f))

    def stopService(self) -> None:
        """Stop reading and remove every peer this service added."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._reading is not None:
            self._reading.cancel()
        for url in list(self._added):
            self._registry.remove(url, SOURCE)
        self._added.clear()

    def read(self) -> Deferred[None]:
        """
        Read the tailnet once and update the registry (the loop calls this).

        :returns: a Deferred that fires when done; it never fails.
        """
        d = Deferred.fromCoroutine(self._read())
        self._reading = d

        def done(result: None | Failure) -> None:
            if self._reading is d:
                self._reading = None
            self.readings += 1
            if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
                self.log.failure("Tailscale reading failed", result)

        return d.addBoth(done)

    def _problem(self, problem: str | None) -> None:
        """Log ``problem`` when it is new, or that it is over (``None``)."""
        if problem == self._problem_now:
            return
        if problem is None:
            self.log.info("Tailscale: reading the tailnet works again")
        else:
            self.log.warn("Tailscale: {problem}", problem=problem)
        self._problem_now = problem

    async def _read(self) -> None:
        path = self._which(self._command)
        if path is None:
            # Reported at start-up; no news since.
            return
        if self._missing_reported:
            self._missing_reported = False
            self.log.info("Tailscale: found {path}", path=path)
        try:
            output = await self._run([path, *ARGUMENTS], self._timeout)
            status = parse_status(output)
        except CommandFailed as e:
            self._problem(f"`tailscale status --json` failed: {e}; keeping the peers read before")
            return
        except StatusError as e:
            self._problem(f"`tailscale status --json` gave unexpected output ({e}); keeping the peers read before")
            return
        if not self.running:
            return
        if status.backend_state != "Running":
            self._problem(f"tailscaled is not connected (BackendState {status.backend_state!r}); no tailnet peers")
        else:
            self._problem(None)
        self._update(peer_urls(status, self._http_port, self.tags))

    def _update(self, urls: dict[str, str]) -> None:
        for url in list(self._added):
            if url not in urls:
                del self._added[url]
                self._registry.remove(url, SOURCE)
                self.log.info("Tailscale: {url} is gone (offline, untagged or left the tailnet)", url=url)
        for url, name in urls.items():
            if url not in self._added:
                self.log.info("Tailscale: found {name} at {url}", name=name, url=url)
            self._added[url] = name
            self._registry.add(url, SOURCE)
