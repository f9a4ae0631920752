"""NAR listings: the ``<hash>.ls`` JSON Nix writes with ``write-nar-listing=true``.

The document is ``{"version": 1, "root": node}`` where a node is
``{"type": "regular", "size": N, "executable": true (only when set),
"narOffset": N}``, ``{"type": "symlink", "target": "..."}`` or
``{"type": "directory", "entries": {name: node}}``; ``narOffset`` is where the
file's contents start inside the NAR.  Nix never fetches these; tools such
as nix-index do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from peernix.nix.nar import NarEntry, NarError, nar_entries

__all__ = ["NarListingBuilder", "listing_from_entries", "nar_listing", "render_listing"]


def _text(name: bytes) -> str:
    # Store file names are ASCII in practice; anything else round-trips
    # through the filesystem encoding with surrogate escapes.
    return os.fsdecode(name)


class NarListingBuilder:
    """
    Build a listing from :class:`NarEntry` values in NAR order, as
    :func:`peernix.nix.nar.nar_entries` yields them or as
    :class:`peernix.nix.nar.NarReader` reports them (pass the builder as its
    ``on_entry``), so a listing can be made while a NAR streams past.
    """

    def __init__(self) -> None:
        self._root: dict[str, object] | None = None
        # Entry tables of the directories seen so far, by NAR path.
        self._dirs: dict[bytes, dict[str, object]] = {}

    def __call__(self, entry: NarEntry) -> None:
        """
        Add one entry.

        :raises NarError: if the entry's parent directory was not added first.
        """
        node: dict[str, object]
        if entry.type == "regular":
            node = {"type": "regular", "size": entry.size}
            if entry.executable:
                node["executable"] = True
            node["narOffset"] = entry.nar_offset
        elif entry.type == "symlink":
            node = {"type": "symlink", "target": _text(entry.target)}
        else:
            entries: dict[str, object] = {}
            node = {"type": "directory", "entries": entries}
            self._dirs[entry.path] = entries
        if not entry.path:
            self._root = node
            return
        parent, _, name = entry.path.rpartition(b"/")
        siblings = self._dirs.get(parent)
        if siblings is None:
            raise NarError(f"NAR entry {entry.path!r} comes before its directory")
        siblings[_text(name)] = node

    def document(self) -> dict[str, object]:
        """
        :returns: ``{"version": 1, "root": node}``.
        :raises NarError: if no root entry was added.
        """
        if self._root is None:
            raise NarError("no NAR entries were listed")
        return {"version": 1, "root": self._root}


def listing_from_entries(entries: Iterable[NarEntry]) -> dict[str, object]:
    """:returns: the listing document of ``entries`` (in NAR order)."""
    builder = NarListingBuilder()
    for entry in entries:
        builder(entry)
    return builder.document()


def nar_listing(fs_path: str) -> dict[str, object]:
    """
    The ``.ls`` document of the NAR of ``fs_path``, as Nix writes it.

    Offsets are computed from ``lstat``/``readlink`` alone; no file contents
    are read.  Blocking filesystem I/O: run it in a worker thread.

    :raises NarError: for a special file or a case-hack name collision.
    :raises OSError: when the filesystem fails.
    """
    return listing_from_entries(nar_entries(fs_path))


def render_listing(document: dict[str, object]) -> bytes:
    """:returns: ``document`` as compact JSON, the way Nix writes ``.ls`` files."""
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
