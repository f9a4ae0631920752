"""Tests for :mod:`peernix.peers.relay`: streaming a NAR with verification and backpressure."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.internet.interfaces import IPushProducer
from zope.interface.verify import verifyObject

from peernix.nix.hashes import Hash
from peernix.peers.errors import NarRelayInterrupted, NarVerificationFailed
from peernix.peers.relay import ZSTD_STEP_OUTPUT, NarRelay
from peernix.test.peerfakes import FakePeerTransport, FakeResponse, chunks_of, file_nar, zstd

NAR = file_nar(bytes(range(256)) * 40)


class PausingConsumer(StringTransport):
    """A consumer that pauses its producer after every write (a slow client) and keeps only counts."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.since_resume = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.since_resume += len(data)
        if self.producer is not None:
            self.producer.pauseProducing()


class NarRelayTests(SynchronousTestCase):
    """One NAR relayed from a (fake) peer response into a consumer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.consumer = StringTransport()
        self.response = FakeResponse()
        self.received: list[int] = []

    def relay(self, nar: bytes = NAR, compression: str = "none", size: int | None = None,
              hold_back: int = 0) -> NarRelay:
        """A relay in streaming mode unless ``hold_back`` says otherwise."""
        relay = NarRelay(
            self.consumer,
            Hash.sha256_of(nar),
            len(nar) if size is None else size,
            compression,
            self.clock,
            silence=10.0,
            on_bytes=self.received.append,
            hold_back=hold_back,
        )
        self.response.deliverBody(relay)
        return relay

    def assertClean(self) -> None:
        self.assertIsNone(self.consumer.producer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_good_raw(self) -> None:
        """A correct raw NAR arrives whole; the last chunk only after verification."""
        relay = self.relay()
        self.assertTrue(self.consumer.streaming)
        pieces = chunks_of(NAR, 1000)
        self.response.send(*pieces)
        self.assertEqual(self.consumer.value(), b"".join(pieces[:-1]))
        self.assertNoResult(relay.done)
        self.response.finish()
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)
        self.assertEqual((relay.bytes_written, sum(self.received)), (len(NAR), len(NAR)))
        self.assertClean()

    def test_small_nar_held_back_whole(self) -> None:
        """A NAR within hold_back reaches the consumer only once it verified, in one piece."""
        relay = self.relay(hold_back=len(NAR))
        self.response.send(*chunks_of(NAR, 1000))
        self.assertEqual(self.consumer.value(), b"")
        self.assertFalse(relay.wrote_any)
        self.response.finish()
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)
        self.assertClean()

    def test_small_corrupted_nar_writes_nothing(self) -> None:
        """A corrupted NAR within hold_back fails without a byte written, so another peer can be tried."""
        relay = self.relay(hold_back=len(NAR))
        bad = bytearray(NAR)
        bad[len(bad) // 2] ^= 1
        self.response.send(*chunks_of(bytes(bad), 1000))
        self.response.finish()
        self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertEqual(self.consumer.value(), b"")
        self.assertFalse(relay.wrote_any)

    def test_good_zstd(self) -> None:
        """A correct zstd NAR is decompressed on the fly and verified."""
        relay = self.relay(compression="zstd")
        compressed = zstd(NAR)
        self.response.send(*chunks_of(compressed, 7))
        self.response.finish()
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)
        self.assertEqual(sum(self.received), len(compressed))
        self.assertClean()

    def test_potential_data_loss_complete(self) -> None:
        """An end without Content-Length is success when the NAR checked out."""
        relay = self.relay()
        self.response.send(NAR[:100], NAR[100:])
        self.response.lose(PotentialDataLoss())
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)

    def test_potential_data_loss_short(self) -> None:
        """An end without Content-Length with bytes missing is a verification failure."""
        relay = self.relay()
        self.response.send(NAR[:100], NAR[100:-8])
        self.response.lose(PotentialDataLoss())
        self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertEqual(relay.failure_kind, "verification")

    def test_corrupted_byte(self) -> None:
        """A flipped byte fails verification; the held-back last chunk is never written."""
        bad = bytearray(NAR)
        bad[-20] ^= 1
        relay = self.relay(size=len(NAR))
        pieces = chunks_of(bytes(bad), 1000)
        self.response.send(*pieces)
        self.response.finish()
        f = self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertIn("hash mismatch", str(f.value))
        self.assertEqual(self.consumer.value(), b"".join(pieces[:-1]))
        self.assertTrue(relay.wrote_any)
        self.assertEqual(relay.failure_kind, "verification")
        self.assertClean()

    def test_not_a_nar(self) -> None:
        """Bytes that are not a NAR (hash and size alone decide) fail at the end, and the client never gets the last chunk."""
        junk = b"not a nar at all" + NAR[16:]
        relay = self.relay(size=len(junk))
        pieces = chunks_of(junk, 1000)
        self.response.send(*pieces)
        self.assertNoResult(relay.done)
        self.response.finish()
        f = self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertIn("hash mismatch", str(f.value))
        self.assertNotEqual(self.consumer.value(), junk)
        self.assertEqual(relay.failure_kind, "verification")
        self.assertClean()

    def test_truncated(self) -> None:
        """A body ending early fails verification and never writes its last chunk."""
        relay = self.relay()
        self.response.send(*chunks_of(NAR[:-16], 1000))
        self.response.finish()
        f = self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertIn("size", str(f.value))
        self.assertLess(len(self.consumer.value()), len(NAR) - 16)

    def test_extra_bytes(self) -> None:
        """More bytes than NarSize abort the peer connection at once."""
        relay = self.relay()
        self.response.send(NAR, b"\0" * 8)
        self.failureResultOf(relay.done, NarVerificationFailed)
        self.assertTrue(self.response.transport.stopped)
        self.assertLess(len(self.consumer.value()), len(NAR))
        self.assertClean()

    def test_zstd_garbage_and_truncation(self) -> None:
        """A corrupt or truncated zstd stream fails verification."""
        relay = self.relay(compression="zstd")
        self.response.send(b"\x28\xb5\x2f\xfd garbage garbage garbage")
        self.failureResultOf(relay.done, NarVerificationFailed)
        self.response = FakeResponse()
        self.consumer = StringTransport()
        relay = self.relay(compression="zstd")
        compressed = zstd(NAR)
        self.response.send(compressed[:-4])
        self.response.finish()
        self.failureResultOf(relay.done, NarVerificationFailed)

    def test_zstd_trailing_data(self) -> None:
        """Garbage after the end of the zstd frame fails verification."""
        relay = self.relay(compression="zstd")
        self.response.send(zstd(NAR) + b"extra garbage")
        self.failureResultOf(relay.done, NarVerificationFailed)

    def test_zstd_frames(self) -> None:
        """Concatenated zstd frames are one valid stream."""
        relay = self.relay(compression="zstd")
        self.response.send(zstd(NAR[:1000]) + zstd(NAR[1000:3000]), zstd(NAR[3000:]))
        self.response.finish()
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)

    def test_zstd_extra_frame(self) -> None:
        """A whole extra frame after the NAR exceeds NarSize and fails."""
        relay = self.relay(compression="zstd")
        self.response.send(zstd(NAR) + zstd(b"more"))
        self.failureResultOf(relay.done, NarVerificationFailed)

    def test_connection_lost_mid_stream(self) -> None:
        """A peer dying mid-stream fails with NarRelayInterrupted (kind connection), last chunk held back."""
        relay = self.relay()
        self.response.send(NAR[:1000], NAR[1000:2000])
        self.response.lose(ConnectionLost())
        self.failureResultOf(relay.done, NarRelayInterrupted)
        self.assertEqual(self.consumer.value(), NAR[:1000])
        self.assertEqual(relay.failure_kind, "connection")
        self.assertClean()

    def test_pause_resume_propagate(self) -> None:
        """The consumer's pause and resume reach the peer transport."""
        self.relay()
        producer = self.consumer.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertTrue(self.response.transport.paused)
        producer.resumeProducing()
        self.assertFalse(self.response.transport.paused)
        self.assertEqual((self.response.transport.pauses, self.response.transport.resumes), (1, 1))

    def test_silence_timeout_not_while_paused(self) -> None:
        """A silent peer times out, but not while the client side has paused it."""
        relay = self.relay()
        producer = self.consumer.producer
        assert producer is not None
        self.response.send(NAR[:100])
        producer.pauseProducing()
        self.clock.advance(100)
        self.assertNoResult(relay.done)
        producer.resumeProducing()
        self.clock.advance(9)
        self.response.send(NAR[100:200])
        self.clock.advance(9)
        self.assertNoResult(relay.done)
        self.clock.advance(1)
        self.failureResultOf(relay.done, NarRelayInterrupted)
        self.assertEqual(relay.failure_kind, "timeout")
        self.assertTrue(self.response.transport.stopped)
        self.assertClean()

    def test_client_stops(self) -> None:
        """The consumer stopping (client gone) stops the peer; the failure is not the peer's."""
        relay = self.relay()
        producer = self.consumer.producer
        assert producer is not None
        producer.stopProducing()
        self.failureResultOf(relay.done, NarRelayInterrupted)
        self.assertIsNone(relay.failure_kind)
        self.assertTrue(self.response.transport.stopped)

    def test_cancel(self) -> None:
        """Cancelling the relay stops the peer connection and unregisters the producer."""
        relay = self.relay()
        self.response.send(NAR[:100])
        relay.done.cancel()
        self.failureResultOf(relay.done, CancelledError)
        self.assertTrue(self.response.transport.stopped)
        self.response.send(NAR[100:])
        self.assertEqual(self.consumer.value(), b"")
        self.assertClean()

    def test_zstd_paused_before_data(self) -> None:
        """Compressed input arriving while paused waits, compressed, until resumed; a clean end waits too."""
        relay = self.relay(compression="zstd")
        producer = self.consumer.producer
        assert producer is not None
        producer.pauseProducing()
        self.response.send(zstd(NAR))
        self.response.finish()
        self.assertEqual(self.consumer.value(), b"")
        self.assertNoResult(relay.done)
        producer.resumeProducing()
        self.successResultOf(relay.done)
        self.assertEqual(self.consumer.value(), NAR)
        self.assertClean()

    def test_zstd_bomb_bounded_per_step(self) -> None:
        """A highly compressed NAR is decompressed a bounded amount at a time when the client is slow."""
        nar = file_nar(b"\0" * (40 << 20))
        consumer = PausingConsumer()
        self.consumer = consumer
        relay = self.relay(nar=nar, compression="zstd")
        self.response.send(zstd(nar))
        self.response.finish()
        steps = 0
        while not relay.done.called:
            # One step's output, plus the chunk held back from the step before.
            self.assertLessEqual(consumer.since_resume, 2 * ZSTD_STEP_OUTPUT)
            producer = consumer.producer
            assert producer is not None
            consumer.since_resume = 0
            producer.resumeProducing()
            steps += 1
        self.successResultOf(relay.done)
        self.assertGreater(steps, 2)
        self.assertEqual(consumer.total, len(nar))

    def test_fake_response_interface(self) -> None:
        """The hand-rolled response and transport provide the interfaces they stand in for."""
        verifyObject(IResponse, FakeResponse())
        verifyObject(IPushProducer, FakePeerTransport())

    def test_unsupported_compression(self) -> None:
        """Compressions other than none and zstd are refused up front."""
        self.assertRaises(ValueError, NarRelay, self.consumer, Hash.sha256_of(NAR), len(NAR), "xz", self.clock)
