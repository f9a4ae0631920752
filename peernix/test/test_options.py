"""Tests for :mod:`peernix.options`: command line, config file, precedence, errors."""

from __future__ import annotations

import ipaddress
import os

import attrs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from peernix.options import (
    SETTINGS,
    Config,
    ConfigError,
    PeernixOptions,
    config_from_file,
    make_config,
    parse_args,
    read_config_file,
    render_settings_rst,
)

NIXOS_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
OTHER_KEY = "laptop-peernix-1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="


class CommandLineTests(SynchronousTestCase):
    """Parsing ``twistd peernix`` argument lists into a :class:`Config`."""

    def test_defaults(self) -> None:
        """No arguments give the documented defaults."""
        config = parse_args([])
        self.assertEqual(config, Config())
        self.assertEqual(config.port, 9999)
        self.assertIsNone(config.interface)
        self.assertEqual(config.store_root, "/")
        self.assertIsNone(config.secret_key_file)
        self.assertEqual(config.priority, 30)
        self.assertEqual(config.peers, ())
        self.assertIsNone(config.trusted_public_keys)
        self.assertEqual(
            config.proxy_clients,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(config.negative_ttl, 10.0)
        self.assertEqual(config.peer_timeout, 2.0)
        self.assertIsNone(config.udp_port)
        self.assertEqual(config.effective_udp_port, 9999)
        self.assertTrue(config.broadcast)
        self.assertTrue(config.mdns)
        self.assertEqual(config.announce_interval, 30.0)
        self.assertEqual(config.peer_ttl, 120.0)
        self.assertFalse(config.access_log)

    def test_every_setting(self) -> None:
        """Every option given once ends up, converted, in the Config."""
        config = parse_args([
            "--port", "8080", "--interface", "192.0.2.1", "--store-root", "/tmp/a",
            "--secret-key-file", "/etc/peernix/sk", "--priority", "40",
            "--peer", "http://192.0.2.7:9999", "--trusted-public-key", NIXOS_KEY,
            "--proxy-client", "10.1.0.0/16", "--negative-ttl", "5", "--peer-timeout", "0.5",
            "--udp-port", "9998", "--no-broadcast", "--no-mdns",
            "--announce-interval", "15", "--peer-ttl", "60.5", "--access-log",
        ])
        self.assertEqual(config, Config(
            port=8080, interface="192.0.2.1", store_root="/tmp/a",
            secret_key_file="/etc/peernix/sk", priority=40,
            peers=("http://192.0.2.7:9999",), trusted_public_keys=(NIXOS_KEY,),
            proxy_clients=(ipaddress.ip_network("10.1.0.0/16"),), negative_ttl=5.0,
            peer_timeout=0.5, udp_port=9998, broadcast=False, mdns=False,
            announce_interval=15.0, peer_ttl=60.5, access_log=True,
        ))
        self.assertEqual(config.effective_udp_port, 9998)

    def test_repeatable_options_accumulate(self) -> None:
        """Repeatable options keep every value, in order."""
        config = parse_args([
            "--peer", "http://192.0.2.7:9999", "--peer", "http://[2001:db8::7]:9000",
            "--trusted-public-key", NIXOS_KEY, "--trusted-public-key", OTHER_KEY,
            "--proxy-client", "192.168.0.0/16", "--proxy-client", "::1",
        ])
        self.assertEqual(config.peers, ("http://192.0.2.7:9999", "http://[2001:db8::7]:9000"))
        self.assertEqual(config.trusted_public_keys, (NIXOS_KEY, OTHER_KEY))
        self.assertEqual(
            config.proxy_clients,
            (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("::1/128")),
        )

    def test_values_are_normalised(self) -> None:
        """Addresses, URLs, networks and paths are stored in one canonical form."""
        config = parse_args([
            "--interface", "[::1]", "--peer", "http://Peer.Example.org", "--peer",
            "http://[2001:DB8:0::7]:80/", "--proxy-client", "10.1.2.3/8",
            "--store-root", "relative/root",
        ])
        self.assertEqual(config.interface, "::1")
        self.assertEqual(config.peers, ("http://peer.example.org:9999", "http://[2001:db8::7]:80"))
        self.assertEqual(config.proxy_clients, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(config.store_root, os.path.abspath("relative/root"))

    def test_port_zero_means_any(self) -> None:
        """Port 0 (any free port) is accepted for the TCP and UDP ports."""
        config = parse_args(["--port", "0", "--udp-port", "0"])
        self.assertEqual((config.port, config.udp_port), (0, 0))

    def test_flags_turn_on_again(self) -> None:
        """``--mdns`` and ``--broadcast`` exist as well as their ``--no-`` forms."""
        config = parse_args(["--mdns", "--broadcast", "--no-access-log"])
        self.assertTrue(config.mdns)
        self.assertTrue(config.broadcast)
        self.assertFalse(config.access_log)

    def assertUsageError(self, argv: list[str], *fragments: str) -> str:
        """Assert parsing ``argv`` fails with a one-line message holding ``fragments``."""
        error = self.assertRaises(usage.UsageError, parse_args, argv)
        message = str(error)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_bad_port(self) -> None:
        """A port that is not a whole number in 0..65535 is refused, naming the option."""
        self.assertUsageError(["--port", "nonsense"], "--port", "'nonsense'")
        self.assertUsageError(["--port", "65536"], "--port", "65536")
        self.assertUsageError(["--port", "-1"], "--port")
        self.assertUsageError(["--port", "1.5"], "--port")
        self.assertUsageError(["--udp-port", "70000"], "--udp-port")

    def test_bad_priority(self) -> None:
        """A negative or non-integer priority is refused."""
        self.assertUsageError(["--priority", "-3"], "--priority")
        self.assertUsageError(["--priority", "high"], "--priority")

    def test_bad_interface(self) -> None:
        """An interface that is not an IP address literal is refused."""
        self.assertUsageError(["--interface", "eth0"], "--interface", "'eth0'")
        self.assertUsageError(["--interface", "256.1.1.1"], "--interface")

    def test_bad_seconds(self) -> None:
        """Intervals must be positive finite numbers."""
        for flag in ("--negative-ttl", "--peer-timeout", "--announce-interval", "--peer-ttl"):
            self.assertUsageError([flag, "0"], flag)
            self.assertUsageError([flag, "-1"], flag)
            self.assertUsageError([flag, "soon"], flag, "'soon'")
            self.assertUsageError([flag, "inf"], flag)
            self.assertUsageError([flag, "nan"], flag)

    def test_bad_peer(self) -> None:
        """A peer must be an http URL with a host, IPv6 in brackets, and no path."""
        for bad in ("192.0.2.7:9999", "ftp://192.0.2.7", "http://::1:9999",
                    "http://192.0.2.7:9999/nix-cache", "http://", "http://host:99999",
                    "http://[not-v6]:80", "http://bad_host:80", "http://192.0.2.7:0",
                    "http://user@192.0.2.7", "http://192.0.2.7/?x=1"):
            self.assertUsageError(["--peer", bad], "--peer", repr(bad))

    def test_bad_trusted_public_key(self) -> None:
        """A trusted key must be NAME:base64 of 32 bytes."""
        self.assertUsageError(["--trusted-public-key", "nocolon"], "--trusted-public-key")
        self.assertUsageError(["--trusted-public-key", "a:not base64"], "--trusted-public-key")
        self.assertUsageError(["--trusted-public-key", "a:AAAA"], "--trusted-public-key", "32 bytes")

    def test_bad_proxy_client(self) -> None:
        """A proxy client must be an address or network."""
        self.assertUsageError(["--proxy-client", "localhost"], "--proxy-client", "'localhost'")
        self.assertUsageError(["--proxy-client", "10.0.0.0/33"], "--proxy-client")

    def test_bad_path(self) -> None:
        """An empty path is refused."""
        self.assertUsageError(["--store-root", ""], "--store-root")

    def test_contradicting_flags(self) -> None:
        """``--mdns`` with ``--no-mdns`` is an error, not a silent choice."""
        self.assertUsageError(["--mdns", "--no-mdns"], "--mdns", "--no-mdns")

    def test_unknown_option(self) -> None:
        """An unknown option is a usage error naming it."""
        self.assertUsageError(["--bogus"], "bogus")

    def test_stray_argument(self) -> None:
        """Arguments that are not options are refused."""
        self.assertUsageError(["9999"])

    def test_help_lists_every_option(self) -> None:
        """``--help`` text mentions every option of the table."""
        text = str(PeernixOptions())
        for setting in SETTINGS:
            self.assertIn(f"--{setting.flag}", text)


class ConfigFileTests(SynchronousTestCase):
    """Reading TOML config files and merging them with the command line."""

    def write(self, text: str) -> str:
        """:returns: the path of a new file holding ``text``."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return str(path)

    def test_every_key(self) -> None:
        """Every setting can be set in the file under its snake_case name."""
        path = self.write(f"""
port = 8080
interface = "::1"
store_root = "/tmp/a"
secret_key_file = "/etc/peernix/sk"
priority = 40
access_log = true
peers = ["http://192.0.2.7:9999", "http://[2001:db8::7]:9999"]
trusted_public_keys = ["{NIXOS_KEY}"]
proxy_clients = ["10.0.0.0/8"]
negative_ttl = 5
peer_timeout = 0.5
udp_port = 9998
broadcast = false
mdns = false
announce_interval = 15
peer_ttl = 60
""")
        config = parse_args(["--config", path])
        self.assertEqual(config, Config(
            port=8080, interface="::1", store_root="/tmp/a", secret_key_file="/etc/peernix/sk",
            priority=40, access_log=True, config_file=os.path.abspath(path),
            peers=("http://192.0.2.7:9999", "http://[2001:db8::7]:9999"),
            trusted_public_keys=(NIXOS_KEY,), proxy_clients=(ipaddress.ip_network("10.0.0.0/8"),),
            negative_ttl=5.0, peer_timeout=0.5, udp_port=9998, broadcast=False, mdns=False,
            announce_interval=15.0, peer_ttl=60.0,
        ))

    def test_every_setting_has_a_key(self) -> None:
        """Every setting but ``--config`` is readable from a file."""
        names = {s.name for s in SETTINGS if s.in_file}
        self.assertEqual(names | {"config_file"}, {f.name for f in attrs.fields(Config)})

    def test_command_line_wins(self) -> None:
        """A value on the command line beats the file's; the file beats the default."""
        path = self.write('port = 8080\npriority = 40\npeers = ["http://192.0.2.1:1"]\nmdns = false\n')
        config = parse_args(["--config", path, "--port", "7070", "--peer", "http://192.0.2.2:2",
                             "--mdns"])
        self.assertEqual(config.port, 7070)
        self.assertEqual(config.priority, 40)
        self.assertEqual(config.peers, ("http://192.0.2.2:2",))
        self.assertTrue(config.mdns)
        self.assertTrue(config.broadcast)

    def test_file_empty_list(self) -> None:
        """An empty list in the file means none (no trusted keys at all)."""
        path = self.write("trusted_public_keys = []\n")
        self.assertEqual(parse_args(["--config", path]).trusted_public_keys, ())

    def test_config_from_file(self) -> None:
        """``config_from_file`` (used by peernix.tac) reads a file alone, or gives defaults."""
        path = self.write("port = 8080\n")
        self.assertEqual(config_from_file(path), Config(port=8080, config_file=os.path.abspath(path)))
        self.assertEqual(config_from_file(None), Config())

    def test_make_config_precedence(self) -> None:
        """``make_config`` merges command line over file over defaults."""
        self.assertEqual(
            make_config({"port": 1}, {"port": 2, "priority": 3}),
            Config(port=1, priority=3),
        )

    def assertConfigError(self, text: str, *fragments: str) -> str:
        """Assert reading a file holding ``text`` fails with one line holding ``fragments``."""
        path = self.write(text)
        error = self.assertRaises(ConfigError, read_config_file, path)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        # The command line reports the same problem as a usage error.
        self.assertRaises(usage.UsageError, parse_args, ["--config", path])
        return message

    def test_unknown_key(self) -> None:
        """An unknown key is an error naming the key, with a suggestion when one is close."""
        self.assertConfigError("bogus = 1\n", "unknown key 'bogus'", "port")
        self.assertConfigError("prot = 1\n", "unknown key 'prot'", "did you mean 'port'")
        self.assertConfigError("store-root = '/'\n", "unknown key 'store-root'", "'store_root'")

    def test_config_key_refused(self) -> None:
        """A config file cannot name another config file."""
        self.assertConfigError("config_file = '/x'\n", "unknown key 'config_file'")

    def test_syntax_error_gives_line(self) -> None:
        """Malformed TOML is reported with its line number."""
        self.assertConfigError("port = 1\npriority = = 2\n", "not valid TOML", "line 2")

    def test_wrong_types(self) -> None:
        """A value of the wrong TOML type is refused, naming key and type."""
        self.assertConfigError('port = "9999"\n', "port", "expected a port number", "string")
        self.assertConfigError("port = true\n", "port", "boolean")
        self.assertConfigError("negative_ttl = '5'\n", "negative_ttl")
        self.assertConfigError("mdns = 'no'\n", "mdns", "boolean")
        self.assertConfigError("interface = 1\n", "interface", "in quotes")
        self.assertConfigError('peers = "http://192.0.2.1:1"\n', "peers", "array")
        self.assertConfigError("peers = [1]\n", "peers")
        self.assertConfigError("[port]\nx = 1\n", "port", "table")

    def test_bad_values(self) -> None:
        """Values of the right type are still checked, naming the key."""
        self.assertConfigError("port = 70000\n", "port", "70000")
        self.assertConfigError("peer_ttl = 0\n", "peer_ttl", "positive")
        self.assertConfigError("peers = ['http://::1:80']\n", "peers", "brackets")
        self.assertConfigError("proxy_clients = ['nowhere']\n", "proxy_clients")
        self.assertConfigError("trusted_public_keys = ['x']\n", "trusted_public_keys")

    def test_unreadable_file(self) -> None:
        """A missing config file is a clear error naming it."""
        missing = os.path.abspath(self.mktemp())
        error = self.assertRaises(usage.UsageError, parse_args, ["--config", missing])
        self.assertIn(missing, str(error))
        self.assertIn("No such file", str(error))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused cleanly."""
        path = str(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"port = \xff\n")
        message = str(self.assertRaises(ConfigError, read_config_file, path))
        self.assertIn(path, message)


class TableTests(SynchronousTestCase):
    """The settings table is complete and agrees with :class:`Config`."""

    def test_defaults_agree(self) -> None:
        """Each setting's default is the Config field's default."""
        fields = {f.name: f for f in attrs.fields(Config)}
        for setting in SETTINGS:
            self.assertEqual(fields[setting.name].default, setting.default, setting.name)

    def test_names_unique(self) -> None:
        """Names and flags are unique."""
        self.assertEqual(len({s.name for s in SETTINGS}), len(SETTINGS))
        self.assertEqual(len({s.flag for s in SETTINGS}), len(SETTINGS))

    def test_rst_mentions_everything(self) -> None:
        """The generated docs name every option, key and default."""
        text = render_settings_rst()
        for setting in SETTINGS:
            self.assertIn(f"``--{setting.flag}", text)
            if setting.in_file:
                self.assertIn(f"``{setting.name} = ", text)
            self.assertIn(setting.describe_default(), text)

    def test_examples_are_valid(self) -> None:
        """The config-file line the docs show for each setting is accepted."""
        for setting in SETTINGS:
            if setting.in_file:
                path = self.mktemp()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(setting.toml_example() + "\n")
                self.assertIn(setting.name, read_config_file(path))

    def test_readme_lists_everything(self) -> None:
        """README.rst's options table names every option and config-file key."""
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "README.rst")
        if not os.path.exists(readme):
            raise self.skipTest("not running from a source tree")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        for setting in SETTINGS:
            for flag in setting.flags:
                self.assertIn(f"``{flag}``", text)
            if setting.in_file:
                self.assertIn(f"``{setting.name}``", text)

    def test_config_is_frozen(self) -> None:
        """Config is immutable."""
        config = Config()
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "port", 1)


class GivingOptionsTests(SynchronousTestCase):
    """--max-upload-rate, --serve-peers and --state-dir (issue 15), and the size syntax."""

    def test_parse_size(self) -> None:
        """K, M, G, T are powers of 1000, Ki, Mi, Gi, Ti of 1024, case-insensitive, an optional B."""
        from peernix.options import format_size, parse_rate, parse_size

        cases = {"1500": 1500, "20M": 20_000_000, "20m": 20_000_000, "1.5Gi": 1_610_612_736,
                 "512KiB": 524_288, "2 G": 2_000_000_000, "1T": 10**12, "1Ti": 2**40, "0.5K": 500}
        for text, value in cases.items():
            self.assertEqual(parse_size(text), value, text)
        for bad in ("", "M", "20X", "-1M", "1e3", "20 MiBs", "1.2.3"):
            self.assertRaises(ValueError, parse_size, bad)
        self.assertEqual(parse_rate("20MB/s"), 20_000_000)
        self.assertEqual(parse_rate("2Mi/s"), 2 * 1024**2)
        for value in (20_000_000, 524_288, 1500, 1):
            self.assertEqual(parse_size(format_size(value)), value)

    def test_defaults(self) -> None:
        """Unlimited, serving, state in /var/lib/peernix."""
        config = parse_args([])
        self.assertIsNone(config.max_upload_rate)
        self.assertTrue(config.serve_peers)
        self.assertEqual(config.state_dir, "/var/lib/peernix")

    def test_command_line(self) -> None:
        """--max-upload-rate 20M is 20,000,000 bytes/s; --serve-peers takes yes or no; --state-dir is made absolute."""
        config = parse_args(["--max-upload-rate", "20M", "--serve-peers", "no", "--state-dir", "state"])
        self.assertEqual(config.max_upload_rate, 20_000_000)
        self.assertFalse(config.serve_peers)
        self.assertEqual(config.state_dir, os.path.abspath("state"))
        self.assertTrue(parse_args(["--serve-peers", "yes"]).serve_peers)
        self.assertIsNone(parse_args(["--max-upload-rate", "unlimited"]).max_upload_rate)
        for argv in (["--serve-peers", "maybe"], ["--max-upload-rate", "fast"], ["--max-upload-rate", "0"]):
            with self.assertRaises(usage.UsageError) as caught:
                parse_args(argv)
            self.assertIn(argv[0], str(caught.exception))

    def test_config_file(self) -> None:
        """TOML: max_upload_rate as a string with a unit or a number, serve_peers as a boolean or yes/no."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write('max_upload_rate = "2.5Mi"\nserve_peers = false\nstate_dir = "/srv/peernix"\n')
        config = parse_args(["--config", path])
        self.assertEqual((config.max_upload_rate, config.serve_peers, config.state_dir),
                         (2_621_440, False, "/srv/peernix"))
        with open(path, "w", encoding="utf-8") as f:
            f.write('max_upload_rate = 1000\nserve_peers = "yes"\n')
        config = parse_args(["--config", path])
        self.assertEqual((config.max_upload_rate, config.serve_peers), (1000, True))
        with open(path, "w", encoding="utf-8") as f:
            f.write('serve_peers = 3\n')
        self.assertRaises(usage.UsageError, parse_args, ["--config", path])
