"""
Bounds on the HTTP server: how many connections it holds, how long a
request may take to arrive, and how large its head and body may be.

A LAN peernix listens on is not a friendly place: a stranger can open
connections and hold them (slowloris: a request sent one byte a second), or
send endless header lines.  Three things keep that bounded:

- :class:`ConnectionLimiter` counts open connections in total and per client
  address.  A *peer* (an address outside ``--proxy-client``) over
  ``max_connections`` in total or ``max_connections_per_client`` from its
  address gets a real ``503 Service Unavailable`` with ``Retry-After``
  (:class:`RefusalProtocol`), never a silent reset, so a peernix peer backs
  off instead of retrying at once.
- :class:`LimitedHTTPChannel` gives every request ``header_timeout`` seconds
  from its first byte (from the connection's start for the first request)
  to arrive whole, answers an over-long request line with 414, too much
  header with 431 and a request body larger than :data:`MAX_REQUEST_BODY`
  with 413, and closes the connection after each of those.
- The site's idle timeout (``twisted.web``'s ``timeOut``, 60 s) closes a
  connection on which nothing arrives between requests.  It alone does not
  stop slowloris: every byte restarts it.  The header timeout does.

**Local clients are exempt from both connection caps.**  Nix disables a
substituter for the rest of a build after a 5xx, so turning the local Nix
away would turn a busy moment into failed builds; and every local
connection comes from the same address (127.0.0.1), so a per-client cap
would throttle exactly the client peernix exists for.  Local connections are
still counted in the total, so a busy local Nix makes room scarcer for
peers, not the other way round.  Whether a connection is local is decided
when it is accepted, from its address alone (no header has arrived yet): a
second peernix on the same machine counts as local too.

With one request at a time per connection (``twisted.web`` answers
pipelined requests one after another), the connection caps are also caps on
the requests peers have in progress.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable, Sequence
from typing import Any, Union

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_CLIENT",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_REQUEST_BODY",
    "MAX_REQUEST_LINE",
    "RETRY_AFTER",
    "Admission",
    "ConnectionLimiter",
    "ConnectionLimits",
    "LimitedHTTPChannel",
    "RefusalProtocol",
    "client_address",
    "ensure_file_limit",
]

_log = Logger()

#: An IP network as :func:`ipaddress.ip_network` returns it.
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: An IP address as :func:`ipaddress.ip_address` returns it.
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: Seconds a request has, from its first byte, to arrive whole.
HEADER_TIMEOUT = 10.0

#: Open connections at most, before peers are refused.
MAX_CONNECTIONS = 1024

#: Open connections from one peer address at most.
MAX_CONNECTIONS_PER_CLIENT = 64

#: Seconds a refused peer is told to wait (``Retry-After``).
RETRY_AFTER = 5

#: The longest request line (and any one header line) accepted, bytes.  A
#: Nix request line is about 100 bytes; twisted's default is 16 KiB.
MAX_REQUEST_LINE = 8 * 1024

#: Request line and headers together at most, bytes (twisted's default).
MAX_HEADER_BYTES = 16 * 1024

#: Headers per request at most.  Nix sends about five, browsers about twenty;
#: twisted's default is 500.
MAX_HEADER_COUNT = 100

#: The largest request body accepted, bytes.  No route takes a body; without
#: a cap ``twisted.web`` would spool a large one to a temporary file.
MAX_REQUEST_BODY = 64 * 1024

#: Refusals in progress at most; past this, connections that would be
#: refused are closed at once (a reset), so a flood of refused connections
#: cannot hold file descriptors either.
MAX_REFUSALS = 128

#: Seconds a refusal waits for the request's head before answering anyway.
REFUSAL_READ_TIMEOUT = 2.0

#: Bytes a refusal reads at most while waiting for the request's head.
REFUSAL_READ_BYTES = 16 * 1024

#: File descriptors the daemon needs besides its HTTP connections
#: (listening sockets, the store database, connections to peers, refusals
#: in progress, logs).
FD_RESERVE = 512


def ensure_file_limit(
    max_connections: int,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """
    Make room for ``max_connections`` open connections: raise this
    process's soft limit of open files (often 1024) to
    ``max_connections + FD_RESERVE``, as far as the hard limit allows, and
    log a warning when that is not enough.  Without it the caps would never
    be reached: ``accept`` would fail first, for local clients too.

    Blocking but instant; call it at start-up.

    :param getrlimit: :func:`resource.getrlimit` (tests pass a fake).
    :param setrlimit: :func:`resource.setrlimit` (tests pass a fake).
    :returns: the soft limit in effect afterwards.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        _log.warn(
            "peernix may open only {limit} files, too few for --max-connections {max_connections}:"
            " raise the limit of open files (systemd: LimitNOFILE={wanted}) or lower --max-connections",
            limit=soft, max_connections=max_connections, wanted=wanted,
        )
    return soft


def client_address(address: IAddress | None) -> IPAddress | None:
    """
    :returns: the IP address of a connection's remote end, with an
        IPv4-mapped IPv6 address (as a dual-stack socket reports IPv4
        clients) turned into the IPv4 address; ``None`` for a non-IP
        transport (a UNIX socket) or no address.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@frozen
class ConnectionLimits:
    """
    The connection caps.

    :ivar max_connections: open connections at most (local ones included)
        before a peer's new connection is refused.
    :ivar max_per_client: open connections from one peer address at most.
    :ivar exempt: networks of local clients (``--proxy-client``), never
        refused and not capped per address.
    :ivar retry_after: seconds a refused peer is told to wait.
    :ivar max_refusals: refusals in progress at most (see :data:`MAX_REFUSALS`).
    """

    max_connections: int = MAX_CONNECTIONS
    max_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    exempt: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    retry_after: int = RETRY_AFTER
    max_refusals: int = MAX_REFUSALS


@frozen
class Admission:
    """
    A connection the limiter let in; hand it back to
    :meth:`ConnectionLimiter.release` exactly once when it closes.

    :ivar client: the peer address it is counted under; ``None`` for a
        local client (not counted per address).
    """

    client: str | None


class ConnectionLimiter:
    """
    Counts open HTTP connections and decides whether a new one may come in.

    Pure bookkeeping, no I/O: :meth:`admit` when a connection is accepted,
    :meth:`release` when it closes.

    :param limits: the caps.
    :param metrics_registry: where to register the ``peernix_http_...``
        connection metrics (a private registry when ``None``).
    """

    def __init__(self, limits: ConnectionLimits = ConnectionLimits(), *,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.limits = limits
        self.total = 0
        self.refusing = 0
        self._per_client: dict[str, int] = {}
        registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
        self._open = Gauge(
            "peernix_http_connections",
            "Open HTTP connections, by client kind (local or peer).",
            ["client"],
            registry=registry,
        )
        self._refused = Counter(
            "peernix_http_connections_refused_total",
            "Peer connections refused, by the cap they hit (total, per_client),"
            " or 'overflow' when too many refusals were in progress to answer 503.",
            ["reason"],
            registry=registry,
        )
        self._rejected = Counter(
            "peernix_http_requests_rejected_total",
            "Requests cut off before they were handled, by reason (header_timeout,"
            " request_line_too_long, headers_too_large, body_too_large).",
            ["reason"],
            registry=registry,
        )
        self._open_local = self._open.labels("local")
        self._open_peer = self._open.labels("peer")

    def is_local(self, ip: IPAddress | None) -> bool:
        """:returns: whether ``ip`` is a local client's (a non-IP transport is local)."""
        return ip is None or any(ip in net for net in self.limits.exempt)

    def connections_from(self, ip: IPAddress) -> int:
        """:returns: the open connections counted for the peer address ``ip``."""
        return self._per_client.get(ip.compressed, 0)

    def admit(self, address: IAddress | None) -> Admission | str:
        """
        Decide on a new connection from ``address`` and count it if admitted.

        :returns: an :class:`Admission` for a connection let in (local
            clients always are), or for a refused one the name of the cap it
            hit: ``"total"`` or ``"per_client"``.
        """
        ip = client_address(address)
        if self.is_local(ip):
            self.total += 1
            self._open_local.inc()
            return Admission(None)
        assert ip is not None
        key = ip.compressed
        if self.total >= self.limits.max_connections:
            return "total"
        if self._per_client.get(key, 0) >= self.limits.max_per_client:
            return "per_client"
        self.total += 1
        self._per_client[key] = self._per_client.get(key, 0) + 1
        self._open_peer.inc()
        return Admission(key)

    def release(self, admission: Admission) -> None:
        """Count a connection admitted by :meth:`admit` as closed."""
        self.total -= 1
        if admission.client is None:
            self._open_local.dec()
            return
        self._open_peer.dec()
        left = self._per_client.get(admission.client, 0) - 1
        if left > 0:
            self._per_client[admission.client] = left
        else:
            # Dropped at zero, so the table holds only addresses with open
            # connections (at most max_connections entries).
            self._per_client.pop(admission.client, None)

    def start_refusal(self, reason: str) -> bool:
        """
        Count a refusal about to answer 503.

        :param reason: what :meth:`admit` returned.
        :returns: ``False`` when :attr:`ConnectionLimits.max_refusals` are in
            progress already: close the connection at once instead.
        """
        if self.refusing >= self.limits.max_refusals:
            self._refused.labels("overflow").inc()
            return False
        self.refusing += 1
        self._refused.labels(reason).inc()
        return True

    def end_refusal(self) -> None:
        """Count a refusal started by :meth:`start_refusal` as finished."""
        self.refusing -= 1

    def count_rejected(self, reason: str) -> None:
        """Count a request cut off by :class:`LimitedHTTPChannel`."""
        self._rejected.labels(reason).inc()


def _response(code: int, phrase: bytes, extra: Sequence[bytes] = ()) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (code, phrase), *extra, b"Content-Length: 0", b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class RefusalProtocol(Protocol):
    """
    Answers one connection ``503 Service Unavailable`` with ``Retry-After``
    and closes it.

    It reads the request's head first (up to :data:`REFUSAL_READ_BYTES`, for
    at most :data:`REFUSAL_READ_TIMEOUT` seconds): closing a socket with
    unread data sends a reset, which can destroy the 503 before the client
    reads it.

    :param retry_after: seconds for ``Retry-After``.
    :param clock: for the read timeout (cancelled when the connection closes).
    :param on_lost: called once when the connection has closed.
    """

    def __init__(self, retry_after: int, clock: IReactorTime, on_lost: Callable[[], None]) -> None:
        self._answer_bytes = _response(503, b"Service Unavailable", [b"Retry-After: %d" % retry_after])
        self._clock = clock
        self._on_lost: Callable[[], None] | None = on_lost
        self._timer: IDelayedCall | None = None
        self._tail = b""
        self._read = 0
        self._answered = False

    def connectionMade(self) -> None:
        # Cancelled by _answer or connectionLost, whichever comes first.
        self._timer = self._clock.callLater(REFUSAL_READ_TIMEOUT, self._answer)

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        self._read += len(data)
        seen = self._tail + data
        self._tail = seen[-3:]
        if b"\r\n\r\n" in seen or b"\n\n" in seen or self._read >= REFUSAL_READ_BYTES:
            self._answer()

    def _answer(self) -> None:
        self._cancel_timer()
        if self._answered or self.transport is None:
            return
        self._answered = True
        self.transport.write(self._answer_bytes)
        # Closes once the 503 is written; the connection's end calls on_lost.
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()


#: The most one ``send()`` of a response hands the kernel (twisted's TCP
#: transports default to 128 KiB).
SEND_BYTES = 512 * 1024


class LimitedHTTPChannel(HTTPChannel):
    """
    ``twisted.web``'s HTTP/1.1 channel with a header timeout, explicit size
    limits and a hook for the connection count.

    Set by :class:`~peernix.service.PeernixSite` after construction (as
    ``twisted.web.http.HTTPFactory`` sets ``timeOut``):

    :ivar header_timeout: seconds a request has to arrive whole (request
        line, headers and any body), counted from its first byte, or from the
        connection's start for the first request; ``None``: no limit.  Past
        it the connection is aborted.  Between requests of a kept-alive
        connection only the idle timeout (``timeOut``) applies.  A timed-out
        connection is closed (after what was already written), and aborted
        if that takes longer than ``abortTimeout``.
    :ivar limiter: counts rejected requests (``None``: not counted).
    :ivar on_lost: called once when the connection has closed (``None``:
        nothing to call), to release the connection's admission.
    :ivar clock: the reactor the timers run on.

    Size limits: a request line or any header line longer than
    :data:`MAX_REQUEST_LINE` gets 414 (request line) or 431 (header line);
    more than :data:`MAX_HEADER_BYTES` of request line and headers gets 431;
    more than :data:`MAX_HEADER_COUNT` headers gets twisted's 400; a body
    larger than :data:`MAX_REQUEST_BODY`, or chunked, gets 413.  Each closes
    the connection.  None of them is ever a 5xx.
    """

    # LineReceiver's cap on one line (twisted's default is 16 KiB).
    MAX_LENGTH = MAX_REQUEST_LINE
    totalHeadersSize = MAX_HEADER_BYTES
    maxHeaders = MAX_HEADER_COUNT

    header_timeout: float | None = HEADER_TIMEOUT
    limiter: ConnectionLimiter | None = None
    on_lost: Callable[[], None] | None = None
    clock: IReactorTime | None = None

    _host: Any = None
    _header_timer: IDelayedCall | None = None
    _abort_call: IDelayedCall | None = None
    _rejected = False

    # -- the header timeout ----------------------------------------------

    def _arm_header_timer(self) -> None:
        if self.header_timeout is None or self.clock is None or self._rejected:
            return
        # Cancelled when the request has arrived (allContentReceived) or the
        # connection closes (connectionLost).
        self._header_timer = self.clock.callLater(self.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.limiter is not None:
            self.limiter.count_rejected("header_timeout")
        transport: Any = self.transport
        if transport is None:
            return
        _log.debug("closing {peer}: no complete request within {timeout} s",
                   peer=str(transport.getPeer()), timeout=self.header_timeout)
        self._rejected = True
        # A close, not an abort: the end of the previous response on a
        # kept-alive connection may still be in the transport's buffer.  A
        # client that does not read it is aborted after abortTimeout, as
        # twisted does on its idle timeout (cancelled by connectionLost).
        abort = getattr(transport, "abortConnection", None)
        if abort is not None and self.abortTimeout is not None and self.clock is not None:
            self._abort_call = self.clock.callLater(self.abortTimeout, abort)
        self.loseConnection()  # type: ignore[no-untyped-call]

    def getHost(self) -> Any:
        """
        The local address, asked of the kernel once per connection: twisted
        asks for it on every request (``getsockname``, a system call and an
        address object each time), and it cannot change.
        """
        if self._host is None:
            self._host = super().getHost()  # type: ignore[no-untyped-call]
        return self._host

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        # A NAR goes out in sends of up to SEND_BYTES rather than twisted's
        # 128 KiB: fewer system calls and reactor turns per byte.
        if self.transport is not None and hasattr(self.transport, "SEND_LIMIT"):
            self.transport.SEND_LIMIT = SEND_BYTES  # type: ignore[attr-defined]
        # A new connection must start and finish its first request in time
        # too: otherwise connections that send nothing would hold their
        # place until the idle timeout.
        self._arm_header_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._header_timer is None and not self._handlingRequest:
            # The first byte of the next request on a kept-alive connection
            # (or pipelined bytes that requestDone replays through here).
            self._arm_header_timer()
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        self._disarm_header_timer()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm_header_timer()
        abort_call, self._abort_call = self._abort_call, None
        if abort_call is not None and abort_call.active():
            abort_call.cancel()
        try:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        finally:
            on_lost, self.on_lost = self.on_lost, None
            if on_lost is not None:
                on_lost()

    # -- size limits -----------------------------------------------------

    def _reject(self, code: int, phrase: bytes, reason: str) -> None:
        """Answer ``code`` without handling the request and close the connection."""
        if self._rejected:
            return
        self._rejected = True
        self._disarm_header_timer()
        if self.limiter is not None:
            self.limiter.count_rejected(reason)
        assert self.transport is not None
        self.transport.write(_response(code, phrase))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # Lines are parsed only while a request arrives; without a request
        # object yet, it is the request line that is too long.
        if self.requests:
            self._reject(431, b"Request Header Fields Too Large", "headers_too_large")
        else:
            self._reject(414, b"URI Too Long", "request_line_too_long")

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._reject(431, b"Request Header Fields Too Large", "headers_too_large")
            return
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        # length: None for a chunked body, else the Content-Length (0: none).
        if self.length is None or self.length > MAX_REQUEST_BODY:
            self._reject(413, b"Content Too Large", "body_too_large")
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
