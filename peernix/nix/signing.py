"""Nix-format ed25519 keys and narinfo signatures.

Key files are what ``nix-store --generate-binary-cache-key NAME sk pk``
writes (``local-keys.cc``): ``NAME:base64(64 bytes)`` for a secret key (the
libsodium secret, i.e. 32-byte seed followed by the 32-byte public key) and
``NAME:base64(32 bytes)`` for a public key.  A signature is
``NAME:base64(ed25519 signature of the fingerprint)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar, cast

import attrs
from attrs import field, frozen
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey


_KEY_NAME_RE = re.compile(r"[^:\s]+")

#: Largest key file we read; real ones are under 150 bytes.
_MAX_KEY_FILE_SIZE = 64 * 1024

#: Signature checks remembered (a digest of key, signature and fingerprint
#: -> whether it verified), oldest out first.
VERIFY_MEMO_SIZE = 8192
_VERIFIED: OrderedDict[bytes, bool] = OrderedDict()

_HOW_TO_MAKE = (
    "make a key pair with `nix-store --generate-binary-cache-key NAME sk pk` "
    "(use a NAME unique to this host, e.g. HOSTNAME-peernix-1)"
)


class KeyFormatError(ValueError):
    """A key is not in Nix's ``name:base64`` format, or its halves disagree."""


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


def _check_name(_inst: object, _attr: attrs.Attribute[str], name: str) -> None:
    if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
        raise KeyFormatError(f"invalid key name {name!r}: it must be non-empty, without ':' or spaces")


def _check_32_bytes(_inst: object, attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise KeyFormatError(f"{attr.name} must be 32 bytes")


@frozen
class PublicKey:
    """An ed25519 public key with its Nix key name."""

    name: str = field(validator=_check_name)
    key: bytes = field(validator=_check_32_bytes)
    # Built once: constructing a VerifyKey per verification would be waste on
    # the per-request path.
    _verify_key: VerifyKey = field(init=False, repr=False, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_verify_key", VerifyKey(self.key))

    def to_string(self) -> str:
        """:returns: ``name:base64(key)``, the ``trusted-public-keys`` form."""
        return f"{self.name}:{base64.b64encode(self.key).decode('ascii')}"

    def verify(self, fingerprint: bytes, sig: str) -> bool:
        """
        :param fingerprint: what was signed (:meth:`NarInfo.fingerprint`).
        :param sig: ``name:base64`` signature.
        :returns: whether ``sig`` is by this key (same name) and valid for
            ``fingerprint``; ``False`` for a malformed or foreign signature.
            Never raises.
        """
        parts = split_sig(sig) if isinstance(sig, str) else None
        if parts is None or parts[0] != self.name or not isinstance(fingerprint, bytes):
            return False
        # The same narinfo is checked several times over its life (trust
        # filter, share filter, every node's answer): an ed25519 check
        # costs ~0.1 ms, a look-up in the bounded memo far less.
        memo = _VERIFIED
        # A 16-byte digest of the three, not the three: a fingerprint lists
        # every reference, and thousands of them would weigh megabytes.
        memo_key = hashlib.blake2b(b"%d:%s%s%s" % (len(fingerprint), self.key, parts[1], fingerprint),
                                   digest_size=16).digest()
        known = memo.get(memo_key)
        if known is not None:
            return known
        try:
            self._verify_key.verify(fingerprint, parts[1])
            good = True
        except (CryptoError, ValueError, TypeError):
            good = False
        memo[memo_key] = good
        if len(memo) > VERIFY_MEMO_SIZE:
            memo.popitem(last=False)
        return good


@frozen
class SecretKey:
    """An ed25519 signing key (its 32-byte seed) with its Nix key name."""

    name: str = field(validator=_check_name)
    seed: bytes = field(validator=_check_32_bytes, repr=False)
    # Derived once: deriving the key pair from the seed costs a scalar
    # multiplication, too much to repeat per signature.
    _signing_key: SigningKey = field(init=False, repr=False, eq=False, hash=False)
    _public_key: PublicKey = field(init=False, repr=False, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        signing_key = SigningKey(self.seed)
        object.__setattr__(self, "_signing_key", signing_key)
        object.__setattr__(self, "_public_key", PublicKey(self.name, bytes(signing_key.verify_key)))

    @property
    def public_key(self) -> PublicKey:
        """:returns: the matching public key, with the same name."""
        return self._public_key

    def sign(self, fingerprint: bytes) -> str:
        """
        :param fingerprint: what to sign (:meth:`NarInfo.fingerprint`).
        :returns: ``name:base64(signature)``; ed25519 is deterministic, so
            the same fingerprint always gives the same string.
        """
        signature = self._signing_key.sign(fingerprint).signature
        return f"{self.name}:{base64.b64encode(signature).decode('ascii')}"

    def to_string(self) -> str:
        """:returns: ``name:base64(seed || public key)``, Nix's secret key file format."""
        raw = self.seed + self._public_key.key
        return f"{self.name}:{base64.b64encode(raw).decode('ascii')}"


def _split_key(text: str, what: str) -> tuple[str, bytes]:
    if not isinstance(text, str):
        raise KeyFormatError(f"{what} must be text")
    name, colon, b64 = text.strip().partition(":")
    if not colon or not name:
        raise KeyFormatError(f"{what} is not in the form NAME:BASE64; {_HOW_TO_MAKE}")
    if not _KEY_NAME_RE.fullmatch(name):
        raise KeyFormatError(f"{what} has an invalid name (it must not contain spaces); {_HOW_TO_MAKE}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} {name!r} is not valid base64; {_HOW_TO_MAKE}") from None
    return name, raw


def parse_secret_key(text: str) -> SecretKey:
    """
    Parse a secret key in Nix's format.

    :param text: ``NAME:base64(32-byte seed || 32-byte public key)``;
        surrounding whitespace (a trailing newline) is ignored.
    :raises KeyFormatError: if the text is not in that form, or the public
        half does not belong to the seed.  The message never contains key
        material.
    """
    name, raw = _split_key(text, "secret key")
    if len(raw) != 64:
        if len(raw) == 32:
            raise KeyFormatError(
                f"secret key {name!r} has 32 bytes: this looks like a public key; {_HOW_TO_MAKE}"
            )
        raise KeyFormatError(f"secret key {name!r} must decode to 64 bytes, got {len(raw)}; {_HOW_TO_MAKE}")
    key = SecretKey(name, raw[:32])
    if key.public_key.key != raw[32:]:
        raise KeyFormatError(f"secret key {name!r} is corrupt: its public half does not match its seed")
    return key


def parse_public_key(text: str) -> PublicKey:
    """
    Parse a public key in Nix's format.

    :param text: ``NAME:base64(32 bytes)``; surrounding whitespace is ignored.
    :raises KeyFormatError: if it is not in that form.
    """
    name, raw = _split_key(text, "public key")
    if len(raw) != 32:
        raise KeyFormatError(f"public key {name!r} must decode to 32 bytes, got {len(raw)}; {_HOW_TO_MAKE}")
    return PublicKey(name, raw)


def parse_public_keys(text: str) -> dict[str, PublicKey]:
    """
    Parse a whitespace-separated list of public keys, as in Nix's
    ``trusted-public-keys``.

    :returns: the keys by name.  When two keys share a name only the first
        counts, as in Nix (``keys.cc`` uses ``emplace``).
    :raises KeyFormatError: if any item is not a public key.
    """
    keys: dict[str, PublicKey] = {}
    for item in text.split():
        key = parse_public_key(item)
        keys.setdefault(key.name, key)
    return keys


def load_secret_key_file(path: str) -> SecretKey:
    """
    Read a secret key file written by ``nix-store --generate-binary-cache-key``.

    This does blocking file I/O; call it at start-up or in a thread.

    :raises KeyFormatError: naming ``path`` and the problem when the file is
        missing, unreadable, too large, not text or not a valid secret key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_SIZE + 1)
    except OSError as e:
        raise KeyFormatError(
            f"cannot read secret key file {path!r}: {e.strerror or e}; {_HOW_TO_MAKE}"
        ) from None
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFormatError(f"secret key file {path!r} is too large to be a key; {_HOW_TO_MAKE}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFormatError(f"secret key file {path!r} is not text; {_HOW_TO_MAKE}") from None
    try:
        return parse_secret_key(text)
    except KeyFormatError as e:
        raise KeyFormatError(f"secret key file {path!r}: {e}") from None


def verify_any(fingerprint: bytes, sigs: Iterable[str], keys: Mapping[str, PublicKey]) -> bool:
    """
    Nix's trust rule: one good signature by a trusted key is enough.

    :param sigs: ``name:base64`` signatures; malformed ones and those by
        names not in ``keys`` are ignored.
    :param keys: trusted keys by name.
    :returns: whether some signature verifies against the key of its name.
    """
    for sig in sigs:
        name = sig.partition(":")[0] if isinstance(sig, str) else ""
        key = keys.get(name)
        if key is not None and key.verify(fingerprint, sig):
            return True
    return False


class Signable(Protocol):
    """
    What :func:`sign_narinfo` needs of a narinfo: its fingerprint and
    signatures (an attrs class, copied with ``attrs.evolve``).  A protocol,
    so this module does not import :mod:`peernix.nix.narinfo`, which
    imports it.
    """

    @property
    def sigs(self) -> tuple[str, ...]: ...

    def fingerprint(self) -> bytes: ...


_Signable = TypeVar("_Signable", bound=Signable)


def sign_narinfo(info: _Signable, key: SecretKey) -> _Signable:
    """
    :param info: a :class:`peernix.nix.narinfo.NarInfo`.
    :returns: a copy of ``info`` with ``key``'s signature of its fingerprint
        appended, or ``info`` itself when that signature is already there.
    """
    sig = key.sign(info.fingerprint())
    if sig in info.sigs:
        return info
    # attrs' mypy plugin cannot evolve a protocol-bound type variable; the
    # protocol's contract is an attrs instance with a ``sigs`` field.
    record: Any = info
    return cast(_Signable, attrs.evolve(record, sigs=(*info.sigs, sig)))
