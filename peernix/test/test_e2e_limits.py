"""
End to end on loopback: the HTTP bounds of a real ``twist peernix``
against real sockets.

The daemon runs with ``--no-broadcast --no-mdns --udp-port <free port>``
(no discovery traffic), ``--proxy-client 127.0.0.1/32`` (only 127.0.0.1 is
a local client), a short ``--header-timeout`` and a small
``--max-connections-per-client``.  Strangers connect from other loopback
addresses (a client socket bound to 127.0.0.2), which Linux routes like
127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import socket
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from peernix.test.daemon import Daemon, free_port, http_get
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore

#: The daemon's ``--header-timeout``, seconds.
HEADER_TIMEOUT = 3.0
#: The daemon's ``--max-connections-per-client``.
PER_CLIENT = 4
#: A stranger (not a proxy client).
STRANGER = "127.0.0.2"
#: Another stranger.
OTHER_STRANGER = "127.0.0.3"
#: Any valid key: nothing here is fetched from peers.
SOME_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="

_shared: Daemon | None = None


def _start() -> Daemon:
    tmp = tempfile.mkdtemp(prefix="peernix-e2e-limits-")
    atexit.register(shutil.rmtree, tmp, True)
    store = ChrootStore(os.path.join(tmp, "store"))
    port = free_port()
    daemon = Daemon(
        ["--store-root", store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(port),
         "--proxy-client", "127.0.0.1/32", "--trusted-public-key", SOME_KEY,
         "--header-timeout", str(HEADER_TIMEOUT), "--max-connections-per-client", str(PER_CLIENT)],
        os.path.join(tmp, "daemon.log"), port=port)
    atexit.register(daemon.stop)
    daemon.wait_ready()
    return daemon


def connection(daemon: Daemon, source: str) -> http.client.HTTPConnection:
    """:returns: a kept-alive HTTP connection to ``daemon`` from the loopback address ``source``."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10, source_address=(source, 0))
    conn.connect()
    return conn


def one_request(daemon: Daemon, source: str) -> http.client.HTTPResponse:
    """:returns: the (read) response to one GET of ``nix-cache-info`` from ``source`` on a new connection."""
    with contextlib.closing(connection(daemon, source)) as conn:
        return get(conn)


def get(conn: http.client.HTTPConnection, path: str = "/nix-cache/nix-cache-info") -> http.client.HTTPResponse:
    """GET ``path`` on ``conn`` and read the whole response (so the connection can be reused)."""
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response


class LimitsEndToEndTests(SynchronousTestCase):
    """A real daemon keeps its bounds on real sockets."""

    skip = SKIP_NO_NIX

    def setUp(self) -> None:
        # trial has no setUpClass: start the daemon once, on first use; it
        # is stopped when the test process exits.
        global _shared
        if _shared is None:
            _shared = _start()
        self.daemon = _shared
        self.wait_no_peer_connections()

    def wait_no_peer_connections(self) -> None:
        """Wait until the daemon counts no open peer connection (earlier tests' sockets are gone)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, body = http_get(f"http://127.0.0.1:{self.daemon.port}/metrics")
            if b'peernix_http_connections{client="peer"} 0.0' in body:
                return
            time.sleep(0.05)
        self.fail("peer connections still counted:\n" + self.daemon.log()[-2000:])

    def test_slowloris_cut_off(self) -> None:
        """A stranger sending a byte a second is cut off after the header timeout; others are served meanwhile."""
        slow = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10,
                                        source_address=(STRANGER, 0))
        self.addCleanup(slow.close)
        start = time.monotonic()
        request = b"GET /nix-cache/nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed_after: float | None = None
        for i in range(int(HEADER_TIMEOUT * 3)):
            try:
                slow.sendall(request[i:i + 1])
            except OSError:
                closed_after = time.monotonic() - start
                break
            # Everybody else is served while the slow client trickles.
            self.assertEqual(http_get(self.daemon.url + "/nix-cache-info")[0], 200)
            self.assertEqual(one_request(self.daemon, OTHER_STRANGER).status, 200)
            slow.settimeout(max(0.0, start + i + 1 - time.monotonic()))
            try:
                data = slow.recv(1024)
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
            self.assertEqual(data, b"", "the slow client got an answer instead of a close")
            closed_after = time.monotonic() - start
            break
        self.assertIsNotNone(closed_after, "the slow client was never cut off")
        assert closed_after is not None
        self.assertGreaterEqual(closed_after, HEADER_TIMEOUT - 0.5)
        self.assertLess(closed_after, HEADER_TIMEOUT + 2.0)

    def test_per_client_cap(self) -> None:
        """Past the per-client cap a stranger gets 503 with Retry-After; 127.0.0.1 and other strangers never do."""
        held = [connection(self.daemon, STRANGER) for _ in range(PER_CLIENT)]
        for conn in held:
            self.addCleanup(conn.close)
            # A complete request: from now on only the idle timeout applies.
            self.assertEqual(get(conn).status, 200)
        for _ in range(3):
            response = one_request(self.daemon, STRANGER)
            self.assertEqual(response.status, 503)
            self.assertEqual(response.getheader("Retry-After"), "5")
            self.assertEqual(response.getheader("Content-Length"), "0")
        self.assertEqual(one_request(self.daemon, OTHER_STRANGER).status, 200)
        # Local connections are never refused, however many.
        local = [connection(self.daemon, "127.0.0.1") for _ in range(PER_CLIENT * 3)]
        for conn in local:
            self.addCleanup(conn.close)
            self.assertEqual(get(conn).status, 200)
            self.assertEqual(get(conn, "/nix-cache/" + "0" * 32 + ".narinfo").status, 404)
        # Closing frees the stranger's places.
        for conn in held:
            conn.close()
        self.wait_no_peer_connections()
        self.assertEqual(one_request(self.daemon, STRANGER).status, 200)
