"""
Real peernix daemons for end-to-end tests: ``python -m twisted peernix ...``
as a subprocess, optionally inside a test network namespace.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import peernix
from peernix.test.netns import Host

class _Destroyable(Protocol):
    def destroy(self) -> None: ...


class _Startable(_Destroyable, Protocol):
    def start(self) -> None: ...


_F = TypeVar("_F", bound=_Destroyable)
_S = TypeVar("_S", bound=_Startable)
_SHARED: dict[str, Any] = {}


def shared_fixture(key: str, make: Callable[[], _F]) -> _F:
    """
    Build an expensive end-to-end fixture (stores, daemons, namespaces) once
    per test process, on first use: trial has no ``setUpClass``.

    :param key: one per fixture, e.g. the test module's ``__name__``.
    :param make: builds (and starts) it; its ``destroy()`` runs at exit,
        also when ``make`` fails half-way it must clean up itself.
    :returns: the fixture, the same object for every call with ``key``.
    """
    if key not in _SHARED:
        fixture = make()
        atexit.register(fixture.destroy)
        _SHARED[key] = fixture
    fixture_: _F = _SHARED[key]
    return fixture_


def start_fixture(fixture: _S) -> _S:
    """
    Start ``fixture`` (``start()``); if that fails half-way, ``destroy()``
    what it made before the error goes on.

    :returns: ``fixture``, running.
    """
    try:
        fixture.start()
    except BaseException:
        fixture.destroy()
        raise
    return fixture


#: The directory holding the ``peernix`` package (and ``twisted/plugins``).
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peernix.__file__)))


#: Ports tests listen on: below Linux's default ephemeral range (32768-60999),
#: so an outgoing connection's local port (of this or a parallel test run)
#: never takes a port between free_port() and the daemon's bind.
_TEST_PORTS = (20000, 32000)


def _ipv6_works() -> bool:
    """:returns: whether an IPv6 socket can be bound here at all."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
    except OSError:
        return False
    return True


def free_port() -> int:
    """
    :returns: a port that was free a moment ago for TCP on 127.0.0.1 and on
        every address (IPv4 and IPv6), and for UDP, chosen at random outside
        the ephemeral port range.
    """
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(*_TEST_PORTS)
        probes = [(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"), (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
                  (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")]
        if _ipv6_works():
            probes.append((socket.AF_INET6, socket.SOCK_STREAM, "::"))
        try:
            for family, kind, address in probes:
                with socket.socket(family, kind) as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port


def http_get(url: str, host: Host | None = None, timeout: float = 5.0,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """
    GET ``url`` (from inside ``host``'s namespace when given).

    :returns: ``(status, body)``; status 0 when the connection failed.
    """
    if host is None:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError):
            return 0, b""
    script = (
        "import sys,urllib.request,urllib.error\n"
        "try:\n"
        f" r=urllib.request.urlopen(urllib.request.Request({url!r},headers={headers or {}!r}),timeout={timeout})\n"
        " sys.stdout.buffer.write(str(r.status).encode()+b'\\n'+r.read())\n"
        "except urllib.error.HTTPError as e:\n"
        " sys.stdout.buffer.write(str(e.code).encode()+b'\\n'+e.read())\n"
        "except OSError:\n"
        " sys.stdout.buffer.write(b'0\\n')\n"
    )
    done = subprocess.run(host.command([sys.executable, "-c", script]), capture_output=True,
                          timeout=timeout + 10)
    status, _, body = done.stdout.partition(b"\n")
    return int(status or b"0"), body


class Daemon:
    """
    One running peernix.  ``args`` are its command-line options; the log goes
    to ``log_path``.  Call :meth:`stop` (tests use ``addCleanup``).
    """

    def __init__(self, args: Sequence[str], log_path: str, *, port: int,
                 host: Host | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.host = host
        self.log_path = log_path
        environ = dict(os.environ)
        environ["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + environ.get("PYTHONPATH", "")
        environ.update(env or {})
        argv = [sys.executable, "-m", "twisted", "peernix", "--port", str(port), *args]
        if not any(a == "--upstream" or a.startswith("--upstream=") for a in args):
            # Test daemons never fetch from the internet: without an
            # --upstream of the test's own, fetching for the LAN is off.
            argv += ["--upstream", "none"]
        if "--state-dir" not in args:
            # Never the machine's /var/lib/peernix: state beside the log.
            argv += ["--state-dir", os.path.abspath(log_path) + ".state"]
        if host is not None:
            argv = host.command(argv)
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=SOURCE_ROOT, env=environ)

    @property
    def address(self) -> str:
        """:returns: the address peers reach this daemon at."""
        return self.host.ipv4 if self.host else "127.0.0.1"

    @property
    def url(self) -> str:
        """:returns: the daemon's cache URL as its local Nix uses it."""
        return f"http://127.0.0.1:{self.port}/nix-cache"

    def log(self) -> str:
        """:returns: what the daemon logged so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """
        Block until ``nix-cache-info`` answers 200.

        :raises RuntimeError: with the daemon's log if it exits or times out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peernix exited with {self.process.returncode}:\n{self.log()}")
            status, _ = http_get(self.url + "/nix-cache-info", self.host, timeout=2)
            if status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"peernix did not become ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon (SIGSTOP to freeze it, SIGCONT to thaw it)."""
        if self.process.poll() is None:
            # Inside a namespace the child of "ip netns exec" is the daemon
            # itself (ip execs), so the pid is the daemon's.
            os.kill(self.process.pid, sig)

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after 10 s) and close its log."""
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
