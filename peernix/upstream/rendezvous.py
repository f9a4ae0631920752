"""
Who fetches a path for the LAN: rendezvous (highest-random-weight) hashing.

Every node computes, without talking, the same order of fetchers for a hash
part: each candidate node gets the weight ``sha256(node key, hash part)`` and
the heaviest comes first.  A node joining or leaving moves only the paths it
wins or won (about ``1/n`` of them); every other path keeps its fetcher, so
churn never reshuffles downloads already under way elsewhere.

A candidate's *key* must be the same string on every node: peernix uses the
``node_id`` each node announces (UDP ``node_id``, mDNS TXT ``id``), never an
address, which differs with the vantage point.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(node_key: str, hash_part: str) -> int:
    """
    :returns: the rendezvous weight of ``node_key`` for ``hash_part``: the
        first 8 bytes of ``sha256(node_key NUL hash_part)`` as an integer.
        The NUL keeps ``("ab", "c")`` and ``("a", "bc")`` apart.
    """
    digest = hashlib.sha256(f"{node_key}\0{hash_part}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def fetcher_order(hash_part: str, node_keys: Iterable[str]) -> list[str]:
    """
    :param hash_part: the store path's hash part.
    :param node_keys: the keys of the nodes that may fetch (healthy peers
        announcing ``fetch_for_lan``, and this node if it fetches), in any
        order; duplicates count once.
    :returns: the keys, the path's fetcher first, then the fallbacks in
        order.  Deterministic: the same set gives the same order on every
        node, whatever the input order.  Ties (equal 64-bit weights) are
        broken by the key itself.
    """
    return sorted(set(node_keys), key=lambda key: (weight(key, hash_part), key), reverse=True)


#: Stands for this node in a fetcher order (peers are their base URLs).
SELF = "self"


class FetcherTable:
    """
    What peers announced about fetching: base URL -> (node id, offers
    fetching).  Discovery feeds it (UDP ``"fetch_for_lan": true`` with
    ``node_id``; mDNS TXT ``fetch=1`` with ``id``); the coordinator reads
    it.  Peers that never announced it (Go nodes, older peernix, static
    peers never heard on UDP or mDNS) are absent, so never chosen.

    Bounded: at most ``max_entries`` URLs, the least recently noted dropped
    first.

    :param node_id: this node's id (its rendezvous key).
    :param fetch_for_lan: whether this node fetches for the LAN itself.
    """

    def __init__(self, node_id: str, fetch_for_lan: bool, max_entries: int = 1024) -> None:
        self.node_id = node_id
        self.fetch_for_lan = fetch_for_lan
        self._max = max_entries
        self._entries: dict[str, tuple[str, bool]] = {}

    def note(self, url: str, node_id: str | None, fetch_for_lan: bool) -> None:
        """
        Record what the peer at base URL ``url`` announced.  An announce
        without a node id cannot be ranked the same way on every node, so it
        counts as not offering fetching.
        """
        self._entries.pop(url, None)
        if node_id and fetch_for_lan:
            self._entries[url] = (node_id, True)
        else:
            self._entries[url] = (node_id or "", False)
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]

    def known(self, url: str) -> bool:
        """:returns: whether the peer at ``url`` told us anything (offering fetching or not)."""
        return url in self._entries

    def offers(self, url: str) -> bool:
        """:returns: whether the peer at ``url`` announced that it fetches for the LAN."""
        entry = self._entries.get(url)
        return entry is not None and entry[1]

    def offering(self) -> list[str]:
        """:returns: the base URLs of the peers that announced fetching for the LAN."""
        return [url for url, (_, offers) in self._entries.items() if offers]

    def order(self, hash_part: str, healthy_urls: Iterable[str]) -> list[str]:
        """
        :param healthy_urls: base URLs of the peers healthy right now.
        :returns: the fetchers of ``hash_part`` in rendezvous order:
            :data:`SELF` for this node (when it fetches for the LAN), base
            URLs for peers (healthy ones offering fetching, with a node id).
            A node id claimed by two URLs (one host seen at two addresses)
            counts once, at the first URL.
        """
        by_key: dict[str, str] = {}
        if self.fetch_for_lan:
            by_key[self.node_id] = SELF
        for url in healthy_urls:
            entry = self._entries.get(url)
            if entry is not None and entry[1] and entry[0] not in by_key:
                by_key[entry[0]] = url
        return [by_key[key] for key in fetcher_order(hash_part, by_key)]
