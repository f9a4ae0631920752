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


def publishable_addresses(addresses: Iterable[str], ipv6: bool = True) -> list[str]:
    """
    The addresses to put in our mDNS A/AAAA records: those *every* mDNS
    client can connect to as they are.

    * IPv4 addresses (loopback, unspecified and multicast ones excepted),
      when there are any: then nothing else.  The Go predecessor
      zw3rk/peernix (``main.go`` at e74df7c, with hashicorp/mdns) keeps
      whichever A or AAAA record of an answer it reads last, and joins it
      with its port as ``addr + ":" + port`` without brackets, so *any* IPv6
      address it records is unusable to it (``too many colons in
      address``).  Records are read in an order we do not control, so
      publishing an AAAA record next to the A record made such a node pick
      the IPv6 one about half of the time.
    * Otherwise (an IPv6-only host, and ``ipv6``) routable IPv6 addresses:
      global and unique local (``fd00::/8``) ones.
    * Never link-local IPv6 (``fe80::/10``): a record carries no zone, and
      an unscoped link-local address cannot be connected to.  An interface
      that has only a link-local IPv6 address contributes its IPv4
      addresses, or nothing.

    Zones (``%eth0``) are stripped, entries that are not IP addresses are
    skipped.

    :param addresses: candidate addresses (IPv6 with or without a zone).
    :param ipv6: allow IPv6 addresses at all (on an IPv6-only host).
    :returns: addresses without duplicates, in the given order; possibly
        empty (then only UDP broadcast and static peers find us).
    """
    v4: list[str] = []
    v6: list[str] = []
    for text in addresses:
        try:
            parsed = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if parsed.is_loopback or parsed.is_unspecified or parsed.is_multicast:
            continue
        if parsed.version == 4:
            v4.append(str(parsed))
        elif ipv6 and not parsed.is_link_local:
            v6.append(str(parsed))
    return _dedupe(v4 if v4 else v6)


def host_addresses(adapters: Iterable[_Adapter] | None = None, ipv6: bool = True) -> list[str]:
    """
    This host's addresses for mDNS registration, chosen by
    :func:`publishable_addresses` (IPv4 when there is any, else routable
    IPv6; never loopback or link-local IPv6).

    :param adapters: as for :func:`ipv4_broadcast_addresses`.
    :param ipv6: allow IPv6 addresses (on a host without IPv4).
    :returns: addresses without duplicates, in interface order.
    """
    found: list[str] = []
    for adapter in _adapters(adapters):
        for ip in adapter.ips:
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return publishable_addresses(found, ipv6)


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
