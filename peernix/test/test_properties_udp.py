"""
Property tests of UDP discovery: whatever arrives, nothing we send in answer
is longer than what caused it, and signed announces verify exactly when
untouched.  (Parsing arbitrary bytes is in ``test_discovery_datagrams``.)
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.discovery.datagrams import MAX_DATAGRAM, Announce, parse_datagram, render_datagram, sign_announce
from peernix.discovery.signed import AnnounceVerifier, Verdict
from peernix.test.test_discovery_udp import NOW, OUR_KEY, PEER_KEY, _Fixture, signed_fixture

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40).filter(str.isprintable)
_ANNOUNCE_FIELDS = st.fixed_dictionaries(
    {"cmd": st.just("announce"), "peernix_version": _TEXT},
    optional={
        "nix_version": _TEXT,
        "platform": _TEXT,
        "features": st.lists(_TEXT, max_size=6),
        "public_key": st.sampled_from([OUR_KEY.public_key.to_string(), PEER_KEY.public_key.to_string()]),
        "port": st.integers(1, 65535),
        "node_id": st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=20),
        "reply": st.booleans(),
        "extra": st.text(max_size=300),
    },
)


class NoAmplificationPropertyTests(SynchronousTestCase):
    """Answers are never longer than their request."""

    def run_one(self, f: _Fixture, data: bytes, host: str) -> None:
        port = f.reactor.udp_ports[0]
        f.receive(data, (host, 4242))
        # Past the answer holdoff, so the next example is answered too.
        f.reactor.advance(3.0)
        for answer, to in port.take():
            if to == (host, 4242):
                self.assertLessEqual(len(answer), len(data), (data, answer))

    @settings(max_examples=200, deadline=None)
    @given(_ANNOUNCE_FIELDS, st.sampled_from([(",", ":"), (", ", ": ")]), st.integers(0, 250))
    def test_any_announce(self, obj: dict[str, Any], separators: tuple[str, str], host: int) -> None:
        """Any announce, from a node that signs or not, is answered (if at all) with a datagram no longer than it."""
        data = json.dumps(obj, separators=separators).encode()
        for f in self.fixtures:
            self.run_one(f, data, f"10.1.0.{host}")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=MAX_DATAGRAM + 10), st.integers(0, 250))
    def test_any_bytes(self, data: bytes, host: int) -> None:
        """Any datagram at all is handled without an exception and never answered with more bytes."""
        for f in self.fixtures:
            self.run_one(f, data, f"10.2.0.{host}")

    def setUp(self) -> None:
        self.fixtures = [_Fixture(start_at=NOW), signed_fixture()]
        for f in self.fixtures:
            f.start()


class SignaturePropertyTests(SynchronousTestCase):
    """Signed announces verify when untouched and not when changed."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.builds(
            Announce,
            peernix_version=_TEXT,
            nix_version=_TEXT,
            platform=_TEXT,
            features=st.lists(_TEXT, max_size=4),
            port=st.one_of(st.none(), st.integers(1, 65535)),
            node_id=st.one_of(st.none(), st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=16)),
            reply=st.booleans(),
        ),
        st.integers(-10, 10),
        st.sampled_from(["port", "platform", "ts", "node_id", "extra"]),
    )
    def test_untouched_verifies_changed_does_not(self, announce: Announce, skew: int, change: str) -> None:
        """A signed announce verifies within the window; changing or adding any field breaks it."""
        clock = Clock()
        clock.advance(NOW)
        signed = sign_announce(attrs.evolve(announce, public_key=PEER_KEY.public_key.to_string()), PEER_KEY, int(NOW) + skew)
        data = render_datagram(signed)
        verifier = AnnounceVerifier(clock, [PEER_KEY.public_key])
        parsed = parse_datagram(data)
        assert isinstance(parsed, Announce)
        self.assertIs(verifier.check(parsed, "h"), Verdict.VERIFIED)
        obj = json.loads(data)
        original = dict(obj)
        # A changed ts stays within the window, so only the signature can reject it.
        new_ts = int(NOW) + skew + (-1 if skew > 0 else 1)
        obj[change] = {"port": (signed.port or 0) % 65535 + 1, "ts": new_ts}.get(change, "changed!")
        if obj == original:
            # The "change" happened to be the value already there.
            return
        changed = parse_datagram(json.dumps(obj).encode())
        assert isinstance(changed, Announce)
        self.assertIs(verifier.check(changed, "h"), Verdict.BAD_SIGNATURE)
