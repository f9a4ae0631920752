"""Tests for :mod:`peernix.discovery.datagrams`, including the Go predecessor's exact bytes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from peernix.discovery.datagrams import (
    GO_MAX_DATAGRAM,
    MAX_DATAGRAM,
    Announce,
    Answer,
    Datagram,
    DatagramError,
    HasPathQuery,
    HasPathWithNarHashQuery,
    Ping,
    Pong,
    QueryAnswer,
    is_valid_public_key,
    parse_datagram,
    render_datagram,
    sign_announce,
    signing_payload,
)
from peernix.nix.hashes import Hash
from peernix.nix.signing import SecretKey

HASH = "0c0ys3hg8kn9jbm6dl9g2rkq1l8ywyna"
NARHASH = Hash.sha256_of(b"nar")
PUBKEY = "peernix-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

# What zw3rk/peernix main.go sends, byte for byte: json.Marshal of its
# DiscoveryMessage struct (fields cmd, peernix_version, nix_version,
# platform, features, public_key, port; all but the first two omitempty),
# from createDiscoveryMessage("announce") with signing on, and with signing
# off (no public_key, no "signing" feature).
GO_ANNOUNCE_SIGNED = (
    b'{"cmd":"announce","peernix_version":"2.0.0","nix_version":"nix (Nix) 2.18.1",'
    b'"platform":"amd64-linux","features":["compression","parallel","health","signing"],'
    b'"public_key":"' + PUBKEY.encode() + b'","port":9999}'
)
GO_ANNOUNCE_UNSIGNED = (
    b'{"cmd":"announce","peernix_version":"2.0.0","nix_version":"unknown",'
    b'"platform":"arm64-darwin","features":["compression","parallel","health"],"port":9999}'
)
# Its queries (queryPeersParallel / ...WithNarHash) and answers (udpServer).
GO_HAS_PATH = b"has_path?" + HASH.encode()
GO_HAS_PATH_NARHASH = b"has_path_with_narhash?" + HASH.encode() + b":" + NARHASH.nix32().encode()
GO_ANSWERS = [b"yes", b"not_found", b"narhash_mismatch", b"invalid_format"]

_GO_FIELDS: dict[str, type] = {
    "cmd": str,
    "peernix_version": str,
    "nix_version": str,
    "platform": str,
    "features": list,
    "public_key": str,
    "port": int,
}


def go_accepts_announce(data: bytes) -> bool:
    """
    A model of what main.go's udpServer does with a datagram: reads at most
    1024 bytes, takes it as JSON if it starts with ``{``, ``json.Unmarshal``s
    it into DiscoveryMessage (unknown fields ignored, names matched
    case-insensitively, null leaves a field zero, a wrong type is an error)
    and handles it if ``cmd`` is ``announce``.
    """
    if len(data) > GO_MAX_DATAGRAM or not data.startswith(b"{"):
        return False
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    values: dict[str, Any] = {}
    for key, value in obj.items():
        field = key.lower()
        if field not in _GO_FIELDS or value is None:
            continue
        kind = _GO_FIELDS[field]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        if not isinstance(value, kind):
            return False
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            return False
        values[field] = value
    return values.get("cmd") == "announce"


def go_record_after(record: dict[str, Any], data: bytes) -> dict[str, Any]:
    """
    A model of main.go's udpServer (commit e74df7c) receiving ``data`` from
    a known peer: when it accepts the announce, every field of its peer
    record is overwritten with the announce's (``Version``, ``NixVersion``,
    ``Platform``, ``Features``, ``PublicKey``), absent ones with zero
    values; anything else leaves the record as it was.

    :returns: the new record, keyed by our JSON field names.
    """
    if not go_accepts_announce(data):
        return dict(record)
    obj = {k.lower(): v for k, v in json.loads(data.decode("utf-8")).items() if v is not None}
    return {
        "peernix_version": obj.get("peernix_version", ""),
        "nix_version": obj.get("nix_version", ""),
        "platform": obj.get("platform", ""),
        "features": list(obj.get("features", [])),
        "public_key": obj.get("public_key", ""),
    }


class ParseTests(SynchronousTestCase):
    """Parsing every datagram kind."""

    def test_go_signed_announce(self) -> None:
        """The Go predecessor's announce with a key parses into all its fields."""
        self.assertEqual(
            parse_datagram(GO_ANNOUNCE_SIGNED),
            Announce(
                peernix_version="2.0.0",
                nix_version="nix (Nix) 2.18.1",
                platform="amd64-linux",
                features=("compression", "parallel", "health", "signing"),
                public_key=PUBKEY,
                port=9999,
            ),
        )

    def test_go_unsigned_announce(self) -> None:
        """The Go announce without a key has an empty public key and no node id."""
        parsed = parse_datagram(GO_ANNOUNCE_UNSIGNED)
        assert isinstance(parsed, Announce)
        self.assertEqual((parsed.public_key, parsed.node_id, parsed.reply, parsed.port), ("", None, False, 9999))

    def test_minimal_announce(self) -> None:
        """Only cmd and peernix_version are required; null counts as absent (as in Go)."""
        self.assertEqual(
            parse_datagram(b'{"cmd":"announce","peernix_version":"1","port":null,"features":null}'),
            Announce(peernix_version="1"),
        )

    def test_unknown_fields_ignored(self) -> None:
        """Unknown JSON fields are ignored, as Go does."""
        parsed = parse_datagram(b'{"cmd":"announce","peernix_version":"1","future":[1,{"a":2}]}')
        self.assertEqual(parsed, Announce(peernix_version="1"))

    def test_our_fields(self) -> None:
        """node_id and reply are read."""
        parsed = parse_datagram(b'{"cmd":"announce","peernix_version":"1","node_id":"abc","reply":true}')
        self.assertEqual(parsed, Announce(peernix_version="1", node_id="abc", reply=True))

    def test_ping_pong(self) -> None:
        """ping and pong parse, with or without one trailing newline."""
        self.assertEqual(parse_datagram(b"ping"), Ping())
        self.assertEqual(parse_datagram(b"ping\n"), Ping())
        self.assertEqual(parse_datagram(b"pong\r\n"), Pong())

    def test_go_queries(self) -> None:
        """The Go predecessor's queries parse."""
        self.assertEqual(parse_datagram(GO_HAS_PATH), HasPathQuery(HASH))
        self.assertEqual(parse_datagram(GO_HAS_PATH_NARHASH), HasPathWithNarHashQuery(HASH, NARHASH))

    def test_narhash_forms(self) -> None:
        """The NarHash may also be prefixed or base16, as Nix accepts hashes."""
        for form in (NARHASH.to_string(), NARHASH.base16(), "sha256:" + NARHASH.base16()):
            self.assertEqual(
                parse_datagram(f"has_path_with_narhash?{HASH}:{form}".encode()),
                HasPathWithNarHashQuery(HASH, NARHASH),
            )

    def test_go_answers(self) -> None:
        """Every answer the Go predecessor sends parses."""
        self.assertEqual(
            [parse_datagram(a) for a in GO_ANSWERS],
            [QueryAnswer(Answer.YES), QueryAnswer(Answer.NOT_FOUND), QueryAnswer(Answer.NARHASH_MISMATCH), QueryAnswer(Answer.INVALID_FORMAT)],
        )


MALFORMED: dict[str, tuple[bytes, str]] = {
    "oversized": (b"{" + b" " * MAX_DATAGRAM + b"}", "oversized"),
    "non-utf8": (b"ping\xff", "encoding"),
    "non-utf8 json": (b'{"cmd":"\xc3\x28"}', "encoding"),
    "bad json": (b'{"cmd":"announce",', "json"),
    "json array": (b"{x", "json"),
    "nan": (b'{"cmd":"announce","peernix_version":"1","port":NaN}', "json"),
    "deep nesting": (b'{"a":' + b"[" * 1020 + b"]" * 1020 + b"}", "json"),
    "unknown cmd": (b'{"cmd":"hello","peernix_version":"1"}', "cmd"),
    "no cmd": (b'{"peernix_version":"1"}', "cmd"),
    "no version": (b'{"cmd":"announce"}', "field"),
    "version number": (b'{"cmd":"announce","peernix_version":2}', "field"),
    "control char": (b'{"cmd":"announce","peernix_version":"1\\u0000"}', "field"),
    "lone surrogate": (b'{"cmd":"announce","peernix_version":"\\ud800"}', "field"),
    "features string": (b'{"cmd":"announce","peernix_version":"1","features":"a,b"}', "field"),
    "features ints": (b'{"cmd":"announce","peernix_version":"1","features":[1]}', "field"),
    "too many features": (
        b'{"cmd":"announce","peernix_version":"1","features":[' + b",".join([b'"f"'] * 40) + b"]}",
        "field",
    ),
    "bad public key": (b'{"cmd":"announce","peernix_version":"1","public_key":"nocolon"}', "field"),
    "short public key": (b'{"cmd":"announce","peernix_version":"1","public_key":"k:AAAA"}', "field"),
    "node_id number": (b'{"cmd":"announce","peernix_version":"1","node_id":5}', "field"),
    "ts string": (b'{"cmd":"announce","peernix_version":"1","ts":"1700000000"}', "field"),
    "ts float": (b'{"cmd":"announce","peernix_version":"1","ts":1700000000.5}', "field"),
    "ts bool": (b'{"cmd":"announce","peernix_version":"1","ts":true}', "field"),
    "ts negative": (b'{"cmd":"announce","peernix_version":"1","ts":-1}', "field"),
    "ts huge": (b'{"cmd":"announce","peernix_version":"1","ts":' + b"9" * 40 + b"}", "field"),
    "sig number": (b'{"cmd":"announce","peernix_version":"1","sig":1}', "field"),
    "sig empty": (b'{"cmd":"announce","peernix_version":"1","sig":""}', "field"),
    "sig control char": (b'{"cmd":"announce","peernix_version":"1","sig":"k:\\n"}', "field"),
    "reply string": (b'{"cmd":"announce","peernix_version":"1","reply":"yes"}', "field"),
    "port string": (b'{"cmd":"announce","peernix_version":"1","port":"9999"}', "port"),
    "port float": (b'{"cmd":"announce","peernix_version":"1","port":9999.0}', "port"),
    "port bool": (b'{"cmd":"announce","peernix_version":"1","port":true}', "port"),
    "port zero": (b'{"cmd":"announce","peernix_version":"1","port":0}', "port"),
    "port too big": (b'{"cmd":"announce","peernix_version":"1","port":65536}', "port"),
    "port negative": (b'{"cmd":"announce","peernix_version":"1","port":-1}', "port"),
    "short hash": (b"has_path?" + HASH[:31].encode(), "hash"),
    "bad hash chars": (b"has_path?" + b"e" * 32, "hash"),
    "hash with path": (b"has_path?" + HASH.encode() + b"/x", "hash"),
    "narhash query no colon": (b"has_path_with_narhash?" + HASH.encode(), "hash"),
    "bad narhash": (b"has_path_with_narhash?" + HASH.encode() + b":zzz", "hash"),
    "md5 narhash": (b"has_path_with_narhash?" + HASH.encode() + b":md5:" + b"0" * 32, "hash"),
    "unknown text": (b"hello", "unknown"),
    "empty": (b"", "unknown"),
    "two newlines": (b"ping\n\n", "unknown"),
}


class MalformedTests(SynchronousTestCase):
    """Every malformed input raises DatagramError with its reason."""

    def test_malformed(self) -> None:
        """Each malformed datagram raises DatagramError with the expected reason."""
        for name, (data, reason) in MALFORMED.items():
            with self.subTest(name):
                with self.assertRaises(DatagramError) as cm:
                    parse_datagram(data)
                self.assertEqual(cm.exception.reason, reason, name)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=MAX_DATAGRAM + 10))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Any bytes parse or raise DatagramError, never another exception."""
        try:
            parse_datagram(data)
        except DatagramError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(["cmd", "peernix_version", "nix_version", "platform", "features", "public_key", "port", "node_id", "reply", "x"]),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.just("announce"),
                lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
                max_leaves=8,
            ),
        )
    )
    def test_arbitrary_json(self, obj: dict[str, Any]) -> None:
        """Any JSON object parses or raises DatagramError, never another exception."""
        try:
            parse_datagram(json.dumps(obj).encode())
        except DatagramError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=80))
    def test_arbitrary_text_commands(self, suffix: str) -> None:
        """Any text after a query prefix parses or raises DatagramError."""
        for prefix in ("has_path?", "has_path_with_narhash?", f"has_path_with_narhash?{HASH}:"):
            try:
                parse_datagram((prefix + suffix).encode("utf-8", "surrogatepass"))
            except DatagramError:
                pass


class RenderTests(SynchronousTestCase):
    """Rendering, and what the Go predecessor makes of it."""

    def test_round_trip(self) -> None:
        """Every datagram kind parses back to itself."""
        datagrams: list[Datagram] = [
            Announce("0.1.0", "2.8.0", "x86_64-linux", ("compression",), PUBKEY, 9999, "abcd", True),
            Announce("0.1.0"),
            Ping(),
            Pong(),
            HasPathQuery(HASH),
            HasPathWithNarHashQuery(HASH, NARHASH),
            *(QueryAnswer(a) for a in Answer),
        ]
        for datagram in datagrams:
            self.assertEqual(parse_datagram(render_datagram(datagram)), datagram)

    def test_same_bytes_as_go(self) -> None:
        """Without our extra fields, our announce is byte for byte what Go marshals."""
        for data in (GO_ANNOUNCE_SIGNED, GO_ANNOUNCE_UNSIGNED):
            self.assertEqual(render_datagram(parse_datagram(data)), data)

    def test_go_accepts_ours(self) -> None:
        """Our announces and replies, with node_id and reply, are announces to Go."""
        ours = Announce("0.1.0", "2.8.0", "x86_64-linux", ("compression", "parallel", "health", "signing"), PUBKEY, 9999, "0123456789abcdef")
        self.assertTrue(go_accepts_announce(render_datagram(ours)))
        reply = Announce("0.1.0", "unknown", "aarch64-darwin", (), "", 1, "f" * 16, True)
        self.assertTrue(go_accepts_announce(render_datagram(reply)))

    def test_go_model_rejects(self) -> None:
        """The Go model used above does reject what Go rejects (so the test above can fail)."""
        self.assertFalse(go_accepts_announce(b'{"cmd":"announce","port":"1"}'))
        self.assertFalse(go_accepts_announce(b'{"cmd":"announce","Features":[1]}'))
        self.assertFalse(go_accepts_announce(b'{"cmd":"ping"}'))
        self.assertFalse(go_accepts_announce(b'{"cmd":"announce","x":"' + b"a" * 1024 + b'"}'))

    def test_queries_as_go_sends(self) -> None:
        """Our rendered queries are exactly the Go predecessor's (NarHash as bare nix32)."""
        self.assertEqual(render_datagram(HasPathQuery(HASH)), GO_HAS_PATH)
        self.assertEqual(render_datagram(HasPathWithNarHashQuery(HASH, NARHASH)), GO_HAS_PATH_NARHASH)
        self.assertEqual([render_datagram(QueryAnswer(a)) for a in Answer], GO_ANSWERS)

    def test_oversized_render(self) -> None:
        """A datagram Go would truncate is refused at render time."""
        with self.assertRaises(DatagramError) as cm:
            render_datagram(Announce("1", platform="x" * 200, features=tuple("f" * 60 for _ in range(20))))
        self.assertEqual(cm.exception.reason, "oversized")

    def test_public_key_check(self) -> None:
        """Only exact Nix public keys are valid."""
        self.assertTrue(is_valid_public_key(PUBKEY))
        self.assertFalse(is_valid_public_key(PUBKEY + "\n"))
        self.assertFalse(is_valid_public_key("peernix-1:" + "A" * 43))
        self.assertFalse(is_valid_public_key(""))


class SignedAnnounceFormatTests(SynchronousTestCase):
    """ts and sig on the wire, and the bytes a signature covers."""

    KEY = SecretKey("peer-a-1", bytes(range(32)))

    def test_signing_payload_canonical(self) -> None:
        """The payload is the object without sig: keys sorted, no spaces, ASCII escapes."""
        obj = {"sig": "x:y", "port": 1, "cmd": "announce", "platform": "caf\u00e9", "features": ["b", "a"]}
        self.assertEqual(
            signing_payload(obj),
            b'{"cmd":"announce","features":["b","a"],"platform":"caf\\u00e9","port":1}',
        )

    def test_parse_keeps_payload_of_received_object(self) -> None:
        """A received sig's payload is computed from the parsed object, whatever the spacing, order or escapes sent."""
        data = b'{ "sig" : "k:s", "ts": 5, "peernix_version": "1", "cmd": "announce", "zz": [1, {"b": 2, "a": 1}] }'
        parsed = parse_datagram(data)
        assert isinstance(parsed, Announce)
        self.assertEqual((parsed.ts, parsed.sig), (5, "k:s"))
        self.assertEqual(parsed.signed_payload, b'{"cmd":"announce","peernix_version":"1","ts":5,"zz":[1,{"a":1,"b":2}]}')

    def test_no_payload_without_sig(self) -> None:
        """An announce without sig has no payload to check (ts alone is kept)."""
        parsed = parse_datagram(b'{"cmd":"announce","peernix_version":"1","ts":7}')
        assert isinstance(parsed, Announce)
        self.assertEqual((parsed.ts, parsed.sig, parsed.signed_payload), (7, None, None))

    def test_sign_render_parse_verify(self) -> None:
        """sign_announce's signature, rendered and parsed back, verifies against the key; changing any field breaks it."""
        ours = Announce("0.1.0", "2.8.0", "x86_64-linux", ("signing",), self.KEY.public_key.to_string(), 9999, "abc")
        data = render_datagram(sign_announce(ours, self.KEY, 1_700_000_000))
        parsed = parse_datagram(data)
        assert isinstance(parsed, Announce) and parsed.sig is not None and parsed.signed_payload is not None
        self.assertEqual(parsed.ts, 1_700_000_000)
        self.assertTrue(self.KEY.public_key.verify(parsed.signed_payload, parsed.sig))
        self.assertTrue(go_accepts_announce(data))
        tampered = parse_datagram(data.replace(b"9999", b"9998"))
        assert isinstance(tampered, Announce) and tampered.signed_payload is not None
        self.assertFalse(self.KEY.public_key.verify(tampered.signed_payload, parsed.sig))

    def test_round_trip_with_signature(self) -> None:
        """A signed announce parses back to itself (the payload is not part of equality)."""
        signed = sign_announce(Announce("1", port=1, reply=True), self.KEY, 3)
        self.assertEqual(parse_datagram(render_datagram(signed)), signed)
