"""The ``.narinfo`` format: data type, parser, renderer, signing fingerprint.

The parser follows Nix's ``NarInfo::NarInfo`` (``nar-info.cc``) and is
stricter only where Nix's own leniency is accidental (a line without
``": "`` makes Nix read the *next* line as the value; we reject it).  The
renderer follows ``NarInfo::to_string`` field for field.
"""

from __future__ import annotations

import re

from attrs import field, frozen

from peernix.nix.hashes import Hash, HashError, parse_hash
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import is_well_formed_sig
from peernix.nix.storepath import STORE_DIR, StorePathError, parse_basename, parse_store_path

#: Largest narinfo we parse.  Real ones are a few hundred bytes; even a path
#: with thousands of references stays far below this.
MAX_NARINFO_SIZE = 64 * 1024

#: What Nix assumes when ``Compression:`` is missing or empty (``nar-info.cc``).
DEFAULT_COMPRESSION = "bzip2"

#: URL and Compression values: printable ASCII without spaces.  Nix itself
#: takes any byte here, but nothing legitimate needs more and a control
#: character in a URL would only fail later, deeper in some HTTP client.
_TOKEN_RE = re.compile(r"[!-~]+")
_DECIMAL_RE = re.compile(r"[0-9]{1,20}")
_U64_MAX = 2**64 - 1


class NarInfoError(ValueError):
    """A narinfo is malformed; the message says which line or field."""


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
        """
        :returns: the narinfo of a local path served at ``url``.  With
            ``compression="none"`` the file is the NAR, so ``FileHash`` and
            ``FileSize`` equal ``NarHash`` and ``NarSize`` (as ``nix copy
            --to file://...?compression=none`` writes them); otherwise the
            file's hash is not known before it is made and both are left out.
        """
        raw = compression == "none"
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
            file_hash=info.nar_hash if raw else None,
            file_size=info.nar_size if raw else None,
        )

    def fingerprint(self) -> bytes:
        """
        :returns: what Nix signs: ``1;<path>;<sha256:nix32>;<size>;<refs>``
            with full reference paths, sorted, comma-separated.
        """
        refs = ",".join(f"{STORE_DIR}/{r}" for r in self.references)
        return f"1;{self.store_path};{self.nar_hash.to_string()};{self.nar_size};{refs}".encode()


def is_valid_ca(value: str) -> bool:
    """
    :returns: whether ``value`` is a content address Nix parses
        (``content-address.cc``): ``text:<sha256 hash>``,
        ``fixed:<hash>``, ``fixed:r:<hash>`` or ``fixed:git:<hash>``, where
        ``<hash>`` is any prefixed or SRI form :func:`parse_hash` accepts.
    """
    method, colon, rest = value.partition(":")
    if not colon:
        return False
    try:
        if method == "text":
            # ``parse_hash`` without ``algo`` insists on a prefixed form.
            return parse_hash(rest).algo == "sha256"
        if method == "fixed":
            if rest.startswith(("r:", "git:")):
                rest = rest.partition(":")[2]
            parse_hash(rest)
            return True
    except HashError:
        return False
    return False


def _parse_u64(key: str, value: str) -> int:
    if not _DECIMAL_RE.fullmatch(value):
        raise NarInfoError(f"{key} {value[:40]!r} is not a decimal number")
    n = int(value)
    if n > _U64_MAX:
        raise NarInfoError(f"{key} {value!r} is too large")
    return n


def _parse_hash_field(key: str, value: str) -> Hash:
    try:
        return parse_hash(value)
    except HashError as e:
        raise NarInfoError(f"invalid {key}: {e}") from None


def _check_basename(key: str, value: str) -> str:
    try:
        parse_basename(value)
    except StorePathError as e:
        raise NarInfoError(f"invalid {key}: {e}") from None
    return value


def parse_narinfo(data: bytes | bytearray | memoryview | str) -> NarInfo:
    """
    Parse a narinfo as Nix does.

    Every line is ``Key: value\\n`` (exactly one space after the first colon,
    the last line ends in a newline).  Unknown keys are ignored; repeated
    keys overwrite earlier ones except ``References`` and ``CA``, which may
    appear once.  Malformed ``Sig`` lines and duplicate signatures are
    dropped, as a cache should rather than fail.

    :param data: the narinfo, at most :data:`MAX_NARINFO_SIZE` bytes of
        UTF-8 (or the equivalent ``str``).
    :returns: the narinfo; ``compression`` is ``"bzip2"`` when the file does
        not say, ``deriver`` is ``None`` for ``unknown-deriver``.
    :raises NarInfoError: for any malformed input, and never another
        exception.
    """
    if isinstance(data, str):
        if len(data) > MAX_NARINFO_SIZE:
            raise NarInfoError(f"narinfo is larger than {MAX_NARINFO_SIZE} bytes")
        try:
            # Lone surrogates would survive into values (a Sig key name) and
            # only fail when the rendering is encoded for the wire.
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise NarInfoError("narinfo is not valid Unicode") from None
        text = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_NARINFO_SIZE:
            raise NarInfoError(f"narinfo is larger than {MAX_NARINFO_SIZE} bytes")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise NarInfoError("narinfo is not valid UTF-8") from None
    else:
        raise NarInfoError(f"narinfo must be bytes or str, not {type(data).__name__}")
    if not text:
        raise NarInfoError("narinfo is empty")
    if not text.endswith("\n"):
        raise NarInfoError("narinfo does not end in a newline")

    store_path: str | None = None
    url = ""
    compression = ""
    nar_hash: Hash | None = None
    nar_size = 0
    references: list[str] | None = None
    deriver: str | None = None
    sigs: list[str] = []
    ca: str | None = None
    seen_ca = False
    file_hash: Hash | None = None
    file_size: int | None = None

    for lineno, line in enumerate(text[:-1].split("\n"), 1):
        colon = line.find(":")
        if colon <= 0 or line[colon + 1:colon + 2] != " ":
            raise NarInfoError(f"line {lineno} is not 'Key: value'")
        key = line[:colon]
        value = line[colon + 2:]
        if key == "StorePath":
            try:
                store_path = parse_store_path(value).path
            except StorePathError as e:
                raise NarInfoError(f"invalid StorePath: {e}") from None
        elif key == "URL":
            url = value
        elif key == "Compression":
            compression = value
        elif key == "FileHash":
            file_hash = _parse_hash_field(key, value)
        elif key == "FileSize":
            file_size = _parse_u64(key, value)
        elif key == "NarHash":
            nar_hash = _parse_hash_field(key, value)
        elif key == "NarSize":
            nar_size = _parse_u64(key, value)
        elif key == "References":
            if references is not None:
                raise NarInfoError("References appears twice")
            # Nix tokenizes on spaces, so runs of spaces are one separator.
            references = [_check_basename("reference", r) for r in value.split(" ") if r]
        elif key == "Deriver":
            deriver = None if value == "unknown-deriver" else _check_basename(key, value)
        elif key == "Sig":
            if is_well_formed_sig(value) and value not in sigs:
                sigs.append(value)
        elif key == "CA":
            if seen_ca:
                raise NarInfoError("CA appears twice")
            seen_ca = True
            if value:
                if not is_valid_ca(value):
                    raise NarInfoError(f"invalid CA {value[:80]!r}")
                ca = value

    if store_path is None:
        raise NarInfoError("StorePath is missing")
    if not url:
        raise NarInfoError("URL is missing or empty")
    if not _TOKEN_RE.fullmatch(url):
        raise NarInfoError("URL contains spaces, control or non-ASCII characters")
    if not compression:
        compression = DEFAULT_COMPRESSION
    elif not _TOKEN_RE.fullmatch(compression):
        raise NarInfoError("Compression contains spaces, control or non-ASCII characters")
    if nar_hash is None:
        raise NarInfoError("NarHash is missing")
    if nar_hash.algo != "sha256":
        raise NarInfoError(f"NarHash must be sha256, not {nar_hash.algo}")
    if nar_size == 0:
        raise NarInfoError("NarSize is missing or zero")
    return NarInfo(
        store_path=store_path,
        url=url,
        compression=compression,
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=tuple(references or ()),
        deriver=deriver,
        sigs=tuple(sigs),
        ca=ca,
        file_hash=file_hash,
        file_size=file_size,
    )


def render_narinfo(info: NarInfo) -> str:
    """
    Render ``info`` as Nix's ``NarInfo::to_string`` does.

    Field order: StorePath, URL, Compression, FileHash?, FileSize?, NarHash
    (``sha256:<nix32>``), NarSize, ``References: `` (always, with its space
    even when empty, because ``References:`` alone breaks Nix's parser),
    Deriver?, one Sig line per signature, CA?.  ``parse_narinfo`` of the
    result equals ``info`` whenever ``info`` holds valid values.

    :raises NarInfoError: if a field contains a newline, which would let it
        forge other lines.
    """
    lines = [
        f"StorePath: {info.store_path}",
        f"URL: {info.url}",
        f"Compression: {info.compression}",
    ]
    if info.file_hash is not None:
        lines.append(f"FileHash: {info.file_hash.to_string()}")
    if info.file_size is not None:
        lines.append(f"FileSize: {info.file_size}")
    lines.append(f"NarHash: {info.nar_hash.to_string()}")
    lines.append(f"NarSize: {info.nar_size}")
    lines.append("References: " + " ".join(info.references))
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver}")
    lines.extend(f"Sig: {sig}" for sig in info.sigs)
    if info.ca is not None:
        lines.append(f"CA: {info.ca}")
    lines.append("")
    out = "\n".join(lines)
    # One count over a few hundred characters is far cheaper than checking
    # every field, and catches any embedded newline.
    if out.count("\n") != len(lines) - 1:
        raise NarInfoError("a narinfo field contains a newline")
    return out
