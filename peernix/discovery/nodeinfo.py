"""
What this node tells its peers about itself (UDP announce, mDNS TXT).

:func:`detect_node_info` runs ``nix-store --version`` and is blocking: call it
once at start-up, before the reactor runs (or in a thread).
"""

from __future__ import annotations

import platform as _platform
import secrets
import subprocess
from collections.abc import Callable, Sequence

from attrs import field, frozen

import peernix

#: Features the Go predecessor advertises and we support too (it ignores them).
BASE_FEATURES: tuple[str, ...] = ("compression", "parallel", "health")

_MACHINES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}

#: Signature of :func:`subprocess.run` as far as we use it (injectable in tests).
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _tuple(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(items)


@frozen
class NodeInfo:
    """
    This node's self-description.

    :ivar peernix_version: our version (``peernix.__version__``).
    :ivar nix_version: the local Nix's version, ``"unknown"`` if not found.
    :ivar platform: a Nix system name such as ``x86_64-linux``.
    :ivar features: feature names, as in the Go predecessor's announcements.
    :ivar public_key: this node's signing key ``name:base64`` or ``""``.
    :ivar node_id: random per process; recognises our own announcements and
        tells a restarted peer from the old one.
    :ivar fetch_for_lan: whether this node offers to fetch from upstreams
        for the LAN (``--fetch-for-lan``), announced as UDP
        ``"fetch_for_lan": true`` and mDNS TXT ``fetch=1``.
    :ivar serve_peers: ``False`` under ``--serve-peers no``: announcements
        tell peers not to ask this node (UDP ``"serve_peers": false``, mDNS
        TXT ``serve=0``).
    :ivar max_upload_rate: ``--max-upload-rate`` in bytes per second,
        announced (UDP ``"max_upload_rate"``, mDNS TXT ``upload_rate=``) for
        people and tools; ``None``: unlimited (not announced).
    """

    peernix_version: str
    nix_version: str
    platform: str
    features: tuple[str, ...] = field(converter=_tuple)
    public_key: str
    node_id: str
    serve_peers: bool = True
    max_upload_rate: int | None = None
    fetch_for_lan: bool = False


def new_node_id() -> str:
    """:returns: a fresh random node id (16 hex digits)."""
    return secrets.token_hex(8)


def detect_platform(machine: str | None = None, system: str | None = None) -> str:
    """
    :param machine: ``platform.machine()`` when ``None``.
    :param system: ``platform.system()`` when ``None``.
    :returns: the Nix system name of this machine, e.g. ``x86_64-linux``.
    """
    machine = (machine if machine is not None else _platform.machine()).lower() or "unknown"
    system = (system if system is not None else _platform.system()).lower() or "unknown"
    return f"{_MACHINES.get(machine, machine)}-{system}"


def parse_nix_version(output: str) -> str:
    """
    :param output: what ``nix-store --version`` printed, e.g.
        ``nix-store (Nix) 2.8.0``.
    :returns: the version (``2.8.0``), or ``"unknown"`` if none is found.
    """
    lines = output.strip().splitlines()
    if not lines:
        return "unknown"
    words = lines[0].split()
    if not words or not words[-1][:1].isdigit():
        return "unknown"
    return words[-1][:64]


def detect_nix_version(run: Runner = subprocess.run, timeout: float = 5.0) -> str:
    """
    Ask the installed Nix for its version.  Blocking (up to ``timeout``).

    :param run: :func:`subprocess.run` or a test double.
    :returns: the version, or ``"unknown"`` when Nix is missing, fails or is slow.
    """
    try:
        result = run(
            ["nix-store", "--version"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if result.returncode != 0:
        return "unknown"
    return parse_nix_version(result.stdout)


def default_features(signing: bool) -> tuple[str, ...]:
    """:returns: the features we announce; ``signing`` when we have a key."""
    return BASE_FEATURES + (("signing",) if signing else ())


def detect_node_info(
    public_key: str = "",
    nix_version: str | None = None,
    platform: str | None = None,
    node_id: str | None = None,
    features: Sequence[str] | None = None,
    run: Runner = subprocess.run,
    serve_peers: bool = True,
    max_upload_rate: int | None = None,
) -> NodeInfo:
    """
    Build this node's :class:`NodeInfo`.  Blocking when ``nix_version`` is
    ``None`` (runs ``nix-store --version``).

    :param public_key: our public key ``name:base64``, or ``""``.
    :param nix_version: detected when ``None``.
    :param platform: detected when ``None``.
    :param node_id: a fresh random one when ``None``.
    :param features: :func:`default_features` when ``None``.
    :param run: passed to :func:`detect_nix_version`.
    :param serve_peers: ``--serve-peers``.
    :param max_upload_rate: ``--max-upload-rate``.
    """
    return NodeInfo(
        peernix_version=peernix.__version__,
        nix_version=nix_version if nix_version is not None else detect_nix_version(run),
        platform=platform if platform is not None else detect_platform(),
        features=features if features is not None else default_features(bool(public_key)),
        public_key=public_key,
        node_id=node_id if node_id is not None else new_node_id(),
        serve_peers=serve_peers,
        max_upload_rate=max_upload_rate,
    )
