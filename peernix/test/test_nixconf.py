"""Tests for :mod:`peernix.nixconf`: nix.conf read the way Nix reads it, from real files."""

from __future__ import annotations

import os
from typing import IO

from twisted.trial.unittest import SynchronousTestCase

from peernix.nixconf import (CACHE_NIXOS_ORG_KEY, NixConfError, NixConfUnreadable, nix_conf_path,
                             read_nix_conf)


class NixConfTests(SynchronousTestCase):
    """read_nix_conf and the NixConf accessors."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "nix.conf")

    def write(self, name: str, text: str) -> str:
        """Write ``text`` to ``name`` in the temporary NIX_CONF_DIR; :returns: its path."""
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_path_from_environment(self) -> None:
        """nix.conf is $NIX_CONF_DIR/nix.conf, else /etc/nix/nix.conf."""
        self.assertEqual(nix_conf_path(env={"NIX_CONF_DIR": self.dir}), self.path)
        self.assertEqual(nix_conf_path(env={}), "/etc/nix/nix.conf")
        self.assertEqual(nix_conf_path("/x", env={"NIX_CONF_DIR": self.dir}), "/x/nix.conf")

    def test_missing_file_means_defaults(self) -> None:
        """Without nix.conf Nix's built-in defaults apply: cache.nixos.org, its key, 3600 s."""
        conf = read_nix_conf(self.path)
        self.assertFalse(conf.exists)
        self.assertEqual(conf.substituters, ["https://cache.nixos.org/"])
        self.assertEqual(conf.trusted_substituters, [])
        self.assertEqual(conf.trusted_public_keys, [CACHE_NIXOS_ORG_KEY])
        self.assertEqual(conf.value("narinfo-cache-negative-ttl"), "3600")
        self.assertFalse(conf.is_set("narinfo-cache-negative-ttl"))

    def test_assignment_replaces_extra_appends(self) -> None:
        """An assignment replaces the value (default included), extra- appends, in file order."""
        self.write("nix.conf", "extra-substituters = http://a\nsubstituters = http://b # comment\n"
                               "extra-substituters = http://c http://d\n")
        self.assertEqual(read_nix_conf(self.path).substituters, ["http://b", "http://c", "http://d"])

    def test_extra_appends_to_default(self) -> None:
        """extra-substituters alone appends to Nix's default cache.nixos.org."""
        self.write("nix.conf", "extra-substituters = http://127.0.0.1:9999/nix-cache\n")
        self.assertEqual(read_nix_conf(self.path).substituters,
                         ["https://cache.nixos.org/", "http://127.0.0.1:9999/nix-cache"])

    def test_aliases(self) -> None:
        """The deprecated names binary-caches, trusted-binary-caches, binary-cache-public-keys count."""
        self.write("nix.conf", "binary-caches = http://a\ntrusted-binary-caches = http://t\n"
                               "binary-cache-public-keys = k:x\nextra-binary-cache-public-keys = j:y\n")
        conf = read_nix_conf(self.path)
        self.assertEqual(conf.substituters, ["http://a"])
        self.assertEqual(conf.trusted_substituters, ["http://t"])
        self.assertEqual(conf.trusted_public_keys, ["k:x", "j:y"])

    def test_includes(self) -> None:
        """include and !include are relative to the including file and read in place; a missing !include is skipped."""
        self.write("nix.conf", "substituters = http://a\ninclude sub/more.conf\n!include absent.conf\n"
                               "narinfo-cache-negative-ttl = 30\n")
        self.write("sub/more.conf", "extra-substituters = http://b\nnarinfo-cache-negative-ttl = 10\n")
        conf = read_nix_conf(self.path)
        self.assertEqual(conf.substituters, ["http://a", "http://b"])
        self.assertEqual(conf.value("narinfo-cache-negative-ttl"), "30")
        self.assertEqual(conf.files, (self.path, os.path.join(self.dir, "sub/more.conf")))

    def test_missing_include_is_an_error(self) -> None:
        """A missing 'include' (without '!') is an error, as in Nix."""
        self.write("nix.conf", "include absent.conf\n")
        self.assertRaises(NixConfError, read_nix_conf, self.path)

    def test_malformed_line(self) -> None:
        """A line without '=' is an error."""
        self.write("nix.conf", "substituters http://a\n")
        self.assertRaises(NixConfError, read_nix_conf, self.path)

    def test_unreadable(self) -> None:
        """A file that exists but cannot be opened raises NixConfUnreadable naming it (top file and include)."""
        self.write("nix.conf", "include other.conf\n")
        other = self.write("other.conf", "substituters = http://a\n")

        def opener(path: str) -> IO[bytes]:
            if path == other:
                raise PermissionError(13, "Permission denied", path)
            return open(path, "rb")

        e = self.assertRaises(NixConfUnreadable, read_nix_conf, self.path, opener)
        self.assertEqual(e.filename, other)
        self.assertIn("Permission denied", str(e))
        self.assertIsInstance(e, NixConfError)
