"""The status page at ``/`` and its JSON twin at ``/status.json``: pure rendering."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from html import escape

from attrs import frozen

from peernix.store.share import WITHHELD_REASONS, ShareStatus
from peernix.web.savings import FIELDS, OUTCOMES, SavingsSnapshot, format_bytes, hit_ratio
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
    #: ``False`` when the peer said it serves no peers (it is never asked).
    serving: bool = True

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
            "serving": self.serving,
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
    #: What the LAN saved this machine; ``None`` when not counted.
    savings: SavingsSnapshot | None = None
    #: ``--serve-peers``: whether peers may download from this node.
    serve_peers: bool = True
    #: ``--max-upload-rate`` in bytes per second; ``None``: unlimited.
    max_upload_rate: int | None = None
    #: Store digests (``/status.json`` ``"digests"``): this node's
    #: (``"own"``: paths, size, tag...) and per peer (``"peers"``, keyed by
    #: URL); ``None`` when digests are off.  Plain JSON data.
    digests: Mapping[str, object] | None = None
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
            "savings": None if self.savings is None else self.savings.document(),
            "giving": {"serve_peers": self.serve_peers, "max_upload_rate": self.max_upload_rate},
            "digests": None if self.digests is None else dict(self.digests),
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
    if not peer.serving:
        state += ", consume only (not asked)"
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


#: Chart colours per counter (readable on white, distinct in grey too).
_COLOURS = {
    "bytes_from_peers": "#2e7d32",
    "bytes_to_peers": "#1565c0",
    "local": "#78909c",
    "peer": "#2e7d32",
    "upstream": "#f9a825",
    "miss": "#c62828",
}
_LABELS = {
    "bytes_from_peers": "from peers",
    "bytes_to_peers": "to peers",
    "local": "local store",
    "peer": "peers",
    "upstream": "upstream via the LAN",
    "miss": "miss",
}


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f} %"


def render_chart(savings: SavingsSnapshot) -> str:
    """
    :returns: an inline SVG of the last 24 hours: bytes from and to peers
        per hour (bars side by side), and local clients' requests per hour
        by outcome (stacked bars).  Drawn here, on the server: no script,
        no external asset.
    """
    width, left, right = 960, 70, 10
    panel, gap, top = 150, 46, 24
    hours = savings.hours
    slot = (width - left - right) / max(1, len(hours))
    parts = [
        f'<svg id="savings-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{top + 2 * panel + gap + 40}" role="img" '
        'aria-label="Bytes from and to peers, and local requests by outcome, per hour over the last 24 hours">',
        '<style>text{font:11px sans-serif;fill:#333}.axis{stroke:#999;stroke-width:1}</style>',
    ]
    byte_max = max([c.get(n, 0) for _, c in hours for n in ("bytes_from_peers", "bytes_to_peers")] + [1])
    request_max = max([sum(c.get(n, 0) for n in OUTCOMES) for _, c in hours] + [1])
    y_bytes = top + panel
    y_requests = top + 2 * panel + gap
    parts.append(f'<text x="{left}" y="{top - 8}">NAR bytes per hour (max {escape(format_bytes(byte_max))})</text>')
    parts.append(f'<text x="{left}" y="{y_bytes + gap - 10}">local requests per hour by answer (max {request_max})</text>')
    for y in (y_bytes, y_requests):
        parts.append(f'<line class="axis" x1="{left}" y1="{y}" x2="{width - right}" y2="{y}"/>')
    bar = max(1.0, slot / 2 - 1)
    for index, (start, counts) in enumerate(hours):
        x = left + index * slot
        hour = time.strftime("%H:00", time.localtime(start))
        for offset, name in enumerate(("bytes_from_peers", "bytes_to_peers")):
            value = counts.get(name, 0)
            height = panel * value / byte_max
            parts.append(
                f'<rect class="bar {name}" x="{x + offset * bar:.1f}" y="{y_bytes - height:.1f}" '
                f'width="{bar:.1f}" height="{height:.1f}" fill="{_COLOURS[name]}">'
                f"<title>{hour}: {escape(format_bytes(value))} {_LABELS[name]}</title></rect>"
            )
        base = float(y_requests)
        for name in OUTCOMES:
            value = counts.get(name, 0)
            height = panel * value / request_max
            base -= height
            parts.append(
                f'<rect class="bar {name}" x="{x:.1f}" y="{base:.1f}" width="{max(1.0, slot - 2):.1f}" '
                f'height="{height:.1f}" fill="{_COLOURS[name]}"><title>{hour}: {value} {_LABELS[name]}</title></rect>'
            )
        if index % 3 == 0:
            parts.append(f'<text x="{x:.1f}" y="{y_requests + 14}">{hour}</text>')
    legend_x = left
    for name in FIELDS:
        label = f'{"bytes " if name.startswith("bytes") else "requests: "}{_LABELS[name]}'
        parts.append(
            f'<rect x="{legend_x}" y="{y_requests + 22}" width="10" height="10" fill="{_COLOURS[name]}"/>'
            f'<text x="{legend_x + 14}" y="{y_requests + 31}">{label}</text>'
        )
        # About 6 px per character of the 11 px font, and a gap.
        legend_x += 14 + 6 * len(label) + 18
    parts.append("</svg>")
    return "".join(parts)


def _savings_section(status: Status) -> str:
    savings = status.savings
    if savings is None:
        return ""
    periods = (("Today", savings.today), ("This week", savings.week),
               (f"Since {time.strftime('%Y-%m-%d', time.localtime(savings.since))}", savings.total))
    head = "".join(f"<th>{escape(label)}</th>" for label, _ in periods)

    def figures(name: str) -> str:
        return "".join(
            f'<td class="figure" data-counter="{name}" data-period="{key}" data-value="{counts.get(name, 0)}">'
            f"{escape(format_bytes(counts.get(name, 0)))}</td>"
            for key, (_, counts) in zip(("today", "week", "total"), periods)
        )

    ratio_rows = ""
    ratios = [hit_ratio(counts) for _, counts in periods]
    for name in OUTCOMES:
        cells = "".join(
            f"<td>{_percent(r[name])} ({counts.get(name, 0)})</td>" for r, (_, counts) in zip(ratios, periods)
        )
        ratio_rows += f"<tr><th>&nbsp;&nbsp;{escape(_LABELS[name])}</th>{cells}</tr>"
    top_rows = "".join(
        f"<tr><td><code>{escape(p.path)}</code></td><td>{p.requests}</td><td>{escape(format_bytes(p.bytes))}</td></tr>"
        for p in savings.top
    ) or '<tr><td colspan="3">none yet</td></tr>'
    return (
        '<section id="savings"><h2>What the LAN saves this machine</h2>\n'
        f'<p class="headline">Got <strong id="bytes-from-peers">{escape(format_bytes(savings.total.get("bytes_from_peers", 0)))}</strong>'
        " from peers instead of the internet, gave "
        f'<strong id="bytes-to-peers">{escape(format_bytes(savings.total.get("bytes_to_peers", 0)))}</strong> to peers.</p>\n'
        f"<table><tr><th></th>{head}</tr>"
        f'<tr><th>Got from peers instead of the internet</th>{figures("bytes_from_peers")}</tr>'
        f'<tr><th>Gave to peers</th>{figures("bytes_to_peers")}</tr>'
        f'<tr><th colspan="4">Local requests answered from</th></tr>{ratio_rows}</table>\n'
        f"<h3>Last 24 hours</h3>\n{render_chart(savings)}\n"
        "<h3>Most requested paths</h3>\n"
        f'<table id="top-paths"><tr><th>Store path</th><th>NAR downloads</th><th>NAR size in all</th></tr>{top_rows}</table>\n'
        "</section>\n"
    )


def _giving_rows(status: Status) -> list[tuple[str, str]]:
    return [
        ("Serves peers", "yes" if status.serve_peers else "no (consume only: peers get 404 and are told not to ask)"),
        ("Upload limit to peers",
         "unlimited" if status.max_upload_rate is None else f"{format_bytes(status.max_upload_rate)}/s "
         f"({status.max_upload_rate} bytes/s, shared evenly by peer downloads)"),
    ]


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
    rows += [row(label, value) for label, value in _giving_rows(status)]
    own = status.digests.get("own") if status.digests is not None else None
    if isinstance(own, Mapping):
        rows.append(row("Store digest", f"{own.get('paths')} shared paths, {own.get('size_bytes')} bytes"
                        f" (false positives {own.get('fp_rate')}, version {own.get('tag') or 'none yet'})"))
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
        f"{_savings_section(status)}"
        "<h2>This node</h2>\n"
        f"<table>{''.join(rows)}</table>\n"
        f"{_sharing_section(status.sharing)}"
        f"{upstream_section(status.upstream)}"
        f"{_peer_section(status)}"
        "<h2>Requests</h2>\n"
        f"<table><tr><th>Route</th><th>Status</th><th>Count</th></tr>{request_rows}</table>\n"
        "</body></html>\n"
    )
    return page.encode("utf-8")
