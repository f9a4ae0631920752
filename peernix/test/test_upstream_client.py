"""Tests of :mod:`peernix.upstream.client`: trusted narinfos, decoded and checked NAR bodies."""

from __future__ import annotations

import os

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from peernix.nix.hashes import Hash
from peernix.nix.narinfo import render_narinfo
from peernix.nix.signing import SecretKey, sign_narinfo
from peernix.peers.trust import TrustPolicy
from peernix.test.peerfakes import FakeResponse, chunks_of
from peernix.test.upstreamfakes import UPSTREAM_KEY, FakeUpstreamCache, compress, make_upstream_path
from peernix.upstream.client import (
    STEP_OUTPUT,
    NarBodyDecoder,
    SourceFailed,
    UpstreamClient,
    VerificationFailed,
    make_decompressor,
    nar_url,
)

BASE = "http://upstream.test/cache"


@implementer(IAgent)
class SilentAgent:
    """An agent whose requests never get an answer (until cancelled)."""

    def __init__(self) -> None:
        self.requests: list[Deferred[IResponse]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: object = None) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred()
        self.requests.append(d)
        return d


class FakesTests(SynchronousTestCase):
    def test_silent_agent(self) -> None:
        """The silent agent is an IAgent."""
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(IAgent, SilentAgent()))


class DecoderTests(SynchronousTestCase):
    def _decode(self, data: bytes, compression: str, chunk: int = 1000, **kwargs: object) -> tuple[NarBodyDecoder, list[bytes], FakeResponse]:
        out: list[bytes] = []
        decoder = NarBodyDecoder(out.append, compression, Clock(), **kwargs)  # type: ignore[arg-type]
        response = FakeResponse()
        response.deliverBody(decoder)
        response.send(*chunks_of(data, chunk))
        return decoder, out, response

    def test_every_compression(self) -> None:
        """xz, zstd, bzip2 and none decode to the NAR; FileHash and FileSize check out."""
        nar = os.urandom(5000) + bytes(100_000)
        for compression in ("xz", "zstd", "bzip2", "none"):
            file = compress(nar, compression)
            decoder, out, response = self._decode(
                file, compression, file_hash=Hash.sha256_of(file), file_size=len(file))
            response.finish()
            self.successResultOf(decoder.done)
            self.assertEqual(b"".join(out), nar, compression)

    def test_unsupported(self) -> None:
        """An unknown compression is refused up front."""
        self.assertRaises(ValueError, make_decompressor, "br")

    def test_bounded_steps(self) -> None:
        """A bomb (highly compressible input in one chunk) comes out in steps of at most STEP_OUTPUT."""
        nar = bytes(8 * 1024 * 1024)
        for compression in ("xz", "zstd"):
            file = compress(nar, compression)
            decoder, out, response = self._decode(file, compression, chunk=len(file))
            response.finish()
            self.successResultOf(decoder.done)
            self.assertEqual(sum(map(len, out)), len(nar))
            self.assertLessEqual(max(map(len, out)), STEP_OUTPUT)

    def test_file_size_exceeded(self) -> None:
        """More bytes than FileSize stop the connection at once: a verification failure."""
        file = compress(b"a" * 10_000, "none")
        decoder, out, response = self._decode(file, "none", file_size=5000)
        self.failureResultOf(decoder.done, VerificationFailed)
        self.assertTrue(response.transport.stopped)
        self.assertLessEqual(sum(map(len, out)), 5000)

    def test_file_hash_mismatch(self) -> None:
        """A FileHash mismatch fails the body as a verification failure."""
        file = compress(b"nar bytes" * 100, "xz")
        decoder, _, response = self._decode(file, "xz", file_hash=Hash.sha256_of(b"other"), file_size=len(file))
        response.finish()
        self.failureResultOf(decoder.done, VerificationFailed)

    def test_short_file(self) -> None:
        """Fewer bytes than FileSize at a clean end: a verification failure."""
        decoder, _, response = self._decode(b"abc", "none", file_size=4)
        response.finish()
        self.failureResultOf(decoder.done, VerificationFailed)

    def test_corrupt_and_truncated(self) -> None:
        """Garbage or a truncated stream is a verification failure, never a success."""
        file = compress(os.urandom(50_000), "xz")
        decoder, _, response = self._decode(file[: len(file) // 2], "xz")
        response.finish()
        self.failureResultOf(decoder.done, VerificationFailed)
        decoder, _, response = self._decode(b"not xz at all", "xz")
        self.failureResultOf(decoder.done, VerificationFailed)

    def test_concatenated_frames(self) -> None:
        """Several concatenated xz streams or zstd frames are one NAR."""
        for compression in ("xz", "zstd"):
            file = compress(b"first", compression) + compress(b"second", compression)
            decoder, out, response = self._decode(file, compression, chunk=7)
            response.finish()
            self.successResultOf(decoder.done)
            self.assertEqual(b"".join(out), b"firstsecond")

    def test_connection_lost(self) -> None:
        """A lost connection is a source failure (another source may be tried)."""
        decoder, _, response = self._decode(b"abc", "none")
        response.lose(ConnectionLost())
        self.failureResultOf(decoder.done, SourceFailed)

    def test_silence(self) -> None:
        """A source that sends nothing for the silence time fails and is stopped."""
        clock = Clock()
        decoder = NarBodyDecoder(lambda data: None, "none", clock, silence=10.0)
        response = FakeResponse()
        response.deliverBody(decoder)
        clock.advance(9)
        response.send(b"x")
        clock.advance(9)
        self.assertNoResult(decoder.done)
        clock.advance(1.5)
        self.failureResultOf(decoder.done, SourceFailed)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_skip(self) -> None:
        """The first ``skip`` decompressed bytes are dropped (resuming from an upstream)."""
        nar = bytes(range(256)) * 40
        decoder, out, response = self._decode(compress(nar, "xz"), "xz", chunk=100, skip=3000)
        response.finish()
        self.successResultOf(decoder.done)
        self.assertEqual(b"".join(out), nar[3000:])

    def test_sink_refuses(self) -> None:
        """A sink raising ValueError (e.g. past NarSize) stops the download as a verification failure."""
        def sink(data: bytes) -> None:
            raise ValueError("size mismatch")

        decoder = NarBodyDecoder(sink, "none", Clock())
        response = FakeResponse()
        response.deliverBody(decoder)
        response.send(b"abc")
        self.failureResultOf(decoder.done, VerificationFailed)
        self.assertTrue(response.transport.stopped)

    def test_cancel(self) -> None:
        """Cancelling stops the connection and the timer."""
        clock = Clock()
        decoder = NarBodyDecoder(lambda data: None, "none", clock)
        response = FakeResponse()
        response.deliverBody(decoder)
        decoder.done.cancel()
        self.failureResultOf(decoder.done, CancelledError)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(clock.getDelayedCalls(), [])


class NarUrlTests(SynchronousTestCase):
    def test_relative(self) -> None:
        """A relative URL resolves below the upstream's base."""
        self.assertEqual(nar_url(BASE, "nar/abc.nar.xz"), "http://upstream.test/cache/nar/abc.nar.xz")

    def test_elsewhere_refused(self) -> None:
        """An unsigned URL field cannot send us to another host."""
        self.assertRaises(SourceFailed, nar_url, BASE, "http://evil.test/nar/x.nar")
        self.assertRaises(SourceFailed, nar_url, BASE, "//evil.test/x")


class FetchNarinfoTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = FakeUpstreamCache("/cache")
        self.agent = RequestTraversalAgent(self.cache)
        self.clock = Clock()
        self.client = UpstreamClient(self.agent, self.clock, TrustPolicy([UPSTREAM_KEY.public_key]))

    def test_trusted(self) -> None:
        """A narinfo signed by a trusted key comes back as the upstream gave it."""
        path = make_upstream_path("hello", b"hi")
        self.cache.add(path)
        info = self.successResultOf(self.client.fetch_narinfo(BASE, path.hash_part))
        self.assertEqual(info, path.info)

    def test_miss(self) -> None:
        """404, 403 (S3) and 410 are misses."""
        path = make_upstream_path("absent", b"x")
        for code in (404, 403, 410):
            self.cache.code_override = code
            self.assertIsNone(self.successResultOf(self.client.fetch_narinfo(BASE, path.hash_part)))

    def test_untrusted(self) -> None:
        """An unsigned narinfo, or one signed by an unknown key, is dropped: an upstream never widens trust."""
        other = SecretKey("other-1", bytes(32))
        for key in (None, other):
            path = make_upstream_path(f"p{key is None}", b"x", key=key)
            self.cache.add(path)
            self.assertIsNone(self.successResultOf(self.client.fetch_narinfo(BASE, path.hash_part)))

    def test_wrong_path(self) -> None:
        """A narinfo naming another path is dropped."""
        asked = make_upstream_path("asked", b"x")
        other = make_upstream_path("other", b"y")
        self.cache.files[f"{asked.hash_part}.narinfo"] = render_narinfo(other.info).encode()
        self.assertIsNone(self.successResultOf(self.client.fetch_narinfo(BASE, asked.hash_part)))

    def test_unsupported_compression(self) -> None:
        """A NAR peernix cannot decode makes the narinfo a miss."""
        path = make_upstream_path("br", b"x", compression="none")
        info = sign_narinfo(attrs.evolve(path.info, compression="br", sigs=()), UPSTREAM_KEY)
        self.cache.add(attrs.evolve(path, info=info))
        self.assertIsNone(self.successResultOf(self.client.fetch_narinfo(BASE, path.hash_part)))

    def test_server_error(self) -> None:
        """Another status is a source failure (the caller answers 404)."""
        self.cache.code_override = 500
        self.failureResultOf(self.client.fetch_narinfo(BASE, make_upstream_path("e", b"x").hash_part), SourceFailed)

    def test_malformed(self) -> None:
        """A malformed narinfo is a source failure."""
        path = make_upstream_path("m", b"x")
        self.cache.files[f"{path.hash_part}.narinfo"] = b"garbage"
        self.failureResultOf(self.client.fetch_narinfo(BASE, path.hash_part), SourceFailed)

    def test_deadline(self) -> None:
        """An upstream that never answers fails at the deadline, and the request is cancelled."""
        agent = SilentAgent()
        client = UpstreamClient(agent, self.clock, TrustPolicy([]), timeout=3.0)
        d = client.fetch_narinfo(BASE, make_upstream_path("s", b"x").hash_part)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, SourceFailed)
        self.assertTrue(agent.requests[0].called)


class OpenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = FakeUpstreamCache("/cache")
        self.client = UpstreamClient(RequestTraversalAgent(self.cache), Clock(), TrustPolicy([]))

    def test_open_and_headers(self) -> None:
        """open() sends Range from an offset and X-Peernix-Peer when asked; a 404 is a source failure."""
        path = make_upstream_path("o", b"x")
        self.cache.add(path)
        response = self.successResultOf(self.client.open(nar_url(BASE, path.info.url), offset=5, peer=True))
        self.assertEqual(response.code, 200)
        _, headers = self.cache.requests[-1]
        self.assertEqual(headers["range"], "bytes=5-")
        self.assertEqual(headers["x-peernix-peer"], "1")
        self.failureResultOf(self.client.open(nar_url(BASE, "nar/missing.nar")), SourceFailed)
