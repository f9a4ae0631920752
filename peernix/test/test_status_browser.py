"""
The status page in a real headless browser: the web app on a real loopback
socket, Debian's chromium taking a screenshot of ``/`` and dumping its DOM.

The page shows a day of savings history (restored from a state as the
daemon would after a restart), so the screenshot looks like a machine in
use.  With ``PEERNIX_SCREENSHOT_TO=docs/status-page.png`` the screenshot
test also copies its PNG there: that is how the docs' screenshot is made.
"""

from __future__ import annotations

import html
import os
import re
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
from peernix.web.ratelimit import UploadLimiter
from peernix.web.savings import Savings, format_bytes

#: The browser: Debian's ``chromium`` (or Ubuntu's name for it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: The window, and so the screenshot, size.
WIDTH, HEIGHT = 1200, 900

#: A peer shown in the table.
PEER_URL = "http://192.0.2.7:9999"

#: The most requested path shown.
HOT_PATH = "0c0ys3hg8kn9jbm6dl9g2rkq1l8ywyna-firefox-120.0.1"


def day_of_savings(now: float) -> Savings:
    """
    :returns: savings with 24 hours of plausible history ending at ``now``
        (a working day: little at night, more in the morning), restored from
        a state as after a restart.
    """
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(now)
    savings = Savings(clock)
    hour_now = int(now // 3600) * 3600
    hours: dict[str, dict[str, int]] = {}
    total = dict.fromkeys(("bytes_from_peers", "bytes_to_peers", "local", "peer", "upstream", "miss"), 0)
    for back in range(24):
        start = hour_now - back * 3600
        weight = (5 + (back * 7) % 11) * (3 if 6 <= back <= 14 else 1)
        counts = {
            "bytes_from_peers": weight * 23_000_000,
            "bytes_to_peers": weight * 9_000_000,
            "local": weight * 40,
            "peer": weight * 25,
            "upstream": 0,
            "miss": weight * 4,
        }
        hours[str(start)] = counts
        for name, value in counts.items():
            total[name] += value
    import time

    # The six days before today, each like the last 24 hours.
    days = {time.strftime("%Y-%m-%d", time.localtime(now - n * 86400)): dict(total) for n in range(1, 7)}
    savings.restore({
        "version": 1,
        "since": now - 20 * 86400,
        "total": {name: value * 9 for name, value in total.items()},
        "days": days,
        "hours": hours,
        "paths": {HOT_PATH: [42, 42 * 95_000_000], "7rjj86a15146cq1d4hm7fjcf2b9a5b8j-glibc-2.38-27": [30, 30 * 30_000_000]},
    })
    # Today's figures come from what happens while the daemon runs.
    savings.add_from_peers(1_234_567_890)
    savings.add_to_peers(98_765_432)
    for outcome in ("local", "local", "peer", "miss"):
        savings.count_request(outcome)
    return savings


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


def png_colour_count(data: bytes, colour: tuple[int, int, int]) -> int:
    """
    :returns: how many pixels of an 8-bit RGB or RGBA PNG (not interlaced,
        as chromium writes them) have exactly ``colour``: the scanlines are
        unfiltered (None, Sub, Up, Average, Paeth) as the PNG spec says.
    """
    width, height = png_size(data)
    bit_depth, colour_type = data[24], data[25]
    if bit_depth != 8 or colour_type not in (2, 6):
        raise ValueError("only 8-bit RGB or RGBA PNGs")
    bpp = 3 if colour_type == 2 else 4
    raw = png_pixel_bytes(data)
    stride = width * bpp
    previous = bytearray(stride)
    count = 0
    target = bytes(colour)
    for y in range(height):
        offset = y * (stride + 1)
        kind = raw[offset]
        line = bytearray(raw[offset + 1:offset + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                upper_left = previous[i - bpp] if i >= bpp else 0
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                line[i] = (line[i] + predictor) & 0xFF
        count += sum(1 for x in range(0, stride, bpp) if line[x:x + 3] == target)
        previous = line
    return count


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
        self.savings = day_of_savings(reactor.seconds())
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
            savings=self.savings,
            upload_limiter=UploadLimiter(20_000_000, reactor),
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
        # The chart's green bars (bytes from peers and peer answers,
        # #2e7d32) are drawn: thousands of pixels of exactly that colour.
        self.assertGreater(png_colour_count(data, (0x2E, 0x7D, 0x32)), 2000)
        target = os.environ.get("PEERNIX_SCREENSHOT_TO")
        if target:
            shutil.copyfile(shot, target)

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

    async def test_dom_savings(self) -> None:
        """The page leads with the savings figures, draws the 24-hour chart as SVG and lists the top paths."""
        url = await self.listen()
        result = await self.chromium("--dump-dom", url)
        dom = result.stdout.decode("utf-8", errors="replace")
        snapshot = self.savings.snapshot()
        self.assertLess(dom.index("What the LAN saves this machine"), dom.index("<h2>This node</h2>"))
        from_peers = format_bytes(snapshot.total["bytes_from_peers"])
        self.assertRegex(dom, rf'id="bytes-from-peers">{re.escape(from_peers)}<')
        self.assertRegex(dom, rf'id="bytes-to-peers">{re.escape(format_bytes(snapshot.total["bytes_to_peers"]))}<')
        today = re.search(r'data-counter="bytes_from_peers" data-period="today" data-value="(\d+)"', dom)
        assert today is not None, "no today figure"
        self.assertEqual(int(today.group(1)), snapshot.today["bytes_from_peers"])
        # The chart: an inline SVG with a bar per hour and series, laid out by the browser.
        self.assertIn('<svg id="savings-chart"', dom)
        self.assertEqual(len(re.findall(r'class="bar bytes_from_peers"', dom)), 24)
        self.assertEqual(len(re.findall(r'class="bar peer"', dom)), 24)
        self.assertIn(html.escape(HOT_PATH), dom)
        self.assertIn("Upload limit to peers", dom)
        self.assertIn("20000000 bytes/s", dom)
