"""
Which peer narinfos may reach the local Nix.

The default trusted set is what the local Nix trusts: ``trusted-public-keys``
from ``nix.conf``, read the way Nix reads it.  A narinfo is trusted when one
of its signatures verifies against the trusted key of the same name, or when
its ``CA:`` field really names its store path.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from twisted.logger import Logger

from peernix.nix.ca import ca_matches
from peernix.nix.narinfo import NarInfo
from peernix.nix.signing import KeyFormatError, PublicKey, parse_public_key, verify_any

log = Logger()

#: What Nix trusts when ``trusted-public-keys`` is never set (``globals.hh``),
#: checked with ``nix show-config`` on Nix 2.8 with no ``nix.conf`` at all.
NIX_DEFAULT_TRUSTED_KEYS = ("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",)

_SETTING = "trusted-public-keys"
#: Nix's deprecated alias of the same setting.
_ALIAS = "binary-cache-public-keys"
_MAX_CONF_SIZE = 1024 * 1024
_MAX_INCLUDE_DEPTH = 16


class NixConfError(ValueError):
    """``nix.conf`` (or a file it includes) is malformed or an include is missing."""


def _read_conf(path: str, depth: int, settings: list[tuple[str, str]]) -> None:
    """Parse one config file into ``(name, value)`` pairs in order, following includes."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise NixConfError(f"includes nested too deeply at {path!r}")
    with open(path, "rb") as f:
        data = f.read(_MAX_CONF_SIZE + 1)
    if len(data) > _MAX_CONF_SIZE:
        raise NixConfError(f"{path!r} is too large for a nix.conf")
    text = data.decode("utf-8", errors="replace")
    # Like Nix's applyConfigInner: no line continuations, "#" starts a
    # comment anywhere, tokens are whitespace separated.
    for raw_line in text.split("\n"):
        line = raw_line.split("#", 1)[0]
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise NixConfError(f"illegal configuration line {raw_line!r} in {path!r}")
        if tokens[0] in ("include", "!include"):
            if len(tokens) != 2:
                raise NixConfError(f"illegal configuration line {raw_line!r} in {path!r}")
            included = os.path.join(os.path.dirname(path), tokens[1])
            if os.path.exists(included):
                _read_conf(included, depth + 1, settings)
            elif tokens[0] == "include":
                raise NixConfError(f"file {included!r} included from {path!r} not found")
            continue
        if tokens[1] != "=":
            raise NixConfError(f"illegal configuration line {raw_line!r} in {path!r}")
        settings.append((tokens[0], " ".join(tokens[2:])))


def read_nix_conf(
    nix_conf_dir: str | None = None, env: Mapping[str, str] = os.environ
) -> list[tuple[str, str]]:
    """
    Read ``<dir>/nix.conf`` (``dir`` is ``nix_conf_dir``, else
    ``$NIX_CONF_DIR``, else ``/etc/nix``) the way Nix reads it, includes
    followed (see :func:`read_nix_trusted_keys` for the rules).

    Blocking file I/O: call it at start-up.

    :returns: every ``(name, value)`` assignment in file order; none when
        the file does not exist.
    :raises NixConfError: for a malformed line, a missing ``include`` or an
        unreadable file.
    """
    conf_dir = nix_conf_dir or env.get("NIX_CONF_DIR") or "/etc/nix"
    path = os.path.join(conf_dir, "nix.conf")
    settings: list[tuple[str, str]] = []
    if os.path.exists(path):
        try:
            _read_conf(path, 0, settings)
        except OSError as e:
            raise NixConfError(f"cannot read {e.filename or path!r}: {e.strerror or e}") from None
    return settings


def nix_list_setting(
    settings: Iterable[tuple[str, str]], names: Iterable[str], default: Iterable[str]
) -> list[str]:
    """
    :param settings: as :func:`read_nix_conf` returns them.
    :param names: the setting's name and its aliases (``substituters``,
        ``binary-caches``).
    :param default: Nix's built-in value, used when the setting is never
        assigned.
    :returns: the value of a list setting as Nix computes it: an assignment
        replaces the list, ``extra-<name>`` appends, in file order.
    """
    names = tuple(names)
    value = list(default)
    for name, text in settings:
        if name in names:
            value = text.split()
        elif name.startswith("extra-") and name[6:] in names:
            value.extend(text.split())
    return value


#: What Nix substitutes from when ``substituters`` is never set (``globals.hh``).
NIX_DEFAULT_SUBSTITUTERS = ("https://cache.nixos.org/",)


def read_nix_substituters(
    nix_conf_dir: str | None = None, env: Mapping[str, str] = os.environ
) -> list[str]:
    """
    Read the local Nix's ``substituters`` and ``extra-substituters`` (and
    their deprecated aliases ``binary-caches``/``extra-binary-caches``) from
    the same ``nix.conf`` :func:`read_nix_trusted_keys` reads.

    Blocking file I/O: call it at start-up.

    :returns: the substituter URLs as written, in order; Nix's default
        (:data:`NIX_DEFAULT_SUBSTITUTERS`) when never set.
    :raises NixConfError: see :func:`read_nix_conf`.
    """
    return nix_list_setting(read_nix_conf(nix_conf_dir, env), ("substituters", "binary-caches"),
                            NIX_DEFAULT_SUBSTITUTERS)


def read_nix_trusted_keys(
    nix_conf_dir: str | None = None, env: Mapping[str, str] = os.environ
) -> list[PublicKey]:
    """
    Read the keys the local Nix trusts from ``<dir>/nix.conf``.

    ``dir`` is ``nix_conf_dir``, else ``$NIX_CONF_DIR``, else ``/etc/nix``.
    As in Nix: ``trusted-public-keys`` (or its alias
    ``binary-cache-public-keys``) replaces the value, ``extra-...`` appends,
    in file order; ``include F`` / ``!include F`` are relative to the
    including file (a missing ``include`` is an error, a missing
    ``!include`` is skipped); ``#`` starts a comment; there are no line
    continuations.  When the setting is never assigned (including when
    ``nix.conf`` does not exist), Nix's built-in default
    :data:`NIX_DEFAULT_TRUSTED_KEYS` applies, exactly as for Nix itself.

    Blocking file I/O: call it at start-up.

    :returns: the keys in order; unparsable keys are skipped with a warning.
        Duplicate names are kept here; :class:`TrustPolicy` keeps the first.
    :raises NixConfError: for a malformed line or a missing ``include``.
    """
    value = nix_list_setting(read_nix_conf(nix_conf_dir, env), (_SETTING, _ALIAS),
                             NIX_DEFAULT_TRUSTED_KEYS)
    keys = []
    for item in value:
        try:
            keys.append(parse_public_key(item))
        except KeyFormatError as e:
            log.warn("ignoring unparsable trusted public key {key!r}: {error}", key=item, error=str(e))
    return keys


class TrustPolicy:
    """
    Nix's trust rule for substitutes, applied to peer narinfos before they
    reach the local Nix.

    :param keys: trusted public keys.  When two share a name, the first one
        counts, as in Nix (``keys.cc`` uses ``emplace``).
    """

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            self._keys.setdefault(key.name, key)

    @property
    def keys(self) -> Mapping[str, PublicKey]:
        """:returns: the trusted keys by name."""
        return dict(self._keys)

    def is_trusted(self, info: NarInfo) -> bool:
        """
        :returns: whether some signature of ``info`` verifies against the
            trusted key of its name, or ``info`` has a ``CA:`` that really
            names its store path (given its references).  Never raises.
        """
        try:
            fingerprint = info.fingerprint()
        except (ValueError, TypeError):
            return False
        if verify_any(fingerprint, info.sigs, self._keys):
            return True
        return info.ca is not None and ca_matches(info.ca, info.store_path, info.references)
