"""Tests of the upstream settings: options, nix.conf substituters, self/peer filtering."""

from __future__ import annotations

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from peernix.options import Config, parse_args, read_config_file
from peernix.peers.trust import NIX_DEFAULT_SUBSTITUTERS, read_nix_substituters
from peernix.upstream.config import (
    choose_upstreams,
    default_upstreams,
    normalise_upstream,
    reaches_peer,
    reaches_self,
)


class UpstreamOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """By default: Nix's substituters (None), fetching for the LAN on, 4 GiB of staging."""
        config = parse_args([])
        self.assertIsNone(config.upstream)
        self.assertTrue(config.fetch_for_lan)
        self.assertEqual(config.staging_dir, "/var/cache/peernix/staging")
        self.assertEqual(config.staging_max_size, 4 * 1024**3)

    def test_upstream_repeatable_and_normalised(self) -> None:
        """--upstream accumulates; URLs lose trailing slashes and Nix's store parameters."""
        config = parse_args(["--upstream", "https://Cache.NixOS.org/", "--upstream", "http://10.0.0.1:8080/c?priority=40"])
        self.assertEqual(config.upstream, ("https://cache.nixos.org", "http://10.0.0.1:8080/c"))

    def test_upstream_none(self) -> None:
        """--upstream none turns the feature off: an empty list, not the default."""
        self.assertEqual(parse_args(["--upstream", "none"]).upstream, ())
        self.assertEqual(Config(upstream=("none",)).upstream, ())

    def test_bad_upstream(self) -> None:
        """A non-HTTP upstream is a one-line usage error naming the option."""
        for bad in ("s3://bucket", "daemon", "ftp://x", "http://"):
            with self.assertRaises(usage.UsageError) as caught:
                parse_args(["--upstream", bad])
            self.assertIn("--upstream", str(caught.exception))

    def test_fetch_for_lan_yes_no(self) -> None:
        """--fetch-for-lan takes yes or no."""
        self.assertFalse(parse_args(["--fetch-for-lan", "no"]).fetch_for_lan)
        self.assertTrue(parse_args(["--fetch-for-lan", "yes"]).fetch_for_lan)
        with self.assertRaises(usage.UsageError):
            parse_args(["--fetch-for-lan", "maybe"])

    def test_staging_options(self) -> None:
        """--staging-dir is made absolute; --staging-max-size reads K/M/G and Ki/Mi/Gi."""
        config = parse_args(["--staging-dir", "rel/dir", "--staging-max-size", "500M"])
        self.assertEqual(config.staging_dir, os.path.abspath("rel/dir"))
        self.assertEqual(config.staging_max_size, 500_000_000)
        self.assertEqual(parse_args(["--staging-max-size", "2Gi"]).staging_max_size, 2 * 1024**3)
        with self.assertRaises(usage.UsageError) as caught:
            parse_args(["--staging-max-size", "lots"])
        self.assertIn("--staging-max-size", str(caught.exception))

    def test_config_file(self) -> None:
        """The TOML keys: upstream = [...], fetch_for_lan (bool or "yes"/"no"), staging_*."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('upstream = ["https://cache.nixos.org"]\nfetch_for_lan = false\n'
                    'staging_dir = "/tmp/stage"\nstaging_max_size = "1Gi"\n')
        values = read_config_file(path)
        self.assertEqual(values["upstream"], ("https://cache.nixos.org",))
        self.assertIs(values["fetch_for_lan"], False)
        self.assertEqual(values["staging_max_size"], 1024**3)
        with open(path, "w") as f:
            f.write('fetch_for_lan = "no"\nstaging_max_size = 1000\nupstream = ["none"]\n')
        values = read_config_file(path)
        self.assertIs(values["fetch_for_lan"], False)
        self.assertEqual(values["staging_max_size"], 1000)
        self.assertEqual(Config(**values).upstream, ())

    def test_command_line_replaces_file_list(self) -> None:
        """An --upstream on the command line replaces the file's list."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('upstream = ["https://a.example"]\n')
        config = parse_args(["--config", path, "--upstream", "https://b.example"])
        self.assertEqual(config.upstream, ("https://b.example",))


class NixSubstitutersTests(SynchronousTestCase):
    def _conf(self, text: str) -> str:
        directory = str(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "nix.conf"), "w") as f:
            f.write(text)
        return directory

    def test_default_without_conf(self) -> None:
        """Without nix.conf, Nix's default substituter."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.assertEqual(read_nix_substituters(directory, env={}), list(NIX_DEFAULT_SUBSTITUTERS))

    def test_substituters_and_extra(self) -> None:
        """substituters replaces, extra-substituters appends, includes are followed, aliases count."""
        directory = self._conf(
            "substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org\n"
            "extra-substituters = https://a.example # comment\n"
            "!include other.conf\n"
        )
        with open(os.path.join(directory, "other.conf"), "w") as f:
            f.write("extra-binary-caches = https://b.example\n")
        self.assertEqual(
            read_nix_substituters(directory, env={}),
            ["http://127.0.0.1:9999/nix-cache", "https://cache.nixos.org", "https://a.example", "https://b.example"],
        )

    def test_env_dir(self) -> None:
        """$NIX_CONF_DIR is where nix.conf is read, as for the trusted keys."""
        directory = self._conf("substituters = https://only.example\n")
        self.assertEqual(read_nix_substituters(env={"NIX_CONF_DIR": directory}), ["https://only.example"])


class FilterTests(SynchronousTestCase):
    def test_normalise(self) -> None:
        """Only http(s) caches are upstreams; store parameters and trailing slashes go."""
        self.assertEqual(normalise_upstream("https://cache.nixos.org/"), "https://cache.nixos.org")
        self.assertEqual(normalise_upstream("http://h:8080/x/?priority=10"), "http://h:8080/x")
        for other in ("daemon", "local", "file:///srv/cache", "s3://b?region=x", "ssh://host"):
            self.assertIsNone(normalise_upstream(other))

    def test_reaches_self(self) -> None:
        """Loopback, localhost, own addresses and /nix-cache on our port are this daemon; other ports are not."""
        own = ["192.168.1.5", "fe80::1%eth0"]
        for url in ("http://127.0.0.1:9999/nix-cache", "http://localhost:9999", "http://[::1]:9999/x",
                    "http://192.168.1.5:9999", "http://[fe80::1]:9999", "http://peer.lan:9999/nix-cache"):
            self.assertTrue(reaches_self(url, 9999, own), url)
        for url in ("http://127.0.0.1:8080", "https://cache.nixos.org", "http://192.168.1.6:9999",
                    "http://peer.lan:9999/other"):
            self.assertFalse(reaches_self(url, 9999, own), url)

    def test_reaches_peer(self) -> None:
        """An upstream on a known peer's host and port is that peer."""
        peers = ["http://10.0.0.2:9999", "http://[fd00::2]:9999"]
        self.assertTrue(reaches_peer("http://10.0.0.2:9999/nix-cache", peers))
        self.assertTrue(reaches_peer("http://[fd00:0::2]:9999/", peers))
        self.assertFalse(reaches_peer("http://10.0.0.2:8080", peers))
        self.assertFalse(reaches_peer("https://cache.nixos.org", peers))

    def test_default_upstreams(self) -> None:
        """The default drops this daemon and unsupported stores, keeps order, drops duplicates."""
        subs = ["http://127.0.0.1:9999/nix-cache", "daemon", "https://cache.nixos.org/",
                "https://cache.nixos.org", "http://10.9.9.9:8080/c?priority=50"]
        self.assertEqual(default_upstreams(subs, 9999, []), ["https://cache.nixos.org", "http://10.9.9.9:8080/c"])

    def test_choose(self) -> None:
        """A configured list wins (nix.conf unread); None reads nix.conf; () is off."""
        def fail() -> list[str]:
            raise AssertionError("nix.conf read although --upstream was given")

        self.assertEqual(choose_upstreams(("https://a.example",), fail, 9999, []), ["https://a.example"])
        self.assertEqual(choose_upstreams((), fail, 9999, []), [])
        self.assertEqual(choose_upstreams(("http://127.0.0.1:9999/nix-cache",), fail, 9999, []), [])
        self.assertEqual(choose_upstreams(None, lambda: ["https://b.example/"], 9999, []), ["https://b.example"])
