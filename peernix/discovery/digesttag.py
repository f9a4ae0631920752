"""
How discovery carries store digest versions (see :mod:`peernix.store.digest`):
the ``digest`` field of UDP announcements and the ``digest=`` TXT record of
mDNS.  A peer that hears a version other than the one it holds fetches the
digest soon, so a path added to a node's store is found within seconds.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen

#: The longest digest version accepted from the network.
MAX_DIGEST_TAG = 64


def is_digest_tag(value: object) -> bool:
    """:returns: whether ``value`` is a plausible digest version: 1 to 64 ASCII letters, digits and ``-``."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_DIGEST_TAG
        and all(c.isascii() and (c.isalnum() or c == "-") for c in value)
    )


@frozen
class DigestHooks:
    """What a discovery mechanism needs to carry digest versions."""

    #: Returns our digest's current version (``None`` before the first build).
    tag: Callable[[], str | None]
    #: Called with a peer's base URL and the version it announced.
    announced: Callable[[str, str], object]
