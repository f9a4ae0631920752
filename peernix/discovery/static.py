"""Peers listed in the configuration (``--peer``), for nodes beyond the broadcast domain."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application.service import Service
from zope.interface import implementer

from peernix.interfaces import IDiscovery, IPeerRegistry

#: The registry source name of configured peers.
SOURCE = "static"


@implementer(IDiscovery)
class StaticPeersService(Service):
    """
    Adds the configured peer URLs to the registry while running.

    Static peers never expire in the registry; they are removed when the
    service stops.
    """

    name = SOURCE

    def __init__(self, registry: IPeerRegistry, urls: Sequence[str]) -> None:
        """
        :param registry: where the peers go (source ``"static"``).
        :param urls: base URLs ``http://host:port`` (IPv6 bracketed),
            already validated by the option parser; duplicates are added once.
        """
        self._registry = registry
        self.urls: tuple[str, ...] = tuple(dict.fromkeys(urls))

    def startService(self) -> None:
        """Add every configured peer; ones the full registry refuses are logged by it."""
        super().startService()  # type: ignore[no-untyped-call]
        for url in self.urls:
            self._registry.add(url, SOURCE)

    def stopService(self) -> None:
        """Remove every configured peer."""
        super().stopService()  # type: ignore[no-untyped-call]
        for url in self.urls:
            self._registry.remove(url, SOURCE)
