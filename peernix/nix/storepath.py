"""Store path names: ``/nix/store/<32 nix32 chars>-<name>``.

Validation follows Nix's ``StorePath`` (``path.cc``): the hash part is 32
characters of the nix32 alphabet, the name is 1..211 characters of
``[0-9a-zA-Z+-._?=]``, and is neither ``.`` nor ``..`` (nor starts with a dot
in a way Nix rejects: Nix only rejects names beginning with ``.``  when the
whole name is ``.`` or ``..``).
"""

from __future__ import annotations

import re

from attrs import frozen

from peernix.nix import nix32

#: The store directory.  Chroot stores keep this logical name too.
STORE_DIR = "/nix/store"
HASH_PART_LEN = 32
MAX_NAME_LEN = 211
_NAME_RE = re.compile(r"[0-9a-zA-Z+\-._?=]{1,211}")


class StorePathError(ValueError):
    """A string is not a valid store path, basename or hash part."""


def is_hash_part(text: str) -> bool:
    """:returns: whether ``text`` is exactly 32 characters of the nix32 alphabet."""
    return len(text) == HASH_PART_LEN and nix32.in_alphabet(text)


def is_valid_name(name: str) -> bool:
    """:returns: whether ``name`` is a valid store path name (the part after ``<hash>-``)."""
    return bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


@frozen
class StorePath:
    """A validated store path; always under :data:`STORE_DIR`."""

    hash_part: str
    name: str

    @property
    def basename(self) -> str:
        """:returns: ``<hash>-<name>``."""
        return f"{self.hash_part}-{self.name}"

    @property
    def path(self) -> str:
        """:returns: ``/nix/store/<hash>-<name>``."""
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.path


def parse_basename(basename: str) -> StorePath:
    """
    :param basename: ``<hash>-<name>``.
    :raises StorePathError: if it is not a valid store path basename.
    """
    hash_part, dash, name = basename[:HASH_PART_LEN], basename[HASH_PART_LEN:HASH_PART_LEN + 1], basename[HASH_PART_LEN + 1:]
    if not is_hash_part(hash_part) or dash != "-":
        raise StorePathError(f"invalid store path basename {basename!r}")
    if not is_valid_name(name):
        raise StorePathError(f"invalid store path name {name!r}")
    return StorePath(hash_part, name)


def parse_store_path(path: str) -> StorePath:
    """
    :param path: ``/nix/store/<hash>-<name>``.
    :raises StorePathError: if it is not a valid store path under :data:`STORE_DIR`.
    """
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise StorePathError(f"{path!r} is not in {STORE_DIR}")
    return parse_basename(path[len(prefix):])
