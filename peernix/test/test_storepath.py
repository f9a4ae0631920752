"""Tests for :mod:`peernix.nix.storepath`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.storepath import (
    STORE_DIR,
    StorePath,
    StorePathError,
    is_hash_part,
    is_valid_name,
    parse_basename,
    parse_store_path,
)

HASH = "d2ikp5l57nzcwzyn5bih0wamppidhnxm"


class HashPartTests(SynchronousTestCase):
    """is_hash_part validates the 32-character nix32 hash part."""

    def test_valid(self) -> None:
        """32 characters of the nix32 alphabet are a hash part."""
        self.assertTrue(is_hash_part(HASH))
        self.assertTrue(is_hash_part("0" * 32))
        self.assertTrue(is_hash_part("z" * 32))

    def test_invalid(self) -> None:
        """Wrong lengths, excluded letters, upper case and other characters are not."""
        for bad in (
            "",
            HASH[:-1],
            HASH + "0",
            "e" + HASH[1:],
            "o" + HASH[1:],
            "u" + HASH[1:],
            "t" + HASH[1:],
            "D" + HASH[1:],
            "-" + HASH[1:],
            "/" + HASH[1:],
            "." + HASH[1:],
            "é" + HASH[1:],
        ):
            self.assertFalse(is_hash_part(bad), bad)


class NameTests(SynchronousTestCase):
    """is_valid_name follows Nix's ``checkName``."""

    def test_valid(self) -> None:
        """Letters, digits and ``+-._?=`` are allowed, up to 211 characters."""
        for name in ("hello-2.12.1", "a", "a+b=c?d.e_f", "-", ".a", "..a", "a.", "x" * 211, "=", "?"):
            self.assertTrue(is_valid_name(name), name)

    def test_invalid(self) -> None:
        """Empty, ``.``, ``..``, too long, and other characters are not."""
        for name in ("", ".", "..", "x" * 212, "a b", "a/b", "a:b", "a~b", "é", "a\nb", "a\0b", "a*"):
            self.assertFalse(is_valid_name(name), repr(name))


class ParseTests(SynchronousTestCase):
    """parse_basename and parse_store_path."""

    def test_basename(self) -> None:
        """A basename splits into hash part and name."""
        sp = parse_basename(f"{HASH}-withref")
        self.assertEqual(sp, StorePath(HASH, "withref"))
        self.assertEqual(sp.basename, f"{HASH}-withref")
        self.assertEqual(sp.path, f"/nix/store/{HASH}-withref")
        self.assertEqual(str(sp), sp.path)

    def test_name_with_dashes(self) -> None:
        """Only the first dash separates hash and name."""
        sp = parse_basename(f"{HASH}-foo-bar-1.0")
        self.assertEqual(sp.name, "foo-bar-1.0")

    def test_store_path(self) -> None:
        """A full path under /nix/store parses."""
        sp = parse_store_path(f"{STORE_DIR}/{HASH}-a+b=c?d.e")
        self.assertEqual(sp.name, "a+b=c?d.e")
        self.assertEqual(sp.hash_part, HASH)

    def test_bad_basenames(self) -> None:
        """Missing dash, missing name, bad hash or bad name raise StorePathError."""
        for bad in (
            HASH,
            f"{HASH}-",
            f"{HASH}_x",
            f"{HASH[:-1]}-x",
            f"{HASH}-.",
            f"{HASH}-..",
            f"{HASH}-a/b",
            f"e{HASH[1:]}-x",
            f"{HASH}-" + "x" * 212,
            "",
        ):
            self.assertRaises(StorePathError, parse_basename, bad)

    def test_bad_store_paths(self) -> None:
        """Paths outside /nix/store, relative paths and nested paths raise StorePathError."""
        for bad in (
            f"{HASH}-x",
            f"/nix/store/{HASH}-x/bin",
            f"/nix/store//{HASH}-x",
            f"/gnu/store/{HASH}-x",
            f"/nix/store{HASH}-x",
            "/nix/store/",
            f"/nix/store/{HASH}-x\n",
        ):
            self.assertRaises(StorePathError, parse_store_path, bad)

    def test_longest_name(self) -> None:
        """A 211-character name is accepted, 212 is not."""
        self.assertEqual(len(parse_basename(f"{HASH}-" + "n" * 211).name), 211)
        self.assertRaises(StorePathError, parse_basename, f"{HASH}-" + "n" * 212)
