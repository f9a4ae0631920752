"""Tests for :mod:`peernix.peers.client`, against a fake LAN (no sockets)."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import render_narinfo
from peernix.nix.signing import SecretKey
from peernix.peers.client import MAX_MISS_BODY_BYTES, PEER_HEADER, PeerClient
from peernix.peers.errors import PeerConnectionError, PeerHTTPError, PeerProtocolError, PeerTimeout
from peernix.peers.registry import Peer
from peernix.test.peerfakes import FakeLan, FakeResponse, file_nar, hash_part_of, lan_client, make_info, store_path_for
from peernix.peers.client import read_limited

KEY = SecretKey("k-1", b"\x01" * 32)


def peer(hostport: str) -> Peer:
    return Peer(url=f"http://{hostport}", first_seen=0.0, last_seen=0.0, sources={"static"})


@implementer(IAgent)
class RecordingAgent:
    """An agent that records requests and answers each with one FakeResponse."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers]] = []
        self.response = FakeResponse()

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        self.requests.append((method, uri, headers or Headers()))
        return succeed(self.response)  # type: ignore[arg-type]


class PeerClientTests(SynchronousTestCase):
    """Bounded requests to one peer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lan = FakeLan()
        http, self.agent = lan_client(self.lan)
        self.client = PeerClient(http, self.clock, timeout=2.0, max_narinfo_bytes=1024)
        self.nar = file_nar(b"hello\n")
        self.info = make_info(store_path_for("hello"), self.nar, key=KEY)
        self.h = hash_part_of(self.info.store_path)

    def fetch(self, hostport: str) -> object:
        d = self.client.fetch_narinfo(peer(hostport), self.h)
        self.agent.flush()
        return d

    def test_found(self) -> None:
        """A 200 narinfo is parsed; the request is marked as a peer's and asks for zstd."""
        self.lan.peer("a:1").serve(self.info)
        d = self.fetch("a:1")
        self.assertEqual(self.successResultOf(d), self.info)  # type: ignore[arg-type]
        host, path, headers = self.lan.requests[0]
        self.assertEqual((host, path), ("a:1", f"/nix-cache/{self.h}.narinfo"))
        self.assertEqual(headers.getRawHeaders(PEER_HEADER), ["1"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ipv6_zone_id(self) -> None:
        """A peer URL with an IPv6 zone id (which treq cannot parse) goes to the agent, marked as a peer's."""
        agent = RecordingAgent()
        verifyObject(IAgent, agent)
        client = PeerClient(self.client._http, self.clock, agent=agent)
        d = client.fetch_narinfo(peer("[fe80::1%eth0]:9999"), self.h)
        [(method, uri, headers)] = agent.requests
        self.assertEqual((method, uri), (b"GET", f"http://[fe80::1%eth0]:9999/nix-cache/{self.h}.narinfo?compression=zstd".encode()))
        self.assertEqual(headers.getRawHeaders(PEER_HEADER.encode()), [b"1"])
        agent.response.send(render_narinfo(self.info).encode())
        agent.response.finish()
        self.assertEqual(self.successResultOf(d), self.info)

    def test_ipv6_literal(self) -> None:
        """A peer at a plain IPv6 literal (which treq cannot parse either) goes to the agent."""
        agent = RecordingAgent()
        client = PeerClient(self.client._http, self.clock, agent=agent)
        d = client.fetch_narinfo(peer("[fd70:1::2]:9999"), self.h)
        [(method, uri, headers)] = agent.requests
        self.assertEqual(uri, f"http://[fd70:1::2]:9999/nix-cache/{self.h}.narinfo?compression=zstd".encode())
        agent.response.send(render_narinfo(self.info).encode())
        agent.response.finish()
        self.assertEqual(self.successResultOf(d), self.info)

    def test_zstd_only_across_the_lan(self) -> None:
        """zstd is asked of peers on other machines, not of peers on loopback (where it only costs CPU)."""
        agent = RecordingAgent()
        client = PeerClient(self.client._http, self.clock, agent=agent)
        expected = {
            "192.168.1.7:9999": True,
            "[fd70:1::2]:9999": True,
            "peer.lan:9999": True,
            "127.0.0.1:9999": False,
            "127.1.2.3:9999": False,
            "[::1]:9999": False,
            "localhost:9999": False,
        }
        for hostport, zstd in expected.items():
            self.assertEqual(peer(hostport).on_loopback, not zstd, hostport)
        # IPv6 peers go through the recording agent, which shows the query.
        client.fetch_narinfo(peer("[::1]:9999"), self.h)
        self.assertEqual(agent.requests[-1][1], f"http://[::1]:9999/nix-cache/{self.h}.narinfo".encode())
        client.fetch_narinfo(peer("[fd70:1::2]:9999"), self.h)
        self.assertTrue(agent.requests[-1][1].endswith(b".narinfo?compression=zstd"))
        # An explicit choice wins.
        client.fetch_narinfo(peer("[fd70:1::2]:9999"), self.h, prefer_zstd=False)
        self.assertTrue(agent.requests[-1][1].endswith(b".narinfo"))
        client.fetch_narinfo(peer("[::1]:9999"), self.h, prefer_zstd=True)
        self.assertTrue(agent.requests[-1][1].endswith(b"?compression=zstd"))

    def test_not_found(self) -> None:
        """404 means the peer does not have it: None."""
        self.lan.peer("a:1")
        self.assertIsNone(self.successResultOf(self.fetch("a:1")))  # type: ignore[arg-type]

    def test_not_found_body_read(self) -> None:
        """A 404's small body is read to its end (the connection is kept for reuse), not cut off."""
        agent = RecordingAgent()
        agent.response = FakeResponse(404)
        client = PeerClient(self.client._http, self.clock, agent=agent)
        d = client.fetch_narinfo(peer("[fd70:1::2]:9999"), self.h)
        self.assertNoResult(d)
        agent.response.send(b"not found\n")
        self.assertNoResult(d)
        agent.response.finish()
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(agent.response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_found_big_body_dropped(self) -> None:
        """A 404 with a body above the miss-body cap is still a miss, and its connection is closed."""
        agent = RecordingAgent()
        agent.response = FakeResponse(404)
        client = PeerClient(self.client._http, self.clock, agent=agent)
        d = client.fetch_narinfo(peer("[fd70:1::2]:9999"), self.h)
        agent.response.send(b"x" * (MAX_MISS_BODY_BYTES + 1))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(agent.response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_redirect_not_followed(self) -> None:
        """A redirect is not followed (it could lead off the peer): it fails with PeerHTTPError after one request."""
        agent = RecordingAgent()
        agent.response = FakeResponse(302)
        agent.response.headers.setRawHeaders(b"Location", [b"http://elsewhere:80/x.nar"])
        client = PeerClient(self.client._http, self.clock, agent=agent)
        d = client.open_nar(peer("a:1"), "nar/x.nar")
        self.assertEqual(self.failureResultOf(d, PeerHTTPError).value.code, 302)
        self.assertEqual(len(agent.requests), 1)

    def test_server_error(self) -> None:
        """Other statuses fail with PeerHTTPError (kind http)."""
        self.lan.peer("a:1").mode = "error"
        f = self.failureResultOf(self.fetch("a:1"), PeerHTTPError)  # type: ignore[arg-type]
        self.assertEqual((f.value.code, f.value.kind), (500, "http"))

    def test_malformed(self) -> None:
        """A narinfo that does not parse fails with PeerProtocolError (kind untrusted)."""
        self.lan.peer("a:1").narinfos[self.h] = b"StorePath: nonsense\n"
        f = self.failureResultOf(self.fetch("a:1"), PeerProtocolError)  # type: ignore[arg-type]
        self.assertEqual(f.value.kind, "untrusted")

    def test_too_large(self) -> None:
        """A body above the cap fails with PeerProtocolError."""
        self.lan.peer("a:1").narinfos[self.h] = b"x" * 5000
        self.failureResultOf(self.fetch("a:1"), PeerProtocolError)  # type: ignore[arg-type]

    def test_connection_dropped(self) -> None:
        """A dropped connection fails with PeerConnectionError."""
        self.lan.peer("a:1").mode = "down"
        self.failureResultOf(self.fetch("a:1"), PeerConnectionError)  # type: ignore[arg-type]

    def test_timeout(self) -> None:
        """A peer that never answers fails with PeerTimeout at the deadline, leaving no timers."""
        self.lan.peer("a:1").mode = "slow"
        d = self.fetch("a:1")
        self.assertNoResult(d)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, PeerTimeout)  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """Cancelling a request fails it with CancelledError (not a peer failure) and stops its timer."""
        self.lan.peer("a:1").mode = "slow"
        d = self.fetch("a:1")
        d.cancel()  # type: ignore[attr-defined]
        self.failureResultOf(d, CancelledError)  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probe(self) -> None:
        """probe returns the latency of nix-cache-info; failures are PeerErrors."""
        self.lan.peer("a:1")
        d = self.client.probe(peer("a:1"))
        self.agent.flush()
        self.assertEqual(self.successResultOf(d), 0.0)
        self.lan.peer("b:1").mode = "error"
        d = self.client.probe(peer("b:1"))
        self.agent.flush()
        self.failureResultOf(d, PeerHTTPError)

    def test_open_nar(self) -> None:
        """open_nar resolves the URL against the peer's cache and returns the unread 200 response."""
        self.lan.peer("a:1").serve(self.info, self.nar)
        d = self.client.open_nar(peer("a:1"), self.info.url)
        self.agent.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.lan.requests[-1][1], f"/nix-cache/{self.info.url}")
        body = read_limited(response, 1000, self.clock, 1.0)
        self.agent.flush()
        self.assertEqual(self.successResultOf(body), self.nar)

    def test_open_nar_errors(self) -> None:
        """A missing NAR is a PeerHTTPError; a URL leaving the peer is refused without a request."""
        self.lan.peer("a:1")
        d = self.client.open_nar(peer("a:1"), "nar/missing.nar")
        self.agent.flush()
        self.failureResultOf(d, PeerHTTPError)
        for url in ["http://evil:1/x.nar", "//evil:1/x.nar", "https://a:1/x.nar"]:
            self.failureResultOf(self.client.open_nar(peer("a:1"), url), PeerProtocolError)
        self.assertEqual(len(self.lan.requests), 1)
        self.assertEqual(
            self.client.nar_url(peer("a:1"), "/nix-cache/nar/x.nar"), "http://a:1/nix-cache/nar/x.nar"
        )


class ReadLimitedTests(SynchronousTestCase):
    """The bounded body reader."""

    def test_silence(self) -> None:
        """A body silent for the timeout fails with PeerTimeout and stops the connection."""
        clock = Clock()
        response = FakeResponse()
        d = read_limited(response, 100, clock, 5.0)
        response.send(b"abc")
        clock.advance(4)
        response.send(b"d")
        clock.advance(4)
        self.assertNoResult(d)
        clock.advance(1)
        self.failureResultOf(d, PeerTimeout)
        self.assertTrue(response.transport.stopped)

    def test_cap_and_cancel(self) -> None:
        """Exceeding the cap or cancelling stops the connection; no timers are left."""
        clock = Clock()
        response = FakeResponse()
        d = read_limited(response, 4, clock, 5.0)
        response.send(b"abc", b"de")
        self.failureResultOf(d, PeerProtocolError)
        self.assertTrue(response.transport.stopped)
        response = FakeResponse()
        d = read_limited(response, 4, clock, 5.0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_interrupted(self) -> None:
        """A body cut off by a connection error fails with PeerConnectionError."""
        clock = Clock()
        response = FakeResponse()
        d = read_limited(response, 100, clock, 5.0)
        response.send(b"abc")
        response.lose(ConnectionError("reset"))
        self.failureResultOf(d, PeerConnectionError)
        self.assertEqual(clock.getDelayedCalls(), [])
