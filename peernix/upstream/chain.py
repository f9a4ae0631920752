"""
A "first of" chain of :class:`~peernix.interfaces.IUpstream`\\ s: the peers'
fan-out first, then fetching for the LAN, so the web layer keeps talking to
one upstream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from peernix.interfaces import IUpstream
from peernix.nix.narinfo import NarInfo
from peernix.peers.errors import NarUnavailable
from peernix.sources import Found

_log = Logger()

#: (hash part, NarHash) -> which link answered, for this many recent lookups.
MAX_REMEMBERED = 8192

#: Seconds a found answer is reused for the same hash part: Nix asks for a
#: path's NAR right after its narinfo, and that NAR request then costs no
#: second walk down the chain (a fan-out to peers whose digest changed
#: meanwhile, a narinfo lookup).  Short: a path that goes away is found
#: gone within it, and a NAR that fails to relay from the remembered link
#: is asked of the others anyway.
RECENT_TTL = 30.0


@implementer(IUpstream)
class FirstOf:
    """
    Ask ``links`` in order; the first trusted narinfo wins, and is the
    answer for that hash part for ``recent_ttl`` seconds.  A NAR is asked
    of the link whose narinfo the client got (remembered per hash part and
    NarHash), else of each link in order until one can start it.

    :param links: the upstreams, best first (the peers' fan-out, then
        :class:`~peernix.upstream.fetch.LanFetcher`).
    :param clock: to measure how long earlier links took.
    :param budget: seconds a whole lookup may take; a later link gets what
        is left of it (at least ``min_share``), so a miss is answered in
        time however slow the earlier ones were.  The last link's own
        deadline bounds it too.
    """

    def __init__(self, links: Sequence[IUpstream], clock: IReactorTime, *, budget: float = 4.5,
                 min_share: float = 1.0, recent_ttl: float = RECENT_TTL) -> None:
        if not links:
            raise ValueError("a chain needs at least one upstream")
        self._links = tuple(links)
        self._clock = clock
        self._budget = budget
        self._min_share = min_share
        self._answered: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._recent_ttl = recent_ttl
        # hash part -> (expiry, the answer found), most recent last.
        self._recent: OrderedDict[str, tuple[float, Found]] = OrderedDict()

    def lookup(self, hash_part: str) -> Deferred[NarInfo | None]:
        """See :meth:`IUpstream.lookup`."""
        return self.find(hash_part).addCallback(lambda found: found.info if found is not None else None)

    def find(self, hash_part: str) -> Deferred[Found | None]:
        """See :meth:`IUpstream.find`: the first link's answer, with its source."""
        return Deferred.fromCoroutine(self._find(hash_part))

    async def _find(self, hash_part: str) -> Found | None:
        started = self._clock.seconds()
        recent = self._recent.get(hash_part)
        if recent is not None:
            if recent[0] > started:
                return recent[1]
            del self._recent[hash_part]
        for index, link in enumerate(self._links):
            d = link.find(hash_part)
            if index:
                left = max(self._min_share, self._budget - (self._clock.seconds() - started))
                d.addTimeout(left, self._clock)
            try:
                found = await d
            except CancelledError:
                raise
            except TimeoutError:
                # Out of time for this link: a miss.
                continue
            except Exception:
                _log.failure("Lookup of {hash_part} failed", hash_part=hash_part)
                continue
            if found is not None:
                key = (hash_part, found.info.nar_hash.nix32())
                self._answered.pop(key, None)
                self._answered[key] = index
                while len(self._answered) > MAX_REMEMBERED:
                    self._answered.popitem(last=False)
                if self._recent_ttl > 0:
                    self._recent.pop(hash_part, None)
                    self._recent[hash_part] = (self._clock.seconds() + self._recent_ttl, found)
                    while len(self._recent) > MAX_REMEMBERED:
                        self._recent.popitem(last=False)
                return found
        return None

    def relay_nar(self, info: NarInfo, consumer: object, on_peer: object = None) -> Deferred[None]:
        """See :meth:`IUpstream.relay_nar`; ``on_peer`` goes to the link asked."""
        return Deferred.fromCoroutine(self._relay(info, consumer, on_peer))

    async def _relay(self, info: NarInfo, consumer: object, on_peer: object) -> None:
        hash_part = info.store_path.rsplit("/", 1)[-1][:32]
        first = self._answered.get((hash_part, info.nar_hash.nix32()))
        order = list(range(len(self._links)))
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        last: Exception = NarUnavailable("no upstream has it")
        for index in order:
            try:
                await self._links[index].relay_nar(info, consumer, on_peer)
                return
            except NarUnavailable as e:
                # Nothing written yet: the next link may have it.
                last = e
                continue
        raise last
