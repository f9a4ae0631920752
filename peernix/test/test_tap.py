"""Tests for :mod:`peernix.tap`: start-up errors are one line, the happy path serves."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

import peernix
from peernix import tap
from peernix.service import ListenError, PeernixService
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore

#: The directory holding ``peernix/`` and ``twisted/plugins/``.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peernix.__file__)))


def parse(argv: list[str]) -> tap.Options:
    """:returns: ``tap.Options`` after parsing ``argv``."""
    options = tap.Options()
    options.parseOptions(argv)
    return options


class OptionErrorTests(SynchronousTestCase):
    """Bad options end start-up with one line, not the usage text."""

    def assertOneLineExit(self, argv: list[str], *fragments: str) -> str:
        """Assert parsing ``argv`` exits with a one-line ``peernix: error:`` message."""
        error = self.assertRaises(SystemExit, parse, argv)
        message = str(error.code)
        self.assertTrue(message.startswith("peernix: error: "), message)
        self.assertNotIn("\n", message)
        self.assertIn("--help", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_bad_value(self) -> None:
        """A bad value names the option and the value."""
        self.assertOneLineExit(["--port", "nonsense"], "--port", "nonsense")

    def test_unknown_option(self) -> None:
        """An unknown option is named."""
        self.assertOneLineExit(["--bogus"], "bogus")

    def test_bad_config_file(self) -> None:
        """A malformed or unknown-key config file is named, with the line or key."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("port = = 1\n")
        self.assertOneLineExit(["--config", path], path, "line 1")
        with open(path, "w") as f:
            f.write("colour = 'blue'\n")
        self.assertOneLineExit(["--config", path], "unknown key 'colour'")

    def test_missing_config_file(self) -> None:
        """A missing config file is named."""
        path = os.path.abspath(self.mktemp())
        self.assertOneLineExit(["--config", path], path)

    def test_help_exits_zero(self) -> None:
        """``--help`` still prints the help and exits with status 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, parse, ["--help"])
        self.assertEqual(error.code, 0)
        self.assertIn("--store-root", out.getvalue())

    def test_version(self) -> None:
        """``--version`` prints peernix's version and exits with status 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, parse, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertIn(f"peernix {peernix.__version__}", out.getvalue())

    def test_good_options(self) -> None:
        """Good options give the Config."""
        self.assertEqual(parse(["--port", "1234"]).config.port, 1234)


class MakeServiceErrorTests(SynchronousTestCase):
    """:func:`tap.makeService` turns store and key problems into one-line exits."""

    def assertOneLineExit(self, argv: list[str], *fragments: str) -> None:
        """Assert ``makeService`` for ``argv`` exits with one line holding ``fragments``."""
        options = parse(argv)
        error = self.assertRaises(SystemExit, tap.makeService, options)
        message = str(error.code)
        self.assertTrue(message.startswith("peernix: error: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_missing_store(self) -> None:
        """A store root without a Nix database is named, with the fix."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.assertOneLineExit(["--store-root", root], root, "--store-root")

    def test_not_a_database(self) -> None:
        """A store root whose database is not SQLite is refused."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "nix", "var", "nix", "db"))
        with open(os.path.join(root, "nix", "var", "nix", "db", "db.sqlite"), "w") as f:
            f.write("junk")
        self.assertOneLineExit(["--store-root", root], "db.sqlite")

    def test_missing_key(self) -> None:
        """A missing secret key file is named."""
        path = os.path.abspath(self.mktemp())
        self.assertOneLineExit(["--secret-key-file", path], path)

    def test_malformed_key(self) -> None:
        """A file that is not a Nix secret key is named, without its content."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("name:c2VjcmV0\n")
        self.assertOneLineExit(["--secret-key-file", path], path)


class _FailingListener(Service):
    """A child whose start fails the way a port in use does."""

    def privilegedStartService(self) -> None:
        raise ListenError("cannot listen on [::]:9999: in use")

    def startService(self) -> None:
        raise ListenError("cannot listen on [::]:9999: in use")


class StartupErrorTests(SynchronousTestCase):
    """Listen errors at start become one-line exits in the foreground."""

    def wrapped(self, foreground: bool) -> Any:
        inner = MultiService()
        _FailingListener().setServiceParent(inner)
        return tap._StartupErrors(inner, foreground=foreground)

    def test_foreground(self) -> None:
        """In the foreground a listen error exits with one line."""
        for start in ("privilegedStartService", "startService"):
            error = self.assertRaises(SystemExit, getattr(self.wrapped(True), start))
            self.assertEqual(str(error.code), "peernix: error: cannot listen on [::]:9999: in use")

    def test_daemon(self) -> None:
        """A daemonising twistd gets the exception itself, to report to its parent."""
        self.assertRaises(ListenError, self.wrapped(False).privilegedStartService)

    def test_foreground_from_parent(self) -> None:
        """The process is in the foreground under twist or twistd --nodaemon, not a daemonising twistd."""
        options = tap.Options()
        self.assertTrue(tap.runs_in_foreground(options))
        options.parent = {"nodaemon": 1}  # type: ignore[assignment]
        self.assertTrue(tap.runs_in_foreground(options))
        options.parent = {"nodaemon": 0}  # type: ignore[assignment]
        self.assertFalse(tap.runs_in_foreground(options))
        options.parent = {"reactor": None}  # type: ignore[assignment]
        self.assertTrue(tap.runs_in_foreground(options))


class TacTests(SynchronousTestCase):
    """:func:`tap.application_from_environment`, the body of peernix.tac."""

    def test_bad_config(self) -> None:
        """A missing $PEERNIX_CONFIG file exits with one line naming it."""
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(SystemExit, tap.application_from_environment, {"PEERNIX_CONFIG": path})
        self.assertIn(path, str(error.code))
        self.assertNotIn("\n", str(error.code))

    def test_tac_file(self) -> None:
        """peernix.tac uses application_from_environment."""
        path = os.path.join(SOURCE_ROOT, "peernix.tac")
        if not os.path.exists(path):
            raise self.skipTest("not running from a source tree")
        with open(path) as f:
            self.assertIn("application_from_environment(os.environ)", f.read())


class GlobalReactorTests(SynchronousTestCase):
    """Only peernix.tap may import the global reactor."""

    def test_only_tap(self) -> None:
        """No other non-test module of peernix imports ``twisted.internet.reactor``."""
        package = os.path.dirname(os.path.abspath(peernix.__file__))
        offenders = []
        for directory, _dirs, files in os.walk(package):
            if os.path.basename(directory) == "test":
                continue
            for name in files:
                path = os.path.join(directory, name)
                if not name.endswith(".py") or path == os.path.abspath(tap.__file__):
                    continue
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and (
                        node.module == "twisted.internet.reactor"
                        or (node.module == "twisted.internet"
                            and any(alias.name == "reactor" for alias in node.names))
                    ):
                        offenders.append(path)
                    elif isinstance(node, ast.Import) and any(
                        alias.name == "twisted.internet.reactor" for alias in node.names
                    ):
                        offenders.append(path)
        self.assertEqual(offenders, [])


class CommandLineTests(SynchronousTestCase):
    """The real twistd and twist commands print one line and exit non-zero."""

    def run_command(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` with this source tree first on the path, from a scratch directory."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = dict(os.environ)
        env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
                              stdin=subprocess.DEVNULL)

    def assertOneLine(self, result: subprocess.CompletedProcess[str], *fragments: str) -> None:
        """Assert stderr is one ``peernix: error:`` line holding ``fragments``, status 1."""
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("peernix: error: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        self.assertNotIn("Usage:", result.stdout)

    def test_twistd_bad_option(self) -> None:
        """``twistd -n peernix --port nonsense`` prints one line and exits 1."""
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        self.assertOneLine(self.run_command([*twistd, "-n", "--pidfile=", "peernix", "--port", "nonsense"]),
                           "--port")

    def test_twist_missing_store(self) -> None:
        """``twist peernix --store-root /nonexistent`` prints one line and exits 1."""
        missing = os.path.abspath(self.mktemp())
        self.assertOneLine(
            self.run_command([sys.executable, "-m", "twisted", "peernix", "--store-root", missing]),
            missing,
        )


class HappyPathTests(TestCase):
    """makeService on a real chroot store serves the cache on a real loopback socket."""

    skip = SKIP_NO_NIX

    async def test_serves(self) -> None:
        """The service from makeService serves the store's nix-cache-info and narinfos."""
        store = ChrootStore(os.path.abspath(self.mktemp()))
        self.addCleanup(store.remove)
        path = store.add_text("hello", "hello, peers\n")
        # No broadcast or mDNS: test traffic stays on loopback.
        options = parse(["--store-root", store.root, "--port", "0", "--interface", "127.0.0.1",
                         "--priority", "41", "--no-broadcast", "--no-mdns", "--udp-port", "0", "--upstream", "none"])
        service = tap.makeService(options)
        self.assertTrue(IService.providedBy(service))
        inner = list(service)[0]  # type: ignore[call-overload]
        self.assertIsInstance(inner, PeernixService)
        service.startService()
        self.addCleanup(service.stopService)
        port = inner.listeners[0].port.getHost().port
        response = await Agent(global_reactor).request(
            b"GET", b"http://127.0.0.1:%d/nix-cache/nix-cache-info" % (port,))
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"Priority: 41", body)
        hash_part = os.path.basename(path)[:32].encode()
        response = await Agent(global_reactor).request(
            b"GET", b"http://127.0.0.1:%d/nix-cache/%s.narinfo" % (port, hash_part))
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"StorePath: " + path.encode() + b"\n", body)
