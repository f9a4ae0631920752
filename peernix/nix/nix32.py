"""Nix's base-32 encoding ("nix32").

It is *not* RFC 4648 base32: the alphabet omits ``e o u t`` and the digest is
read as a little-endian integer printed most significant digit first.
"""

from __future__ import annotations

import re

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
ALPHABET_SET = frozenset(ALPHABET)
#: Whole strings of the alphabet (checked in C, not a Python loop per character).
_ALPHABET_RE = re.compile("[0-9a-df-np-sv-z]*")
#: nix32 digits to the digits ``int(..., 32)`` reads (0-9, a-v): decoding is
#: then one C call.
_TO_BASE32 = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")
#: Every 10-bit value as its two nix32 digits: encoding two digits per step
#: is ~3x faster than one (the narinfo hot path encodes several hashes per
#: answer).
_PAIRS = tuple(ALPHABET[i >> 5] + ALPHABET[i & 31] for i in range(1024))


class Nix32Error(ValueError):
    """A string is not valid nix32 for the requested length."""


def encoded_length(nbytes: int) -> int:
    """
    :returns: the number of nix32 characters that encode ``nbytes`` bytes.
    """
    return (nbytes * 8 - 1) // 5 + 1 if nbytes else 0


def decoded_length(nchars: int) -> int | None:
    """
    :returns: the byte length whose encoding has ``nchars`` characters, or
        ``None`` when no byte length encodes to that many characters.
    """
    nbytes = nchars * 5 // 8
    for n in (nbytes, nbytes + 1):
        if encoded_length(n) == nchars:
            return n
    return None


def encode(data: bytes) -> str:
    """
    Encode ``data`` in nix32.

    :returns: ``encoded_length(len(data))`` characters.
    """
    length = encoded_length(len(data))
    n = int.from_bytes(data, "little")
    pairs = _PAIRS
    text = "".join([pairs[(n >> shift) & 1023] for shift in range(10 * ((length + 1) // 2) - 10, -10, -10)])
    # An odd length has one leading digit too many (a zero: n < 32**length).
    return text[1:] if length & 1 else text


def in_alphabet(text: str) -> bool:
    """:returns: whether every character of ``text`` is in the nix32 alphabet (true for ``""``)."""
    return _ALPHABET_RE.fullmatch(text) is not None


def decode(text: str) -> bytes:
    """
    Decode nix32 ``text``.

    :raises Nix32Error: for characters outside the alphabet, a length that no
        byte string encodes to, or non-zero bits beyond the last byte.
    """
    nbytes = decoded_length(len(text))
    if nbytes is None:
        raise Nix32Error(f"invalid nix32 length {len(text)}")
    if not in_alphabet(text):
        bad = next(c for c in text if c not in ALPHABET_SET)
        raise Nix32Error(f"invalid nix32 character {bad!r}")
    n = int(text.translate(_TO_BASE32), 32) if text else 0
    if n >> (8 * nbytes):
        raise Nix32Error("nix32 string has non-zero padding bits")
    return n.to_bytes(nbytes, "little")


def is_nix32(text: str, nbytes: int) -> bool:
    """
    :returns: whether ``text`` is exactly the nix32 encoding of some
        ``nbytes``-byte string.
    """
    if len(text) != encoded_length(nbytes):
        return False
    try:
        decode(text)
    except Nix32Error:
        return False
    return True
