"""
Pure HTTP negotiation helpers for NAR responses: ``Accept-Encoding`` and
``Range`` (RFC 9110 §12.5.3 and §14).  No I/O, no Twisted.
"""

from __future__ import annotations

#: Transport encodings we can produce, most preferred first (ties in q-value
#: go to the earlier one).  zstd is both faster and smaller than gzip.
SUPPORTED_ENCODINGS: tuple[str, ...] = ("zstd", "gzip")

#: Aliases a client may list for an encoding we support (RFC 9110 §8.4.1.3:
#: ``x-gzip`` is equivalent to ``gzip``).
_ALIASES = {"x-gzip": "gzip"}


def _is_digits(text: str) -> bool:
    """:returns: whether ``text`` is non-empty ASCII digits (``str.isdigit`` also accepts e.g. ``²``)."""
    return bool(text) and all(c in "0123456789" for c in text)


class RangeNotSatisfiable(ValueError):
    """
    A syntactically valid single ``bytes`` range lies wholly outside the
    representation: answer 416 with ``Content-Range: bytes */<size>``.
    """


def _parse_qvalue(text: str) -> float | None:
    """
    :returns: the weight of a ``q=`` parameter value (RFC 9110 §12.4.2:
        ``0[.ddd]`` or ``1[.000]``), or ``None`` when it is malformed.
    """
    head, _dot, frac = text.partition(".")
    if head not in ("0", "1") or len(frac) > 3 or (frac and not _is_digits(frac)):
        return None
    value = float(f"{head}.{frac or '0'}")
    return value if value <= 1.0 else None


def parse_accept_encoding(header: bytes) -> dict[str, float]:
    """
    Parse an ``Accept-Encoding`` value into ``{coding: weight}``.

    Tokens are lower-cased (codings are case-insensitive).  Elements with a
    malformed weight are dropped.  When a coding is listed twice the lower
    weight wins, so an explicit refusal (``q=0``) is never overridden.

    :param header: the raw header value (several header lines joined with
        ``,``).
    """
    weights: dict[str, float] = {}
    for element in header.decode("latin-1").split(","):
        parts = element.split(";")
        coding = parts[0].strip().lower()
        if not coding:
            continue
        weight: float | None = 1.0
        for param in parts[1:]:
            name, eq, value = param.partition("=")
            if name.strip().lower() == "q":
                weight = _parse_qvalue(value.strip()) if eq else None
        if weight is None:
            continue
        coding = _ALIASES.get(coding, coding)
        weights[coding] = min(weight, weights.get(coding, weight))
    return weights


def choose_encoding(header: bytes | None) -> str | None:
    """
    Choose the transport encoding of a response from the request's
    ``Accept-Encoding`` header.

    Only codings the client accepts with a non-zero weight (explicitly, or
    through ``*``) are candidates; the highest weight wins, ties go to zstd
    before gzip.  When the client weights ``identity`` strictly higher than
    every candidate (explicitly), no encoding is used.  If nothing but identity is
    acceptable, or even identity is refused, the answer is still
    uncompressed (RFC 9110 lets a server ignore the header rather than send
    406).

    :param header: the raw header value, or ``None`` when the request has
        none (old Nix clients never send one).
    :returns: ``"zstd"``, ``"gzip"``, or ``None`` for no ``Content-Encoding``
        (never ``"identity"``: Nix 2.14–2.30 cannot decode a response that
        names it).
    """
    if header is None:
        return None
    weights = parse_accept_encoding(header)
    star = weights.get("*")
    best: str | None = None
    best_weight = 0.0
    for coding in SUPPORTED_ENCODINGS:
        weight = weights.get(coding, star if star is not None else 0.0)
        if weight > best_weight:
            best, best_weight = coding, weight
    if best is None:
        return None
    # identity competes only when the client weighted it explicitly (its
    # implicit acceptability in RFC 9110 §12.5.3 is no preference, else any
    # "gzip;q=0.8" would never be honoured), and wins only when preferred
    # strictly.
    identity = weights.get("identity")
    if identity is not None and identity > best_weight:
        return None
    return best


#: Digits in a Range bound worth reading: 10**19 bytes is far beyond any NAR.
MAX_RANGE_DIGITS = 19


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    Interpret a ``Range`` header against a representation of ``size`` bytes.

    Only a single range in the ``bytes`` unit is honoured: ``a-b``, ``a-`` or
    the suffix form ``-n``.  Anything else (another unit, several ranges, a
    syntax error such as ``b < a``) is ignored, which RFC 9110 §14.2 allows:
    the caller then sends the whole representation with 200.

    :param header: the raw ``Range`` value, or ``None``.
    :param size: the full length of the representation.
    :returns: ``(first, last)``, both inclusive and within ``[0, size)``, or
        ``None`` to serve the whole representation.
    :raises RangeNotSatisfiable: when the one range is valid but starts at
        or beyond ``size``, or is the empty suffix ``-0``.
    """
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    unit, eq, spec = text.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    ranges = [r.strip() for r in spec.split(",") if r.strip()]
    if len(ranges) != 1:
        return None
    first_text, dash, last_text = ranges[0].partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or (first_text and not _is_digits(first_text)) or (last_text and not _is_digits(last_text)):
        return None
    if len(first_text) > MAX_RANGE_DIGITS or len(last_text) > MAX_RANGE_DIGITS:
        # No NAR is that large; also keeps int() away from its digit limit.
        return None
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range -{suffix} of {size} bytes")
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    if last_text:
        last = int(last_text)
        if last < first:
            return None
    else:
        last = size - 1
    if first >= size:
        raise RangeNotSatisfiable(f"range starts at {first}, size is {size}")
    return first, min(last, size - 1)
