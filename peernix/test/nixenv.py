"""
Test fixtures that drive a real Nix through its command line, so tests can
build chroot stores and run real Nix clients.

Two generations of Nix client are described by :class:`NixInstall`:
:data:`NIX_2_8` (Debian's ``nix-bin``, tools on ``PATH``; it also builds
every fixture store) and :data:`NIX_2_24` (``/opt/nix-modern/bin``, put there
by ``../shared/tools/nix-2.24/install``).  :data:`NIX_CLIENTS` lists both;
a real-client test is written once as a :class:`RealClientTests` mixin and
made into one test class per client (see there).

Everything here blocks (``subprocess.run``); use it in test set-up, never in
code under test.  Nothing touches the machine's real ``/nix``: every command
runs with ``--store ROOT`` and an environment of its own (see
:func:`isolated_env`).

Gotchas found with Nix 2.8 (each is handled here):

- ``nix-store --generate-binary-cache-key`` opens the *default* store, i.e.
  writes ``/nix/var/nix/db``, unless given ``--store``; :func:`generate_key`
  passes a throw-away one.
- ``nix-store --store ROOT --dump /nix/store/x`` reads the literal path on
  the host filesystem, not ``ROOT/nix/store/x``; :meth:`ChrootStore.dump`
  uses ``nix store dump-path --store ROOT`` instead.
- ``nix-build`` tries ``https://cache.nixos.org`` first and retries for ~4
  seconds when there is no network; every command here sets
  ``substituters =`` (empty) unless it substitutes on purpose.
- ``HOME`` is not needed.  Nix's narinfo disk cache (hits and misses, used
  for ``http://`` substituters) is ``$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite``;
  each :class:`NixClient` has its own, and sets
  ``narinfo-cache-negative-ttl = 0`` so a miss can be retried at once.
- A miss with no way to build fails fast (about 30 ms) with exit status 1
  and "don't know how to build these paths"; an untrusted signature fails
  with status 1 and "is not signed by any of the keys in
  'trusted-public-keys'".
- ``nix-store --add FILE`` registers a ``fixed:r:sha256:...`` CA;
  ``builtins.toFile`` (:meth:`ChrootStore.to_file`) registers ``text:sha256:...``;
  build outputs have no CA, a deriver, ``ultimate = 1`` and, with
  ``secret-key-files``, a signature.
- Store files are read-only (``dr-xr-xr-x``); call ``remove()`` (which
  makes them writable first) when a non-root user must delete a store.
- New-style commands (``nix copy``, ``nix store sign``) need
  ``--extra-experimental-features nix-command``.

And with Nix 2.24 (:data:`NIX_2_24`):

- Its default store would be ``/nix/store`` with a database of its own
  under ``/opt/nix-modern/var``: always give ``--store``.  The same
  :func:`isolated_env` works for it; it writes nothing under
  ``/opt/nix-modern``.
- ``nix path-info --json`` prints an object keyed by store path (2.8: a
  list of objects with a ``path``), with ``"deriver": null`` where 2.8
  leaves the key out.
- It has ``max-substitution-jobs`` (default 16; 2.8 has no such setting)
  and asks for ``Accept-Encoding: zstd, br, gzip, deflate, bzip2, xz``.
- A narinfo without ``FileSize`` shows as "0.00 MiB download".
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Union

from attrs import frozen
from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: Path of ``/bin/busybox`` (a static busybox), the only builder tool derivations use.
BUSYBOX = "/bin/busybox"

NIX_AVAILABLE: bool = all(shutil.which(tool) is not None for tool in ("nix-store", "nix-build", "nix", "nix-instantiate"))
"""Whether the Nix command-line tools are on ``PATH``."""

SKIP_NO_NIX: str | None = (
    None if NIX_AVAILABLE else "nix-store/nix-build/nix not installed (Debian: apt-get install nix-bin)"
)
"""A trial ``skip`` reason when Nix is missing, else ``None``: ``skip = SKIP_NO_NIX``."""

SKIP_NO_BUILD: str | None = SKIP_NO_NIX or (
    None if os.access(BUSYBOX, os.X_OK) else f"{BUSYBOX} missing (Debian: apt-get install busybox-static)"
)
"""Like :data:`SKIP_NO_NIX`, but also requires :data:`BUSYBOX` (for :meth:`ChrootStore.build`)."""

_NIX_COMMAND = ("--extra-experimental-features", "nix-command")

#: The tools every :class:`NixInstall` must have.
_CLIENT_TOOLS = ("nix-store", "nix-build", "nix", "nix-instantiate")


@functools.cache
def _reported_version(nix: str) -> tuple[int, ...] | None:
    """:returns: the version ``nix --version`` prints, e.g. ``(2, 24, 15)``; ``None`` if it cannot say."""
    try:
        out = subprocess.run([nix, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(part) for part in found.groups() if part is not None) if found else None


@frozen
class NixInstall:
    """
    One installed Nix client generation: which release, and where its tools are.

    Every command of a :class:`NixClient` (and a :class:`ChrootStore`) runs
    the tools of its ``NixInstall``.  Only ever give such a Nix a chroot
    store (``--store DIR``) or an ``http://`` store, never its default store,
    and an environment from :func:`isolated_env` (absolute ``NIX_CONF_DIR``,
    own ``XDG_CACHE_HOME``).
    """

    #: The release it must be, e.g. ``"2.24"`` (major.minor).
    release: str
    #: The directory holding ``nix``, ``nix-store``...; ``None``: found on ``PATH``.
    bin_dir: str | None
    #: How to install it, for the skip reason when it is missing.
    install_hint: str

    @property
    def name(self) -> str:
        """:returns: e.g. ``"Nix 2.24"``."""
        return f"Nix {self.release}"

    def tool(self, name: str) -> str:
        """:returns: the command to run this Nix's ``name`` (``nix-store``, ``nix``...)."""
        return os.path.join(self.bin_dir, name) if self.bin_dir is not None else name

    def nix_command(self) -> list[str]:
        """:returns: ``nix --extra-experimental-features nix-command`` of this Nix (2.8 needs the flag)."""
        return [self.tool("nix"), *_NIX_COMMAND]

    @property
    def missing(self) -> str | None:
        """
        :returns: a trial ``skip`` reason when this Nix is not installed (a
            tool is missing, or ``nix --version`` names another release),
            else ``None``.
        """
        where = self.bin_dir if self.bin_dir is not None else "PATH"
        for name in _CLIENT_TOOLS:
            found = shutil.which(name) if self.bin_dir is None else (
                self.tool(name) if os.access(self.tool(name), os.X_OK) else None)
            if found is None:
                return f"{self.name} not installed ({name} not in {where}; {self.install_hint})"
        version = self.version
        if version is None or ".".join(map(str, version[:2])) != self.release:
            shown = ".".join(map(str, version)) if version else "no version"
            return f"{self.name} not installed ({self.tool('nix')} is {shown}; {self.install_hint})"
        return None

    @property
    def version(self) -> tuple[int, ...] | None:
        """:returns: the installed version, e.g. ``(2, 24, 15)`` (asked once); ``None`` when not installed."""
        return _reported_version(self.tool("nix"))

    def at_least(self, *version: int) -> bool:
        """:returns: whether the installed version is ``version`` or newer (e.g. ``at_least(2, 16)``)."""
        installed = self.version
        return installed is not None and installed >= version


NIX_2_8 = NixInstall(release="2.8", bin_dir=None, install_hint="Debian: apt-get install nix-bin")
"""Debian 12's Nix (``nix-bin``), tools on ``PATH``."""

NIX_2_24 = NixInstall(release="2.24", bin_dir="/opt/nix-modern/bin",
                      install_hint="run ../shared/tools/nix-2.24/install")
"""Nix 2.24.15 at ``/opt/nix-modern`` (``../shared/tools/nix-2.24/install``): chroot or http stores only."""

NIX_CLIENTS: tuple[NixInstall, ...] = (NIX_2_8, NIX_2_24)
"""Every client generation the real-client tests run with."""

# Settings every command gets from its private nix.conf; command lines repeat
# the ones that matter for readability.
_NIX_CONF = """\
substituters =
sandbox = false
build-users-group =
builders =
require-sigs = true
fallback = false
connect-timeout = 5
narinfo-cache-negative-ttl = 0
"""


class NixCommandError(Exception):
    """A Nix command exited with a non-zero status; the message holds its stderr."""

    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[bytes]) -> None:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        super().__init__(f"{' '.join(args)!r} exited {result.returncode}: {stderr}")
        self.result = result


@frozen
class Executable:
    """An executable regular file in an :meth:`ChrootStore.add_tree` spec."""

    contents: bytes


@frozen
class Symlink:
    """A symbolic link in an :meth:`ChrootStore.add_tree` spec."""

    target: str


TreeSpec = Mapping[str, Union[bytes, str, Executable, Symlink, "TreeSpec"]]
"""
A directory: entry name -> ``bytes``/``str`` (a regular file, ``b""`` is
empty), :class:`Executable`, :class:`Symlink`, or a nested mapping (a
sub-directory, ``{}`` is empty).
"""


def isolated_env(base_dir: str) -> dict[str, str]:
    """
    Make an environment in which Nix reads no user or system configuration
    and writes nothing outside ``base_dir`` (apart from the ``--store`` given
    on its command line).

    Sets ``NIX_CONF_DIR`` (holding a nix.conf with ``substituters =``,
    ``sandbox = false``, ``build-users-group =``, ``require-sigs = true``,
    ``narinfo-cache-negative-ttl = 0``), ``NIX_USER_CONF_FILES`` (empty: no
    ``~/.config/nix``), ``XDG_CACHE_HOME`` (the narinfo disk cache),
    ``XDG_CONFIG_HOME``, ``XDG_DATA_HOME``, ``XDG_STATE_HOME``,
    ``NIX_STATE_DIR`` and ``NIX_LOG_DIR`` (so a stray default-store open lands
    here, not in ``/nix/var``), ``TMPDIR``; drops every other ``NIX_*``
    variable (``NIX_REMOTE``, ``NIX_PATH``...).

    :param base_dir: a directory to keep that state in; created if missing.
    :returns: the environment for ``subprocess.run(..., env=...)``.
    """
    base = os.path.abspath(base_dir)
    for sub in ("conf", "cache", "config", "data", "state", "nix-state", "nix-log", "tmp"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    conf = os.path.join(base, "conf", "nix.conf")
    if not os.path.exists(conf):
        with open(conf, "w") as f:
            f.write(_NIX_CONF)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(
        NIX_CONF_DIR=os.path.join(base, "conf"),
        NIX_USER_CONF_FILES="",
        XDG_CACHE_HOME=os.path.join(base, "cache"),
        XDG_CONFIG_HOME=os.path.join(base, "config"),
        XDG_DATA_HOME=os.path.join(base, "data"),
        XDG_STATE_HOME=os.path.join(base, "state"),
        NIX_STATE_DIR=os.path.join(base, "nix-state"),
        NIX_LOG_DIR=os.path.join(base, "nix-log"),
        TMPDIR=os.path.join(base, "tmp"),
    )
    return env


def run_nix(args: Sequence[str], env: Mapping[str, str], *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """
    Run one Nix command, capturing its output.

    :param args: the command line, e.g. ``["nix-store", "--store", root, ...]``.
    :param env: its environment, usually from :func:`isolated_env`.
    :param check: raise on a non-zero exit status.
    :raises NixCommandError: when ``check`` and the command failed.
    """
    result = subprocess.run(list(args), env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    if check and result.returncode != 0:
        raise NixCommandError(args, result)
    return result


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8").splitlines() if line]


def remove_tree(path: str) -> None:
    """Delete ``path`` even when it holds read-only store directories (as Nix leaves them)."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, stat.S_IRWXU)
    if os.path.islink(path):
        os.unlink(path)
        return
    os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path)


def _write_tree(directory: str, spec: TreeSpec) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, value in spec.items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad entry name {name!r}")
        full = os.path.join(directory, name)
        if isinstance(value, Symlink):
            os.symlink(value.target, full)
        elif isinstance(value, Executable):
            with open(full, "wb") as f:
                f.write(value.contents)
            os.chmod(full, 0o755)
        elif isinstance(value, (bytes, str)):
            with open(full, "wb") as f:
                f.write(value.encode("utf-8") if isinstance(value, str) else value)
        else:
            _write_tree(full, value)


def generate_key(directory: str, name: str) -> tuple[str, str, str]:
    """
    Make a Nix signing key pair with ``nix-store --generate-binary-cache-key``.

    :param directory: where to write ``<name>.sk`` and ``<name>.pk``.
    :param name: the key name, e.g. ``"test-1"``.
    :returns: ``(secret key file, public key file, public key text)``; the
        text is ``name:base64(32 bytes)``, ready for ``trusted-public-keys``.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    sk = os.path.join(directory, f"{name}.sk")
    pk = os.path.join(directory, f"{name}.pk")
    scratch = tempfile.mkdtemp(prefix=".keygen-", dir=directory)
    try:
        # --store: without it this command opens (and writes) /nix/var/nix/db.
        env = isolated_env(os.path.join(scratch, "env"))
        run_nix(["nix-store", "--store", os.path.join(scratch, "store"), "--generate-binary-cache-key", name, sk, pk], env)
    finally:
        remove_tree(scratch)
    with open(pk) as f:
        public = f.read().strip()
    return sk, pk, public


def copy_to_file_cache(store_root: str, paths: Iterable[str], dest: str, *, env: Mapping[str, str] | None = None) -> None:
    """
    Copy ``paths`` and their closure from the chroot store at ``store_root``
    into a file binary cache at ``dest`` (``nix copy --to
    file://DEST?compression=none``), so a test can compare peernix's
    narinfos with the ones Nix itself writes (``dest/<hash>.narinfo``, NARs
    under ``dest/nar/``).

    :param env: the environment to use; by default a fresh :func:`isolated_env`
        in ``dest + ".nixenv"`` (next to ``dest``, not inside it, so the cache
        directory holds only what Nix wrote).
    """
    dest = os.path.abspath(dest)
    if env is None:
        env = isolated_env(dest + ".nixenv")
    run_nix(
        ["nix", *_NIX_COMMAND, "copy", "--store", store_root, "--to", f"file://{dest}?compression=none", *paths],
        env,
    )


@frozen
class Closure:
    """
    The outputs made by :meth:`ChrootStore.build_closure` (full store paths).

    ``leaf`` has no references; ``mid`` refers to ``leaf``; ``top`` refers
    to ``mid`` and to itself (a file in it contains its own path), and holds
    an executable file, a symlink, an empty file and a sub-directory.
    ``derivers`` maps each output to its ``.drv`` path.
    """

    leaf: str
    mid: str
    top: str
    derivers: Mapping[str, str]

    @property
    def outputs(self) -> tuple[str, str, str]:
        """:returns: ``(leaf, mid, top)``."""
        return (self.leaf, self.mid, self.top)


class _NixRoot:
    """A chroot store root plus a private Nix environment (shared code)."""

    def __init__(self, root: str, nix: NixInstall = NIX_2_8) -> None:
        #: The Nix whose tools every command on this store runs.
        self.nix = nix
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        #: Private config/cache/temporary directory, next to (not inside) the
        #: store root so removing it never disturbs the store.
        self.env_dir = self.root + ".nixenv"
        self.env = isolated_env(self.env_dir)
        self._counter = 0

    def _scratch(self, prefix: str) -> str:
        self._counter += 1
        path = os.path.join(self.env_dir, "work", f"{prefix}-{self._counter}")
        os.makedirs(path)
        return path

    def _store_args(self) -> list[str]:
        return ["--store", self.root]

    @property
    def store_dir(self) -> str:
        """:returns: the real directory holding the store's files, ``ROOT/nix/store``."""
        return os.path.join(self.root, "nix", "store")

    @property
    def db_path(self) -> str:
        """:returns: the store's SQLite DB, ``ROOT/nix/var/nix/db/db.sqlite``."""
        return os.path.join(self.root, "nix", "var", "nix", "db", "db.sqlite")

    def real_path(self, store_path: str) -> str:
        """:returns: where ``/nix/store/...`` is on disk, ``ROOT/nix/store/...``."""
        if not store_path.startswith("/nix/store/"):
            raise ValueError(f"{store_path!r} is not in /nix/store")
        return self.root + store_path

    def is_valid(self, path: str) -> bool:
        """:returns: whether the DB lists ``path`` (``nix-store --check-validity``)."""
        result = run_nix([self.nix.tool("nix-store"), *self._store_args(), "--check-validity", path], self.env,
                         check=False)
        return result.returncode == 0

    def verify(self, *paths: str) -> subprocess.CompletedProcess[bytes]:
        """
        Check each path's files against its NarHash (``nix-store --verify-path``).

        :returns: the finished process; ``returncode == 0`` means every path
            is valid and intact.
        """
        return run_nix([self.nix.tool("nix-store"), *self._store_args(), "--verify-path", *paths], self.env,
                       check=False)

    def query(self, path: str, what: str) -> list[str]:
        """
        Run ``nix-store -q --<what> path``.

        :param what: ``references``, ``referrers``, ``deriver``, ``hash``,
            ``size``, ``requisites``...
        :returns: the output lines (a deriver of ``unknown-deriver`` comes back as is).
        """
        return _lines(run_nix([self.nix.tool("nix-store"), *self._store_args(), "-q", f"--{what}", path],
                              self.env).stdout)

    def path_info_json(self, paths: Sequence[str]) -> list[dict[str, object]]:
        """:returns: ``nix path-info --json --sigs`` for ``paths`` (narHash, narSize, references, deriver, signatures, ca)."""
        out = run_nix([*self.nix.nix_command(), "path-info", *self._store_args(), "--json", "--sigs", *paths],
                      self.env).stdout
        data: list[dict[str, object]] = json.loads(out)
        return data

    def dump(self, path: str) -> bytes:
        """
        :returns: the NAR of ``path``, whole (fine for small test paths), made
            by ``nix store dump-path --store ROOT`` (not ``nix-store --dump``,
            which would read the host's ``/nix/store``).
        """
        return run_nix([*self.nix.nix_command(), "store", "dump-path", *self._store_args(), path], self.env).stdout

    def remove(self) -> None:
        """Delete the whole store root and the private environment, read-only files included."""
        remove_tree(self.root)
        remove_tree(self.env_dir)


class ChrootStore(_NixRoot):
    """
    A Nix chroot store at ``root`` (files in ``root/nix/store``, DB in
    ``root/nix/var/nix/db``) filled with the real Nix CLI.

    Store paths are still named ``/nix/store/...``.  The store is created by
    the first command.  Its private Nix environment lives in
    ``root + ".nixenv"``.  Builds take about a second; share a store between
    tests of one class (``setUpClass``) when they only read it.
    """

    def __init__(self, root: str) -> None:
        """:param root: the store root directory; created if missing."""
        super().__init__(root)
        # Create the DB at once so a store with nothing in it is still a store.
        run_nix([self.nix.tool("nix-store"), *self._store_args(), "--init"], self.env)

    def add_file(self, path: str) -> str:
        """
        ``nix-store --add`` a file or directory (CA ``fixed:r:sha256:...``).

        :returns: the new store path; its name is ``path``'s basename.
        """
        return _lines(run_nix([self.nix.tool("nix-store"), *self._store_args(), "--add", os.path.abspath(path)],
                              self.env).stdout)[-1]

    def add_text(self, name: str, text: str | bytes) -> str:
        """
        Add a regular file named ``name`` holding ``text`` (``nix-store --add``).

        :returns: the store path ``/nix/store/<hash>-<name>``.
        """
        directory = self._scratch("text")
        _write_tree(directory, {name: text})
        return self.add_file(os.path.join(directory, name))

    def to_file(self, name: str, text: str) -> str:
        """
        Add ``text`` the way ``builtins.toFile`` does, giving a path whose CA
        is ``text:sha256:...``.

        :returns: the store path.
        """
        expr = f"builtins.toFile {_nix_string(name)} {_nix_string(text)}"
        out = run_nix(
            [self.nix.tool("nix-instantiate"), *self._store_args(), "--read-write-mode", "--eval", "--json", "-E", expr], self.env
        ).stdout
        path: str = json.loads(out)
        return path

    def add_tree(self, name: str, spec: TreeSpec) -> str:
        """
        Build a directory from ``spec`` and ``nix-store --add`` it.

        :param name: the store path name.
        :param spec: see :data:`TreeSpec`, e.g.
            ``{"bin": {"run": Executable(b"#!/bin/sh\\n")}, "link": Symlink("bin/run"), "empty": b""}``.
        :returns: the store path.
        """
        directory = self._scratch("tree")
        _write_tree(os.path.join(directory, name), spec)
        return self.add_file(os.path.join(directory, name))

    def make_big_path(self, size_bytes: int, name: str = "big", seed: int = 0) -> str:
        """
        Add a single regular file of ``size_bytes`` pseudo-random
        (incompressible, deterministic for a ``seed``) bytes, written 1 MiB at
        a time so it never sits in memory whole.

        :returns: the store path.  The temporary copy is deleted afterwards.
        """
        directory = self._scratch("big")
        full = os.path.join(directory, name)
        rng = random.Random(seed)
        left = size_bytes
        with open(full, "wb") as f:
            while left > 0:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        try:
            return self.add_file(full)
        finally:
            os.unlink(full)

    def build(
        self,
        nix_expr_text: str,
        secret_key_file: str | None = None,
        extra_files: Mapping[str, bytes | str] | None = None,
    ) -> list[str]:
        """
        Build a Nix expression with ``nix-build --store ROOT --option sandbox
        false --option build-users-group "" [--option secret-key-files SK]
        --no-out-link``.

        The expression is written to ``default.nix`` in a fresh directory
        that also holds ``bb/``: a copy of :data:`BUSYBOX` as ``bb/busybox``
        and one symlink per applet (``bb/sh``, ``bb/mkdir``...), so
        ``builder = "${./bb}/busybox"; args = ["sh" "-c" "..."]; PATH =
        "${./bb}";`` works.  :data:`BUILD_PRELUDE` defines ``mk name script``
        that way; start an expression with it.

        :param secret_key_file: sign every output with this key (Nix writes
            the signature to ``ValidPaths.sigs``).
        :param extra_files: more files next to ``default.nix`` (relative
            name -> contents), e.g. sources the expression imports.
        :returns: the output paths nix-build printed, in its order.
        :raises NixCommandError: when the build fails (its log is in the message).
        """
        directory = self._scratch("build")
        bb = os.path.join(directory, "bb")
        os.makedirs(bb)
        shutil.copy(BUSYBOX, os.path.join(bb, "busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, check=True).stdout.decode().split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                os.symlink("busybox", os.path.join(bb, applet))
        with open(os.path.join(directory, "default.nix"), "w") as f:
            f.write(nix_expr_text)
        for rel, contents in (extra_files or {}).items():
            full = os.path.join(directory, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(contents.encode("utf-8") if isinstance(contents, str) else contents)
        args = [
            self.nix.tool("nix-build"),
            *self._store_args(),
            "--option", "sandbox", "false",
            "--option", "build-users-group", "",
            "--option", "substituters", "",
        ]
        if secret_key_file is not None:
            args += ["--option", "secret-key-files", os.path.abspath(secret_key_file)]
        args += ["--no-out-link", os.path.join(directory, "default.nix")]
        return _lines(run_nix(args, self.env).stdout)

    def build_closure(self, secret_key_file: str | None = None, tag: str = "closure") -> Closure:
        """
        Build three outputs with references between them (see :class:`Closure`).

        :param secret_key_file: sign the outputs with this key.
        :param tag: part of every name, so different tags give different paths.
        :returns: the outputs and their derivers.
        """
        expr = BUILD_PRELUDE + f"""
  leaf = mk "{tag}-leaf" "mkdir $out; echo leaf > $out/data";
  mid = mk "{tag}-mid" "mkdir $out; echo ${{leaf}} > $out/uses-leaf";
  top = mk "{tag}-top" ''
    mkdir -p $out/sub
    echo ${{mid}} > $out/uses-mid
    echo $out > $out/self
    printf '#!/bin/sh\\necho hi\\n' > $out/run.sh
    chmod +x $out/run.sh
    ln -s sub/file $out/link
    echo nested > $out/sub/file
    touch $out/empty
  '';
in [ leaf mid top ]
"""
        leaf, mid, top = self.build(expr, secret_key_file=secret_key_file)
        derivers = {p: self.query(p, "deriver")[0] for p in (leaf, mid, top)}
        return Closure(leaf=leaf, mid=mid, top=top, derivers=derivers)

    def sign(self, paths: Sequence[str], secret_key_file: str) -> None:
        """Add a signature by ``secret_key_file`` to ``paths`` in the DB (``nix store sign``)."""
        run_nix(
            [
                *self.nix.nix_command(), "store", "sign", *self._store_args(),
                "--key-file", os.path.abspath(secret_key_file), *paths,
            ],
            self.env,
        )

    def delete(self, path: str) -> None:
        """
        Garbage-collect one path (``nix-store --delete``); it must not be
        referenced by another valid path.
        """
        run_nix([self.nix.tool("nix-store"), *self._store_args(), "--delete", path], self.env)

    def copy_to_file_cache(self, paths: Sequence[str], dest: str) -> None:
        """See :func:`copy_to_file_cache`; uses this store's environment."""
        copy_to_file_cache(self.root, paths, dest, env=self.env)


BUILD_PRELUDE = """\
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "${./bb}/busybox";
    args = [ "sh" "-c" script ];
    PATH = "${./bb}";
  };
"""
"""
The start of a ``let`` for :meth:`ChrootStore.build`: ``mk name script``
makes a derivation running ``script`` with busybox's ``sh`` and every busybox
applet on ``PATH``.  Continue with more bindings, then ``in ...``.
"""


def _nix_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


class NixClient(_NixRoot):
    """
    A real Nix client: an empty chroot store at ``root`` that substitutes
    from a binary cache, with its own config and narinfo disk cache (in
    ``root + ".nixenv"``), run with the tools of ``nix`` (a
    :class:`NixInstall`, Debian's :data:`NIX_2_8` unless given).
    """

    def substitute(
        self,
        paths: Sequence[str],
        substituter_url: str,
        trusted_public_keys: Sequence[str],
        extra_options: Mapping[str, str] | None = None,
        wrap: Callable[[Sequence[str]], list[str]] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """
        Fetch ``paths`` (and their closure) from one substituter: ``nix-store
        --store ROOT -r PATHS --option substituters URL --option
        trusted-public-keys "K1 K2" --option require-sigs true``.

        Nothing can be built (no derivation is known, ``builders`` is empty,
        ``fallback = false``), so a miss fails at once with exit status 1.
        ``narinfo-cache-negative-ttl`` is 0 (override it in
        ``extra_options`` to test Nix's miss cache).

        :param extra_options: more ``--option NAME VALUE`` pairs.
        :param wrap: turns the command line into the one to run, e.g.
            :meth:`peernix.test.netns.Host.command` to run it inside a
            network namespace (same environment).
        :returns: the finished process (not checked); ``stdout`` lists the
            realised paths, ``stderr`` says why it failed.
        """
        args = [
            self.nix.tool("nix-store"),
            *self._store_args(),
            "-r",
            *paths,
            "--option", "substituters", substituter_url,
            "--option", "trusted-public-keys", " ".join(trusted_public_keys),
            "--option", "require-sigs", "true",
            "--option", "fallback", "false",
            "--option", "builders", "",
        ]
        for name, value in (extra_options or {}).items():
            args += ["--option", name, value]
        return run_nix(wrap(args) if wrap is not None else args, self.env, check=False)

    def nix_command(self, args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        """
        Run ``nix --extra-experimental-features nix-command ARGS`` of this
        client's Nix in its environment (its own config and narinfo disk
        cache), e.g. ``["path-info", "--store", "http://...", PATH]``.
        ``ARGS`` say which store; this client's chroot store is not implied.

        :returns: the finished process (not checked).
        """
        return run_nix([*self.nix.nix_command(), *args], self.env, check=False)


if TYPE_CHECKING:
    TestCaseMixin = SynchronousTestCase
else:
    TestCaseMixin = object
"""
The base of a test mixin: ``SynchronousTestCase`` to the type checker (so
its methods may call ``self.assertEqual``...), ``object`` at run time (so
trial does not collect the mixin's tests on their own).
"""


class RealClientTests(TestCaseMixin):
    """
    A mixin for tests that run a real Nix client, written once and run with
    every client generation: a subclass per :class:`NixInstall` in
    :data:`NIX_CLIENTS`, each naming its ``nix`` and its ``skip``::

        class _ServeTests(RealClientTests):
            def test_substitutes(self) -> None:
                client = self.nix_client()
                ...

        class ServeNix28Tests(_ServeTests, SynchronousTestCase):
            nix = NIX_2_8
            skip = SKIP_NO_BUILD or NIX_2_8.missing

        class ServeNix224Tests(_ServeTests, SynchronousTestCase):
            nix = NIX_2_24
            skip = SKIP_NO_BUILD or NIX_2_24.missing

    The mixin itself is no test case (trial does not collect it), so a
    test runs only with a client.  Expensive fixtures (stores, daemons)
    belong in :func:`peernix.test.daemon.shared_fixture`, shared by the
    classes of both clients.
    """

    #: The Nix this class's tests run.
    nix: ClassVar[NixInstall]

    def nix_client(self, prefix: str = "peernix-client-", root: str | None = None) -> NixClient:
        """
        :returns: a fresh :class:`NixClient` of :attr:`nix` (in a new
            temporary directory unless ``root`` is given), removed after
            the test.
        """
        client = NixClient(root if root is not None else tempfile.mkdtemp(prefix=prefix), nix=self.nix)
        self.addCleanup(client.remove)
        return client

    def require_nix(self, why: str, *version: int) -> None:
        """
        Skip the running test unless :attr:`nix` is ``version`` or newer.

        :param why: what needs it, e.g. ``"max-substitution-jobs"``.
        :raises SkipTest: with a reason naming the client and ``why``.
        """
        if not self.nix.at_least(*version):
            wanted = ".".join(map(str, version))
            raise SkipTest(f"{self.nix.name} lacks {why} (needs Nix {wanted} or newer)")
