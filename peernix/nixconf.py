"""
The local Nix's ``nix.conf``, read the way Nix reads it.

:func:`read_nix_conf` turns ``<dir>/nix.conf`` (``dir`` is ``$NIX_CONF_DIR``,
else ``/etc/nix``) and the files it includes into a :class:`NixConf`: the
``name = value`` assignments in the order Nix applies them.  Its accessors
resolve a setting as Nix does: an assignment replaces the value, an
``extra-NAME`` assignment appends to it, in file order, and a setting never
assigned has Nix's built-in default (:data:`NIX_DEFAULTS`).

The trusted keys of the fan-out (:mod:`peernix.peers.trust`) and every
``nix.conf`` check of ``peernix doctor`` (:mod:`peernix.doctor`) come from
here, so both see the same file the same way.

Only reading the files is I/O; the opener is injectable for tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import IO

from attrs import frozen

#: cache.nixos.org's public key: what Nix trusts when ``trusted-public-keys``
#: is never set (``globals.hh``), checked with ``nix show-config`` on Nix
#: 2.8 with no ``nix.conf`` at all.
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="

#: The built-in values of the settings peernix reads, as Nix has them when
#: ``nix.conf`` never assigns them.
NIX_DEFAULTS: Mapping[str, str] = {
    "substituters": "https://cache.nixos.org/",
    "trusted-substituters": "",
    "trusted-public-keys": CACHE_NIXOS_ORG_KEY,
    "narinfo-cache-negative-ttl": "3600",
}

#: Nix's deprecated names of the same settings (``globals.hh`` aliases).
ALIASES: Mapping[str, str] = {
    "binary-caches": "substituters",
    "trusted-binary-caches": "trusted-substituters",
    "binary-cache-public-keys": "trusted-public-keys",
}

_MAX_CONF_SIZE = 1024 * 1024
_MAX_INCLUDE_DEPTH = 16

#: Opens a file for binary reading (``open`` in production).
Opener = Callable[[str], IO[bytes]]


class NixConfError(ValueError):
    """``nix.conf`` (or a file it includes) is malformed, unreadable, or an include is missing."""


class NixConfUnreadable(NixConfError):
    """
    ``nix.conf`` or a file it includes exists but cannot be read (no
    permission, an I/O error): what it says is unknown, not wrong.

    :ivar filename: the file that could not be read.
    """

    def __init__(self, message: str, filename: str) -> None:
        super().__init__(message)
        self.filename = filename


def _open_binary(path: str) -> IO[bytes]:
    return open(path, "rb")


def nix_conf_path(nix_conf_dir: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """:returns: ``<dir>/nix.conf``, ``dir`` being ``nix_conf_dir``, else ``$NIX_CONF_DIR``, else ``/etc/nix``."""
    conf_dir = nix_conf_dir or env.get("NIX_CONF_DIR") or "/etc/nix"
    return os.path.join(conf_dir, "nix.conf")


@frozen
class NixConf:
    """
    What one ``nix.conf`` says, includes followed.

    :ivar path: the top file.
    :ivar exists: whether it exists (Nix uses its defaults when not).
    :ivar files: every file read, the top one first, in reading order.
    :ivar settings: ``(name, value)`` of every assignment, in the order Nix
        applies them (an include's lines at the place of the include).
    """

    path: str
    exists: bool
    files: tuple[str, ...] = ()
    settings: tuple[tuple[str, str], ...] = ()

    def _assignments(self, name: str) -> list[tuple[bool, str]]:
        """:returns: ``(is_extra, value)`` of each assignment of ``name`` or its alias, in order."""
        names = {name} | {alias for alias, target in ALIASES.items() if target == name}
        found = []
        for key, value in self.settings:
            if key in names:
                found.append((False, value))
            elif key.startswith("extra-") and key[len("extra-"):] in names:
                found.append((True, value))
        return found

    def is_set(self, name: str) -> bool:
        """:returns: whether the file assigns ``name`` (or ``extra-name``, or an alias) at all."""
        return bool(self._assignments(name))

    def list_value(self, name: str) -> list[str]:
        """
        :returns: the whitespace-separated items of list setting ``name`` as
            Nix resolves them: the default, replaced by each assignment,
            extended by each ``extra-`` assignment, in order.
        """
        items = NIX_DEFAULTS.get(name, "").split()
        for extra, value in self._assignments(name):
            if extra:
                items.extend(value.split())
            else:
                items = value.split()
        return items

    def value(self, name: str) -> str | None:
        """:returns: the value of scalar setting ``name``: its last assignment, else the default (``None``: none)."""
        value = NIX_DEFAULTS.get(name)
        for extra, text in self._assignments(name):
            if not extra:
                value = text
        return value

    @property
    def substituters(self) -> list[str]:
        """:returns: ``substituters`` (and ``extra-substituters``), in order."""
        return self.list_value("substituters")

    @property
    def trusted_substituters(self) -> list[str]:
        """:returns: ``trusted-substituters`` (and ``extra-``), in order."""
        return self.list_value("trusted-substituters")

    @property
    def trusted_public_keys(self) -> list[str]:
        """:returns: ``trusted-public-keys`` (and ``extra-``), in order, unparsed."""
        return self.list_value("trusted-public-keys")


def _read_file(path: str, depth: int, opener: Opener, files: list[str],
               settings: list[tuple[str, str]]) -> None:
    """Parse one config file into ``settings``, following includes."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise NixConfError(f"includes nested too deeply at {path!r}")
    try:
        with opener(path) as f:
            data = f.read(_MAX_CONF_SIZE + 1)
    except OSError as e:
        raise NixConfUnreadable(f"cannot read {e.filename or path!r}: {e.strerror or e}",
                                str(e.filename or path)) from None
    files.append(path)
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
                _read_file(included, depth + 1, opener, files, settings)
            elif tokens[0] == "include":
                raise NixConfError(f"file {included!r} included from {path!r} not found")
            continue
        if tokens[1] != "=":
            raise NixConfError(f"illegal configuration line {raw_line!r} in {path!r}")
        settings.append((tokens[0], " ".join(tokens[2:])))


def read_nix_conf(path: str, opener: Opener = _open_binary) -> NixConf:
    """
    Read ``path`` and the files it includes.

    As in Nix: ``include F`` / ``!include F`` are relative to the including
    file (a missing ``include`` is an error, a missing ``!include`` is
    skipped); ``#`` starts a comment; there are no line continuations; a
    missing ``path`` means Nix's defaults.

    Blocking file I/O.

    :param opener: opens a file for binary reading (tests inject failures).
    :raises NixConfUnreadable: ``path`` or an included file exists but
        cannot be read.
    :raises NixConfError: a malformed line, a missing ``include``, a file
        over 1 MiB or includes nested more than 16 deep.
    """
    if not os.path.exists(path):
        return NixConf(path=path, exists=False)
    files: list[str] = []
    settings: list[tuple[str, str]] = []
    _read_file(path, 0, opener, files, settings)
    return NixConf(path=path, exists=True, files=tuple(files), settings=tuple(settings))
