"""
Tests for :mod:`peernix.logging` (JSON log lines, telling twist and twistd
the format) and for what the daemon logs: never key material.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from typing import Any

from twisted.application.service import Application, IService, MultiService, Service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    Logger,
    capturedLogs,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SynchronousTestCase

from peernix.logging import (
    LogObserverProvider,
    event_as_json_line,
    json_log_observer,
    twistd_log_stream,
    use_log_format,
)
from peernix.nix.signing import SecretKey
from peernix.test.daemon import SOURCE_ROOT, free_port, http_get
from peernix.test.fakes import MemoryStore, run_synchronously
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore, generate_key
from peernix.test.test_service import build, quiet


def event(**fields: Any) -> dict[str, Any]:
    """:returns: a log event as :class:`twisted.logger.Logger` makes them, captured."""
    with capturedLogs() as events:
        Logger(namespace="peernix.test").info(**fields)
    return dict(events[0])


class EventAsJsonLineTests(SynchronousTestCase):
    """:func:`event_as_json_line` writes one flat JSON object per event, on one line."""

    def test_one_line_with_fields(self) -> None:
        """The line holds time, level, namespace, the rendered message and every field by name."""
        line = event_as_json_line(event(format="peer {peer} answered in {seconds}s", peer="http://192.0.2.7:9999",
                                        seconds=0.25))
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "peernix.test")
        self.assertEqual(record["message"], "peer http://192.0.2.7:9999 answered in 0.25s")
        self.assertEqual(record["peer"], "http://192.0.2.7:9999")
        self.assertEqual(record["seconds"], 0.25)
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_time_is_utc(self) -> None:
        """``time`` is the event's own timestamp in UTC."""
        record = json.loads(event_as_json_line({"log_time": 86400.5, "log_format": "x",
                                                "log_level": LogLevel.warn}))
        self.assertEqual(record["time"], "1970-01-02T00:00:00.500000Z")
        self.assertEqual(record["level"], "warn")

    def test_newlines_stay_inside(self) -> None:
        """A message or value with newlines still makes exactly one line."""
        line = event_as_json_line(event(format="two\nlines {x}", x="a\nb"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line)["message"], "two\nlines a\nb")

    def test_failure(self) -> None:
        """An event with a failure gets ``error`` and a ``traceback`` string, still on one line."""
        try:
            raise ValueError("bad thing")
        except ValueError:
            failure = Failure()
        with capturedLogs() as events:
            Logger(namespace="peernix.test").failure("while doing {what}", failure, what="x")
        self.flushLoggedErrors(ValueError)
        line = event_as_json_line(dict(events[0]))
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["error"], "ValueError: bad thing")
        self.assertIn("Traceback", record["traceback"])
        self.assertEqual(record["what"], "x")

    def test_odd_values(self) -> None:
        """Values that are not JSON data become their (shortened) repr; nested data stays data."""
        record = json.loads(event_as_json_line(event(
            format="odd", obj=object(), big=list(range(3)), table={"a": (1, 2)}, data=b"\x00",
            nan=float("nan"), long="x" * 5, huge=("y" * 5000).encode(),
        )))
        self.assertTrue(record["obj"].startswith("<object object"))
        self.assertEqual(record["big"], [0, 1, 2])
        self.assertEqual(record["table"], {"a": [1, 2]})
        self.assertEqual(record["data"], "b'\\x00'")
        self.assertEqual(record["nan"], "nan")
        self.assertEqual(record["long"], "xxxxx")
        self.assertLess(len(record["huge"]), 1100)

    def test_legacy_system(self) -> None:
        """Events of Twisted's legacy log keep their ``system``."""
        record = json.loads(event_as_json_line({"log_format": "hi", "log_system": "HTTPChannel,0,127.0.0.1",
                                                "log_time": 0.0}))
        self.assertEqual(record["system"], "HTTPChannel,0,127.0.0.1")
        self.assertEqual(record["message"], "hi")

    def test_observer_writes_lines(self) -> None:
        """:func:`json_log_observer` writes one line per event to text and binary files."""
        text = io.StringIO()
        binary = io.BytesIO()
        for stream in (text, binary):
            observer = json_log_observer(stream)
            self.assertTrue(ILogObserver.providedBy(observer))
            observer(event(format="one"))
            observer(event(format="two"))
        for written in (text.getvalue(), binary.getvalue().decode("utf-8")):
            self.assertEqual([json.loads(line)["message"] for line in written.splitlines()], ["one", "two"])


def twistd_options(*argv: str) -> ServerOptions:
    """:returns: twistd's options after parsing ``argv`` (without a sub-command)."""
    options = ServerOptions()
    options.parseOptions(list(argv))
    return options


class UseLogFormatTests(SynchronousTestCase):
    """:func:`use_log_format` tells twist or twistd which observer to use."""

    def test_twist_json(self) -> None:
        """Under twist, ``json`` replaces twist's observer factory with peernix's JSON lines."""
        service = Service()
        twist_options: dict[str, Any] = {"fileLogObserverFactory": textFileLogObserver, "logFormat": "text"}
        self.assertIs(use_log_format(service, "json", twist_options), service)
        self.assertIs(twist_options["fileLogObserverFactory"], json_log_observer)
        self.assertEqual(twist_options["logFormat"], "json")

    def test_twist_text(self) -> None:
        """Under twist, ``text`` means Twisted's text lines even where twist would pick JSON (no terminal)."""
        from twisted.logger import jsonFileLogObserver

        twist_options: dict[str, Any] = {"fileLogObserverFactory": jsonFileLogObserver}
        use_log_format(Service(), "text", twist_options)
        self.assertIs(twist_options["fileLogObserverFactory"], textFileLogObserver)

    def test_twistd_json(self) -> None:
        """Under twistd, ``json`` puts the observer on the application twistd creates."""
        service = Service()
        wrapped = use_log_format(service, "json", twistd_options("--nodaemon"))
        self.assertIsInstance(wrapped, LogObserverProvider)
        assert isinstance(wrapped, MultiService)
        self.assertEqual(list(wrapped), [service])
        application = Application("peernix")
        wrapped.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsInstance(observer, FileLogObserver)
        self.assertIs(observer.formatEvent, event_as_json_line)
        self.assertIn(wrapped, list(IService(application)))  # type: ignore[call-overload]

    def test_twistd_json_keeps_existing_observer(self) -> None:
        """An application that already has an observer keeps it."""
        application = Application("peernix")
        mine = json_log_observer(io.StringIO())
        application.setComponent(ILogObserver, mine)
        use_log_format(Service(), "json", twistd_options("--nodaemon")).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), mine)

    def test_twistd_text_or_explicit_logger(self) -> None:
        """twistd keeps its own observer for ``text``, with ``--logger`` or with ``--syslog``."""
        service = Service()
        self.assertIs(use_log_format(service, "text", twistd_options("--nodaemon")), service)
        self.assertIs(use_log_format(service, "json", twistd_options(
            "--nodaemon", "--logger", "twisted.logger.textFileLogObserver")), service)
        self.assertIs(use_log_format(service, "json", {"syslog": True, "logfile": ""}), service)

    def test_no_runner(self) -> None:
        """Without a runner's options (a test calling makeService), logging is left alone."""
        service = Service()
        self.assertIs(use_log_format(service, "json", None), service)

    def test_twistd_stream(self) -> None:
        """JSON goes where twistd's text would: stdout in the foreground, else the log file."""
        self.assertIs(twistd_log_stream(twistd_options("--nodaemon")), sys.stdout)
        self.assertIs(twistd_log_stream(twistd_options("--nodaemon", "--logfile", "-")), sys.stdout)
        path = os.path.abspath(self.mktemp())
        stream = twistd_log_stream(twistd_options("--logfile", path))
        self.addCleanup(stream.close)
        self.assertIsInstance(stream, LogFile)
        json_log_observer(stream)(event(format="to the file"))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.loads(f.read())["message"], "to the file")


class NoSecretsInLogsTests(SynchronousTestCase):
    """The daemon's log never contains the secret key, whatever it serves."""

    def test_service_with_key(self) -> None:
        """Building, starting, serving signed narinfos, the status page and metrics, and stopping log no key material."""
        key = SecretKey("host-peernix-1", os.urandom(32))
        key_file = self.mktemp()
        with open(key_file, "w") as f:
            f.write(key.to_string() + "\n")
        secret_b64 = key.to_string().partition(":")[2]
        root = self.mktemp()
        os.makedirs(root)
        store = MemoryStore(root)
        info = store.add_file("hello", b"hello world\n")
        hash_part = info.path.split("/")[-1][:32]
        with capturedLogs() as events:
            service, reactor = build(self, quiet(secret_key_file=key_file, access_log=True),
                                     store=store, defer_to_thread=run_synchronously)
            self.assertEqual(service.secret_key, key)
            service.startService()
            site = service.site
            responses = []
            for path in (f"/nix-cache/{hash_part}.narinfo", "/nix-cache/nix-cache-info", "/", "/status.json",
                         "/metrics", "/nix-cache/" + "0" * 32 + ".narinfo", "/nix-cache/../etc"):
                address = IPv4Address("TCP", "127.0.0.1", 40000)
                channel = site.buildProtocol(address)
                transport = StringTransport(peerAddress=address)
                channel.makeConnection(transport)
                channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                responses.append(transport.value())
            service.stopService()
        # The narinfo was signed: the key really was used.
        self.assertIn(key.name.encode() + b":", responses[0])
        self.assertIn(b"Sig: " + key.name.encode(), responses[0])
        self.assertGreater(len(events), 0)
        for e in events:
            rendered = formatEvent(e) + event_as_json_line(dict(e)) + repr(e)
            self.assertNotIn(secret_b64, rendered)
            self.assertNotIn(secret_b64[:43], rendered)
            self.assertNotIn(key.seed.hex(), rendered)


class DaemonLogTests(SynchronousTestCase):
    """Real ``twistd`` and ``twist`` daemons log JSON lines with ``--log-format json``, without the key."""

    skip = SKIP_NO_NIX

    def run_daemon(self, runner: list[str], extra: list[str]) -> tuple[list[str], str]:
        """
        Run peernix on a chroot store with a secret key and the access log on,
        make it serve a few requests, stop it.

        :returns: ``(stdout lines, the secret key's base64)``.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        store = ChrootStore(os.path.join(base, "root"))
        self.addCleanup(store.remove)
        path = store.add_text("logged", "contents\n")
        sk, _pk, _public = generate_key(os.path.join(base, "keys"), "logtest-peernix-1")
        with open(sk) as f:
            secret_b64 = f.read().strip().partition(":")[2]
        port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["NIX_CONF_DIR"] = os.path.join(base, "nixconf")
        argv = [*runner, "--port", str(port), "--store-root", store.root, "--secret-key-file", sk,
                "--access-log", "--no-mdns", "--no-broadcast", "--log-format", "json", "--upstream", "none", *extra]
        out_path = os.path.join(base, "out")
        with open(out_path, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=base, env=env)
            try:
                base_url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and process.poll() is None:
                    if http_get(base_url + "/nix-cache/nix-cache-info", timeout=2)[0] == 200:
                        break
                    time.sleep(0.1)
                hash_part = os.path.basename(path)[:32]
                status, body = http_get(f"{base_url}/nix-cache/{hash_part}.narinfo")
                self.assertEqual(status, 200, body)
                self.assertIn(b"Sig: logtest-peernix-1:", body)
                http_get(base_url + "/")
            finally:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(15)
        with open(out_path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines(), secret_b64

    def check(self, lines: list[str], secret_b64: str) -> None:
        """Every line is one JSON object; the start-up line and the access log are there; no key."""
        self.assertTrue(lines, "no output")
        records = []
        for line in lines:
            self.assertNotIn(secret_b64, line)
            self.assertNotIn(secret_b64[:43], line)
            try:
                record = json.loads(line)
            except ValueError:
                self.fail(f"not a JSON line: {line!r}\n" + "\n".join(lines))
            self.assertIsInstance(record, dict)
            self.assertTrue({"time", "level", "namespace", "message"} <= record.keys(), line)
            records.append(record)
        serving = [r for r in records if "url" in r and "serving" in r["message"]]
        self.assertTrue(serving, "\n".join(lines))
        self.assertIsInstance(serving[0]["port"], int)
        self.assertTrue(any(".narinfo" in r["message"] for r in records), "no access log line")

    def test_twistd(self) -> None:
        """``twistd -n peernix --log-format json`` writes JSON lines to stdout."""
        runner = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
                  "--pidfile=", "peernix"]
        self.check(*self.run_daemon(runner, []))

    def test_twist(self) -> None:
        """``twist peernix --log-format json`` writes JSON lines to stdout."""
        self.check(*self.run_daemon([sys.executable, "-m", "twisted", "peernix"], []))
