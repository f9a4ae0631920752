"""
The peer table: every known peer, where it was found, and its health.

The registry is the only writer of :class:`Peer` state.  It is bounded
(``max_peers``), static peers never expire, and peers that fail are skipped
with exponential backoff.  Peers that *misbehave* (untrusted answers, NARs
that fail verification) collect "strikes" that a successful probe only
halves, so a peer that answers health probes but lies is still kept out of
fan-outs for a while.

Peers whose signed announcement verified against a trusted key are
*verified* (see :mod:`peernix.discovery.signed`): they come first in
:meth:`PeerRegistry.healthy_peers`, and part of the table is kept for them,
so a flood of unverified (possibly spoofed) newcomers can neither fill the
whole table nor evict anyone healthy.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from peernix.interfaces import IPeerRegistry
# The peer record lives in its own module (the interfaces name it too);
# re-exported here, where it has always been imported from.
from peernix.peers.peer import STATIC as STATIC
from peernix.peers.peer import Peer as Peer

log = Logger()

#: Failure kinds that say the peer is alive but misbehaving, with their weight.
_MISBEHAVIOUR_WEIGHTS = {"untrusted": 2, "verification": 4}
_LIVENESS_KINDS = frozenset({"timeout", "connection", "http"})

_HOSTNAME_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def parse_peer_url(text: str) -> str:
    """
    Validate and normalise a peer base URL.

    Accepted: ``http://host:port`` with an optional trailing ``/`` or
    ``/nix-cache[/]`` path; ``host`` is a DNS name, an IPv4 address or a
    bracketed IPv6 literal, optionally with a zone id (``[fe80::1%eth0]``,
    also written ``%25eth0`` as RFC 6874 says).  The port is required: the
    default HTTP port is almost never where a peernix listens.

    :returns: ``http://host:port`` with the host lower-cased, IP addresses
        in canonical form and IPv6 literals bracketed.
    :raises ValueError: with a message saying what is wrong.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("peer URL is empty")
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid peer URL {text!r}: {e}") from None
    if parts.scheme.lower() != "http":
        raise ValueError(f"invalid peer URL {text!r}: the scheme must be http://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"invalid peer URL {text!r}: user information is not allowed")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid peer URL {text!r}: no query or fragment allowed")
    if parts.path not in ("", "/", "/nix-cache", "/nix-cache/"):
        raise ValueError(f"invalid peer URL {text!r}: expected http://host:port")
    if port is None:
        raise ValueError(f"invalid peer URL {text!r}: a port is required, e.g. http://host:9999")
    if not 0 < port < 65536:
        raise ValueError(f"invalid peer URL {text!r}: port out of range")
    netloc = parts.netloc
    host_text = netloc.rsplit(":", 1)[0]
    if host_text.startswith("["):
        if not host_text.endswith("]"):
            raise ValueError(f"invalid peer URL {text!r}: unterminated IPv6 literal")
        literal = host_text[1:-1].replace("%25", "%", 1)
        addr, pct, zone = literal.partition("%")
        if pct and (not zone or not re.fullmatch(r"[A-Za-z0-9_.\-]+", zone)):
            raise ValueError(f"invalid peer URL {text!r}: invalid IPv6 zone id")
        try:
            ip6 = ipaddress.IPv6Address(addr)
        except ValueError:
            raise ValueError(f"invalid peer URL {text!r}: invalid IPv6 address") from None
        host = f"[{ip6.compressed}{'%' + zone if pct else ''}]"
    else:
        name = host_text.lower()
        try:
            host = str(ipaddress.IPv4Address(name))
        except ValueError:
            labels = name.rstrip(".").split(".")
            if (
                not name
                or len(name) > 253
                or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)
                or labels[-1].isdigit()
            ):
                raise ValueError(f"invalid peer URL {text!r}: invalid host name") from None
            host = ".".join(labels)
    return f"http://{host}:{port}"


def backoff_delay(strikes: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """
    :returns: how long to skip a peer after ``strikes`` weighted failures in a
        row: ``base * 2**(strikes-1)`` capped at ``cap``; 0 for no strikes.
    """
    if strikes <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(strikes - 1, 30))


@implementer(IPeerRegistry)
class PeerRegistry:
    """
    The bounded peer table.

    :param clock: time source for last-seen, expiry and backoff.
    :param ttl: seconds after which a discovered peer not heard from (neither
        announced nor answering) is dropped by :meth:`expire`.
    :param max_peers: table size.  An unverified discovered newcomer is
        admitted only while unverified discovered peers hold fewer than
        ``max_peers - verified_reserve`` places and the table is not full,
        or when a *failing* unverified discovered peer can make room for it:
        healthy peers (and verified ones) are never evicted for it, so
        spoofed announcements cannot flush the table.  A verified newcomer
        evicts a failing discovered peer, else the worst unverified
        discovered one.  A static newcomer evicts the worst discovered peer.
    :param backoff_cap: the longest a failing peer is skipped, seconds.
    :param verified_reserve: places unverified discovered peers never take;
        ``max_peers // 4`` by default.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        ttl: float = 120.0,
        max_peers: int = 256,
        backoff_cap: float = 60.0,
        verified_reserve: int | None = None,
    ) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        reserve = max_peers // 4 if verified_reserve is None else verified_reserve
        if not 0 <= reserve < max_peers:
            raise ValueError("verified_reserve must be at least 0 and less than max_peers")
        self._unverified_places = max_peers - reserve
        self._clock = clock
        self._ttl = ttl
        self._max_peers = max_peers
        self._backoff_cap = backoff_cap
        self._peers: dict[str, Peer] = {}
        self._subscribers: list[Callable[[Peer], object]] = []

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, url: str) -> Peer | None:
        """:returns: the peer with (normalised) base URL ``url``, if known."""
        try:
            return self._peers.get(parse_peer_url(url))
        except ValueError:
            return None

    def add(self, url: str, source: str, public_key: str | None = None, verified: bool = False) -> Peer | None:
        """
        See :meth:`IPeerRegistry.add`.

        ``verified=True`` marks the peer verified until the TTL passes
        without another verified announcement; ``False`` never clears the
        mark (an unsigned copy or a compact reply of a verified peer's
        announcement does not make it less verified).

        An invalid ``url`` (see :func:`parse_peer_url`) is logged and not
        admitted (``None``): discovery feeds this from the network, and a bad
        announcement must not raise into a protocol.  Validate configured
        peers with :func:`parse_peer_url` to give users a clear error.
        """
        try:
            norm = parse_peer_url(url)
        except ValueError as e:
            log.warn("not adding peer from {source}: {error}", source=source, error=str(e))
            return None
        now = self._clock.seconds()
        peer = self._peers.get(norm)
        if peer is not None:
            peer.sources.add(source)
            peer.last_seen = now
            if public_key is not None:
                peer.public_key = public_key
            if verified:
                peer.verified = True
                peer.verified_at = now
            return peer
        if not self._admit(static=source == STATIC, verified=verified):
            log.debug("peer table full, not admitting {url}", url=norm)
            return None
        peer = Peer(
            url=norm,
            first_seen=now,
            last_seen=now,
            sources={source},
            public_key=public_key,
            verified=verified,
            verified_at=now if verified else None,
        )
        self._peers[norm] = peer
        log.info("new peer {url} (from {source})", url=norm, source=source)
        for callback in list(self._subscribers):
            try:
                callback(peer)
            except Exception:
                # A subscriber's bug must not stop discovery from adding peers.
                log.failure("peer subscriber failed")
        return peer

    def _admit(self, *, static: bool, verified: bool) -> bool:
        """Make room for a newcomer if it may have a place; :returns: whether it may be added."""
        now = self._clock.seconds()
        discovered = [p for p in self._peers.values() if not p.is_static]

        def failing(p: Peer) -> bool:
            return p.backoff_until > now and bool(p.consecutive_failures or p.strikes)

        if static:
            if len(self._peers) < self._max_peers:
                return True
            candidates = discovered
        elif verified:
            if len(self._peers) < self._max_peers:
                return True
            # Failing peers first; else the worst unverified one: verified
            # peers are preferred.
            candidates = [p for p in discovered if failing(p)] or [p for p in discovered if not p.verified]
        else:
            unverified = [p for p in discovered if not p.verified]
            if len(self._peers) < self._max_peers and len(unverified) < self._unverified_places:
                return True
            # Only unverified peers that are failing right now may give way.
            candidates = [p for p in unverified if failing(p)]
        if not candidates:
            return False
        worst = min(candidates, key=lambda p: (p.score, p.last_seen))
        del self._peers[worst.url]
        log.info("evicted peer {url} to make room", url=worst.url)
        return True

    def remove(self, url: str, source: str) -> None:
        """See :meth:`IPeerRegistry.remove`.  Unknown URLs are ignored."""
        peer = self.get(url)
        if peer is None:
            return
        peer.sources.discard(source)
        if not peer.sources:
            del self._peers[peer.url]

    def expire(self) -> None:
        """
        See :meth:`IPeerRegistry.expire`.  A peer whose last verified
        announcement is older than the TTL stays (if otherwise alive) but is
        no longer verified.
        """
        deadline = self._clock.seconds() - self._ttl
        for peer in list(self._peers.values()):
            if not peer.is_static and peer.last_seen < deadline:
                log.info("peer {url} expired", url=peer.url)
                del self._peers[peer.url]
            elif peer.verified and (peer.verified_at is None or peer.verified_at < deadline):
                peer.verified = False

    def peers(self) -> list[Peer]:
        """:returns: every known peer, verified ones first, then best score first."""
        return sorted(self._peers.values(), key=lambda p: (not p.verified, -p.score))

    def healthy_peers(self) -> list[Peer]:
        """
        :returns: peers not in backoff and serving peers, verified ones
            first, then best score first.
        """
        now = self._clock.seconds()
        return [p for p in self.peers() if p.backoff_until <= now and p.serving]

    def record_serving(self, peer: Peer, serving: bool) -> None:
        """See :meth:`IPeerRegistry.record_serving`."""
        if peer.serving != serving:
            log.info(
                "peer {url} {change} serving peers",
                url=peer.url,
                change="started" if serving else "stopped",
            )
        peer.serving = serving

    def record_success(self, peer: Peer, latency: float) -> None:
        """
        See :meth:`IPeerRegistry.record_success`.  A peer that answers counts
        as seen (so mDNS peers, which announce once, do not expire while
        alive); liveness backoff ends; misbehaviour strikes are halved.
        """
        now = self._clock.seconds()
        peer.successes += 1
        peer.last_seen = max(peer.last_seen, now)
        latency = max(0.0, latency)
        peer.latency = latency if peer.latency is None else 0.7 * peer.latency + 0.3 * latency
        peer.consecutive_failures = 0
        peer.strikes //= 2
        peer.backoff_until = now + backoff_delay(peer.strikes, cap=self._backoff_cap)

    def record_failure(self, peer: Peer, kind: str) -> None:
        """See :meth:`IPeerRegistry.record_failure`; unknown kinds count as liveness failures."""
        now = self._clock.seconds()
        peer.failures[kind] = peer.failures.get(kind, 0) + 1
        weight = _MISBEHAVIOUR_WEIGHTS.get(kind)
        if weight is not None:
            peer.strikes += weight
        else:
            peer.consecutive_failures += 1
        delay = backoff_delay(peer.consecutive_failures + peer.strikes, cap=self._backoff_cap)
        peer.backoff_until = max(peer.backoff_until, now + delay)

    def subscribe(self, callback: object) -> None:
        """See :meth:`IPeerRegistry.subscribe`; ``callback`` must be callable."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._subscribers.append(callback)
