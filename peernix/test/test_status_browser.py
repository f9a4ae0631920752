"""
The status page in a real headless browser: the web app on a real loopback
socket, Debian's chromium taking a screenshot of ``/`` and dumping its DOM.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

import peernix
from peernix.nix.signing import SecretKey
from peernix.peers.registry import PeerRegistry
from peernix.test.fakes import MemoryStore, run_synchronously
from peernix.web.app import WebApp
from peernix.web.metrics import Metrics

#: The browser: Debian's ``chromium`` (or Ubuntu's name for it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: The window, and so the screenshot, size.
WIDTH, HEIGHT = 1200, 900

#: A peer shown in the table.
PEER_URL = "http://192.0.2.7:9999"


def png_size(data: bytes) -> tuple[int, int]:
    """
    :returns: ``(width, height)`` from a PNG's IHDR chunk.
    :raises ValueError: ``data`` is not a PNG.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_pixel_bytes(data: bytes) -> bytes:
    """:returns: the decompressed image data (filtered scanlines) of a PNG: every IDAT chunk, inflated."""
    offset, idat = 8, b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    return zlib.decompress(idat)


class StatusPageBrowserTests(TestCase):
    """A person's browser renders the status page: version, node key, peers table."""

    skip = None if CHROMIUM else "chromium not installed (apt-get install chromium)"

    def setUp(self) -> None:
        from twisted.internet import reactor

        root = self.mktemp()
        os.makedirs(root)
        store = MemoryStore(root)
        store.add_file("hello", b"hello\n")
        self.key = SecretKey("statustest-peernix-1", bytes(range(32)))
        self.registry = PeerRegistry(reactor)
        peer = self.registry.add(PEER_URL, "udp", public_key="peer-peernix-1:" + "A" * 43 + "=")
        assert peer is not None
        self.registry.record_success(peer, 0.012)
        self.registry.add("http://[2001:db8::7]:9999", "static")
        app = WebApp(
            store,
            reactor=reactor,
            defer_to_thread=run_synchronously,
            secret_key=self.key,
            priority=30,
            metrics=Metrics(),
            store_root=root,
            version=peernix.__version__,
            registry=self.registry,
        )
        self.reactor: Any = reactor
        self.site = Site(app.resource(), reactor=reactor)
        self.site.noisy = False

    async def listen(self) -> str:
        """Serve the app on 127.0.0.1, any free port, until the test ends; :returns: the page's URL."""
        port: IListeningPort = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"  # type: ignore[attr-defined]

    async def chromium(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run headless chromium with a fresh profile (60 s at most), off the reactor thread."""
        assert CHROMIUM is not None
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        argv = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={os.path.join(home, 'profile')}", f"--window-size={WIDTH},{HEIGHT}", *args,
        ]
        env = {**os.environ, "HOME": home}
        result: subprocess.CompletedProcess[bytes] = await deferToThread(
            subprocess.run, argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env, cwd=home,
        )
        return result

    async def test_screenshot(self) -> None:
        """Chromium's screenshot of ``/`` is a 1200x900 PNG with content, not a blank page."""
        url = await self.listen()
        shot = os.path.abspath(self.mktemp()) + ".png"
        result = await self.chromium(f"--screenshot={shot}", url)
        self.assertTrue(os.path.exists(shot), result.stderr.decode(errors="replace")[-2000:])
        with open(shot, "rb") as f:
            data = f.read()
        self.assertEqual(png_size(data), (WIDTH, HEIGHT))
        self.assertGreater(len(data), 10_000)
        pixels = png_pixel_bytes(data)
        # RGB(A) scanlines plus one filter byte each: the size says it decoded.
        self.assertGreaterEqual(len(pixels), HEIGHT * (WIDTH * 3 + 1))
        # A blank page compresses to a handful of distinct byte values.
        self.assertGreater(len(set(pixels)), 32)

    async def test_dom(self) -> None:
        """The rendered DOM shows the version, this node's key, and the peers table with its rows."""
        url = await self.listen()
        result = await self.chromium("--dump-dom", url)
        dom = result.stdout.decode("utf-8", errors="replace")
        self.assertIn("<h1>peernix</h1>", dom)
        self.assertIn(peernix.__version__, dom)
        self.assertIn(self.key.public_key.to_string(), dom)
        self.assertIn("<h2>Peers</h2>", dom)
        self.assertIn("<th>URL</th>", dom)
        self.assertIn(PEER_URL, dom)
        self.assertIn("http://[2001:db8::7]:9999", dom)
        self.assertNotIn(self.key.to_string().partition(":")[2], dom)
