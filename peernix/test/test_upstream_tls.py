"""Tests of :mod:`peernix.upstream.tls`: https upstreams although the daemon keeps pyOpenSSL out."""

from __future__ import annotations

import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from peernix.test.daemon import SOURCE_ROOT
from peernix.upstream.tls import TLSEndpoint, UpstreamEndpointFactory


class EndpointFactoryTests(SynchronousTestCase):
    def test_http(self) -> None:
        """An http URL connects plainly, with the connect timeout."""
        reactor = MemoryReactorClock()
        endpoint = UpstreamEndpointFactory(reactor, 2.0).endpointForURI(URI.fromBytes(b"http://cache.test:8080/x"))
        self.assertNotIsInstance(endpoint, TLSEndpoint)

    def test_https_wraps_tls(self) -> None:
        """An https URL connects with TLS on top of the TCP connection."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        reactor = MemoryReactorClock()
        endpoint = UpstreamEndpointFactory(reactor, 2.0).endpointForURI(URI.fromBytes(b"https://127.0.0.1/x"))
        self.assertIsInstance(endpoint, TLSEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        wrapping = reactor.tcpClients[0][2]
        self.assertIsInstance(getattr(wrapping, "_wrappedFactory", wrapping), TLSMemoryBIOFactory)

    def test_other_schemes(self) -> None:
        """Other schemes are refused."""
        factory = UpstreamEndpointFactory(MemoryReactorClock(), 2.0)
        self.assertRaises(SchemeNotSupported, factory.endpointForURI, URI.fromBytes(b"ftp://cache.test/x"))

    def test_https_in_the_daemon_process(self) -> None:
        """With pyOpenSSL blocked as the daemon blocks it, an https upstream is still tried over TLS."""
        script = (
            "import peernix.tap\n"  # blocks OpenSSL, imports twisted.web.client without TLS
            "from twisted.internet import reactor\n"
            "from twisted.web.client import Agent, HTTPConnectionPool\n"
            "from peernix.upstream.tls import UpstreamEndpointFactory\n"
            "agent = Agent.usingEndpointFactory(reactor, UpstreamEndpointFactory(reactor, 2.0),"
            " pool=HTTPConnectionPool(reactor))\n"
            "d = agent.request(b'GET', b'https://127.0.0.1:1/x')\n"
            "d.addBoth(lambda r: print(type(r.value).__name__)).addBoth(lambda _: reactor.stop())\n"
            "reactor.run()\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=SOURCE_ROOT, env={"PYTHONPATH": SOURCE_ROOT, "PATH": "/usr/bin:/bin"})
        self.assertEqual(done.stdout.strip(), "ConnectionRefusedError", done.stderr)
