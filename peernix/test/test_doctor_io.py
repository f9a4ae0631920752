"""
Tests for :mod:`peernix.doctor_io` with real loopback sockets and the real
``/proc/net`` and ``nix-store``: every wait is bounded, proxies from the
environment are ignored, bound sockets are found.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from peernix.doctor import (OK, SKIPPED, WARNING, CheckResult, HttpAnswer, check_nix_version, parse_version,
                            run_checks)
from peernix.doctor_io import MAX_BODY, gather, http_get, nix_version, read_sockets
from peernix.options import Config


class _Server:
    """A TCP server on 127.0.0.1 running ``handle(connection)`` for each client in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        # accept() wakes up now and then to see whether the server was closed.
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(None)
            with connection:
                try:
                    self.handle(connection)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def read_request(connection: socket.socket) -> bytes:
    """:returns: the request head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class HttpGetTests(SynchronousTestCase):
    """http_get: bounded, never raising, no proxy."""

    def server(self, handle: Callable[[socket.socket], None]) -> str:
        server = _Server(handle)
        self.addCleanup(server.close)
        return f"http://127.0.0.1:{server.port}"

    def test_answer_and_error_status(self) -> None:
        """A 200 and a 404 come back with status and body."""
        def handle(connection: socket.socket) -> None:
            head = read_request(connection)
            status = b"200 OK" if b"GET /ok " in head else b"404 Not Found"
            connection.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")

        base = self.server(handle)
        answer = http_get(base + "/ok", 5)
        self.assertEqual((answer.status, answer.body, answer.ok), (200, b"hello", True))
        self.assertEqual(http_get(base + "/missing", 5).status, 404)

    def test_refused(self) -> None:
        """Nothing listening: an error, no status."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        answer = http_get(f"http://127.0.0.1:{port}/x", 5)
        self.assertIsNone(answer.status)
        self.assertIn("refused", answer.error or "")

    def test_silent_server(self) -> None:
        """A server that never answers: given up after the timeout."""
        release = threading.Event()
        base = self.server(lambda connection: (read_request(connection), release.wait(30)) and None)
        # Cleanups run last-in first-out: release the handler before joining the server.
        self.addCleanup(release.set)
        start = time.monotonic()
        answer = http_get(base + "/x", 0.5)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIsNone(answer.status)
        self.assertIn("0.5 s", answer.error or "")

    def test_trickling_body(self) -> None:
        """A body trickling a byte at a time: given up soon after the timeout, not when it ends."""
        release = threading.Event()

        def handle(connection: socket.socket) -> None:
            read_request(connection)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not release.wait(0.1):
                connection.sendall(b"x")

        base = self.server(handle)
        self.addCleanup(release.set)
        start = time.monotonic()
        answer = http_get(base + "/x", 0.5)
        self.assertLess(time.monotonic() - start, 10)
        self.assertIsNone(answer.status)
        self.assertIn("did not come", answer.error or "")

    def test_body_cap(self) -> None:
        """No more than MAX_BODY bytes are read."""
        def handle(connection: socket.socket) -> None:
            read_request(connection)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 4096))
            connection.sendall(b"x" * (MAX_BODY + 4096))

        answer = http_get(self.server(handle) + "/x", 10)
        self.assertEqual(len(answer.body), MAX_BODY)

    def test_redirect_not_followed(self) -> None:
        """A redirect is reported as its status, not followed."""
        def handle(connection: socket.socket) -> None:
            read_request(connection)
            connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1/x\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")

        answer = http_get(self.server(handle) + "/x", 5)
        self.assertEqual(answer.status, 302)
        self.assertFalse(answer.ok)

    def test_hostile_json(self) -> None:
        """A deeply nested document is no JSON to the doctor, not a crash."""
        self.assertIsNone(HttpAnswer("http://x", 200, b"[" * 100000 + b"]" * 100000).json())

    def test_no_proxy(self) -> None:
        """http_proxy in the environment is ignored: LAN and loopback addresses are asked directly."""
        def restore(name: str, old: str | None) -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
            self.addCleanup(restore, name, os.environ.get(name))
        os.environ["http_proxy"] = os.environ["HTTP_PROXY"] = "http://127.0.0.1:1"
        os.environ.pop("no_proxy", None)
        os.environ.pop("NO_PROXY", None)

        def handle(connection: socket.socket) -> None:
            read_request(connection)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

        self.assertEqual(http_get(self.server(handle) + "/x", 5).status, 200)


class SystemTests(SynchronousTestCase):
    """The real /proc/net and nix-store."""

    def test_read_sockets(self) -> None:
        """A bound UDP socket and a listening TCP socket on loopback are found."""
        if not os.path.exists("/proc/net/tcp"):
            raise self.skipTest("no /proc/net (not Linux)")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket()
        self.addCleanup(udp.close)
        self.addCleanup(tcp.close)
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        sockets = read_sockets()
        self.assertIn(("127.0.0.1", udp.getsockname()[1]), sockets.udp_bound)
        self.assertIn(("127.0.0.1", tcp.getsockname()[1]), sockets.tcp_listening)

    def test_nix_version(self) -> None:
        """The real nix-store on PATH prints a version the doctor reads."""
        if shutil.which("nix-store") is None:
            raise self.skipTest("nix-store is not on PATH")
        output, error = nix_version()
        self.assertIsNone(error)
        self.assertIsNotNone(parse_version(output or ""))

    def test_both_nix_generations(self) -> None:
        """The real Nix clients' versions are read: Debian's (2.8: a warning, no Accept-Encoding), 2.24's (ok)."""
        old = os.environ.get("PATH", "")
        self.addCleanup(os.environ.__setitem__, "PATH", old)
        found = 0
        for directory in ("/usr/bin", "/opt/nix-modern/bin"):
            if not os.path.exists(os.path.join(directory, "nix-store")):
                continue
            os.environ["PATH"] = directory
            output, error = nix_version()
            version = parse_version(output or "")
            self.assertIsNotNone(version, output)
            assert version is not None
            result = check_nix_version(output, error)
            self.assertEqual(result.status, WARNING if version < (2, 14) else OK, result.line())
            self.assertEqual(result.details["accept_encoding"], version >= (2, 14))
            found += 1
        if not found:
            raise self.skipTest("neither /usr/bin/nix-store nor /opt/nix-modern/bin/nix-store exists")

    def test_nix_missing(self) -> None:
        """No Nix on PATH: no output, and a reason naming both commands."""
        old = os.environ.get("PATH", "")
        self.addCleanup(os.environ.__setitem__, "PATH", old)
        os.environ["PATH"] = os.path.abspath(self.mktemp())
        output, error = nix_version()
        self.assertIsNone(output)
        self.assertIn("nix-store not found", error or "")
        self.assertIn("nix not found", error or "")


class UpstreamProbeTests(SynchronousTestCase):
    """
    ``peernix doctor``'s "upstreams" check with the daemon's real
    ``--upstream`` setting: gathered with real requests to an upstream on
    127.0.0.1 that answers and to a port on 127.0.0.1 where nothing listens.
    """

    def setUp(self) -> None:
        def cache(connection: socket.socket) -> None:
            head = read_request(connection)
            body = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
            status = b"200 OK" if head.startswith(b"GET /cache/nix-cache-info ") else b"404 Not Found"
            connection.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                               % len(body) + body)

        self.server = _Server(cache)
        self.addCleanup(self.server.close)
        # A port nothing listens on: bound, then closed.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.dead_port = probe.getsockname()[1]
        probe.close()
        self.conf_dir = self.mktemp()
        os.makedirs(self.conf_dir)
        with open(os.path.join(self.conf_dir, "nix.conf"), "w") as f:
            f.write(f"substituters = http://127.0.0.1:{self.dead_port}/nix-cache\n")

    def gather(self, config: Config) -> CheckResult:
        facts = gather(config, timeout=2.0, env={"NIX_CONF_DIR": self.conf_dir}, addresses=("127.0.0.1",),
                       run=lambda *a, **kw: subprocess.CompletedProcess(a, 0, "nix-store (Nix) 2.24.9\n", ""),
                       read_proc=lambda path: "")
        return {r.name: r for r in run_checks(facts)}["upstreams"]

    def test_reachable_and_unreachable(self) -> None:
        """One upstream answering nix-cache-info, one refusing: a warning naming only the dead one."""
        good = f"http://127.0.0.1:{self.server.port}/cache"
        dead = f"http://127.0.0.1:{self.dead_port}/cache"
        result = self.gather(Config(port=self.dead_port, upstream=(good,)))
        self.assertEqual(result.status, OK, result.line())
        self.assertIn(good, result.summary)
        result = self.gather(Config(port=self.dead_port, upstream=(good, dead)))
        self.assertEqual(result.status, WARNING, result.line())
        self.assertEqual(result.details["upstreams"], [good, dead])
        self.assertEqual(len(result.details["failing"]), 1)
        self.assertTrue(result.details["failing"][0].startswith(dead), result.details)
        self.assertNotIn(good + " (", result.summary)

    def test_off(self) -> None:
        """--upstream none: the check is skipped, saying LAN fetch is off."""
        result = self.gather(Config(port=self.dead_port, upstream=()))
        self.assertEqual(result.status, SKIPPED)
        self.assertIn("off", result.summary)
