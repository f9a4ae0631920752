"""
Small NARs fetched from a peer before the local client asks for them.

Nix asks for a path's NAR right after its narinfo (``nix-store -r``,
``nix build``, ``nix copy``), and for most of a closure the NAR is a few
KiB: relaying it then costs a second round trip through two HTTP stacks
while the client waits.  :class:`NarPrefetch` starts that download as soon
as the client got the narinfo, keeps the verified NAR in memory, and hands
it over when the client's NAR request comes (or lets the request wait for
the download already under way instead of starting a second one).

Bounded in every direction: only NARs of at most ``max_size`` bytes, at most
``budget`` bytes held or reserved for downloads in flight (a path that does
not fit is simply not prefetched), at most ``concurrency`` downloads at once
with ``queue`` more waiting, and a NAR nobody asked for within ``ttl``
seconds is dropped.  A NAR is dropped as soon as it has been handed over,
so memory is only held between a narinfo and its NAR.  The downloads verify
NarHash and NarSize as every relay does; one that fails leaves nothing
behind, and the client's request then goes to the peers as without
prefetching.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from attrs import define, field
from prometheus_client import Counter
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from peernix.nix.narinfo import NarInfo

log = Logger()

#: NARs of at most this many bytes (NarSize) are prefetched.
MAX_SIZE = 64 * 1024

#: Bytes of prefetched NARs held (or reserved for downloads in flight) at most.
BUDGET = 8 * 1024 * 1024

#: Seconds a prefetched NAR waits for its client before it is dropped.
TTL = 30.0

#: Seconds a client's NAR request waits for a prefetch still under way
#: before it goes to the peers itself.
WAIT = 5.0

#: ``fetch(info, consumer, on_peer)``: relay the verified NAR of ``info``
#: from some peer into ``consumer``, calling ``on_peer(url)`` with the
#: peer's URL before writing (see :meth:`peernix.interfaces.IUpstream.relay_nar`).
Fetch = Callable[[NarInfo, IConsumer, Callable[[str], object]], "Deferred[None]"]


@implementer(IConsumer)
class _Collect:
    """An ``IConsumer`` keeping what is written to it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.producer: IProducer | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.parts.append(data)


@define(eq=False)
class _Held:
    """One prefetched NAR: waiting, downloading, or held in memory."""

    info: NarInfo
    data: bytes | None = None
    peer_url: str | None = None
    op: Deferred[None] | None = None
    timer: IDelayedCall | None = None
    waiters: list[Deferred[bytes | None]] = field(factory=list)


class NarPrefetch:
    """
    Prefetched NARs, by hash part.

    :param fetch: how a NAR is downloaded and verified.
    :param clock: for the ttl and the wait of :meth:`take`.
    :param outcomes: counts ``used``, ``unused`` (dropped after ``ttl``),
        ``failed`` and ``skipped`` (budget or queue full) prefetches, by
        the label ``outcome``.
    """

    def __init__(
        self,
        fetch: Fetch,
        clock: IReactorTime,
        outcomes: Counter,
        *,
        max_size: int = MAX_SIZE,
        budget: int = BUDGET,
        ttl: float = TTL,
        wait: float = WAIT,
        concurrency: int = 4,
        queue: int = 256,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._outcomes = outcomes
        self.max_size = max_size
        self._budget = budget
        self._ttl = ttl
        self._wait = wait
        self._concurrency = max(1, concurrency)
        self._queue_max = queue
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._waiting: deque[str] = deque()
        self._running = 0
        #: Bytes held or reserved (each entry reserves its NarSize).
        self.reserved = 0

    def __len__(self) -> int:
        return len(self._held)

    def expect(self, hash_part: str, info: NarInfo) -> None:
        """
        A local client was given ``info`` for ``hash_part``: fetch its NAR
        in the background when it is small enough and fits the budget.
        Does nothing when the same NAR is held or coming already.
        """
        size = info.nar_size
        if size > self.max_size or size < 0:
            return
        held = self._held.get(hash_part)
        if held is not None:
            if held.info.nar_hash == info.nar_hash:
                return
            self._drop(hash_part, held)
        if self.reserved + size > self._budget or len(self._waiting) >= self._queue_max:
            self._outcomes.labels("skipped").inc()
            return
        self._held[hash_part] = _Held(info)
        self.reserved += size
        self._waiting.append(hash_part)
        self._pump()

    def take(self, hash_part: str, info: NarInfo) -> Deferred[tuple[bytes, str | None] | None]:
        """
        Hand over the prefetched NAR of ``info`` (and the URL of the peer it
        came from), dropping it here.

        :returns: a Deferred firing with ``(nar, peer URL)``, at once when it
            is held, after the download when one is under way (at most
            ``wait`` seconds), or with ``None`` when it is not here, failed,
            or took too long: the caller then fetches it itself.  A prefetch
            still queued (not started) is dropped and answered ``None`` at
            once, so a client never waits behind a queue.  It fails only
            with ``CancelledError``, when cancelled.
        """
        held = self._held.get(hash_part)
        if held is None or held.info.nar_hash != info.nar_hash:
            return succeed(None)
        if held.data is not None:
            return succeed(self._hand_over(hash_part, held))
        if held.op is None:
            self._drop(hash_part, held)
            return succeed(None)
        waiter: Deferred[bytes | None] = Deferred(lambda w: held.waiters.remove(w) if w in held.waiters else None)
        held.waiters.append(waiter)
        # Cancelling the answer (the client left) only ends this wait; the
        # download goes on for whoever asks next.
        return Deferred.fromCoroutine(self._arrival(hash_part, held, waiter))

    def close(self) -> None:
        """Stop every download and drop everything (service shutdown): no timer or request is left."""
        self._waiting.clear()
        for hash_part, held in list(self._held.items()):
            self._drop(hash_part, held)

    # -- internals ---------------------------------------------------------

    async def _arrival(
        self, hash_part: str, held: _Held, waiter: Deferred[bytes | None]
    ) -> tuple[bytes, str | None] | None:
        """:returns: what :meth:`take` answers once ``held``'s download ended, or ``None`` after ``wait`` seconds."""
        waiter.addTimeout(self._wait, self._clock)
        try:
            data = await waiter
        except TimeoutError:
            return None
        if data is None:
            return None
        if self._held.get(hash_part) is held:
            return self._hand_over(hash_part, held)
        # Another waiter took it first: it is the same verified NAR.
        return data, held.peer_url

    def _hand_over(self, hash_part: str, held: _Held) -> tuple[bytes, str | None]:
        assert held.data is not None
        self._outcomes.labels("used").inc()
        self._drop(hash_part, held)
        return held.data, held.peer_url

    def _pump(self) -> None:
        while self._waiting and self._running < self._concurrency:
            hash_part = self._waiting.popleft()
            held = self._held.get(hash_part)
            if held is None or held.op is not None:
                continue
            self._running += 1
            collect = _Collect()

            def on_peer(url: str, held: _Held = held) -> None:
                held.peer_url = url

            op = self._fetch(held.info, collect, on_peer)
            held.op = op
            op.addCallbacks(
                self._fetched, self._failed, callbackArgs=(hash_part, held, collect), errbackArgs=(hash_part, held)
            )

    def _fetched(self, _: None, hash_part: str, held: _Held, collect: _Collect) -> None:
        self._running -= 1
        held.op = None
        data = b"".join(collect.parts)
        if self._held.get(hash_part) is not held or len(data) != held.info.nar_size:
            # Dropped meanwhile (close, a newer narinfo), or not what the
            # relay promised: nothing kept.
            self._drop(hash_part, held)
        else:
            held.data = data
            held.timer = self._clock.callLater(self._ttl, self._expired, hash_part, held)
        waiters, held.waiters = held.waiters, []
        for waiter in waiters:
            waiter.callback(held.data)
        self._pump()

    def _failed(self, failure: Failure, hash_part: str, held: _Held) -> None:
        self._running -= 1
        held.op = None
        if not isinstance(failure.value, CancelledError):
            self._outcomes.labels("failed").inc()
            log.debug(
                "prefetching the NAR of {path} failed: {error}",
                path=held.info.store_path,
                error=failure.getErrorMessage(),
            )
        self._drop(hash_part, held)
        self._pump()

    def _expired(self, hash_part: str, held: _Held) -> None:
        held.timer = None
        self._outcomes.labels("unused").inc()
        self._drop(hash_part, held)

    def _drop(self, hash_part: str, held: _Held) -> None:
        """Forget ``held`` (idempotent): cancel its download and timer, free its reservation, answer its waiters."""
        if self._held.get(hash_part) is held:
            del self._held[hash_part]
            self.reserved -= held.info.nar_size
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        held.timer = None
        waiters, held.waiters = held.waiters, []
        for waiter in waiters:
            waiter.callback(held.data)
        if held.op is not None:
            op, held.op = held.op, None
            op.cancel()
