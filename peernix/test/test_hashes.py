"""Tests for :mod:`peernix.nix.hashes`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import hashlib

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import DIGEST_SIZES, Hash, HashError, parse_hash

#: The NAR of a regular file containing "hello\n", in every form.
HELLO_HEX = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
HELLO_NIX32 = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
HELLO_B64 = base64.b64encode(bytes.fromhex(HELLO_HEX)).decode()
HELLO_SRI = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="


class HashTests(SynchronousTestCase):
    """The Hash value type."""

    def test_renderings(self) -> None:
        """A hash renders as Nix writes it: prefixed nix32, base16 and SRI."""
        h = Hash("sha256", bytes.fromhex(HELLO_HEX))
        self.assertEqual(h.to_string(), f"sha256:{HELLO_NIX32}")
        self.assertEqual(str(h), f"sha256:{HELLO_NIX32}")
        self.assertEqual(h.nix32(), HELLO_NIX32)
        self.assertEqual(h.base16(), HELLO_HEX)
        self.assertEqual(h.sri(), HELLO_SRI)

    def test_sha256_of(self) -> None:
        """sha256_of hashes bytes; the empty string gives the known vector."""
        self.assertEqual(
            Hash.sha256_of(b"").to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        )

    def test_rejects_bad_digest_size(self) -> None:
        """A digest of the wrong size for its algorithm is refused."""
        self.assertRaises(HashError, Hash, "sha256", b"\0" * 31)
        self.assertRaises(HashError, Hash, "sha1", b"\0" * 32)

    def test_rejects_unknown_algorithm(self) -> None:
        """An algorithm Nix does not know is refused."""
        self.assertRaises(HashError, Hash, "blake3", b"\0" * 32)

    def test_value_semantics(self) -> None:
        """Hashes compare and hash by value."""
        a = Hash("sha256", bytes.fromhex(HELLO_HEX))
        b = parse_hash(HELLO_SRI)
        self.assertEqual(a, b)
        self.assertEqual(len({a, b}), 1)


class ParseHashTests(SynchronousTestCase):
    """parse_hash accepts what ``Hash::parseAnyPrefixed`` accepts."""

    def test_all_forms(self) -> None:
        """Prefixed base16, nix32, base64 and SRI forms all parse to the same hash."""
        expected = Hash("sha256", bytes.fromhex(HELLO_HEX))
        for text in (
            f"sha256:{HELLO_HEX}",
            f"sha256:{HELLO_NIX32}",
            f"sha256:{HELLO_B64}",
            HELLO_SRI,
        ):
            self.assertEqual(parse_hash(text), expected, text)

    def test_unprefixed_with_algo(self) -> None:
        """With ``algo`` given, a bare digest in any encoding parses."""
        expected = Hash("sha256", bytes.fromhex(HELLO_HEX))
        for text in (HELLO_HEX, HELLO_NIX32, HELLO_B64):
            self.assertEqual(parse_hash(text, "sha256"), expected)

    def test_unprefixed_without_algo(self) -> None:
        """A bare digest without ``algo`` does not name its algorithm and is refused."""
        self.assertRaises(HashError, parse_hash, HELLO_NIX32)

    def test_other_algorithms(self) -> None:
        """md5, sha1 and sha512 parse in each encoding and round-trip through to_string."""
        for algo in ("md5", "sha1", "sha512"):
            raw = hashlib.new(algo, b"peernix").digest()
            h = Hash(algo, raw)
            for text in (
                f"{algo}:{raw.hex()}",
                h.to_string(),
                f"{algo}:{base64.b64encode(raw).decode()}",
                h.sri(),
            ):
                self.assertEqual(parse_hash(text), h, text)
            self.assertEqual(len(raw), DIGEST_SIZES[algo])

    def test_wrong_algorithm(self) -> None:
        """A hash of another algorithm than the one asked for is refused."""
        self.assertRaises(HashError, parse_hash, f"sha256:{HELLO_NIX32}", "sha512")

    def test_malformed(self) -> None:
        """Malformed hashes raise HashError only."""
        bad = [
            "",
            "sha256:",
            "sha256-",
            "sha256:" + HELLO_NIX32[:-1],
            "sha256:" + HELLO_HEX[:-2],
            "sha256:" + HELLO_HEX[:-1] + "g",
            "sha256:" + "e" * 52,
            "sha256:" + "z" + HELLO_NIX32[1:],
            "sha256:" + HELLO_B64[:-1] + "!",
            "sha256-" + HELLO_B64[:-4],
            "sha256-" + HELLO_HEX,
            "sha257:" + HELLO_NIX32,
            "SHA256:" + HELLO_NIX32,
            "sha256:" + HELLO_NIX32 + " ",
            "sha256:é" + HELLO_NIX32[1:],
            "sha256:" + HELLO_NIX32 + "\n",
            "md5:" + HELLO_NIX32,
        ]
        for text in bad:
            self.assertRaises(HashError, parse_hash, text)

    def test_non_string(self) -> None:
        """Non-string input raises HashError, not TypeError."""
        self.assertRaises(HashError, parse_hash, b"sha256:" + HELLO_NIX32.encode())  # type: ignore[arg-type]

    def test_round_trip(self) -> None:
        """parse_hash(h.to_string()) == h and parse_hash(h.sri()) == h."""
        for i in range(50):
            h = Hash.sha256_of(bytes([i]) * i)
            self.assertEqual(parse_hash(h.to_string()), h)
            self.assertEqual(parse_hash(h.sri()), h)
            self.assertEqual(parse_hash("sha256:" + h.base16()), h)
