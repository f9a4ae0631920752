"""The status page's section on fetching for the LAN: pure rendering."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

#: Counters of the ``upstream`` status document: key -> label.
UPSTREAM_COUNTER_LABELS: Mapping[str, str] = {
    "bytes_fetched": "bytes fetched from upstreams",
    "bytes_from_fetchers": "NAR bytes received from other nodes' fetches",
    "bytes_served_to_peers": "NAR bytes served from staging to peers",
    "bytes_served_to_local_clients": "NAR bytes served from staging to local clients",
    "fetcher_fallbacks": "fetcher fallbacks (a fetcher failed, the next was asked)",
    "verification_failures": "NARs failing verification (never served)",
}


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def upstream_section(upstream: Mapping[str, object] | None) -> str:
    """
    :param upstream: the ``upstream`` document of ``/status.json``, or
        ``None`` when fetching for the LAN is off.
    :returns: the HTML section; every value escaped.
    """
    if upstream is None:
        return "<h2>Fetching for the LAN</h2>\n<p>Off: no upstream cache (<code>--upstream</code>).</p>\n"
    upstreams = upstream.get("upstreams") or []
    staging = upstream.get("staging") or {}
    assert isinstance(staging, Mapping)
    rows = [
        ("Upstreams", ", ".join(str(u) for u in upstreams) if isinstance(upstreams, list) else ""),
        ("Fetches for the LAN", "yes" if upstream.get("fetch_for_lan") else "no (--fetch-for-lan no)"),
        ("Staging", f"{staging.get('dir', '')}: {staging.get('bytes', 0)} of {staging.get('max_bytes', 0)} bytes,"
                    f" {staging.get('nars', 0)} NARs"),
    ]
    rows += [(label, _number(upstream.get(key, 0))) for key, label in UPSTREAM_COUNTER_LABELS.items()]
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    active = upstream.get("active_fetches") or []
    fetch_rows = "".join(
        "<tr>" + "".join(f"<td>{escape(str(f.get(k, '')))}</td>"
                         for k in ("store_path", "received", "nar_size", "requests", "source")) + "</tr>"
        for f in (active if isinstance(active, list) else []) if isinstance(f, Mapping)
    ) or '<tr><td colspan="5">none</td></tr>'
    return (
        "<h2>Fetching for the LAN</h2>\n"
        f"<table>{table}</table>\n"
        "<h3>Active fetches</h3>\n"
        "<table><tr><th>Store path</th><th>Received</th><th>NarSize</th><th>Requests</th><th>Source</th></tr>"
        f"{fetch_rows}</table>\n"
    )
