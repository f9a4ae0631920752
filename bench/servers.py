"""
Start and stop the servers the benchmark compares: nginx over the file
cache, the minimal ``twisted.web`` server, and peernix daemons.  Every
server listens on 127.0.0.1 only.  Every process started here is recorded
so :func:`stop_all` can clean up on exit, on an error and on Ctrl-C
(frozen daemons are sent SIGCONT before they are stopped).
"""

from __future__ import annotations

import os
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from bench.fixtures import Fixture
from peernix.test.daemon import free_port as free_port  # re-exported for bench.soak

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The repository root: peernix runs from here (``python -m twisted peernix``).
REPO_ROOT = os.path.dirname(_HERE)


class Unavailable(Exception):
    """A server could not be started; the message says why (and holds its log)."""


def http_status(url: str, timeout: float = 2.0) -> int:
    """:returns: the status of a GET of ``url``; 0 when the connection failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def netns_http_status(netns: str, url: str, timeout: float = 2.0) -> int:
    """:returns: the status of a GET of ``url`` made with curl inside ``netns``; 0 when it failed."""
    try:
        done = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "--max-time",
                               str(timeout), "-w", "%{http_code}", url], capture_output=True, timeout=timeout + 10)
        return int(done.stdout.decode().strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


class Server:
    """
    One server subprocess.

    :ivar name: a label for logs and error messages.
    :ivar port: its TCP port on 127.0.0.1.
    :ivar cache_url: the binary cache URL (``http://127.0.0.1:P/nix-cache``).
    :ivar process: the subprocess; ``process.pid`` is the serving process.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: str,
                 env: dict[str, str] | None = None, cwd: str | None = None, *,
                 netns: str | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.port = port
        #: The network namespace it runs in (``None``: the bench's own).
        self.netns = netns
        self.host = host
        self.cache_url = f"http://{host}:{port}/nix-cache"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.frozen = False
        if netns is not None:
            # ip netns exec execs the command: the pid stays the server's.
            argv = ["ip", "netns", "exec", netns, *argv]
        self.process = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                        start_new_session=True)
        _RUNNING.append(self)

    def log(self) -> str:
        """:returns: the last 3000 characters the server logged."""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def wait_ready(self, probe_path: str, timeout: float = 30.0) -> None:
        """
        Block until GET ``probe_path`` (relative to the port's root) answers 200.

        :raises Unavailable: with the server's log when it exits or times out.
        """
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.port}{probe_path}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"{self.name} exited with {self.process.returncode}: {self.log()}")
            status = http_status(url, timeout=2) if self.netns is None else netns_http_status(self.netns, url)
            if status == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise Unavailable(f"{self.name} did not answer {url} within {timeout:.0f} s: {self.log()}")

    def freeze(self) -> None:
        """SIGSTOP the server (a hung peer)."""
        self.frozen = True
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        if self.frozen and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        """Stop the server (SIGCONT, SIGTERM, SIGKILL after 5 s) and forget it."""
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGCONT)
                self.process.terminate()
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            except ProcessLookupError:
                pass
        self.frozen = False
        self._log.close()
        if self in _RUNNING:
            _RUNNING.remove(self)


_RUNNING: list[Server] = []


def stop_all() -> None:
    """Stop every server still running (thawing frozen ones first)."""
    for s in list(_RUNNING):
        try:
            s.stop()
        except OSError:
            pass


def check_tools() -> list[str]:
    """:returns: a message per missing server tool (empty when all are there)."""
    missing = []
    if shutil.which("nginx") is None and not os.access("/usr/sbin/nginx", os.X_OK):
        missing.append("nginx not found (Debian: apt-get install nginx-light)")
    if shutil.which("wrk") is None:
        missing.append("wrk not found (Debian: apt-get install wrk)")
    if shutil.which("curl") is None:
        missing.append("curl not found (Debian: apt-get install curl)")
    return missing


def start_nginx(fixture: Fixture, workdir: str, *, netns: str | None = None, listen: str = "127.0.0.1") -> Server:
    """
    Serve ``fixture.file_cache`` with nginx (one worker, our own config,
    ``listen`` only, 127.0.0.1 by default) at ``http://LISTEN:P/nix-cache/``.

    :param netns: the network namespace to run it in (``None``: ours).

    :raises Unavailable: when nginx is missing or does not start.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        raise Unavailable("nginx not found (Debian: apt-get install nginx-light)")
    prefix = os.path.join(workdir, "nginx" if netns is None else f"nginx-{netns}")
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    with open(os.path.join(_HERE, "nginx.conf.tmpl")) as f:
        template = string.Template(f.read())
    # As root, nginx workers would switch to "nobody", who may not be able to
    # read the fixture; keep them root (they only serve 127.0.0.1).
    conf = template.substitute(port=port, prefix=prefix, listen=listen, cache_dir=fixture.file_cache,
                               user_line="user root;" if os.geteuid() == 0 else "")
    conf_path = os.path.join(prefix, "nginx.conf")
    with open(conf_path, "w") as f:
        f.write(conf)
    server = Server("nginx", [nginx, "-p", prefix, "-c", conf_path, "-e", os.path.join(prefix, "error.log")],
                    port, os.path.join(workdir, "nginx.log" if netns is None else f"nginx-{netns}.log"),
                    netns=netns, host=listen)
    server.wait_ready("/nix-cache/nix-cache-info", timeout=10)
    return server


def start_minimal_web(workdir: str) -> Server:
    """
    Start the fixed-600-byte ``twisted.web`` server (``bench/minimal_web.py``).

    :raises Unavailable: when it does not start.
    """
    port = free_port()
    server = Server("twisted.web minimal", [sys.executable, "-m", "bench.minimal_web", str(port)],
                    port, os.path.join(workdir, "minimal-web.log"), cwd=REPO_ROOT)
    server.wait_ready("/nix-cache/nix-cache-info", timeout=15)
    return server


def spawn_peernix(name: str, store_root: str, workdir: str, *, secret_key_file: str | None = None,
                  peers: Sequence[str] = (), trusted_public_keys: Sequence[str] = (),
                  netns: str | None = None, host: str = "127.0.0.1") -> Server:
    """
    Start ``python -m twisted peernix`` from the repository root (without
    waiting for it; call :func:`wait_peernix`).  Discovery by broadcast and
    mDNS is off; its UDP port is a free one.

    :param peers: peer base URLs, e.g. ``http://127.0.0.1:Q``.
    :param netns: the network namespace to run it in (``None``: ours);
        ``host`` is then the address the bench reaches it at.
    """
    port = free_port()
    argv = [sys.executable, "-m", "twisted", "peernix", "--port", str(port),
            "--store-root", store_root, "--no-broadcast", "--no-mdns", "--udp-port", str(free_port()),
            "--upstream", "none"]
    if secret_key_file is not None:
        argv += ["--secret-key-file", secret_key_file]
    for peer in peers:
        argv += ["--peer", peer]
    for key in trusted_public_keys:
        argv += ["--trusted-public-key", key]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return Server(f"peernix {name}", argv, port, os.path.join(workdir, f"peernix-{name}.log"),
                  env=env, cwd=REPO_ROOT, netns=netns, host=host)


def wait_peernix(server: Server, timeout: float = 30.0) -> Server:
    """
    Wait until a peernix answers ``/nix-cache/nix-cache-info``.

    :raises Unavailable: with its log if it exits or does not answer in time.
    """
    server.wait_ready("/nix-cache/nix-cache-info", timeout=timeout)
    return server


def base_url(server: Server) -> str:
    """:returns: the URL peers use for ``server`` (``http://127.0.0.1:P``, or its namespace address)."""
    return f"http://{server.host}:{server.port}"
