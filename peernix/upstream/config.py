"""
Which upstream caches a node fetches from for the LAN.

``--upstream`` given at all is the list; otherwise it is the local Nix's own
``substituters`` and ``extra-substituters`` (read with
:func:`peernix.peers.trust.read_nix_substituters`), minus every URL that
would reach this daemon (a loopback or own address on our port, any
``/nix-cache`` URL on our port) and every unsupported store (``daemon``,
``s3://``...).  URLs that reach a *peer* are filtered when they are used
(:func:`reaches_peer`), because peers come and go.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from twisted.logger import Logger

_log = Logger()


def _host_port(url: str) -> tuple[str, int] | None:
    """:returns: the normalised ``(host, port)`` of an http(s) URL, or ``None``."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    try:
        host = ipaddress.ip_address(host.split("%", 1)[0]).compressed
    except ValueError:
        pass
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return host, port


def normalise_upstream(url: str) -> str | None:
    """
    :returns: ``url`` as an upstream base URL (``http(s)://host[:port][/path]``
        without a trailing slash or Nix's ``?priority=`` store parameters),
        or ``None`` for anything peernix cannot fetch from over HTTP
        (``daemon``, ``local``, ``file://``, ``s3://``, ``ssh://``...).
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return None
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def reaches_self(url: str, port: int, own_addresses: Iterable[str]) -> bool:
    """
    :param port: this daemon's HTTP port.
    :param own_addresses: this machine's addresses (any form).
    :returns: whether ``url`` would reach this daemon: a loopback address,
        ``localhost`` or one of ``own_addresses`` on ``port``, or any
        ``/nix-cache`` URL on ``port`` (peernix's own path: on our port it
        is this daemon or a peer either way).
    """
    target = _host_port(url)
    if target is None:
        return False
    host, target_port = target
    if target_port != port:
        return False
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    if path == "/nix-cache":
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    own = set()
    for text in own_addresses:
        try:
            own.add(ipaddress.ip_address(text.split("%", 1)[0]).compressed)
        except ValueError:
            continue
    return address.compressed in own


def reaches_peer(url: str, peer_urls: Iterable[str]) -> bool:
    """
    :param peer_urls: known peers' base URLs (``http://host:port``).
    :returns: whether ``url`` points at one of those peers (same host and
        port): such an "upstream" is a peer's cache, already asked by the
        fan-out, and fetching from it for the LAN would loop.
    """
    target = _host_port(url)
    if target is None:
        return False
    return any(_host_port(peer) == target for peer in peer_urls)


def default_upstreams(
    substituters: Sequence[str], port: int, own_addresses: Iterable[str]
) -> list[str]:
    """
    :param substituters: the local Nix's substituters, in order.
    :param port: this daemon's HTTP port.
    :param own_addresses: this machine's addresses.
    :returns: the substituters peernix can fetch from, normalised, in order,
        without duplicates and without those that reach this daemon
        (:func:`reaches_self`).  Dropped ones are logged once, at start-up.
    """
    own = list(own_addresses)
    upstreams: list[str] = []
    for raw in substituters:
        url = normalise_upstream(raw)
        if url is None:
            _log.info("Not fetching for the LAN from substituter {url}: not an http(s) cache", url=raw)
            continue
        if reaches_self(url, port, own):
            _log.debug("Substituter {url} is this daemon; not an upstream", url=raw)
            continue
        if url not in upstreams:
            upstreams.append(url)
    return upstreams


def choose_upstreams(
    configured: Sequence[str] | None,
    read_substituters: Callable[[], Sequence[str]],
    port: int,
    own_addresses: Iterable[str],
) -> list[str]:
    """
    :param configured: ``Config.upstream``: ``None`` for the default, a
        (possibly empty: ``--upstream none``) list given by the user.
    :param read_substituters: reads the local Nix's substituters (blocking:
        called at start-up only, and only without ``configured``).
    :returns: the upstream base URLs to use; empty means fetching for the
        LAN is off.  A list given by the user is used as given (normalised),
        except URLs that reach this daemon.
    """
    if configured is not None:
        own = list(own_addresses)
        chosen = []
        for raw in configured:
            url = normalise_upstream(raw)
            if url is None or reaches_self(url, port, own):
                _log.warn("Ignoring upstream {url}: it is not an http(s) cache or it is this daemon", url=raw)
                continue
            if url not in chosen:
                chosen.append(url)
        return chosen
    return default_upstreams(read_substituters(), port, own_addresses)

