"""
This host's network addresses, and peer base URLs built from addresses.

Reading interfaces goes through ``ifaddr`` (a dependency of zeroconf); the
functions take the adapter list as an argument so tests pass fixed adapters.
Reading interfaces is a quick local system call (``getifaddrs``), fine on the
reactor thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Protocol

import ifaddr

#: The limited broadcast address, always announced to as well.
LIMITED_BROADCAST = "255.255.255.255"


class _IP(Protocol):
    """The part of ``ifaddr.IP`` we use."""

    @property
    def ip(self) -> str | tuple[str, int, int]: ...

    @property
    def network_prefix(self) -> int: ...


class _Adapter(Protocol):
    """The part of ``ifaddr.Adapter`` we use."""

    @property
    def ips(self) -> Sequence[_IP]: ...


def _adapters(adapters: Iterable[_Adapter] | None) -> Iterable[_Adapter]:
    if adapters is None:
        return list(ifaddr.get_adapters())
    return adapters


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def ipv4_broadcast_addresses(adapters: Iterable[_Adapter] | None = None) -> list[str]:
    """
    The directed broadcast address of every non-loopback IPv4 interface,
    then ``255.255.255.255``.

    Directed broadcasts are sent as well as the limited broadcast because a
    host with several interfaces sends ``255.255.255.255`` out of one of them
    only (the one the default route uses).  Point-to-point networks
    (``/31``, ``/32``) have no broadcast address and are skipped.

    :param adapters: interfaces as ``ifaddr.get_adapters()`` returns them;
        read from the system when ``None``.
    :returns: addresses without duplicates, in interface order.
    """
    found: list[str] = []
    for adapter in _adapters(adapters):
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue
            try:
                network = ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
            except ValueError:
                continue
            if network.is_loopback or network.prefixlen >= 31:
                continue
            found.append(str(network.broadcast_address))
    found.append(LIMITED_BROADCAST)
    return _dedupe(found)


def host_addresses(adapters: Iterable[_Adapter] | None = None, ipv6: bool = True) -> list[str]:
    """
    Every non-loopback address of this host, IPv4 first, for mDNS registration.

    IPv6 addresses come without a scope: mDNS answers carry the interface
    they arrived on, and the resolver adds the scope of link-local addresses.

    :param adapters: as for :func:`ipv4_broadcast_addresses`.
    :param ipv6: include IPv6 addresses.
    :returns: addresses without duplicates.
    """
    v4: list[str] = []
    v6: list[str] = []
    for adapter in _adapters(adapters):
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                parsed = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if parsed.is_loopback or parsed.is_unspecified:
                continue
            if parsed.version == 4:
                v4.append(str(parsed))
            elif ipv6:
                v6.append(str(parsed))
    return _dedupe(v4 + v6)


def peer_url(host: str, port: int) -> str:
    """
    The base URL of a peer's HTTP server, ``http://host:port``.

    IPv6 literals are bracketed; a zone (``fe80::1%eth0`` or ``%2``) is kept
    as it is, the form ``--peer`` accepts.

    :param host: an IPv4 or IPv6 address (IPv6 optionally with ``%zone``) or
        a host name.
    :param port: 1..65535.
    :raises ValueError: for a port out of range, an empty host, or a host
        with characters that do not belong in a URL authority.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if not host or any(c in host for c in "/?#@[] \t\r\n"):
        raise ValueError(f"invalid host {host!r}")
    if ":" in host:
        address, _, zone = host.partition("%")
        ipaddress.IPv6Address(address)
        if "%" in host and not zone:
            raise ValueError(f"empty IPv6 zone in {host!r}")
        return f"http://[{host}]:{port}"
    return f"http://{host}:{port}"
