"""What a store knows about one valid path (Nix's ``ValidPathInfo``)."""

from __future__ import annotations

from attrs import field, frozen

from peernix.nix.hashes import Hash
from peernix.nix.storepath import StorePath, parse_store_path


def _sorted_unique(paths: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sorted(set(paths)))


@frozen
class PathInfo:
    """
    One valid store path as the local Nix database describes it.

    All paths are full ``/nix/store/...`` paths.  ``references`` is sorted
    (byte order, as Nix's ``std::set``) and keeps a self-reference.
    ``sigs`` holds only well-formed ``name:base64`` signatures, in DB order.
    """

    path: str
    nar_hash: Hash
    nar_size: int
    references: tuple[str, ...] = field(default=(), converter=_sorted_unique)
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    registration_time: int = 0

    @property
    def store_path(self) -> StorePath:
        """:returns: ``path`` parsed (it is validated by whoever builds a PathInfo)."""
        return parse_store_path(self.path)

    @property
    def hash_part(self) -> str:
        """:returns: the 32-character hash part of ``path``."""
        return self.store_path.hash_part
