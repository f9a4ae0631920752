"""
Streaming one NAR from a peer to a client, verifying it on the way.

:class:`NarRelay` is the body protocol of the peer's response
(``response.deliverBody(relay)``).  It decompresses (``zstd``) or passes
through (``none``), feeds every byte to a :class:`NarVerifier`, and writes to
the consumer (the client's request) with backpressure: the peer connection
is registered as the consumer's streaming producer, as in twisted's
``portforward``, through a thin proxy that also pauses the silence timer.
The last chunk is held back until hash and size checked out, so a client
never receives a complete-looking bad NAR (a NAR of at most
:data:`HOLD_BACK_BYTES` is held back whole, so a lying peer can be replaced
unseen).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from peernix.nix.hashes import Hash
from peernix.nix.nar import NarError, NarVerifier
from peernix.peers.errors import NarClientGone, NarRelayInterrupted, NarVerificationFailed
from peernix.zstd import ZstdDecompressor, ZstdError

#: Most decompressed bytes one step produces: a zstd bomb cannot make one
#: step allocate more than this, however well it compresses.
ZSTD_STEP_OUTPUT = 256 * 1024

#: Compressions a relay can decode.
SUPPORTED_COMPRESSIONS = frozenset({"none", "zstd"})

#: NARs up to this size are verified whole before their first byte is relayed.
HOLD_BACK_BYTES = 2 * 1024 * 1024


@implementer(IPushProducer)
class _PeerProducer:
    """
    What the consumer sees as its producer: forwards pause/resume to the
    peer's transport and keeps the relay's silence timer from firing while
    the *client* is the slow side.
    """

    def __init__(self, relay: NarRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._set_paused(True)

    def resumeProducing(self) -> None:
        self._relay._set_paused(False)

    def stopProducing(self) -> None:
        # The consumer went away (client disconnected): no fault of the peer.
        self._relay.fail(None, NarClientGone("the client stopped the transfer"))


class NarRelay(Protocol):
    """
    Body protocol relaying one NAR into ``consumer``.

    :param consumer: an ``IConsumer`` (e.g. a ``twisted.web`` request).
    :param nar_hash: the NarHash the NAR must have.
    :param nar_size: the NarSize it must have; more bytes abort at once.
    :param compression: ``"none"`` or ``"zstd"``.
    :param clock: for the silence timeout.
    :param silence: seconds the peer may stay silent while we are not paused.
    :param on_bytes: called with the number of raw bytes received from the
        peer (for metrics).
    :param hold_back: a NAR of at most this many bytes is held back whole
        until it verified, so a lying peer's bytes never reach the client
        and the caller can retry another peer unseen; a larger NAR streams,
        holding back only its last chunk.  Memory per relay is bounded by
        this (plus one chunk).
    :raises ValueError: for an unsupported compression.

    :ivar done: fires with ``None`` once every byte was verified and written;
        fails with :class:`NarVerificationFailed` (bad bytes, attribute
        ``failure_kind == "verification"``) or :class:`NarRelayInterrupted`
        (peer connection lost: ``"connection"``; silent: ``"timeout"``;
        client stopped: ``None``, as its subclass :class:`NarClientGone`).  Cancelling it stops the peer connection.
    :ivar wrote_any: whether any byte has been written to the consumer; if
        not, a failed relay may be retried with another peer.
    """

    def __init__(
        self,
        consumer: IConsumer,
        nar_hash: Hash,
        nar_size: int,
        compression: str,
        clock: IReactorTime,
        *,
        silence: float = 30.0,
        on_bytes: Callable[[int], None] | None = None,
        hold_back: int = HOLD_BACK_BYTES,
    ) -> None:
        if compression not in SUPPORTED_COMPRESSIONS:
            raise ValueError(f"unsupported NAR compression {compression!r}")
        self.done: Deferred[None] = Deferred(self._cancelled)
        self.wrote_any = False
        self.bytes_received = 0
        self.bytes_written = 0
        self.failure_kind: str | None = None
        self._consumer = consumer
        self._verifier = NarVerifier(nar_hash, nar_size, check_grammar=False)
        self._nar_size = nar_size
        self._clock = clock
        self._silence = silence
        self._on_bytes = on_bytes
        self._decompressor = ZstdDecompressor() if compression == "zstd" else None
        # Verified-later bytes not yet written: the whole NAR when it is
        # small enough, else just the latest chunk.
        self._held: list[bytes] = []
        self._hold_all = nar_size <= hold_back
        # Compressed input not yet decompressed (waiting while paused).
        self._input: deque[memoryview] = deque()
        # The clean end of the body, once it came.
        self._end: Failure | None = None
        self._fed = 0
        self._registered = False
        self._paused = False
        self._finished = False
        # Started in connectionMade, pushed back by every chunk, cancelled
        # while paused and in _cleanup.
        self._timer: IDelayedCall | None = None

    # -- peer side -------------------------------------------------------

    def connectionMade(self) -> None:
        self._consumer.registerProducer(_PeerProducer(self), True)
        self._registered = True
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self.bytes_received += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        self._arm_timer()
        if self._decompressor is None:
            self._emit(data)
            return
        self._input.append(memoryview(data))
        self._drain()

    def _drain(self) -> None:
        """
        Decompress queued input, at most :data:`ZSTD_STEP_OUTPUT` bytes a
        step, until paused or out of input.

        The decompressor keeps input it could not expand yet, and what was
        not fed waits (compressed) in ``_input`` while the client is slow
        (the peer connection is paused meanwhile): memory stays bounded even
        for a zstd bomb.
        """
        while not self._paused and not self._finished:
            decompressor = self._decompressor
            assert decompressor is not None
            if decompressor.eof:
                # Several concatenated frames are valid zstd (and Nix reads
                # them); anything else after a frame fails below.
                rest = decompressor.unused_data
                if not rest and not self._input:
                    break
                decompressor = self._decompressor = ZstdDecompressor()
                if rest:
                    self._input.appendleft(memoryview(rest))
            if decompressor.needs_input:
                if not self._input:
                    break
                data: bytes | memoryview = self._input.popleft()
            else:
                data = b""
            try:
                out = decompressor.decompress(data, max_length=ZSTD_STEP_OUTPUT)
            except ZstdError as e:
                self.fail("verification", NarVerificationFailed(f"corrupt zstd stream: {e}"))
                return
            self._emit(out)
        if self._end is not None and not self._pending_input():
            self._complete()

    def _pending_input(self) -> bool:
        """:returns: whether compressed input is still waiting to be expanded."""
        decompressor = self._decompressor
        if decompressor is None:
            return False
        if self._input:
            return True
        if decompressor.eof:
            return bool(decompressor.unused_data)
        return not decompressor.needs_input

    def _emit(self, data: bytes) -> None:
        if not data or self._finished:
            return
        self._fed += len(data)
        if self._fed > self._nar_size:
            self.fail("verification", NarVerificationFailed(f"peer sent more than NarSize {self._nar_size} bytes"))
            return
        try:
            self._verifier.feed(data)
        except NarError as e:
            self.fail("verification", NarVerificationFailed(str(e)))
            return
        if self._hold_all:
            self._held.append(data)
            return
        held, self._held = self._held, [data]
        for chunk in held:
            self._write(chunk)

    def _write(self, data: bytes) -> None:
        self.wrote_any = True
        self.bytes_written += len(data)
        self._consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished:
            return
        if not isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.fail("connection", NarRelayInterrupted(f"peer connection lost: {reason.getErrorMessage()}"))
            return
        self._end = reason
        if self._pending_input():
            # Compressed input still waits for the client to catch up;
            # _drain completes once it is through.
            return
        self._complete()

    def _complete(self) -> None:
        # A clean end (or an end without Content-Length) is only a success
        # if the NAR itself is complete: hash and size.
        if self._finished:
            return
        self._disarm_timer()
        if self._decompressor is not None and not self._decompressor.eof:
            self.fail("verification", NarVerificationFailed("truncated zstd stream"))
            return
        try:
            self._verifier.finish()
        except NarError as e:
            self.fail("verification", NarVerificationFailed(str(e)))
            return
        held, self._held = self._held, []
        if held:
            self._write(b"".join(held))
        self._cleanup(stop_peer=False)
        self.done.callback(None)

    # -- timers, pausing, failure --------------------------------------

    def _arm_timer(self) -> None:
        if self._finished or self._paused:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._silence)
        else:
            self._timer = self._clock.callLater(self._silence, self._silent)

    def _disarm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _silent(self) -> None:
        self._timer = None
        self.fail("timeout", NarRelayInterrupted(f"peer silent for {self._silence} s"))

    def _set_paused(self, paused: bool) -> None:
        if self._finished:
            return
        self._paused = paused
        if self.transport is not None:
            peer = cast(IPushProducer, self.transport)
            if paused:
                peer.pauseProducing()
            else:
                peer.resumeProducing()
        if paused:
            self._disarm_timer()
        else:
            if self._end is None:
                self._arm_timer()
            if self._decompressor is not None:
                self._drain()

    def fail(self, kind: str | None, error: Exception) -> None:
        """
        Stop relaying: drop the held-back chunk, stop the peer connection and
        fail :attr:`done` with ``error``.

        :param kind: the failure kind to record against the peer, or ``None``
            when it was not the peer's fault.
        """
        if self._finished:
            return
        self.failure_kind = kind
        self._cleanup(stop_peer=True)
        self.done.errback(error)

    def _cleanup(self, *, stop_peer: bool) -> None:
        self._finished = True
        self._held = []
        self._input.clear()
        self._disarm_timer()
        if stop_peer and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    def _cancelled(self, _d: Deferred[None]) -> None:
        if not self._finished:
            self.failure_kind = None
            self._cleanup(stop_peer=True)
