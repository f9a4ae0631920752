"""The status page at ``/`` and its JSON twin at ``/status.json``: pure rendering."""

from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape

from attrs import frozen

from peernix.store.share import WITHHELD_REASONS, ShareStatus
from peernix.web.upstream_status import upstream_section


@frozen
class PeerStatus:
    """One row of the peer table, as plain data (a snapshot of a registry ``Peer``)."""

    url: str
    #: Where the peer was found (``static``, ``udp``, ``mdns``), sorted.
    sources: tuple[str, ...]
    #: ``False`` while the peer is skipped (backing off after failures).
    healthy: bool
    #: Seconds of backoff left; 0 when healthy.
    backoff_seconds: float
    #: Higher is better; orders candidates, never confers trust.
    score: float
    #: Smoothed answer latency in seconds, ``None`` before the first answer.
    latency: float | None
    #: Seconds since the peer was last heard from.
    last_seen_ago: float
    #: Failure counts by kind (``timeout``, ``connection``, ``http``,
    #: ``untrusted``, ``verification``).
    failures: Mapping[str, int]
    #: The key the peer announced (informative: it confers no trust).
    public_key: str | None

    def document(self) -> dict[str, object]:
        """:returns: this row as a JSON object."""
        return {
            "url": self.url,
            "sources": list(self.sources),
            "healthy": self.healthy,
            "backoff_seconds": round(self.backoff_seconds, 3),
            "score": round(self.score, 4),
            "latency": None if self.latency is None else round(self.latency, 4),
            "last_seen_ago": round(self.last_seen_ago, 3),
            "failures": dict(sorted(self.failures.items())),
            "public_key": self.public_key,
        }


#: The peer-side counters the status page shows: JSON key -> label.
PEER_COUNTER_LABELS: Mapping[str, str] = {
    "narinfos_from_peers": "narinfos served from peers",
    "peer_hits": "fan-outs won by a trusted peer",
    "misses": "fan-outs no peer answered (misses)",
    "bytes_proxied": "NAR bytes proxied from peers",
    "verification_failures": "peer NARs failing verification",
    "untrusted_answers": "untrusted or lying peer narinfos ignored",
}


@frozen
class Status:
    """What the status page shows; every field is plain data."""

    version: str
    store_root: str
    store_dir: str
    priority: int
    key_name: str | None
    public_key: str | None
    valid_paths: int | None
    #: ``(route, status code) -> count`` of answered requests.
    requests: dict[tuple[str, int], int]
    #: The peer table, best first; ``None`` when this node has no peer side.
    peers: tuple[PeerStatus, ...] | None = None
    #: Peer-side counters keyed as :data:`PEER_COUNTER_LABELS`; ``None``
    #: when this node has no peer side.
    peer_counters: Mapping[str, float] | None = None
    #: What peers may download (``--share``) and the last count of shared
    #: and withheld paths; ``None`` when peers see the whole store
    #: unfiltered by any policy.
    sharing: ShareStatus | None = None
    #: Fetching for the LAN (:meth:`peernix.upstream.fetch.LanFetcher.status`);
    #: ``None`` when it is off.
    upstream: Mapping[str, object] | None = None

    def document(self) -> dict[str, object]:
        """:returns: the JSON document of ``/status.json``."""
        requests: dict[str, dict[str, int]] = {}
        for (route, code), count in sorted(self.requests.items()):
            requests.setdefault(route, {})[str(code)] = count
        return {
            "version": self.version,
            "store_root": self.store_root,
            "store_dir": self.store_dir,
            "priority": self.priority,
            "key_name": self.key_name,
            "public_key": self.public_key,
            "valid_paths": self.valid_paths,
            "requests": requests,
            "peers": None if self.peers is None else [p.document() for p in self.peers],
            "peer_counters": None if self.peer_counters is None else {
                name: _number(value) for name, value in sorted(self.peer_counters.items())
            },
            "sharing": None if self.sharing is None else _sharing_document(self.sharing),
            "upstream": None if self.upstream is None else dict(self.upstream),
        }


def _sharing_document(sharing: ShareStatus) -> dict[str, object]:
    """
    :returns: ``{"mode", "counting", "counted": false}`` before the first
        count, then also ``"shared"``, ``"withheld"`` and
        ``"withheld_by_reason"`` (every reason of :data:`WITHHELD_REASONS`,
        0 included).
    """
    document: dict[str, object] = {"mode": sharing.mode, "counting": sharing.counting}
    counts = sharing.counts
    document["counted"] = counts is not None
    if counts is not None:
        document["shared"] = counts.shared
        document["withheld"] = counts.withheld_total
        document["withheld_by_reason"] = {reason: counts.withheld.get(reason, 0) for reason in WITHHELD_REASONS}
    return document


def _number(value: float) -> int | float:
    """Counters are floats in Prometheus; show whole numbers as integers."""
    return int(value) if float(value).is_integer() else value


def render_json(status: Status) -> bytes:
    """:returns: ``status`` as a JSON document (UTF-8, trailing newline)."""
    return json.dumps(status.document(), indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _peer_row(peer: PeerStatus) -> str:
    state = "healthy" if peer.healthy else f"backing off ({peer.backoff_seconds:.1f} s left)"
    latency = "unknown" if peer.latency is None else f"{peer.latency * 1000:.1f} ms"
    failures = ", ".join(f"{kind}: {count}" for kind, count in sorted(peer.failures.items())) or "none"
    cells = [
        peer.url,
        ", ".join(peer.sources),
        state,
        f"{peer.score:.3f}",
        latency,
        f"{peer.last_seen_ago:.0f} s ago",
        failures,
        peer.public_key if peer.public_key is not None else "unknown",
    ]
    return "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>"


def _peer_section(status: Status) -> str:
    if status.peers is None or status.peer_counters is None:
        return "<h2>Peers</h2>\n<p>No peer side: this node only serves its own store.</p>\n"
    peer_rows = "".join(_peer_row(p) for p in status.peers) or '<tr><td colspan="8">none known</td></tr>'
    counter_rows = "".join(
        f"<tr><th>{escape(label)}</th><td>{_number(status.peer_counters.get(name, 0.0))}</td></tr>"
        for name, label in PEER_COUNTER_LABELS.items()
    )
    return (
        "<h2>Peers</h2>\n"
        "<table><tr><th>URL</th><th>Sources</th><th>State</th><th>Score</th><th>Latency</th>"
        f"<th>Last seen</th><th>Failures</th><th>Announced key</th></tr>{peer_rows}</table>\n"
        "<p>Peers are never trusted: a peer's narinfo is passed on only when signed by a trusted key"
        " (or content-addressed), and its NAR is checked against the NarHash.</p>\n"
        f"<h2>Peer traffic</h2>\n<table>{counter_rows}</table>\n"
    )


def _sharing_section(sharing: ShareStatus | None) -> str:
    if sharing is None:
        return ""
    if sharing.mode == "all":
        policy = "all: peers may download every valid path of this store."
    else:
        policy = ("trusted: peers may download only paths signed by a trusted key (or this node's own);"
                  " everything else answers as missing.")
    rows = [f"<tr><th>Mode</th><td>{escape(policy)}</td></tr>"]
    counts = sharing.counts
    if counts is None:
        state = "counting..." if sharing.counting else "unknown"
        rows.append(f"<tr><th>Shared paths</th><td>{state}</td></tr>")
    else:
        rows.append(f"<tr><th>Shared paths</th><td>{counts.shared}</td></tr>")
        rows.append(f"<tr><th>Withheld paths</th><td>{counts.withheld_total}</td></tr>")
        for reason, label in WITHHELD_REASONS.items():
            rows.append(f"<tr><th>&nbsp;&nbsp;{escape(label)}</th><td>{counts.withheld.get(reason, 0)}</td></tr>")
    return (
        "<h2>Shared with peers</h2>\n"
        f"<table>{''.join(rows)}</table>\n"
        "<p>Local clients (proxy clients) always see the whole store; counts are refreshed every few minutes.</p>\n"
    )


def render_html(status: Status) -> bytes:
    """
    :returns: a small self-contained HTML page; every value is HTML-escaped
        (store roots, key names and peer URLs come from configuration or the
        network, and a page must never trust them).
    """

    def row(label: str, value: object) -> str:
        return f"<tr><th>{escape(label)}</th><td>{escape(str(value))}</td></tr>"

    rows = [
        row("Version", status.version),
        row("Store root", status.store_root),
        row("Store directory", status.store_dir),
        row("Priority", status.priority),
        row("Signing key", status.key_name if status.key_name is not None else "none (local paths are served unsigned)"),
    ]
    if status.public_key is not None:
        rows.append(row("Public key", status.public_key))
    rows.append(row("Valid paths", status.valid_paths if status.valid_paths is not None else "unknown"))
    request_rows = "".join(
        f"<tr><td>{escape(route)}</td><td>{code}</td><td>{count}</td></tr>"
        for (route, code), count in sorted(status.requests.items())
    ) or '<tr><td colspan="3">none yet</td></tr>'
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>peernix</title>'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{text-align:left;padding:.2em 1em .2em 0}code{font-size:90%}</style></head>\n"
        "<body><h1>peernix</h1>\n"
        "<p>A LAN-wide Nix binary cache. Substituter URL: <code>http://&lt;this host&gt;:&lt;port&gt;/nix-cache</code>;"
        ' machine-readable status at <a href="status.json">status.json</a>,'
        ' metrics at <a href="metrics">metrics</a>.</p>\n'
        f"<table>{''.join(rows)}</table>\n"
        f"{_sharing_section(status.sharing)}"
        f"{upstream_section(status.upstream)}"
        f"{_peer_section(status)}"
        "<h2>Requests</h2>\n"
        f"<table><tr><th>Route</th><th>Status</th><th>Count</th></tr>{request_rows}</table>\n"
        "</body></html>\n"
    )
    return page.encode("utf-8")
