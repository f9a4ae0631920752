"""Tests for :mod:`peernix.discovery.signed`: which signed announces verify."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.discovery.datagrams import Announce, parse_datagram, render_datagram, sign_announce
from peernix.discovery.ratelimit import KeyedRateLimiter
from peernix.discovery.signed import AnnounceKeys, AnnounceVerifier, Verdict
from peernix.nix.signing import SecretKey

KEY = SecretKey("peer-b-1", bytes(range(1, 33)))
OTHER = SecretKey("peer-c-1", bytes(range(2, 34)))
NOW = 1_700_000_000


def received(ts: int = NOW, key: SecretKey = KEY, **fields: Any) -> Announce:
    """:returns: a signed announce as the receiver parses it."""
    base = Announce("0.1.0", public_key=key.public_key.to_string(), port=8080, node_id="n")
    parsed = parse_datagram(render_datagram(sign_announce(attrs.evolve(base, **fields), key, ts)))
    assert isinstance(parsed, Announce)
    return parsed


class AnnounceKeysTests(SynchronousTestCase):
    """The key bundle."""

    def test_defaults(self) -> None:
        """By default there is no secret key and nothing is trusted; any iterable of keys is kept as a tuple."""
        self.assertEqual(AnnounceKeys(), AnnounceKeys(None, ()))
        self.assertEqual(AnnounceKeys(KEY, [OTHER.public_key]).trusted, (OTHER.public_key,))


class VerifierTests(SynchronousTestCase):
    """AnnounceVerifier.check."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.verifier = AnnounceVerifier(self.clock, [KEY.public_key], window=10.0)

    def test_verified(self) -> None:
        """A fresh announce by a trusted key that names it verifies."""
        self.assertIs(self.verifier.check(received(), "192.0.2.1"), Verdict.VERIFIED)

    def test_window_edges(self) -> None:
        """ts may be up to the window away from now, either way, and no further."""
        self.assertIs(self.verifier.check(received(ts=NOW - 10), "h"), Verdict.VERIFIED)
        self.assertIs(self.verifier.check(received(ts=NOW + 10), "h"), Verdict.VERIFIED)
        self.assertIs(self.verifier.check(received(ts=NOW - 11), "h"), Verdict.STALE)
        self.assertIs(self.verifier.check(received(ts=NOW + 11), "h"), Verdict.STALE)

    def test_unsigned_and_incomplete(self) -> None:
        """No ts and no sig is unsigned; one without the other is incomplete."""
        self.assertIs(self.verifier.check(Announce("1"), "h"), Verdict.UNSIGNED)
        self.assertIs(self.verifier.check(Announce("1", ts=NOW), "h"), Verdict.INCOMPLETE)
        self.assertIs(self.verifier.check(attrs.evolve(received(), ts=None), "h"), Verdict.INCOMPLETE)

    def test_untrusted_and_mismatch(self) -> None:
        """A key we do not trust, a malformed sig, or a public_key other than the signing key do not verify."""
        self.assertIs(self.verifier.check(received(key=OTHER), "h"), Verdict.UNTRUSTED_KEY)
        self.assertIs(self.verifier.check(attrs.evolve(received(), sig="garbage"), "h"), Verdict.UNTRUSTED_KEY)
        mismatch = received(public_key=OTHER.public_key.to_string())
        self.assertIs(self.verifier.check(mismatch, "h"), Verdict.KEY_MISMATCH)

    def test_bad_signature(self) -> None:
        """A signature over other bytes (a forged or altered announce) does not verify."""
        forged = attrs.evolve(received(port=8080), sig=received(port=8081).sig)
        self.assertIs(self.verifier.check(forged, "h"), Verdict.BAD_SIGNATURE)
        self.assertEqual(len(self.verifier), 0)

    def test_replay(self) -> None:
        """The same signed announce again is a duplicate from the first address, a replay from any other."""
        announce = received()
        self.assertIs(self.verifier.check(announce, "192.0.2.1"), Verdict.VERIFIED)
        self.assertIs(self.verifier.check(announce, "192.0.2.1"), Verdict.DUPLICATE)
        self.assertIs(self.verifier.check(announce, "192.0.2.66"), Verdict.REPLAY)

    def test_known_signature_on_other_bytes(self) -> None:
        """A remembered signature attached to a changed announce is a bad signature, from any address."""
        genuine = received(port=8080)
        self.verifier.check(genuine, "192.0.2.1")
        forged = attrs.evolve(received(port=8081), sig=genuine.sig)
        self.assertIs(self.verifier.check(forged, "192.0.2.1"), Verdict.BAD_SIGNATURE)
        self.assertIs(self.verifier.check(forged, "192.0.2.2"), Verdict.BAD_SIGNATURE)

    def test_replay_after_window_is_stale(self) -> None:
        """Remembered signatures are forgotten once stale, and a late copy is rejected as stale."""
        announce = received()
        self.verifier.check(announce, "a")
        self.clock.advance(11)
        self.assertIs(self.verifier.check(received(ts=NOW + 11, node_id="m"), "b"), Verdict.VERIFIED)
        self.assertEqual(len(self.verifier), 1)
        self.assertIs(self.verifier.check(announce, "c"), Verdict.STALE)

    def test_memory_bounded(self) -> None:
        """At most max_seen signatures are remembered."""
        verifier = AnnounceVerifier(self.clock, [KEY.public_key], max_seen=3)
        for i in range(5):
            self.assertIs(verifier.check(received(node_id=f"n{i}"), "h"), Verdict.VERIFIED)
        self.assertEqual(len(verifier), 3)

    def test_budget(self) -> None:
        """Signature checks beyond the budget are not done; cheap rejections spend nothing."""
        verifier = AnnounceVerifier(self.clock, [KEY.public_key], budget=KeyedRateLimiter(self.clock, 1.0, 1.0, 1))
        self.assertIs(verifier.check(received(ts=NOW - 60), "h"), Verdict.STALE)
        self.assertIs(verifier.check(received(key=OTHER), "h"), Verdict.UNTRUSTED_KEY)
        self.assertIs(verifier.check(received(node_id="a"), "h"), Verdict.VERIFIED)
        self.assertIs(verifier.check(received(node_id="b"), "h"), Verdict.RATE_LIMITED)
        self.clock.advance(1)
        self.assertIs(verifier.check(received(ts=NOW + 1, node_id="b"), "h"), Verdict.VERIFIED)

    def test_first_key_of_a_name_counts(self) -> None:
        """With two trusted keys of one name, only the first verifies (as in Nix)."""
        impostor = SecretKey(KEY.name, bytes(32))
        verifier = AnnounceVerifier(self.clock, [KEY.public_key, impostor.public_key])
        self.assertIs(verifier.check(received(key=impostor), "h"), Verdict.KEY_MISMATCH)
        self.assertIs(verifier.check(received(), "h"), Verdict.VERIFIED)
