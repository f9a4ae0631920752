"""Tests for :mod:`peernix.nix.signing`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import os
import subprocess

import attrs
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import parse_narinfo, render_narinfo
from peernix.nix.signing import (
    KeyFormatError,
    PublicKey,
    SecretKey,
    is_well_formed_sig,
    load_secret_key_file,
    parse_public_key,
    parse_public_keys,
    parse_secret_key,
    sign_narinfo,
    split_sig,
    verify_any,
)
from peernix.test.test_narinfo import (
    MINIMAL,
    NIX_MISSING,
    NIX_SKIP,
    SAMPLE,
    NixEnv,
    built_closure,
    read_cache_file,
    scratch_dir,
)

# The throwaway test key and vectors of nix-protocol.md section 1.5.
SK = "test-1:7PkklNGdFMvOC2stB1+EhT9Gfh4hBLvpx+HFrKMNWyRYWr4KHNuWa9PDSBHZCGpq6EBYZZdg3RQhSEhSAOKgkA=="
PK = "test-1:WFq+ChzblmvTw0gR2QhqauhAWGWXYN0UIUhIUgDioJA="
FP1 = (
    b"1;/nix/store/d2ikp5l57nzcwzyn5bih0wamppidhnxm-withref;"
    b"sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk;216;"
    b"/nix/store/n5zkgm04502f8ig8drnkcfs94xpcr6jw-d,/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f"
)
SIG1 = "test-1:X7L2H/DdJF0aNuhBynisU99bruoSNVd1d8lW/T/+4Xz637gKyZBcl+FRfQfEji9N2dIdSin3Tv71iXpzDN+7Dw=="
FP2 = (
    b"1;/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f;"
    b"sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;"
)
SIG2 = "test-1:7vJklpePzRuPN4z8lyTI9C9rkH68ijKQtmcUQQwTXEyUV1gNBrTmwPVBcur2sqllYz+/dpzRwoRKd8/eWA81BQ=="
# FP1 with its narHash in base16: Nix never signs this form.
FP1_BASE16 = FP1.replace(
    b"sha256:0qp1rh373lr4b0yjlidayxy9k71pmpmi0z9hrk7smbgn0a7s9lgk",
    b"sha256:" + parse_narinfo(SAMPLE).nar_hash.base16().encode(),
)

# A real key pair from `nix-store --generate-binary-cache-key host-a-1 sk pk`
# and a signature Nix made with it (nix-build with secret-key-files).
HOST_SK = "host-a-1:TGVtjNgKDm2g8T346JmjfBc4qOzNi0xyLA9qpHjKNQMUZHykudtBYZ+sg/VY71m9WypprjcMpRq7cVTZx/m5Zg=="
HOST_PK = "host-a-1:FGR8pLnbQWGfrIP1WO9ZvVsqaa43DKUau3FU2cf5uWY="


def _b64(n: int, byte: int = 0) -> str:
    return base64.b64encode(bytes([byte]) * n).decode()


class KeyParsingTests(SynchronousTestCase):
    """parse_secret_key and parse_public_key read Nix's key formats."""

    def test_vector_key(self) -> None:
        """The test-1 secret key parses and its public half is the test-1 public key."""
        sk = parse_secret_key(SK)
        self.assertEqual(sk.name, "test-1")
        self.assertEqual(sk.public_key, parse_public_key(PK))
        self.assertEqual(sk.public_key.to_string(), PK)
        self.assertEqual(sk.to_string(), SK)

    def test_real_key(self) -> None:
        """A key pair written by the real Nix parses and matches."""
        sk = parse_secret_key(HOST_SK)
        self.assertEqual(sk.public_key, parse_public_key(HOST_PK))
        self.assertEqual(sk.to_string(), HOST_SK)

    def test_whitespace_trimmed(self) -> None:
        """Surrounding whitespace and a trailing newline are ignored."""
        self.assertEqual(parse_secret_key(f"  {SK}\n"), parse_secret_key(SK))
        self.assertEqual(parse_public_key(f"\t{PK}\r\n"), parse_public_key(PK))

    def test_secret_key_errors(self) -> None:
        """Malformed secret keys raise KeyFormatError telling how to make a key."""
        raw = base64.b64decode(SK.split(":", 1)[1])
        wrong_half = base64.b64encode(raw[:32] + bytes(32)).decode()
        for bad in (
            "",
            "test-1",
            SK.split(":", 1)[1],
            ":" + SK.split(":", 1)[1],
            "test 1:" + SK.split(":", 1)[1],
            "test-1:" + SK.split(":", 1)[1][:-2],
            "test-1:not base64!",
            "test-1:" + _b64(63),
            "test-1:" + _b64(65),
            "test-1:" + wrong_half,
            PK,
        ):
            e = self.assertRaises(KeyFormatError, parse_secret_key, bad)
            self.assertIsInstance(e, ValueError)

    def test_hint_in_message(self) -> None:
        """The error says how to generate a key with nix-store."""
        e = self.assertRaises(KeyFormatError, parse_secret_key, "garbage")
        self.assertIn("nix-store --generate-binary-cache-key", str(e))
        e = self.assertRaises(KeyFormatError, parse_secret_key, PK)
        self.assertIn("public key", str(e))

    def test_mismatched_halves(self) -> None:
        """A secret key whose public half does not belong to its seed is rejected as corrupt."""
        raw = base64.b64decode(SK.split(":", 1)[1])
        other = base64.b64decode(HOST_SK.split(":", 1)[1])
        bad = "test-1:" + base64.b64encode(raw[:32] + other[32:]).decode()
        e = self.assertRaises(KeyFormatError, parse_secret_key, bad)
        self.assertIn("does not match", str(e))

    def test_errors_do_not_leak_key(self) -> None:
        """Error messages never contain the secret key material."""
        b64 = SK.split(":", 1)[1]
        for bad in ("test-1:" + b64 + "AAAA", "test 1:" + b64, b64):
            e = self.assertRaises(KeyFormatError, parse_secret_key, bad)
            self.assertNotIn(b64[:20], str(e))

    def test_public_key_errors(self) -> None:
        """Malformed public keys raise KeyFormatError."""
        for bad in ("", "test-1", "test-1:" + _b64(31), "test-1:" + _b64(33), SK, ":" + _b64(32), "a b:" + _b64(32)):
            self.assertRaises(KeyFormatError, parse_public_key, bad)

    def test_non_string(self) -> None:
        """Non-string input raises KeyFormatError, not TypeError."""
        self.assertRaises(KeyFormatError, parse_secret_key, SK.encode())  # type: ignore[arg-type]
        self.assertRaises(KeyFormatError, parse_public_key, None)  # type: ignore[arg-type]

    def test_constructor_validation(self) -> None:
        """Keys refuse wrong sizes and invalid names at construction."""
        self.assertRaises(KeyFormatError, PublicKey, "a", b"\0" * 31)
        self.assertRaises(KeyFormatError, SecretKey, "a", b"\0" * 64)
        self.assertRaises(KeyFormatError, SecretKey, "", b"\0" * 32)
        self.assertRaises(KeyFormatError, SecretKey, "a:b", b"\0" * 32)

    def test_repr_hides_seed(self) -> None:
        """A secret key's repr does not show its seed."""
        sk = parse_secret_key(SK)
        self.assertNotIn(repr(sk.seed), repr(sk))
        self.assertNotIn(sk.seed.hex(), repr(sk))

    def test_parse_public_keys(self) -> None:
        """A trusted-public-keys list parses by name; the first key of a name wins, as in Nix."""
        other = "test-1:" + _b64(32, 7)
        keys = parse_public_keys(f"{PK} {HOST_PK}\n {other}")
        self.assertEqual(set(keys), {"test-1", "host-a-1"})
        self.assertEqual(keys["test-1"], parse_public_key(PK))
        self.assertEqual(parse_public_keys(""), {})
        self.assertRaises(KeyFormatError, parse_public_keys, f"{PK} junk")


class KeyFileTests(SynchronousTestCase):
    """load_secret_key_file reads key files and explains failures."""

    def _write(self, data: bytes) -> str:
        path = str(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_reads_key(self) -> None:
        """A file in Nix's format, with or without a trailing newline, loads."""
        self.assertEqual(load_secret_key_file(self._write(SK.encode())), parse_secret_key(SK))
        self.assertEqual(load_secret_key_file(self._write(SK.encode() + b"\n")), parse_secret_key(SK))

    def test_missing(self) -> None:
        """A missing file is a KeyFormatError naming the file."""
        path = self.mktemp()
        e = self.assertRaises(KeyFormatError, load_secret_key_file, path)
        self.assertIn(path, str(e))
        self.assertIn("nix-store --generate-binary-cache-key", str(e))

    def test_directory(self) -> None:
        """A directory instead of a file is a KeyFormatError naming it."""
        path = self.mktemp()
        os.mkdir(path)
        e = self.assertRaises(KeyFormatError, load_secret_key_file, path)
        self.assertIn(path, str(e))

    def test_malformed_content(self) -> None:
        """A file holding a public key, garbage, binary or a huge blob is a KeyFormatError naming it."""
        for data in (PK.encode(), b"garbage", b"\xff\xfe\x00", b"", b"a" * 100_000):
            path = self._write(data)
            e = self.assertRaises(KeyFormatError, load_secret_key_file, path)
            self.assertIn(path, str(e))

    def test_unreadable(self) -> None:
        """An unreadable file is a KeyFormatError naming it."""
        if os.geteuid() == 0:
            # root reads through permissions: use a path through a regular
            # file instead, which fails for everyone.
            path = os.path.join(self._write(SK.encode()), "key")
        else:
            path = self._write(SK.encode())
            os.chmod(path, 0)
        e = self.assertRaises(KeyFormatError, load_secret_key_file, path)
        self.assertIn(path, str(e))


class SignVerifyTests(SynchronousTestCase):
    """Signing and verification match Nix."""

    def test_vectors(self) -> None:
        """Signing the two fingerprints of nix-protocol.md 1.5 gives exactly the documented Sigs."""
        sk = parse_secret_key(SK)
        self.assertEqual(sk.sign(FP1), SIG1)
        self.assertEqual(sk.sign(FP2), SIG2)

    def test_deterministic(self) -> None:
        """Signing twice gives the same signature."""
        sk = parse_secret_key(HOST_SK)
        self.assertEqual(sk.sign(b"x"), sk.sign(b"x"))

    def test_verify_vectors(self) -> None:
        """The documented Sigs verify against the public key."""
        pk = parse_public_key(PK)
        self.assertTrue(pk.verify(FP1, SIG1))
        self.assertTrue(pk.verify(FP2, SIG2))

    def test_verify_rejects(self) -> None:
        """Wrong fingerprint, base16 fingerprint, another name, malformed or tampered sigs give False."""
        pk = parse_public_key(PK)
        raw = bytearray(base64.b64decode(SIG1.split(":", 1)[1]))
        raw[0] ^= 1
        tampered = "test-1:" + base64.b64encode(bytes(raw)).decode()
        self.assertFalse(pk.verify(FP2, SIG1))
        self.assertFalse(pk.verify(FP1_BASE16, SIG1))
        self.assertFalse(pk.verify(FP1, "test-2:" + SIG1.split(":", 1)[1]))
        self.assertFalse(pk.verify(FP1, tampered))
        for bad in ("", "test-1", "test-1:", "test-1:abc", SIG1 + "=", SIG1[:-4], "test-1:" + _b64(64, 0xFF)):
            self.assertFalse(pk.verify(FP1, bad), bad)

    def test_verify_never_raises(self) -> None:
        """verify returns False for non-string signatures and non-bytes fingerprints."""
        pk = parse_public_key(PK)
        self.assertFalse(pk.verify(FP1, None))  # type: ignore[arg-type]
        self.assertFalse(pk.verify(FP1.decode(), SIG1))  # type: ignore[arg-type]
        # A public key that is not a valid curve point still just says no.
        odd = PublicKey("test-1", b"\xff" * 32)
        self.assertFalse(odd.verify(FP1, SIG1))

    def test_verdicts_remembered_per_key(self) -> None:
        """Repeated checks give the same answers (good and bad), per key, and the memo stays bounded."""
        from peernix.nix import signing

        pk = parse_public_key(PK)
        for _ in range(2):
            self.assertTrue(pk.verify(FP1, SIG1))
            self.assertFalse(pk.verify(FP2, SIG1))
        # Another key of the same name never inherits the first one's verdict.
        impostor = PublicKey("test-1", parse_public_key(HOST_PK).key)
        self.assertFalse(impostor.verify(FP1, SIG1))
        for i in range(signing.VERIFY_MEMO_SIZE + 10):
            pk.verify(b"%d" % i, SIG1)
        self.assertLessEqual(len(signing._VERIFIED), signing.VERIFY_MEMO_SIZE)
        self.assertTrue(pk.verify(FP1, SIG1))

    def test_real_nix_signature(self) -> None:
        """A signature made by Nix itself verifies; the built narinfo fixture proves the fingerprint."""
        from peernix.test.test_narinfo import BUILT

        info = parse_narinfo(BUILT)
        pk = parse_public_key(HOST_PK)
        self.assertTrue(pk.verify(info.fingerprint(), info.sigs[0]))
        self.assertEqual(parse_secret_key(HOST_SK).sign(info.fingerprint()), info.sigs[0])

    def test_well_formed(self) -> None:
        """split_sig and is_well_formed_sig accept only name:base64(64 bytes)."""
        self.assertEqual(split_sig(SIG1), ("test-1", base64.b64decode(SIG1[7:])))
        self.assertTrue(is_well_formed_sig(SIG1))
        for bad in ("", ":", SIG1[7:], "a b:" + SIG1[7:], "x:" + _b64(63), "x:" + _b64(65), "x:" + SIG1[7:-2]):
            self.assertIsNone(split_sig(bad), bad)
            self.assertFalse(is_well_formed_sig(bad))


class VerifyAnyTests(SynchronousTestCase):
    """verify_any applies Nix's trust rule."""

    def setUp(self) -> None:
        self.test1 = parse_public_key(PK)
        self.host = parse_public_key(HOST_PK)

    def test_one_good_sig_is_enough(self) -> None:
        """One valid signature by a trusted key suffices, whatever else is there."""
        other_good = parse_secret_key(HOST_SK).sign(FP1)
        sigs = ["garbage", "unknown-1:" + _b64(64), "test-1:" + _b64(64), SIG1, other_good]
        self.assertTrue(verify_any(FP1, sigs, {"test-1": self.test1}))
        self.assertTrue(verify_any(FP1, sigs, {"host-a-1": self.host}))
        self.assertTrue(verify_any(FP1, iter(sigs), {"test-1": self.test1}))

    def test_untrusted(self) -> None:
        """Signatures by unknown names, or no signatures, do not count."""
        self.assertFalse(verify_any(FP1, [SIG1], {"host-a-1": self.host}))
        self.assertFalse(verify_any(FP1, [], {"test-1": self.test1}))
        self.assertFalse(verify_any(FP1, [SIG1], {}))

    def test_name_must_match_key(self) -> None:
        """A key registered under another name is not used for a signature's name."""
        self.assertFalse(verify_any(FP1, [SIG1], {"test-1": self.host}))
        renamed = "host-a-1:" + SIG1.split(":", 1)[1]
        self.assertFalse(verify_any(FP1, [renamed], {"host-a-1": self.test1}))

    def test_wrong_fingerprint(self) -> None:
        """A signature over another fingerprint does not count."""
        self.assertFalse(verify_any(FP2, [SIG1], {"test-1": self.test1}))


class SignNarInfoTests(SynchronousTestCase):
    """sign_narinfo appends our signature."""

    def test_appends(self) -> None:
        """The copy carries the existing signatures then ours; the original is unchanged."""
        info = parse_narinfo(SAMPLE)
        sk = parse_secret_key(HOST_SK)
        signed = sign_narinfo(info, sk)
        self.assertEqual(signed.sigs, (*info.sigs, sk.sign(info.fingerprint())))
        self.assertEqual(attrs.evolve(signed, sigs=info.sigs), info)
        self.assertEqual(len(info.sigs), 1)
        self.assertTrue(verify_any(signed.fingerprint(), signed.sigs, {"host-a-1": sk.public_key}))

    def test_no_duplicate(self) -> None:
        """Signing again with the same key adds nothing."""
        info = parse_narinfo(SAMPLE)
        self.assertIs(sign_narinfo(info, parse_secret_key(SK)), info)
        once = sign_narinfo(parse_narinfo(MINIMAL), parse_secret_key(SK))
        self.assertIs(sign_narinfo(once, parse_secret_key(SK)), once)

    def test_vector(self) -> None:
        """Signing the sample narinfo with test-1 reproduces its real Sig."""
        info = attrs.evolve(parse_narinfo(SAMPLE), sigs=())
        self.assertEqual(sign_narinfo(info, parse_secret_key(SK)).sigs, (SIG1,))


class RealNixTests(SynchronousTestCase):
    """Keys and signatures against the real Nix."""

    if NIX_MISSING:
        skip = NIX_SKIP

    def test_generated_key(self) -> None:
        """A key pair from nix-store --generate-binary-cache-key loads and matches."""
        env = NixEnv("keys")
        sk_file, pk_file = env.generate_key("gen-test-1")
        sk = load_secret_key_file(sk_file)
        with open(pk_file) as f:
            pk = parse_public_key(f.read())
        self.assertEqual(sk.public_key, pk)
        self.assertEqual(sk.name, "gen-test-1")
        with open(sk_file) as f:
            self.assertEqual(sk.to_string(), f.read().strip())

    def test_nix_signature_verifies(self) -> None:
        """Signatures Nix made while building verify with our code; our own signature is identical."""
        env, path, cache, pk_file = built_closure()
        with open(pk_file) as f:
            pk = parse_public_key(f.read())
        info = parse_narinfo(read_cache_file(cache, path, "narinfo"))
        self.assertTrue(verify_any(info.fingerprint(), info.sigs, {pk.name: pk}))
        sk = load_secret_key_file(os.path.join(env.root, "peernix-test-1.sk"))
        self.assertIs(sign_narinfo(info, sk), info)

    def test_nix_trusts_our_signature(self) -> None:
        """Nix accepts a narinfo signed by us as trusted, and rejects it unsigned."""
        env = NixEnv("trust")
        src = os.path.join(scratch_dir("src"), "signed-by-us")
        with open(src, "w") as out:
            out.write("trust me\n")
        path = env.add(src)
        cache = env.copy_to_file_cache(path)
        hash_part = os.path.basename(path)[:32]
        narinfo_path = os.path.join(cache, f"{hash_part}.narinfo")
        with open(narinfo_path, "rb") as f:
            info = parse_narinfo(f.read())
        # Strip CA: a CA path is trusted without any signature.
        info = attrs.evolve(info, ca=None, sigs=())
        sk = parse_secret_key(HOST_SK)

        def verify(narinfo_text: str) -> bool:
            with open(narinfo_path, "w") as f:
                f.write(narinfo_text)
            return subprocess.run(
                ["nix", "--extra-experimental-features", "nix-command", "store", "verify",
                 "--no-contents", "--store", f"file://{cache}",
                 "--option", "trusted-public-keys", sk.public_key.to_string(), path],
                env=env.env, capture_output=True, timeout=60,
            ).returncode == 0

        self.assertFalse(verify(render_narinfo(info)))
        self.assertTrue(verify(render_narinfo(sign_narinfo(info, sk))))
