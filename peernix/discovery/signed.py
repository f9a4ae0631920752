"""
Signed announcements: which received announces mark their sender verified.

An announce may carry ``ts`` (unix seconds) and ``sig``, the ed25519
signature by the sender's Nix key of :func:`.datagrams.signing_payload`.
It *verifies* when all of these hold:

* ``sig`` names a key in our trusted set (the fan-out's trusted keys) and
  verifies against it, and the announce's ``public_key`` is that key;
* ``|now - ts|`` is within the replay window (a few seconds; the clocks of
  the LAN's machines must agree that well, or announces stay unverified);
* the same ``(key, ts, sig)`` has not been verified before from another
  source address (a replay).  The source address is not signed, so what a
  verified announce proves is "a holder of a trusted key sent this within
  the window, and this is the first copy we saw": the first copy's source
  address is the one marked verified.  Later copies from the *same* address
  (one broadcast arrives through the directed and the limited broadcast
  address) are harmless duplicates.

Anything else is treated exactly like an unsigned announce (the Go
predecessor never signs): the peer is still added, just not verified.
Verifying costs CPU, so it runs only after the cheap checks and within a
global budget.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable

from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime

from peernix.discovery.datagrams import Announce
from peernix.discovery.ratelimit import KeyedRateLimiter
from peernix.nix.signing import PublicKey, SecretKey, split_sig

#: Default replay window, seconds either side of our clock.
REPLAY_WINDOW = 10.0
#: Verified signatures remembered for replay detection.  Entries older than
#: the window need not be kept (their ``ts`` is stale by then); this bound
#: only matters beyond ``verify_rate * 2 * window`` verifications, far more
#: than the verification budget allows.
MAX_SEEN = 4096


def _keys(keys: Iterable[PublicKey]) -> tuple[PublicKey, ...]:
    return tuple(keys)


@frozen
class AnnounceKeys:
    """
    The keys UDP discovery signs and verifies announces with.

    :ivar secret_key: this node's Nix secret key (``--secret-key-file``);
        when set, every announce we send is signed.
    :ivar trusted: the keys whose signed announces mark a peer verified: the
        same trusted set the fan-out accepts narinfos from.
    """

    secret_key: SecretKey | None = None
    trusted: tuple[PublicKey, ...] = field(default=(), converter=_keys)


class Verdict(enum.Enum):
    """What a received announce's signature says; the value is a metric label."""

    UNSIGNED = "unsigned"
    VERIFIED = "verified"
    DUPLICATE = "duplicate"
    INCOMPLETE = "incomplete"
    STALE = "stale"
    UNTRUSTED_KEY = "untrusted_key"
    KEY_MISMATCH = "key_mismatch"
    REPLAY = "replay"
    BAD_SIGNATURE = "bad_signature"
    RATE_LIMITED = "rate_limited"


class AnnounceVerifier:
    """
    Checks signed announces against the trusted keys, the replay window and
    the signatures already seen.
    """

    def __init__(
        self,
        clock: IReactorTime,
        trusted: Iterable[PublicKey],
        *,
        window: float = REPLAY_WINDOW,
        budget: KeyedRateLimiter | None = None,
        max_seen: int = MAX_SEEN,
    ) -> None:
        """
        :param clock: wall-clock time (the reactor's ``seconds()``).
        :param trusted: trusted public keys; with two of one name, the first
            counts (as in Nix).
        :param window: accepted ``|now - ts|``, seconds.
        :param budget: spent (key ``None``) on every signature check; when
            empty the announce is :attr:`Verdict.RATE_LIMITED`.
        :param max_seen: verified signatures remembered at most.
        """
        self._clock = clock
        self._trusted: dict[str, PublicKey] = {}
        for key in trusted:
            self._trusted.setdefault(key.name, key)
        self._window = window
        self._budget = budget
        self._max_seen = max_seen
        # (key name, ts, sig) -> (source host of the first verified copy,
        # its ts, the payload it signed).
        self._seen: OrderedDict[tuple[str, int, str], tuple[str, int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        """:returns: how many verified signatures are remembered."""
        return len(self._seen)

    def check(self, announce: Announce, host: str) -> Verdict:
        """
        Judge one received announce.  Never raises.

        :param announce: as parsed (with :attr:`Announce.signed_payload`).
        :param host: its source address.
        :returns: :attr:`Verdict.VERIFIED` or :attr:`Verdict.DUPLICATE` when
            the sender holds a trusted key; anything else means "treat as
            unsigned".
        """
        if announce.sig is None and announce.ts is None:
            return Verdict.UNSIGNED
        if announce.sig is None or announce.ts is None or announce.signed_payload is None:
            return Verdict.INCOMPLETE
        now = self._clock.seconds()
        self._prune(now)
        # Cheap checks first: a flood of junk signatures costs no crypto.
        if abs(now - announce.ts) > self._window:
            return Verdict.STALE
        parts = split_sig(announce.sig)
        key = self._trusted.get(parts[0]) if parts is not None else None
        if key is None:
            return Verdict.UNTRUSTED_KEY
        if announce.public_key != key.to_string():
            return Verdict.KEY_MISMATCH
        seen_key = (key.name, announce.ts, announce.sig)
        seen = self._seen.get(seen_key)
        if seen is not None:
            if seen[2] != announce.signed_payload:
                # A known signature on other bytes: a forgery.
                return Verdict.BAD_SIGNATURE
            # Only verified signatures are remembered, so this copy is
            # genuine; whether it may vouch for this address is the question.
            return Verdict.DUPLICATE if seen[0] == host else Verdict.REPLAY
        if self._budget is not None and not self._budget.allow(None):
            return Verdict.RATE_LIMITED
        if not key.verify(announce.signed_payload, announce.sig):
            return Verdict.BAD_SIGNATURE
        self._seen[seen_key] = (host, announce.ts, announce.signed_payload)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)
        return Verdict.VERIFIED

    def _prune(self, now: float) -> None:
        # Entries are in arrival order and each ts was within the window on
        # arrival, so the oldest come first (give or take the window).
        while self._seen:
            _, (_, ts, _) = next(iter(self._seen.items()))
            if ts >= now - self._window:
                break
            self._seen.popitem(last=False)
