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
from peernix.nixconf import CACHE_NIXOS_ORG_KEY, NIX_DEFAULTS, NixConfError, nix_conf_path, read_nix_conf

__all__ = [
    "NIX_DEFAULT_SUBSTITUTERS",
    "NIX_DEFAULT_TRUSTED_KEYS",
    "NixConfError",
    "TrustPolicy",
    "read_nix_substituters",
    "read_nix_trusted_keys",
]

log = Logger()

#: What Nix trusts when ``trusted-public-keys`` is never set (``globals.hh``),
#: checked with ``nix show-config`` on Nix 2.8 with no ``nix.conf`` at all.
NIX_DEFAULT_TRUSTED_KEYS = (CACHE_NIXOS_ORG_KEY,)


#: What Nix substitutes from when ``substituters`` is never set (``globals.hh``).
NIX_DEFAULT_SUBSTITUTERS = tuple(NIX_DEFAULTS["substituters"].split())


def read_nix_substituters(
    nix_conf_dir: str | None = None, env: Mapping[str, str] = os.environ
) -> list[str]:
    """
    Read the local Nix's ``substituters`` and ``extra-substituters`` (and
    their deprecated aliases) from the same ``nix.conf`` as
    :func:`read_nix_trusted_keys`: the default upstreams of fetching for the
    LAN (:mod:`peernix.upstream.config`).

    Blocking file I/O: call it at start-up.

    :returns: the substituter URLs as written, in order; Nix's default
        (:data:`NIX_DEFAULT_SUBSTITUTERS`) when never set.
    :raises NixConfError: see :func:`read_nix_trusted_keys`.
    """
    return list(read_nix_conf(nix_conf_path(nix_conf_dir, env)).substituters)


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
    value = read_nix_conf(nix_conf_path(nix_conf_dir, env)).trusted_public_keys
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
