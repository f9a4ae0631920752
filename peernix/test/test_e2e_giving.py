"""
End to end on loopback, a real ``twist peernix`` per test: ``--max-upload-rate``
measured on real sockets, and the savings state surviving a restart.

Peers are clients from another loopback address (127.0.0.2, with
``--proxy-client 127.0.0.1/32``): to the daemon they are peers, as a machine
across the LAN would be.  The local client is 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.test.daemon import Daemon, free_port, http_get
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore

#: A peer: any loopback address but 127.0.0.1.
PEER = "127.0.0.2"
#: Any valid key: nothing here is fetched from peers.
SOME_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
#: The cap under test, bytes per second (``--max-upload-rate 2M``).
RATE = 2_000_000
#: Concurrent peer downloads.
STREAMS = 4
#: The size of the file served, bytes: big enough that every stream is still
#: running at the end of the measurement (4 streams share 2 MB/s: 0.5 MB/s each).
FILE_SIZE = 5_000_000
#: The measurement window, seconds after the downloads started: the first
#: second (the bucket's initial burst, connection set-up) is left out.
WINDOW = (1.0, 5.0)


def get(source: str, port: int, path: str, headers: dict[str, str] | None = None,
        progress: list[tuple[float, int]] | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """
    GET ``path`` from the daemon on 127.0.0.1 from the loopback address ``source``,
    reading the body in 16 KiB reads, noting ``(monotonic time, bytes so far)``
    after each in ``progress``.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        parts: list[bytes] = []
        got = 0
        while True:
            chunk = response.read(16384)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            if progress is not None:
                progress.append((time.monotonic(), got))
        return response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(parts)
    finally:
        conn.close()


def bytes_at(progress: list[tuple[float, int]], t: float) -> int:
    """:returns: the bytes received by monotonic time ``t`` according to ``progress``."""
    got = 0
    for when, total in progress:
        if when > t:
            break
        got = total
    return got


class GivingEndToEndTests(SynchronousTestCase):
    """A real daemon caps what it gives peers, not what it gives its own machine, and keeps its savings."""

    skip = SKIP_NO_NIX

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.store = ChrootStore(os.path.join(self.tmp, "store"))
        self.path = self.store.add_text("big-file", os.urandom(FILE_SIZE))
        self.hash_part = self.path.rsplit("/", 1)[-1][:32]
        self.state_dir = os.path.join(self.tmp, "state")

    def start(self, *extra: str) -> Daemon:
        port = free_port()
        daemon = Daemon(
            ["--store-root", self.store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(port),
             "--proxy-client", "127.0.0.1/32", "--trusted-public-key", SOME_KEY, "--share", "all",
             "--state-dir", self.state_dir, "--access-log", *extra],
            os.path.join(self.tmp, f"daemon-{port}.log"), port=port)
        self.addCleanup(daemon.stop)
        daemon.wait_ready()
        return daemon

    def nar_path(self, daemon: Daemon) -> str:
        """:returns: the NAR URL path of the big file, from its narinfo (asked as a local client)."""
        status, headers, body = get("127.0.0.1", daemon.port, f"/nix-cache/{self.hash_part}.narinfo")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-peernix-source"), "local")
        url = re.search(rb"^URL: (\S+)$", body, re.M)
        assert url is not None
        return "/nix-cache/" + url.group(1).decode()

    def status(self, daemon: Daemon) -> dict[str, Any]:
        status, body = http_get(f"http://127.0.0.1:{daemon.port}/status.json")
        self.assertEqual(status, 200)
        document: dict[str, Any] = json.loads(body)
        return document

    def test_upload_cap(self) -> None:
        """
        Four concurrent peer downloads together get 2 MB/s within 10 % over
        four seconds, each about a quarter; a local client's download at the
        same time is not held back.
        """
        daemon = self.start("--max-upload-rate", "2M")
        nar = self.nar_path(daemon)
        progress: list[list[tuple[float, int]]] = [[] for _ in range(STREAMS)]
        results: list[Any] = [None] * STREAMS

        def download(index: int) -> None:
            try:
                results[index] = get(PEER, daemon.port, nar, progress=progress[index])
            except Exception as e:  # reported by the assertions below
                results[index] = e

        threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(STREAMS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        # A local client in the middle of it: never limited.
        time.sleep(2.0)
        local_start = time.monotonic()
        status, headers, body = get("127.0.0.1", daemon.port, nar)
        local_seconds = time.monotonic() - local_start
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-peernix-source"), "local")
        nar_size = len(body)
        self.assertGreater(nar_size, FILE_SIZE)
        # At the cap it would take nar_size / RATE (2.5 s); unlimited it takes a fraction of that.
        self.assertLess(local_seconds, nar_size / RATE / 2, "the local client was held back")
        for thread in threads:
            thread.join(60)
        for result in results:
            self.assertIsInstance(result, tuple, result)
            self.assertEqual((result[0], len(result[2])), (200, nar_size))
        first, last = started + WINDOW[0], started + WINDOW[1]
        shares = [bytes_at(p, last) - bytes_at(p, first) for p in progress]
        for p in progress:
            # Every stream was still running at the end of the window.
            self.assertGreater(p[-1][0], last)
        measured = sum(shares) / (last - first)
        self.assertGreater(measured, RATE * 0.9, f"{measured:.0f} B/s, shares {shares}")
        self.assertLess(measured, RATE * 1.1, f"{measured:.0f} B/s, shares {shares}")
        for share in shares:
            # Fair: each within a third of an even share (the turns are 64 KiB).
            self.assertGreater(share, sum(shares) / STREAMS * 0.67, shares)
        savings = self.status(daemon)["savings"]
        self.assertEqual(savings["bytes_to_peers"], STREAMS * nar_size)
        self.assertEqual(self.status(daemon)["giving"]["max_upload_rate"], RATE)

    def test_savings_survive_restart(self) -> None:
        """NAR bytes given to a peer are still on the status page after the daemon restarted."""
        daemon = self.start()
        nar = self.nar_path(daemon)
        status, headers, body = get(PEER, daemon.port, nar)
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-peernix-source"), "local")
        before = self.status(daemon)["savings"]
        self.assertEqual(before["bytes_to_peers"], len(body))
        self.assertEqual(before["top_paths"][0]["path"], self.path.rsplit("/", 1)[-1])
        # The access log names the source too.
        self.assertIn('source="local"', daemon.log())
        daemon.stop()
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "savings.json")))
        again = self.start()
        after = self.status(again)["savings"]
        self.assertEqual(after["bytes_to_peers"], len(body))
        self.assertEqual(after["since"], before["since"])
        self.assertEqual(after["today"]["bytes_to_peers"], len(body))
        self.assertEqual(after["top_paths"], before["top_paths"])
