"""The status page at ``/`` and its JSON twin at ``/status.json``: pure rendering."""

from __future__ import annotations

import json
from html import escape

from attrs import frozen


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
        }


def render_json(status: Status) -> bytes:
    """:returns: ``status`` as a JSON document (UTF-8, trailing newline)."""
    return json.dumps(status.document(), indent=2, sort_keys=True).encode("utf-8") + b"\n"


def render_html(status: Status) -> bytes:
    """
    :returns: a small self-contained HTML page; every value is HTML-escaped
        (store roots and key names come from configuration, but a page must
        never trust them).
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
        "<h2>Requests</h2>\n"
        f"<table><tr><th>Route</th><th>Status</th><th>Count</th></tr>{request_rows}</table>\n"
        "</body></html>\n"
    )
    return page.encode("utf-8")
