"""
The peer record: one peer, where it was found, and its health.

A plain data record, named by the contracts (:mod:`peernix.interfaces`)
and kept up to date by the registry (:mod:`peernix.peers.registry`, which
re-exports it); everyone else reads it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from attrs import define, field

#: Source name of peers given on the command line or in the config file.
STATIC = "static"


@define(eq=False)
class Peer:
    """
    One peer and its health.  Mutable, but only
    :class:`~peernix.peers.registry.PeerRegistry`
    changes it; everyone else reads.  Compared and hashed by identity.

    :ivar url: normalised base URL ``http://host:port``.
    :ivar sources: who knows the peer (``static``, ``udp``, ``mdns``).
    :ivar public_key: the key the peer announced (``name:base64``), if any;
        informative only, it confers no trust.
    :ivar latency: exponentially weighted mean of answer latency, seconds.
    :ivar consecutive_failures: liveness failures since the last success.
    :ivar strikes: weighted misbehaviour count (halved by each success).
    :ivar backoff_until: clock time before which the peer is skipped.
    :ivar failures: failure counts per kind, for status and metrics.
    :ivar verified: whether a signed announcement by a trusted key vouched
        for this peer within the TTL.  It orders peers (verified first) and
        protects their place in the table; trust in answers still comes only
        from narinfo signatures.
    :ivar verified_at: clock time of the last verified announcement.
    :ivar serving: ``False`` once the peer said it serves no peers
        (``--serve-peers no``, in its announcement or health probe answer):
        it is then never asked.
    """

    url: str
    first_seen: float
    last_seen: float
    sources: set[str] = field(factory=set)
    public_key: str | None = None
    latency: float | None = None
    consecutive_failures: int = 0
    strikes: int = 0
    backoff_until: float = 0.0
    successes: int = 0
    failures: dict[str, int] = field(factory=dict)
    verified: bool = False
    verified_at: float | None = None
    serving: bool = True

    @property
    def nix_cache_url(self) -> str:
        """:returns: the peer's binary cache URL, ending in ``/``."""
        return f"{self.url}/nix-cache/"

    @property
    def on_loopback(self) -> bool:
        """
        :returns: whether the peer is on this machine (a loopback address or
            ``localhost``): several daemons on one host, as in tests.
        """
        host = urlsplit(self.url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def is_static(self) -> bool:
        """:returns: whether the peer is configured statically (never expires)."""
        return STATIC in self.sources

    @property
    def score(self) -> float:
        """
        :returns: higher is better: minus the latency (1 s assumed when
            unknown), minus half a second per consecutive failure and one
            second per strike.  Used to order candidates, never for trust.
        """
        latency = 1.0 if self.latency is None else self.latency
        return -latency - 0.5 * self.consecutive_failures - 1.0 * self.strikes
