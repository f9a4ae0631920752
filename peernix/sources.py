"""
Where an answer came from: the value of the ``X-Peernix-Source`` response
header and of the access log's ``source`` field.

* ``local``: this machine's store;
* ``peer <base URL>``: relayed from a LAN peer, e.g. ``peer http://10.0.0.2:9999``;
* ``upstream <URL>``: fetched from an upstream cache for the LAN
  (:mod:`peernix.upstream`) by this node itself;
* ``upstream <URL> via <fetcher base URL>``: fetched from that upstream by
  another LAN node (the path's fetcher), which streamed it to this one.

A narinfo fetched for the LAN names the node the NAR would come through
(the running or finished download's fetcher, else the first in rendezvous
order); its NAR names the fetcher whose bytes are written when the first
byte goes.
"""

from __future__ import annotations

from typing import Final, Literal

from attrs import frozen

from peernix.nix.narinfo import NarInfo

#: The response header naming an answer's source.
SOURCE_HEADER: Final = b"X-Peernix-Source"

SourceKind = Literal["local", "peer", "upstream"]


@frozen
class Source:
    """
    One answer's origin.

    :ivar kind: ``local``, ``peer`` or ``upstream``.
    :ivar url: the peer's base URL (``peer``) or the upstream URL
        (``upstream``); ``None`` for ``local``.
    :ivar via: for ``upstream``, the base URL of the LAN node that fetched
        it, when not this one.
    """

    kind: SourceKind
    url: str | None = None
    via: str | None = None

    def __str__(self) -> str:
        if self.kind == "local" or self.url is None:
            return self.kind
        text = f"{self.kind} {self.url}"
        if self.via is not None:
            text += f" via {self.via}"
        return text

    def header_value(self) -> bytes:
        """:returns: the ``X-Peernix-Source`` value (URLs are ASCII; anything else is escaped)."""
        return str(self).encode("ascii", "backslashreplace")


#: An answer from this machine's own store.
LOCAL: Final = Source("local")


def peer_source(base_url: str) -> Source:
    """:returns: the source of an answer relayed from the peer at ``base_url``."""
    return Source("peer", base_url)


def parse_source(text: str) -> Source:
    """
    Read a header value back (tests, tools).

    :raises ValueError: ``text`` is not ``local``, ``peer URL`` or
        ``upstream URL [via URL]``.
    """
    words = text.split()
    if words == ["local"]:
        return LOCAL
    if len(words) == 2 and words[0] == "peer":
        return Source("peer", words[1])
    if len(words) == 2 and words[0] == "upstream":
        return Source("upstream", words[1])
    if len(words) == 4 and words[0] == "upstream" and words[2] == "via":
        return Source("upstream", words[1], words[3])
    raise ValueError(f"not a peernix source: {text!r}")


@frozen
class Found:
    """
    What :meth:`peernix.interfaces.IUpstream.find` answers: a trusted
    narinfo and where it came from.

    :ivar info: the narinfo, signatures untouched, URL as the source gave it.
    :ivar source: the peer or upstream that answered.
    """

    info: NarInfo
    source: Source
