"""
HTTPS to upstream caches.

The daemon keeps pyOpenSSL out of memory when it can (see
:mod:`peernix.tap`): ``twisted.web.client`` and ``twisted.internet.endpoints``
then decide at import that there is no TLS, for good.  Upstreams such as
cache.nixos.org need it, so requests to upstreams go through
:class:`UpstreamEndpointFactory`, which loads TLS itself the first time an
``https`` upstream is asked (about 12 MB, paid only then).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


def allow_tls() -> None:
    """Undo :mod:`peernix.tap`'s block on importing ``OpenSSL`` (no-op when there is none)."""
    if "OpenSSL" in sys.modules and sys.modules["OpenSSL"] is None:
        del sys.modules["OpenSSL"]


@implementer(IStreamClientEndpoint)
class TLSEndpoint:
    """Connects through ``wrapped`` and speaks TLS (verified for ``hostname``) on top."""

    def __init__(self, hostname: str, wrapped: IStreamClientEndpoint) -> None:
        allow_tls()
        # Imported here, after allow_tls: these need pyOpenSSL.
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.protocols.tls import TLSMemoryBIOFactory

        self._factory = TLSMemoryBIOFactory
        self._creator = optionsForClientTLS(hostname)
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        tls = self._factory(self._creator, True, protocolFactory)
        d: Deferred[Any] = self._wrapped.connect(tls)
        # The caller (the connection pool) wants its own protocol back.
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class UpstreamEndpointFactory:
    """
    Endpoints for ``http`` and ``https`` URLs, TLS loaded on first use.

    :param reactor: for connecting (``IReactorTCP`` and ``IReactorTime``).
    :param connect_timeout: seconds a TCP connection may take.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            host = uri.host.decode("ascii")
            return TLSEndpoint(host.strip("[]"), endpoint)
        raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
