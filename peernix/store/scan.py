"""
The record a bulk scan of a store's valid paths gives (see
:class:`peernix.interfaces.IStoreScanner`): plain data, importable by the
contracts and by every store.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class PathScan:
    """What a store's ``scan_paths`` found."""

    #: Hash parts of the accepted paths, in row order.
    hash_parts: tuple[str, ...]
    #: Rows of ``ValidPaths`` when the scan started.
    rows: int
    #: The highest row id when the scan started (the next scan starts after it).
    max_id: int
    #: Rows looked at (ids after ``after_id`` up to :attr:`max_id`), accepted or not.
    scanned: int
