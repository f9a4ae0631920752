"""
Sizes as people write them: ``4Gi``, ``500M``, ``1048576``.

A pure parser shared by every size setting (``--staging-max-size``,
``--max-upload-rate``...), so they all read the same syntax.
"""

from __future__ import annotations

import re

#: Suffix -> multiplier.  ``K``/``M``/``G``/``T`` are powers of 1000 (as
#: disk vendors and ``dd`` write them), ``Ki``/``Mi``/``Gi``/``Ti`` powers of
#: 1024; a trailing ``B`` is allowed (``4GiB``).  Lower-case ``k`` is
#: accepted for kilo, the SI spelling; other prefixes are upper case only,
#: so ``m`` (milli) is never read as mega.
SIZE_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGT]i?|)B?\s*")


class SizeError(ValueError):
    """A size is malformed; the message says what is expected."""


def parse_size(text: str) -> int:
    """
    Read a size in bytes.

    :param text: a number with an optional suffix: ``4096``, ``4K`` (4000),
        ``4Ki`` (4096), ``1.5Gi``, ``200MB``; see :data:`SIZE_SUFFIXES`.
        Fractions are allowed with a suffix and rounded down to whole bytes.
    :returns: the number of bytes (0 or more).
    :raises SizeError: for anything else, saying what is expected.
    """
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None or (match.group(2) == "ki"):
        raise SizeError(
            f"expected a size in bytes such as 4096, 500M or 4Gi "
            f"(K, M, G: powers of 1000; Ki, Mi, Gi: powers of 1024), got {text!r}"
        )
    number, suffix = match.groups()
    if "." in number and not suffix:
        raise SizeError(f"expected a whole number of bytes, got {text!r}")
    whole, _, fraction = number.partition(".")
    multiplier = SIZE_SUFFIXES[suffix]
    # Exact integer arithmetic: no float rounding for large sizes.
    value = int(whole) * multiplier
    if fraction:
        value += int(fraction) * multiplier // 10 ** len(fraction)
    return value


def format_size(size: int) -> str:
    """
    :returns: ``size`` in the largest binary unit that shows it exactly
        (``4Gi``, ``1536Ki``, ``1000``): what :func:`parse_size` reads back.
    """
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        multiplier = SIZE_SUFFIXES[suffix]
        if size and size % multiplier == 0:
            return f"{size // multiplier}{suffix}"
    return str(size)
