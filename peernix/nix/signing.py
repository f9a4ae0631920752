"""Nix-format ed25519 keys and narinfo signatures."""

from __future__ import annotations

import base64
import binascii
import re

_KEY_NAME_RE = re.compile(r"[^:\s]+")


def split_sig(sig: str) -> tuple[str, bytes] | None:
    """
    Split ``name:base64`` into the key name and the raw signature.

    :returns: ``(name, 64 raw bytes)``, or ``None`` if ``sig`` is malformed
        (no name, bad base64, or not exactly 64 bytes), which Nix would reject
        as "signature is corrupt".
    """
    name, colon, b64 = sig.partition(":")
    if not colon or not _KEY_NAME_RE.fullmatch(name):
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 64:
        return None
    return name, raw


def is_well_formed_sig(sig: str) -> bool:
    """:returns: whether ``sig`` is ``name:base64(64 bytes)``."""
    return split_sig(sig) is not None
