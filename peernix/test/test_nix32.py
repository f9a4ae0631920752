"""Tests for :mod:`peernix.nix.nix32`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix import nix32

#: (hex digest, nix32) pairs printed by ``nix-hash --to-base32`` (Nix 2.8).
VECTORS = [
    # sha256("")
    ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
     "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
    # sha256 of the NAR of a file containing "hello\n"
    ("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13",
     "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"),
    # sha256 of the 1080-byte directory NAR of nix-protocol.md section 1.6
    ("ca3b5c2e3e64a521a901727ff9e88532bd6dc95f88310ac346b07c6e2caf472d",
     "0ba7mwn6wz5h8v1hlcc8bz4nvg9jhplgjzvj06lj39b47qp5qfya"),
    # 20 bytes (sha1 size, also the store path hash size)
    ("0123456789abcdef0123456789abcdef01234567", "cx2j60ggrnmqjrs54c0yzkdbi5kla8q1"),
    # 16 bytes (md5 size)
    ("0123456789abcdef0123456789abcdef", "7grnmqjrs54c0yzkdbi5kla8q1"),
    # sha512("abc")
    ("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
     "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx"),
]


def _reference_encode(data: bytes) -> str:
    """A direct port of Nix's ``printHash32`` loop, to check the fast encoder against."""
    length = nix32.encoded_length(len(data))
    out = []
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = b // 8, b % 8
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(nix32.ALPHABET[c & 0x1F])
    return "".join(out)


class EncodeTests(SynchronousTestCase):
    """nix32 encoding."""

    def test_sha256_of_empty(self) -> None:
        """The sha256 of the empty string encodes to the value nix-hash prints."""
        self.assertEqual(
            nix32.encode(hashlib.sha256(b"").digest()),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        )

    def test_vectors(self) -> None:
        """Every vector produced by nix-hash encodes and decodes exactly."""
        for hex_digest, text in VECTORS:
            raw = bytes.fromhex(hex_digest)
            self.assertEqual(nix32.encode(raw), text)
            self.assertEqual(nix32.decode(text), raw)

    def test_encoded_length(self) -> None:
        """Lengths follow Nix's ``(n*8 - 1)/5 + 1``: 52 for sha256, 32 for a store path hash."""
        self.assertEqual(nix32.encoded_length(32), 52)
        self.assertEqual(nix32.encoded_length(20), 32)
        self.assertEqual(nix32.encoded_length(16), 26)
        self.assertEqual(nix32.encoded_length(64), 103)
        self.assertEqual(nix32.encoded_length(1), 2)
        self.assertEqual(nix32.encoded_length(0), 0)

    def test_matches_nix_loop(self) -> None:
        """The encoder agrees with a literal port of Nix's bit-twiddling loop on random inputs."""
        rng = random.Random(1234)
        for _ in range(300):
            data = rng.randbytes(rng.randrange(1, 70))
            self.assertEqual(nix32.encode(data), _reference_encode(data))

    def test_alphabet_excludes_e_o_u_t(self) -> None:
        """The alphabet has 32 distinct characters and leaves out e, o, u and t."""
        self.assertEqual(len(set(nix32.ALPHABET)), 32)
        for c in "eout":
            self.assertNotIn(c, nix32.ALPHABET)


class DecodeTests(SynchronousTestCase):
    """nix32 decoding and validation."""

    def test_round_trip_all_lengths(self) -> None:
        """decode(encode(x)) == x for every length from 0 to 80 bytes."""
        rng = random.Random(99)
        for n in range(81):
            data = rng.randbytes(n)
            self.assertEqual(nix32.decode(nix32.encode(data)), data)

    def test_decoded_length(self) -> None:
        """Each encoded length maps back to its byte length; impossible lengths give None."""
        for n in range(100):
            self.assertEqual(nix32.decoded_length(nix32.encoded_length(n)), n)
        valid = {nix32.encoded_length(n) for n in range(100)}
        for chars in range(1, 150):
            if chars not in valid:
                self.assertIsNone(nix32.decoded_length(chars))

    def test_rejects_excluded_letters(self) -> None:
        """e, o, u, t and upper-case letters are rejected."""
        good = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        for c in "eoutA-_ \n":
            bad = c + good[1:]
            self.assertRaises(nix32.Nix32Error, nix32.decode, bad)

    def test_rejects_what_int_base_32_would_take(self) -> None:
        """Signs, separators, surrounding space and the digits int(x, 32) knows beyond nix32's are rejected anywhere."""
        good = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        for bad in ("+" + good[1:], good[:10] + "_" + good[11:], " " + good[1:], good[:-1] + "\n",
                    good[:20] + "e" + good[21:], good[:20] + "M" + good[21:], good[:-1] + "\u0661"):
            self.assertRaises(nix32.Nix32Error, nix32.decode, bad)
            self.assertFalse(nix32.in_alphabet(bad))
        self.assertTrue(nix32.in_alphabet(good))
        self.assertTrue(nix32.in_alphabet(""))

    def test_rejects_impossible_length(self) -> None:
        """A length no byte string encodes to is rejected."""
        self.assertRaises(nix32.Nix32Error, nix32.decode, "000")
        self.assertRaises(nix32.Nix32Error, nix32.decode, "1")

    def test_rejects_non_zero_padding_bits(self) -> None:
        """A first character carrying bits beyond the last byte is rejected."""
        # 52 characters hold 260 bits; the top 4 bits must be zero, so the
        # first character may be at most '1'.
        self.assertRaises(nix32.Nix32Error, nix32.decode, "z" + "0" * 51)
        self.assertEqual(nix32.decode("1" + "0" * 51), (1 << 255).to_bytes(32, "little"))

    def test_is_nix32(self) -> None:
        """is_nix32 answers without raising, for any string and length."""
        self.assertTrue(nix32.is_nix32(VECTORS[0][1], 32))
        self.assertFalse(nix32.is_nix32(VECTORS[0][1], 20))
        self.assertFalse(nix32.is_nix32("z" + "0" * 51, 32))
        self.assertFalse(nix32.is_nix32("e" * 52, 32))
        self.assertTrue(nix32.is_nix32("0" * 32, 20))


class RealNixTests(SynchronousTestCase):
    """nix32 against the real ``nix-hash``."""

    if shutil.which("nix-hash") is None:
        skip = "nix-hash not installed"

    def test_matches_nix_hash(self) -> None:
        """Random digests encode exactly as ``nix-hash --to-base32`` prints them."""
        rng = random.Random(7)
        for algo, size in (("sha256", 32), ("sha1", 20), ("md5", 16), ("sha512", 64)):
            for _ in range(3):
                raw = rng.randbytes(size)
                out = subprocess.run(
                    ["nix-hash", "--type", algo, "--to-base32", raw.hex()],
                    check=True, capture_output=True, text=True,
                ).stdout.strip()
                self.assertEqual(nix32.encode(raw), out)
                self.assertEqual(nix32.decode(out), raw)
