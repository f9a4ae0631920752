"""
DNS zones for DNS-SD tests, served by ``twisted.names``.

:class:`MemoryZone` is an authority over records held in memory: it is an
``IResolver`` itself (for unit tests without sockets) and what a
``twisted.names.server.DNSServerFactory`` serves (for tests over real UDP).
:func:`add_instance` writes one DNS-SD service instance into it.

Run as a program, this module is a tiny authoritative DNS server for
end-to-end tests: it serves the zone of a JSON file (see :func:`load_zone`)
over UDP and TCP, and reads the file again whenever it changes, so a test
removes a node from the zone by rewriting the file::

    python -m peernix.test.dnszone --zone zone.json --listen 10.1.2.254 --port 53
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.names import authority, common, dns
from twisted.names.server import DNSServerFactory


class MemoryZone(authority.FileAuthority):  # type: ignore[misc]
    """
    An authority for ``origin`` over :attr:`records` (lower-case name bytes
    -> record payloads), which tests change at will.  Names in the zone
    without records are NXDOMAIN; names outside it are not its business.
    """

    def __init__(self, origin: str) -> None:
        common.ResolverBase.__init__(self)  # type: ignore[no-untyped-call]
        self._cache: dict[Any, Any] = {}
        self.origin = origin.lower().rstrip(".")
        origin_bytes = self.origin.encode()
        # Zero TTLs: nothing downstream may cache what a test changes.
        soa = dns.Record_SOA(mname=b"ns." + origin_bytes, rname=b"admin." + origin_bytes,
                             serial=1, refresh=60, retry=60, expire=0, minimum=0, ttl=0)
        self.soa = (origin_bytes, soa)  # type: ignore[assignment]
        self.records: dict[bytes, list[Any]] = {}  # type: ignore[assignment]

    def add(self, name: str | bytes, record: Any) -> None:
        """Add ``record`` (a ``dns.Record_*``) at ``name`` (text, or any bytes)."""
        key = name if isinstance(name, bytes) else name.encode()
        self.records.setdefault(key.lower().rstrip(b"."), []).append(record)

    def remove(self, name: str, type_: int | None = None) -> None:
        """Remove the records of ``type_`` (all of them when ``None``) at ``name``."""
        key = name.lower().rstrip(".").encode()
        kept = [r for r in self.records.get(key, []) if type_ is not None and r.TYPE != type_]
        if kept:
            self.records[key] = kept
        else:
            self.records.pop(key, None)

    def remove_pointer(self, name: str, target: str) -> None:
        """Remove the PTR record at ``name`` pointing to ``target``."""
        key = name.lower().rstrip(".").encode()
        wanted = target.lower().rstrip(".").encode()
        kept = [r for r in self.records.get(key, []) if not (r.TYPE == dns.PTR and r.name.name.lower() == wanted)]
        if kept:
            self.records[key] = kept
        else:
            self.records.pop(key, None)


def address_record(address: str) -> Any:
    """:returns: an A or AAAA record (zero TTL) for ``address``."""
    if ipaddress.ip_address(address).version == 4:
        return dns.Record_A(address, ttl=0)
    return dns.Record_AAAA(address, ttl=0)


def add_instance(zone: MemoryZone, domain: str, instance: str,
                 targets: Sequence[tuple[str, int, Sequence[str]]],
                 txt: Mapping[str, str] | Sequence[bytes] | None = None) -> str:
    """
    List a ``_peernix._tcp`` instance in ``zone``: the PTR, one SRV per
    target, a TXT record and the targets' addresses.

    :param instance: the instance label (``alice``).
    :param targets: ``(host name, port, addresses)`` per SRV target.
    :param txt: TXT fields (``{"pubkey": ...}``) or raw strings; none when ``None``.
    :returns: the instance's full name.
    """
    service = f"_peernix._tcp.{domain}"
    name = f"{instance}.{service}"
    zone.add(service, dns.Record_PTR(name, ttl=0))
    for host, port, addresses in targets:
        zone.add(name, dns.Record_SRV(0, 0, port, host, ttl=0))
        for address in addresses:
            zone.add(host, address_record(address))
    if txt is not None:
        strings = [f"{k}={v}".encode() for k, v in txt.items()] if isinstance(txt, Mapping) else list(txt)
        zone.add(name, dns.Record_TXT(*strings, ttl=0))
    return name


def load_zone(path: str) -> MemoryZone:
    """
    Read a zone from JSON: ``{"origin": "peernix.test", "instances":
    [{"instance": "alice", "targets": [["alice.hosts.peernix.test", 9999,
    ["10.1.2.3"]]], "txt": {"pubkey": "..."}}]}`` (``txt`` optional).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    zone = MemoryZone(data["origin"])
    for item in data["instances"]:
        add_instance(zone, data["origin"], item["instance"],
                     [(host, int(port), list(addresses)) for host, port, addresses in item["targets"]],
                     item.get("txt"))
    return zone


class _ReloadingZone(MemoryZone):
    """A :class:`MemoryZone` that reads its JSON file again when it changed."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._mtime = -1.0
        super().__init__(load_zone(path).origin)
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime != self._mtime:
                fresh = load_zone(self._path)
                self._mtime = mtime
                self.records = fresh.records
                print(f"zone {self._path} loaded: {sorted(k.decode() for k in self.records)}", flush=True)
        except (OSError, ValueError, KeyError) as e:
            print(f"zone {self._path} not reloaded: {e}", flush=True)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        self._reload()
        print(f"query {dns.QUERY_TYPES.get(type, type)} {name.decode(errors='replace')}", flush=True)
        return super()._lookup(name, cls, type, timeout)


def main(argv: Sequence[str]) -> None:
    """Serve the zone of ``--zone`` on ``--listen``:``--port``, UDP and TCP, until killed."""
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    factory = DNSServerFactory(authorities=[_ReloadingZone(args.zone)])  # type: ignore[no-untyped-call]
    factory.noisy = False
    reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface=args.listen)  # type: ignore[attr-defined]
    reactor.listenTCP(args.port, factory, interface=args.listen)  # type: ignore[attr-defined]
    print(f"serving DNS on {args.listen}:{args.port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
