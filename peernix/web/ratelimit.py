"""
``--max-upload-rate``: the bytes per second this machine serves to peers.

:class:`UploadLimiter` is one token bucket shared by every peer-facing
write (NARs, narinfos, listings, logs; local clients never pass through
it).  A write always goes out whole and takes its bytes from the bucket,
which may go into debt; while it is in debt nobody writes: streams are
*paused* (their producers stop making data, nothing is buffered), short
bodies wait.  When the debt is paid off, waiters are let go one at a time,
each for one write, after which a stream that still has data waits again.
The next to go is the waiter that has been served the fewest bytes (a
newcomer starts level with the least served of those waiting, as a fair
queueing scheduler's virtual time), so concurrent peer downloads share the
rate evenly *in bytes*, whatever their chunk sizes, and a short answer (a
narinfo) waits at most about one turn.  The long-run rate is exactly
``rate``, plus the bucket's burst once.

:class:`ThrottledConsumer` sits between a push producer (a NAR or log
stream) and a request: the request's transport may pause it (a slow
client), and so may the limiter; the producer runs only when neither does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer, IPushProducer, IReactorTime
from zope.interface import implementer

#: The most the bucket holds (a burst after a quiet spell): a tenth of a
#: second of the rate, so the rate measured over seconds stays within a few
#: percent of the cap; at least one small write.
BURST_SECONDS: Final = 0.1
MIN_BURST: Final = 16 * 1024
#: The shortest wait for a turn, seconds.
_MIN_DELAY: Final = 0.001
#: A debt this small (bytes) counts as paid: float rounding.
_SLACK: Final = 1.0


class _Waiter:
    """One entry of the queue: a callable, its place, and whether it was cancelled."""

    __slots__ = ("go", "served", "order", "cancelled")

    def __init__(self, go: Callable[[], object], served: float, order: int) -> None:
        self.go = go
        self.served = served
        self.order = order
        self.cancelled = False

    def cancel(self) -> None:
        """Leave the queue (the stream ended or the client left)."""
        self.cancelled = True


class UploadLimiter:
    """
    A token bucket of ``rate`` bytes per second with fair turns for the
    writers waiting for it.

    :param rate: bytes per second, at least 1.
    :param clock: time source and timer.
    :param burst: the bucket's size in bytes; by default
        ``max(rate * BURST_SECONDS, MIN_BURST)``.
    """

    def __init__(self, rate: int, clock: IReactorTime, burst: int | None = None) -> None:
        if rate < 1:
            raise ValueError("rate must be at least 1 byte per second")
        self.rate = rate
        self._clock = clock
        self.burst = burst if burst is not None else max(int(rate * BURST_SECONDS), MIN_BURST)
        self._tokens = float(self.burst)
        self._last = clock.seconds()
        self._queue: list[_Waiter] = []
        self._order = 0
        #: The bytes served of the last waiter let go: where newcomers start.
        self.floor = 0.0
        # The wake-up when the debt will be paid; cancelled when nobody waits.
        self._timer: IDelayedCall | None = None
        #: Bytes taken from the bucket so far.
        self.sent = 0

    def _refill(self) -> None:
        now = self._clock.seconds()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)

    @property
    def waiting(self) -> int:
        """:returns: how many writers wait for their turn."""
        return sum(1 for w in self._queue if not w.cancelled)

    def may_write(self) -> bool:
        """:returns: whether a write may go out now: the bucket is not in debt and nobody waits."""
        self._refill()
        return self._tokens >= 0 and not self.waiting

    def take(self, nbytes: int) -> bool:
        """
        Account for ``nbytes`` written (always allowed: the write is not split).

        :returns: whether the bucket is now in debt: the writer must wait
            (:meth:`wait`) before its next write.
        """
        self._refill()
        self._tokens -= nbytes
        self.sent += nbytes
        return self._tokens < 0

    def wait(self, go: Callable[[], object], served: float | None = None) -> _Waiter:
        """
        Queue ``go``, called once it is this writer's turn (never
        synchronously from here).

        :param served: the bytes this writer was served so far, counted from
            :attr:`floor` when it started (see :class:`ThrottledConsumer`);
            ``None``: a one-off writer, level with the least served.
        :returns: a handle whose ``cancel()`` leaves the queue.
        """
        self._order += 1
        waiter = _Waiter(go, self.floor if served is None else max(served, self.floor), self._order)
        self._queue.append(waiter)
        self._schedule()
        return waiter

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        self._refill()
        # At least a millisecond: a float rounding that leaves the bucket a
        # hair in debt at the wake-up must not become a busy loop.
        delay = max(_MIN_DELAY, -self._tokens / self.rate)
        self._timer = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._refill()
        # Let writers go while the bucket is not in debt; each one's write
        # (synchronous or soon) takes from it.
        self._queue = [w for w in self._queue if not w.cancelled]
        while self._queue and self._tokens > -_SLACK:
            waiter = min(self._queue, key=lambda w: (w.served, w.order))
            self._queue.remove(waiter)
            if waiter.cancelled:
                continue
            self.floor = max(self.floor, waiter.served)
            waiter.go()
            self._refill()
        self._queue = [w for w in self._queue if not w.cancelled]
        if self._queue:
            self._schedule()

    def stop(self) -> None:
        """Drop every waiter and the timer (service shutdown)."""
        for waiter in self._queue:
            waiter.cancelled = True
        self._queue.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IConsumer, IPushProducer)
class ThrottledConsumer:
    """
    An ``IConsumer`` in front of ``consumer`` that passes writes on, takes
    them from ``limiter``'s bucket and pauses the registered (push)
    producer while the bucket is in debt, until the limiter gives this
    stream its turn.  To ``consumer`` it is the producer, so the
    transport's own pauses (a slow client) are combined with the limiter's.

    :param on_write: called with the length of every write (byte counting).
    """

    def __init__(self, consumer: IConsumer, limiter: UploadLimiter,
                 on_write: Callable[[int], object] | None = None) -> None:
        self._consumer = consumer
        self._limiter = limiter
        self._on_write = on_write
        self._producer: IPushProducer | None = None
        self._transport_paused = False
        self._waiter: _Waiter | None = None
        #: Bytes served, counted from the limiter's floor when registered.
        self.served = 0.0

    # IConsumer, towards the producer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("ThrottledConsumer needs a push (streaming) producer")
        self._producer = producer  # type: ignore[assignment]
        self.served = self._limiter.floor
        self._consumer.registerProducer(self, True)
        if not self._limiter.may_write():
            # Others wait already: take a turn behind them.
            self._throttle()

    def unregisterProducer(self) -> None:
        self._producer = None
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._consumer.write(data)
        self.served += len(data)
        if self._on_write is not None:
            self._on_write(len(data))
        if self._limiter.take(len(data)) and self._producer is not None:
            self._throttle()

    # IPushProducer, towards the transport

    def pauseProducing(self) -> None:
        self._transport_paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport_paused = False
        if self._producer is not None and self._waiter is None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None
        if self._producer is not None:
            self._producer.stopProducing()

    # the limiter's side

    @property
    def throttled(self) -> bool:
        """:returns: whether the stream waits for its turn."""
        return self._waiter is not None

    def _throttle(self) -> None:
        if self._producer is None:
            return
        self._producer.pauseProducing()
        if self._waiter is not None:
            return
        self._waiter = self._limiter.wait(self._turn, self.served)

    def _turn(self) -> None:
        self._waiter = None
        if self._producer is not None and not self._transport_paused:
            self._producer.resumeProducing()
