"""Content hashes in every textual form Nix accepts.

Nix's ``Hash::parseAnyPrefixed`` takes ``<algo>:<digest>`` where the digest is
base16, nix32 or base64 (told apart by length), and SRI ``<algo>-<base64>``.
We render ``<algo>:<nix32>``, the form Nix writes into narinfos.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib

from attrs import frozen

from peernix.nix import nix32

#: Digest sizes of the algorithms Nix knows.
DIGEST_SIZES: dict[str, int] = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


class HashError(ValueError):
    """A string is not a hash in any form Nix accepts."""


@frozen
class Hash:
    """A digest with its algorithm name (``sha256``, ...)."""

    algo: str
    digest: bytes

    def __attrs_post_init__(self) -> None:
        size = DIGEST_SIZES.get(self.algo)
        if size is None:
            raise HashError(f"unknown hash algorithm {self.algo!r}")
        if len(self.digest) != size:
            raise HashError(f"{self.algo} digest must be {size} bytes, got {len(self.digest)}")

    @classmethod
    def sha256_of(cls, data: bytes) -> Hash:
        """:returns: the sha256 of ``data``."""
        return cls("sha256", hashlib.sha256(data).digest())

    def nix32(self) -> str:
        """:returns: the digest in nix32, without the algorithm."""
        return _nix32_of(self.digest)

    def base16(self) -> str:
        """:returns: the digest in lower-case hex, without the algorithm."""
        return self.digest.hex()

    def sri(self) -> str:
        """:returns: the SRI form ``<algo>-<base64>``."""
        return f"{self.algo}-{base64.b64encode(self.digest).decode('ascii')}"

    def to_string(self) -> str:
        """:returns: ``<algo>:<nix32>``, as Nix writes hashes in narinfos and fingerprints."""
        return f"{self.algo}:{self.nix32()}"

    def __str__(self) -> str:
        return self.to_string()


@functools.lru_cache(maxsize=8192)
def _nix32_of(digest: bytes) -> str:
    """:returns: ``digest`` in nix32 (remembered: a NarHash is written many times on a busy path)."""
    return nix32.encode(digest)


def _decode_digest(algo: str, text: str) -> bytes:
    size = DIGEST_SIZES[algo]
    try:
        if len(text) == 2 * size:
            return bytes.fromhex(text)
        if len(text) == nix32.encoded_length(size):
            return nix32.decode(text)
        if len(text) == 4 * ((size + 2) // 3):
            raw = base64.b64decode(text, validate=True)
            if len(raw) == size:
                return raw
    except (ValueError, binascii.Error) as e:
        raise HashError(f"invalid {algo} digest {text!r}: {e}") from None
    raise HashError(f"invalid {algo} digest length {len(text)} in {text!r}")


def parse_hash(text: str, algo: str | None = None) -> Hash:
    """
    Parse a hash the way ``Hash::parseAnyPrefixed`` does.

    :param text: ``<algo>:<base16|nix32|base64>`` or SRI ``<algo>-<base64>``.
        When ``algo`` is given, an unprefixed digest is accepted too.
    :param algo: the algorithm the hash must have, if any.
    :raises HashError: for anything else, including a different algorithm.
    """
    if not isinstance(text, str) or not text.isascii():
        raise HashError(f"invalid hash {text!r}")
    sri = False
    if ":" in text:
        name, _, digest = text.partition(":")
    elif "-" in text:
        name, _, digest = text.partition("-")
        sri = True
    elif algo is not None:
        name, digest = algo, text
    else:
        raise HashError(f"hash {text!r} does not name its algorithm")
    if name not in DIGEST_SIZES:
        raise HashError(f"unknown hash algorithm {name!r}")
    if algo is not None and name != algo:
        raise HashError(f"expected a {algo} hash, got {name}")
    if sri:
        size = DIGEST_SIZES[name]
        try:
            raw = base64.b64decode(digest, validate=True)
        except binascii.Error:
            raise HashError(f"invalid SRI hash {text!r}") from None
        if len(raw) != size or len(digest) != 4 * ((size + 2) // 3):
            raise HashError(f"invalid SRI hash {text!r}")
        return Hash(name, raw)
    return Hash(name, _decode_digest(name, digest))
