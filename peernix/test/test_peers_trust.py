"""Tests for :mod:`peernix.peers.trust`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import attrs
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.signing import SecretKey, parse_public_key
from peernix.peers.trust import NIX_DEFAULT_TRUSTED_KEYS, NixConfError, TrustPolicy, read_nix_trusted_keys
from peernix.test.peerfakes import file_nar, make_info, store_path_for

K1 = SecretKey("k-1", b"\x01" * 32)
K2 = SecretKey("k-2", b"\x02" * 32)
K3 = SecretKey("k-3", b"\x03" * 32)
IMPOSTOR = SecretKey("k-1", b"\x09" * 32)


class ReadNixTrustedKeysTests(SynchronousTestCase):
    """Reading trusted-public-keys from nix.conf like Nix."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def names(self, **kw: object) -> list[str]:
        return [k.to_string() for k in read_nix_trusted_keys(self.dir, env={}, **kw)]  # type: ignore[arg-type]

    def test_missing_conf_uses_nix_default(self) -> None:
        """Without nix.conf the keys are Nix's built-in default, as for Nix itself."""
        self.assertEqual(self.names(), list(NIX_DEFAULT_TRUSTED_KEYS))

    def test_env_dir(self) -> None:
        """$NIX_CONF_DIR is used when no directory is given."""
        self.write("nix.conf", f"trusted-public-keys = {K1.public_key.to_string()}\n")
        keys = read_nix_trusted_keys(env={"NIX_CONF_DIR": self.dir})
        self.assertEqual(keys, [K1.public_key])

    def test_set_and_extra(self) -> None:
        """The plain setting replaces (default included), extra- appends, in file order; comments are stripped."""
        self.write(
            "nix.conf",
            "# a comment\n"
            f"extra-trusted-public-keys = {K3.public_key.to_string()}\n"
            f"trusted-public-keys = {K1.public_key.to_string()}   # trailing comment\n"
            f"extra-trusted-public-keys = {K2.public_key.to_string()}\n"
            "substituters = http://x\n",
        )
        self.assertEqual(self.names(), [K1.public_key.to_string(), K2.public_key.to_string()])

    def test_extra_appends_to_default(self) -> None:
        """extra- alone appends to Nix's default, as `nix show-config` shows."""
        self.write("nix.conf", f"extra-trusted-public-keys = {K2.public_key.to_string()}\n")
        self.assertEqual(self.names(), [*NIX_DEFAULT_TRUSTED_KEYS, K2.public_key.to_string()])

    def test_includes(self) -> None:
        """include and !include are relative to the including file; a missing !include is ignored."""
        self.write("nix.conf", "include sub/a.conf\n!include missing.conf\n!include sub/b.conf\n")
        self.write("sub/a.conf", f"trusted-public-keys = {K1.public_key.to_string()}\ninclude c.conf\n")
        self.write("sub/c.conf", f"extra-trusted-public-keys = {K2.public_key.to_string()}\n")
        self.write("sub/b.conf", f"extra-trusted-public-keys = {K3.public_key.to_string()}\n")
        self.assertEqual(
            self.names(), [K1.public_key.to_string(), K2.public_key.to_string(), K3.public_key.to_string()]
        )

    def test_missing_include(self) -> None:
        """A missing plain include is an error naming the file."""
        self.write("nix.conf", "include nope.conf\n")
        e = self.assertRaises(NixConfError, read_nix_trusted_keys, self.dir, {})
        self.assertIn("nope.conf", str(e))

    def test_illegal_lines(self) -> None:
        """Lines Nix rejects (no '=', a lone word, a continuation) raise NixConfError."""
        for text in ["trusted-public-keys k\n", "lonely\n", "include a b\n", f"trusted-public-keys = {K1.public_key.to_string()} \\\n k:x\n"]:
            self.write("nix.conf", text)
            self.assertRaises(NixConfError, read_nix_trusted_keys, self.dir, {})

    def test_bad_keys_skipped(self) -> None:
        """Unparsable keys are skipped with a warning, the rest kept."""
        self.write("nix.conf", f"trusted-public-keys = garbage {K1.public_key.to_string()} k:AAAA\n")
        self.assertEqual(self.names(), [K1.public_key.to_string()])

    def test_matches_real_nix(self) -> None:
        """Our reading equals `nix show-config` for a config with extras and includes."""
        if shutil.which("nix") is None:
            raise self.skipTest("nix not installed")
        self.write("nix.conf", f"!include other.conf\nextra-trusted-public-keys = {K2.public_key.to_string()}\n")
        self.write("other.conf", f"trusted-public-keys = {K1.public_key.to_string()} {K3.public_key.to_string()}\n")
        env = dict(os.environ, NIX_CONF_DIR=self.dir, NIX_USER_CONF_FILES="", XDG_CONFIG_HOME=self.dir)
        env.pop("NIX_CONFIG", None)
        out = subprocess.run(
            ["nix", "--extra-experimental-features", "nix-command", "show-config"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith("trusted-public-keys = "))
        self.assertEqual(line.split(" = ", 1)[1].split(), self.names())


class TrustPolicyTests(SynchronousTestCase):
    """Nix's trust rule for peer narinfos."""

    def setUp(self) -> None:
        self.nar = file_nar(b"hello\n")
        self.path = store_path_for("hello")
        self.policy = TrustPolicy([K1.public_key, IMPOSTOR.public_key, K2.public_key])

    def test_signed_by_trusted_key(self) -> None:
        """A signature by a trusted key makes a narinfo trusted."""
        self.assertTrue(self.policy.is_trusted(make_info(self.path, self.nar, key=K2)))

    def test_unsigned_or_unknown_key(self) -> None:
        """Unsigned narinfos and signatures by unknown keys are not trusted."""
        self.assertFalse(self.policy.is_trusted(make_info(self.path, self.nar)))
        self.assertFalse(self.policy.is_trusted(make_info(self.path, self.nar, key=K3)))

    def test_first_key_of_a_name_wins(self) -> None:
        """With two keys named alike only the first counts, as in Nix."""
        self.assertTrue(self.policy.is_trusted(make_info(self.path, self.nar, key=K1)))
        self.assertFalse(self.policy.is_trusted(make_info(self.path, self.nar, key=IMPOSTOR)))
        self.assertEqual(self.policy.keys["k-1"], K1.public_key)

    def test_tampered_fields(self) -> None:
        """Changing any signed field (path, NarHash, size, references) breaks the signature."""
        info = make_info(self.path, self.nar, key=K1)
        other = make_info(store_path_for("other"), file_nar(b"bye\n"))
        for changed in [
            attrs.evolve(info, store_path=other.store_path),
            attrs.evolve(info, nar_hash=other.nar_hash),
            attrs.evolve(info, nar_size=info.nar_size + 8),
            attrs.evolve(info, references=(other.store_path.rsplit("/", 1)[1],)),
        ]:
            self.assertFalse(self.policy.is_trusted(changed))
        # Unsigned fields may differ: a peer re-serves with its own URL.
        self.assertTrue(self.policy.is_trusted(attrs.evolve(info, url="elsewhere.nar.zst", compression="zstd")))

    def test_content_addressed(self) -> None:
        """A valid CA is trusted without signatures; a CA that does not name the path is not."""
        ca = "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
        good = make_info("/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f", self.nar, ca=ca)
        self.assertTrue(TrustPolicy([]).is_trusted(good))
        self.assertFalse(TrustPolicy([]).is_trusted(make_info(self.path, self.nar, ca=ca)))

    def test_parse_public_key_roundtrip(self) -> None:
        """Keys read back from their text form are the same keys."""
        self.assertEqual(parse_public_key(K1.public_key.to_string()), K1.public_key)
