"""
Content-addressed store paths: does a ``CA:`` field really name this path?

A content-addressed path needs no signature, because its name is computed
from its content: Nix recomputes the store path from the CA field (and the
references) and compares (``ValidPathInfo::isContentAddressed``).  This module
does the same computation (``Store::makeStorePath``, ``makeTextPath``,
``makeFixedOutputPath``) so a peer cannot pass off arbitrary content as CA.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from peernix.nix import nix32
from peernix.nix.hashes import Hash, HashError, parse_hash
from peernix.nix.storepath import STORE_DIR, StorePathError, parse_basename, parse_store_path

_PATH_HASH_SIZE = 20


def compress_hash(digest: bytes, size: int = _PATH_HASH_SIZE) -> bytes:
    """:returns: ``digest`` XOR-folded to ``size`` bytes, as Nix's ``compressHash``."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(type_: str, inner: Hash, name: str) -> str:
    """
    Nix's ``makeStorePath``.

    :param type_: the type descriptor, e.g. ``text:/nix/store/...`` or ``output:out``.
    :param inner: the content hash, rendered as ``<algo>:<base16>``.
    :returns: ``/nix/store/<nix32(compress(sha256(descriptor)))>-<name>``.
    """
    descriptor = f"{type_}:{inner.algo}:{inner.base16()}:{STORE_DIR}:{name}"
    digest = compress_hash(hashlib.sha256(descriptor.encode()).digest())
    return f"{STORE_DIR}/{nix32.encode(digest)}-{name}"


def _make_type(kind: str, references: Sequence[str], self_reference: bool) -> str:
    # References are full paths in std::set order; same-prefix full paths
    # sort like their basenames.
    type_ = kind
    for ref in sorted(set(references)):
        type_ += ":" + ref
    if self_reference:
        type_ += ":self"
    return type_


def expected_store_path(ca: str, name: str, references: Sequence[str], self_path: str) -> str | None:
    """
    :param ca: the ``CA:`` field.
    :param name: the store path name.
    :param references: full paths of the references, possibly including ``self_path``.
    :param self_path: the claimed store path (to recognise a self-reference).
    :returns: the store path that ``ca`` and the references determine, or
        ``None`` if ``ca`` is unparsable or of a kind we do not check (git).
    """
    method, _, rest = ca.partition(":")
    others = [r for r in references if r != self_path]
    self_reference = len(others) != len(references)
    try:
        if method == "text":
            if self_reference:
                return None  # text paths cannot refer to themselves
            inner = _parse_ca_hash(rest)
            if inner.algo != "sha256":
                return None
            return make_store_path(_make_type("text", others, False), inner, name)
        if method == "fixed":
            recursive = rest.startswith("r:")
            if recursive:
                rest = rest[2:]
            inner = _parse_ca_hash(rest)
            if recursive and inner.algo == "sha256":
                return make_store_path(_make_type("source", others, self_reference), inner, name)
            if others:
                return None  # Nix asserts flat/non-sha256 fixed outputs have no references
            prefix = "r:" if recursive else ""
            outer = Hash.sha256_of(f"fixed:out:{prefix}{inner.algo}:{inner.base16()}:".encode())
            return make_store_path("output:out", outer, name)
    except HashError:
        return None
    return None


def _parse_ca_hash(text: str) -> Hash:
    # CA fields use "<algo>:<digest>"; SRI or a bare digest is not a CA.
    if ":" not in text:
        raise HashError(f"CA hash {text!r} lacks its algorithm")
    return parse_hash(text)


def ca_matches(ca: str, store_path: str, references: Sequence[str]) -> bool:
    """
    :param ca: the ``CA:`` field of a narinfo (``text:sha256:...``,
        ``fixed:sha256:...``, ``fixed:r:sha256:...``, other algorithms for
        ``fixed``).
    :param store_path: the full store path the CA is claimed for.
    :param references: the path's references, as basenames or full paths,
        including a self-reference if any.
    :returns: whether recomputing the store path from ``ca`` and the
        references gives exactly ``store_path``.  ``False`` (never an
        exception) for anything unparsable and for git hashes, which we do
        not check.
    """
    if not isinstance(ca, str) or not isinstance(store_path, str):
        return False
    try:
        path = parse_store_path(store_path)
        full_refs = []
        for ref in references:
            if ref.startswith("/"):
                full_refs.append(parse_store_path(ref).path)
            else:
                full_refs.append(parse_basename(ref).path)
    except (StorePathError, AttributeError, TypeError):
        return False
    expected = expected_store_path(ca, path.name, full_refs, path.path)
    return expected == path.path
