"""Token buckets per key (source address), bounded in how many keys they remember."""

from __future__ import annotations

from collections import OrderedDict

from attrs import define
from twisted.internet.interfaces import IReactorTime


@define
class _Bucket:
    tokens: float
    stamp: float


class KeyedRateLimiter:
    """
    A token bucket per key: each key may spend ``burst`` tokens at once and
    gains ``rate`` tokens a second.

    At most ``max_keys`` buckets are kept; the least recently used one is
    forgotten first, so spoofed source addresses cannot grow memory.
    A forgotten key starts again with a full bucket, which only matters to an
    attacker who already floods with more addresses than ``max_keys``; a
    global limiter (a single key) bounds the total.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: float, max_keys: int = 1024) -> None:
        """
        :param clock: time source.
        :param rate: tokens gained per second per key.
        :param burst: bucket capacity.
        :param max_keys: buckets remembered at most.
        """
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[object, _Bucket] = OrderedDict()

    def allow(self, key: object, cost: float = 1.0) -> bool:
        """
        Spend ``cost`` tokens of ``key``'s bucket if it has them.

        :returns: whether the action is allowed.
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.stamp = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return True
        return False

    def __len__(self) -> int:
        return len(self._buckets)
