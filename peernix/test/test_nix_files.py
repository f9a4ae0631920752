"""
Tests for the Nix side: ``flake.nix`` and ``nix/*.nix`` parse, and the
modules' pure helpers (``nix/lib.nix``) agree with the Python code they
configure: the TOML they write is a config file peernix reads, the
substituter URL is the one peernix logs, the systemd hardening is the one
``docs/peernix.service`` documents.

nixpkgs is not available offline, so the modules themselves are not
evaluated; what can be checked without it is.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import peernix
from peernix.options import SETTINGS, SETTINGS_BY_NAME, Config, read_config_file
from peernix.service import local_cache_url

#: The repository root (this checkout).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = os.path.join(ROOT, "nix", "lib.nix")

#: The Nix files are in a checkout, not in an installed package.
SKIP_NO_SOURCE: str | None = (
    None if os.path.exists(os.path.join(ROOT, "flake.nix")) else "not running from a source tree (no flake.nix)"
)
SKIP_NO_NIX_INSTANTIATE: str | None = SKIP_NO_SOURCE or (
    None if shutil.which("nix-instantiate") else "nix-instantiate not installed"
)


def nix_files() -> list[str]:
    """:returns: every ``.nix`` file of the checkout outside build and test scratch directories."""
    found = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_trial_temp", "_build", "build")) and d != "result"]
        found += [os.path.join(directory, f) for f in files if f.endswith(".nix")]
    return sorted(found)


def read(relative: str) -> str:
    """:returns: the text of a file of the checkout."""
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def evaluate(expression: str) -> Any:
    """
    Evaluate a Nix expression (``lib`` is ``nix/lib.nix``) strictly, without
    nixpkgs or the network.

    :returns: the value, through JSON.
    :raises AssertionError: with Nix's message when evaluation fails.
    """
    full = f"let lib = import {LIB}; in {expression}"
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "-E", full],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "NIX_PATH": ""},
    )
    if result.returncode != 0:
        raise AssertionError(f"nix-instantiate failed on {expression!r}:\n{result.stderr}")
    return json.loads(result.stdout)


def nix_settings(values: dict[str, Any]) -> str:
    """:returns: a Nix expression for ``values`` (through JSON, so every type maps exactly)."""
    return f"(builtins.fromJSON {json.dumps(json.dumps(values))})"


class ParseTests(SynchronousTestCase):
    """Every Nix file parses."""

    skip = SKIP_NO_NIX_INSTANTIATE

    def test_files_exist(self) -> None:
        """The flake, the package and both modules are there."""
        names = {os.path.relpath(p, ROOT) for p in nix_files()}
        self.assertTrue({"flake.nix", "nix/package.nix", "nix/nixos-module.nix", "nix/darwin-module.nix",
                         "nix/lib.nix"} <= names, names)

    def test_every_file_parses(self) -> None:
        """``nix-instantiate --parse`` accepts every .nix file."""
        for path in nix_files():
            result = subprocess.run(["nix-instantiate", "--parse", path], capture_output=True, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
            self.assertEqual(result.returncode, 0, f"{path}:\n{result.stderr}")


class LibTests(SynchronousTestCase):
    """``nix/lib.nix`` evaluates and agrees with peernix's Python code."""

    skip = SKIP_NO_NIX_INSTANTIATE

    def test_defaults_agree(self) -> None:
        """The defaults the modules assume are peernix's."""
        defaults = evaluate("lib.defaults")
        for name, value in defaults.items():
            self.assertEqual(SETTINGS_BY_NAME[name].default, value, name)

    def test_substituter_url(self) -> None:
        """The substituter URL is the one peernix tells the user to put in nix.conf, never ?trusted=1."""
        cases: list[dict[str, Any]] = [
            {}, {"port": 8080}, {"interface": "::"}, {"interface": "0.0.0.0"}, {"interface": "::1", "port": 1234},
            {"interface": "192.0.2.1"}, {"interface": None, "port": None},
        ]
        for case in cases:
            url = evaluate(f"lib.substituterUrl {nix_settings(case)}")
            config = Config(**{k: v for k, v in case.items() if v is not None})
            self.assertEqual(url, local_cache_url(config, config.port), case)
            self.assertNotIn("trusted", url)

    def test_firewall(self) -> None:
        """The firewall opens the HTTP port on TCP, the UDP port, and 5353 only with mDNS."""
        self.assertEqual(evaluate("lib.firewall {}"),
                         {"allowedTCPPorts": [9999], "allowedUDPPorts": [9999, 5353]})
        self.assertEqual(evaluate(f"lib.firewall {nix_settings({'port': 8080, 'udp_port': 9998, 'mdns': False})}"),
                         {"allowedTCPPorts": [8080], "allowedUDPPorts": [9998]})
        config = Config(port=8080)
        self.assertEqual(evaluate(f"lib.udpPort {nix_settings({'port': 8080})}"), config.effective_udp_port)

    def test_toml_round_trip(self) -> None:
        """Every setting a config file takes, written by the module's TOML generator, reads back as peernix's example does."""
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.in_file:
                values.update(tomllib.loads(setting.toml_example()))
        values["negative_ttl"] = 2.5
        values["mdns"] = False
        text = evaluate(f"lib.toTOML {nix_settings(values)}")
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        original = self.mktemp()
        with open(original, "wb") as f:
            f.write("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()).encode())
        self.assertEqual(read_config_file(path), read_config_file(original))
        self.assertEqual(set(read_config_file(path)), {s.name for s in SETTINGS if s.in_file})

    def test_toml_nulls_and_quoting(self) -> None:
        """``null`` leaves a setting out; strings with quotes and newlines survive."""
        text = evaluate('lib.toTOML { port = null; interface = "::1"; peers = [ ]; "x y" = "a\\"b\\n"; }')
        data = tomllib.loads(text)
        self.assertEqual(data, {"interface": "::1", "peers": [], "x y": 'a"b\n'})

    def test_toml_refuses_tables(self) -> None:
        """A nested attribute set is refused with a message naming the key."""
        error = self.assertRaises(AssertionError, evaluate, "lib.toTOML { peers = { a = 1; }; }")
        self.assertIn("services.peernix.settings.peers", str(error))

    def test_secret_key_file_checks(self) -> None:
        """A key in the Nix store, a relative path or a Nix path value is refused; a root-only path is fine."""
        problems = evaluate(
            'map lib.secretKeyFileProblem [ null "/var/lib/peernix/secret-key" "/nix/store/abc-key" "key" ./. ]'
        )
        self.assertEqual(problems[:2], [None, None])
        self.assertIn("Nix store", problems[2])
        self.assertIn("absolute", problems[3])
        self.assertIn("Nix path value", problems[4])

    def run_key_check(self, path: str) -> str:
        """:returns: what ``lib.secretKeyCheckScript path`` prints when run by ``sh`` with this system's tools."""
        script = evaluate(f"lib.secretKeyCheckScript {json.dumps(path)}")
        result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "")
        return result.stderr

    def test_secret_key_check_without_stat(self) -> None:
        """
        The nix-darwin activation check of the key file uses no ``stat``
        (GNU coreutils' comes first on nix-darwin's activation PATH, and its
        flags are not BSD's), only POSIX find: here it runs with GNU find
        and judges every case right.
        """
        script = evaluate('lib.secretKeyCheckScript "/var/lib/peernix/secret-key"')
        self.assertNotRegex(script, r"\bstat\b")
        self.assertIn("find -H", script)
        if os.geteuid() != 0:
            raise self.skipTest("needs root: the key must be owned by root")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key = os.path.join(directory, "it's a key")
        with open(key, "w") as f:
            f.write("k:x\n")
        os.chmod(key, 0o600)
        self.assertEqual(self.run_key_check(key), "")
        link = os.path.join(directory, "link")
        os.symlink(key, link)
        self.assertEqual(self.run_key_check(link), "")
        for mode in (0o640, 0o604, 0o644, 0o610):
            os.chmod(key, mode)
            self.assertIn("must be owned by root and readable by root only", self.run_key_check(key), oct(mode))
        os.chmod(key, 0o400)
        self.assertEqual(self.run_key_check(key), "")
        os.chown(key, 65534, -1)
        self.assertIn("must be owned by root", self.run_key_check(key))
        self.assertIn("does not exist", self.run_key_check(os.path.join(directory, "missing")))

    def test_nix_conf_lines(self) -> None:
        """The nix.conf lines for peernix; no extra-trusted-public-keys line without keys."""
        self.assertEqual(
            evaluate("lib.nixConfLines { settings = { }; }"),
            ["extra-substituters = http://127.0.0.1:9999/nix-cache"],
        )
        self.assertEqual(
            evaluate('lib.nixConfLines { settings = { port = 8080; }; trustedPublicKeys = [ "a-1:AAAA" "b-1:BBBB" ]; }'),
            ["extra-substituters = http://127.0.0.1:8080/nix-cache", "extra-trusted-public-keys = a-1:AAAA b-1:BBBB"],
        )

    def test_manual_nix_conf_warning(self) -> None:
        """With nix.enable = false the warning says exactly which lines to add to nix.conf."""
        warning = evaluate('lib.manualNixConfWarning { settings = { }; trustedPublicKeys = [ "a-1:AAAA" ]; }')
        self.assertIn("nix.enable is false", warning)
        self.assertIn("nix.custom.conf", warning)
        self.assertIn("\n  extra-substituters = http://127.0.0.1:9999/nix-cache\n  extra-trusted-public-keys = a-1:AAAA", warning)
        self.assertNotIn("extra-trusted-public-keys", evaluate("lib.manualNixConfWarning { settings = { }; }"))

    def test_arguments(self) -> None:
        """The daemon gets --config, and the key through systemd's credentials directory."""
        self.assertEqual(
            evaluate('lib.arguments { configFile = "/nix/store/x-peernix.toml"; secretKeyArgument = lib.credentialPath; }'),
            ["--config", "/nix/store/x-peernix.toml", "--secret-key-file", "${CREDENTIALS_DIRECTORY}/secret-key"],
        )
        self.assertEqual(evaluate('lib.arguments { configFile = "/c"; }'), ["--config", "/c"])
        self.assertEqual(evaluate("lib.credentialName"), "secret-key")

    def test_hardening_matches_unit_file(self) -> None:
        """The NixOS unit's hardening is docs/peernix.service's, line for line."""
        parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(read("docs/peernix.service"))
        unit = {k: v for k, v in parser["Service"].items() if k != "ExecStart"}
        self.assertEqual(evaluate("lib.hardening"), unit)

    def test_hardening_lets_announcements_through(self) -> None:
        """No IPAddressDeny (it silently dropped the predecessor's broadcasts); netlink for the interface list."""
        hardening = evaluate("lib.hardening")
        self.assertNotIn("IPAddressDeny", hardening)
        self.assertEqual(hardening["RestrictAddressFamilies"].split(), ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"])
        self.assertEqual(hardening["CapabilityBoundingSet"], "")
        self.assertEqual(hardening["ProtectSystem"], "strict")
        self.assertEqual(hardening["ReadWritePaths"], "/nix/var/nix/db")
        self.assertEqual(hardening["Restart"], "on-failure")


class ModuleTextTests(SynchronousTestCase):
    """What can be checked of the modules and the flake without nixpkgs: their text."""

    skip = SKIP_NO_SOURCE

    def test_no_trusted_substituter(self) -> None:
        """Neither module adds ?trusted=1 or trusted-substituters; both add extra-substituters and trusted keys."""
        for name in ("nix/nixos-module.nix", "nix/darwin-module.nix", "nix/lib.nix"):
            code = "\n".join(line.split("#")[0] for line in read(name).splitlines())
            self.assertNotIn("trusted=1", code, name)
            self.assertNotIn("trusted-substituters", code, name)
            self.assertNotIn("IPAddressDeny", code, name)
        for name in ("nix/nixos-module.nix", "nix/darwin-module.nix"):
            text = read(name)
            self.assertIn("nix.settings.extra-substituters = [ (peernixLib.substituterUrl cfg.settings) ];", text)
            self.assertIn("nix.settings.extra-trusted-public-keys = lib.mkIf (cfg.trustedPublicKeys != [ ]) cfg.trustedPublicKeys;", text)

    def test_no_empty_trusted_keys_line(self) -> None:
        """Without trustedPublicKeys neither module sets extra-trusted-public-keys (NixOS would write an empty line)."""
        for name in ("nix/nixos-module.nix", "nix/darwin-module.nix"):
            code = "\n".join(line.split("#")[0] for line in read(name).splitlines())
            self.assertNotIn("extra-trusted-public-keys = cfg.trustedPublicKeys", code, name)
            self.assertEqual(code.count("nix.settings.extra-trusted-public-keys ="), 1, name)

    def test_warns_when_nix_conf_is_not_managed(self) -> None:
        """With nix.enable = false (Determinate Nix) both modules emit a warning with the lines to add by hand."""
        for name in ("nix/nixos-module.nix", "nix/darwin-module.nix"):
            self.assertIn(
                "warnings = lib.optional (!(config.nix.enable or true))\n"
                "      (peernixLib.manualNixConfWarning { inherit (cfg) settings trustedPublicKeys; });",
                read(name), name)

    def test_darwin_key_check_has_no_stat(self) -> None:
        """The nix-darwin module checks the key with lib.secretKeyCheckScript, not with stat."""
        text = read("nix/darwin-module.nix")
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        self.assertNotRegex(code, r"\bstat\b")
        self.assertIn("(lib.mkAfter (peernixLib.secretKeyCheckScript cfg.secretKeyFile))", text)

    def test_nixos_credential(self) -> None:
        """The NixOS module passes the key with LoadCredential and never as a Nix path."""
        text = read("nix/nixos-module.nix")
        self.assertIn('LoadCredential = "${peernixLib.credentialName}:${cfg.secretKeyFile}";', text)
        self.assertIn("secretKeyArgument = if cfg.secretKeyFile == null then null else peernixLib.credentialPath;",
                      text)
        self.assertRegex(text, r"secretKeyFile = mkOption \{\n\s+type = types\.nullOr types\.str;")
        self.assertIn('after = [ "network-online.target"', text)
        self.assertIn("networking.firewall = lib.mkIf cfg.openFirewall (peernixLib.firewall cfg.settings);", text)

    def test_darwin_launchd(self) -> None:
        """The nix-darwin module runs a launchd daemon with the same arguments."""
        text = read("nix/darwin-module.nix")
        self.assertIn("launchd.daemons.peernix.serviceConfig", text)
        self.assertIn("ProgramArguments", text)
        self.assertRegex(text, r"secretKeyFile = mkOption \{\n\s+type = types\.nullOr types\.str;")

    def test_declared_settings_are_peernix_settings(self) -> None:
        """Every settings key a module declares or reads is a config-file key of SETTINGS."""
        module_options = {"enable", "package", "settings", "secretKeyFile", "trustedPublicKeys", "openFirewall",
                          "logFile"}
        for name in ("nix/nixos-module.nix", "nix/darwin-module.nix"):
            text = read(name)
            declared = set(re.findall(r"^\s+([A-Za-z_]+) = mkOption", text, re.M)) - module_options
            used = set(re.findall(r"cfg\.settings(?:\.| \? )([A-Za-z_]+)", text))
            self.assertTrue(declared, name)
            for key in declared | used:
                self.assertIn(key, SETTINGS_BY_NAME, f"{name}: {key}")
                self.assertTrue(SETTINGS_BY_NAME[key].in_file, key)

    def test_flake_outputs(self) -> None:
        """The flake has the package for Linux and Darwin, both modules, and checks running trial and mypy."""
        text = read("flake.nix")
        for needle in ('"x86_64-linux"', '"aarch64-linux"', '"x86_64-darwin"', '"aarch64-darwin"',
                       "packages = forSystems (linuxSystems ++ darwinSystems)", "nixosModules.default",
                       "darwinModules.default", "checks = forSystems linuxSystems", "doCheck = true", "mypy"):
            self.assertIn(needle, text)

    def test_package_dependencies(self) -> None:
        """The package lists every third-party module peernix imports, and setup.cfg's requirements."""
        text = read("nix/package.nix")
        marker = "dependencies = with python3Packages; ["
        start = text.index(marker) + len(marker)
        listed = set(re.findall(r"[a-z][a-z0-9-]*", text[start:text.index("\n  version = ", start)]))
        nix_names = {"nacl": "pynacl", "prometheus_client": "prometheus-client", "zope": "zope-interface",
                     "backports": "backports-zstd"}
        package = os.path.dirname(os.path.abspath(peernix.__file__))
        imported: set[str] = set()
        for directory, dirs, files in os.walk(package):
            dirs[:] = [d for d in dirs if d not in ("test", "__pycache__")]
            for file in files:
                if file.endswith(".py"):
                    with open(os.path.join(directory, file), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            imported.update(a.name.split(".")[0] for a in node.names)
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            imported.add(node.module.split(".")[0])
        third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("peernix", "__future__")}
        self.assertTrue(third_party)
        for module in third_party:
            self.assertIn(nix_names.get(module, module), listed, module)
        setup = configparser.ConfigParser()
        setup.read_string(read("setup.cfg"))
        for requirement in setup["options"]["install_requires"].split("\n"):
            if requirement.strip():
                name = re.split(r"[\s\[<>=]", requirement.strip())[0].lower().replace(".", "-").replace("_", "-")
                self.assertIn({"pynacl": "pynacl"}.get(name, name), listed, requirement)

    def evaluate_package(self, python: str) -> subprocess.CompletedProcess[str]:
        """
        Evaluate the package's ``dependencies`` against a stub nixpkgs whose
        ``python3Packages`` is ``python`` (a Nix attribute set expression
        merged over stub packages), without nixpkgs.
        """
        expression = f"""
          let
            stub = {{
              pythonOlder = v: true; python = {{ sitePackages = "lib"; interpreter = "python"; }};
              twisted = {{ optional-dependencies.tls = [ "tls" ]; }};
              klein = "klein"; treq = "treq"; attrs = "attrs"; zope-interface = "zope"; pynacl = "nacl";
              zeroconf = "zeroconf"; ifaddr = "ifaddr"; prometheus-client = "prom"; zstandard = "zstandard"; rbloom = "rbloom";
              setuptools = "setuptools"; hypothesis = "hypothesis"; buildPythonApplication = a: a;
            }} // {python};
            lib = {{
              optionals = c: l: if c then l else [ ];
              fileset = {{ toSource = x: null; intersection = a: b: null; unions = x: null; fileFilter = f: p: null; }};
              licenses.mit = null; platforms = {{ linux = [ ]; darwin = [ ]; }};
            }};
            package = import {os.path.join(ROOT, "nix", "package.nix")} {{
              inherit lib; python3Packages = stub; nix = null; busybox = null;
            }};
          in package.dependencies
        """
        return subprocess.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "-E", expression],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "NIX_PATH": ""},
        )

    def test_package_minimum_nixpkgs(self) -> None:
        """
        With a nixpkgs without backports-zstd, evaluating the package stops
        with a message naming the minimum nixpkgs and the ways out; with it,
        or with Python 3.14 (compression.zstd), it evaluates.
        """
        if SKIP_NO_NIX_INSTANTIATE:
            raise self.skipTest(SKIP_NO_NIX_INSTANTIATE)
        old = self.evaluate_package("{ }")
        self.assertNotEqual(old.returncode, 0)
        for needle in ("python3Packages.backports-zstd", "NixOS 26.05", "python314Packages", "flake"):
            self.assertIn(needle, old.stderr)
        new = self.evaluate_package('{ backports-zstd = "backports-zstd"; }')
        self.assertEqual(new.returncode, 0, new.stderr)
        self.assertIn("backports-zstd", json.loads(new.stdout))
        py314 = self.evaluate_package("{ pythonOlder = v: false; }")
        self.assertEqual(py314.returncode, 0, py314.stderr)
        self.assertNotIn("backports-zstd", json.loads(py314.stdout))
        self.assertIn("zstandard", json.loads(py314.stdout))

    def test_version(self) -> None:
        """The package reads its version from peernix/__init__.py, as setup.cfg does."""
        text = read("nix/package.nix")
        self.assertIn('builtins.readFile ../peernix/__init__.py', text)
        self.assertIsNotNone(re.search(r'__version__ = "([^"]+)"', read("peernix/__init__.py")))

    def test_ci_parses_nix(self) -> None:
        """CI runs nix-instantiate --parse on the Nix files."""
        self.assertIn("nix-instantiate --parse", read(".ci/run"))

