"""The ``.narinfo`` format: data type, parser, renderer, signing fingerprint."""

from __future__ import annotations

from attrs import field, frozen

from peernix.nix.hashes import Hash
from peernix.nix.pathinfo import PathInfo
from peernix.nix.storepath import STORE_DIR


def _sorted_tuple(items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sorted(set(items)))


@frozen
class NarInfo:
    """
    One narinfo.  Paths in ``references`` and ``deriver`` are *basenames*, as
    the file format has them; ``store_path`` is the full path.
    ``references`` is sorted and keeps a self-reference.
    """

    store_path: str
    url: str
    compression: str
    nar_hash: Hash
    nar_size: int
    references: tuple[str, ...] = field(default=(), converter=_sorted_tuple)
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    file_hash: Hash | None = None
    file_size: int | None = None

    @classmethod
    def from_path_info(cls, info: PathInfo, url: str, compression: str = "none") -> NarInfo:
        """:returns: the narinfo of a local path served at ``url``."""
        return cls(
            store_path=info.path,
            url=url,
            compression=compression,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=tuple(r.rsplit("/", 1)[-1] for r in info.references),
            deriver=info.deriver.rsplit("/", 1)[-1] if info.deriver else None,
            sigs=info.sigs,
            ca=info.ca,
        )

    def fingerprint(self) -> bytes:
        """
        :returns: what Nix signs: ``1;<path>;<sha256:nix32>;<size>;<refs>``
            with full reference paths, sorted, comma-separated.
        """
        refs = ",".join(f"{STORE_DIR}/{r}" for r in self.references)
        return f"1;{self.store_path};{self.nar_hash.to_string()};{self.nar_size};{refs}".encode()
