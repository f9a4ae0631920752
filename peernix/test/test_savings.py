"""Tests for :mod:`peernix.web.savings`: counting, periods, the state file, restarts, the chart."""

from __future__ import annotations

import json
import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.web.savings import (
    CHART_HOURS,
    EVICT_BATCH,
    STATE_FILE_NAME,
    TOP_SHOWN,
    TOP_TRACKED,
    Savings,
    SavingsService,
    SavingsStateFile,
)
from peernix.web.status import Status, render_chart, render_html, render_json

#: Noon UTC on a Wednesday (2027-01-13): whole days either side, whatever the local zone.
NOON = 1_800_000_000 - (1_800_000_000 % 86400) + 12 * 3600 - 3 * 86400


def clock_at(t: float = NOON) -> Clock:
    clock = Clock()
    clock.advance(t)
    return clock


class SavingsTests(SynchronousTestCase):
    """The counters and their periods."""

    def test_totals_today_week_hours(self) -> None:
        """Bytes and outcomes add up in the total, today's, this week's and the current hour's counts."""
        clock = clock_at()
        savings = Savings(clock)
        savings.add_from_peers(1000)
        savings.add_to_peers(300)
        savings.count_request("local")
        savings.count_request("peer")
        savings.count_request("miss")
        snap = savings.snapshot()
        self.assertEqual(snap.since, NOON)
        self.assertEqual(snap.total["bytes_from_peers"], 1000)
        self.assertEqual(snap.today["bytes_to_peers"], 300)
        self.assertEqual(snap.week["local"], 1)
        self.assertEqual(len(snap.hours), CHART_HOURS)
        self.assertEqual(snap.hours[-1][1]["bytes_from_peers"], 1000)
        self.assertEqual(snap.document()["hit_ratio"], {"local": 0.3333, "peer": 0.3333, "upstream": 0.0, "miss": 0.3333})
        self.assertRaises(ValueError, savings.count_request, "elsewhere")

    def test_periods_roll(self) -> None:
        """Two days later the bytes are this week's, not today's; after 24 hours they leave the chart; after 8 days the week."""
        clock = clock_at()
        savings = Savings(clock)
        savings.add_from_peers(1000)
        clock.advance(2 * 86400)
        savings.add_from_peers(10)
        snap = savings.snapshot()
        self.assertEqual((snap.today["bytes_from_peers"], snap.week["bytes_from_peers"]), (10, 1010))
        self.assertEqual(sum(c["bytes_from_peers"] for _, c in snap.hours), 10)
        clock.advance(8 * 86400)
        savings.add_from_peers(1)
        snap = savings.snapshot()
        self.assertEqual((snap.today["bytes_from_peers"], snap.week["bytes_from_peers"]), (1, 1))
        self.assertEqual(snap.total["bytes_from_peers"], 1011)
        self.assertLessEqual(len(savings.days), 8)
        self.assertLessEqual(len(savings.hours), CHART_HOURS)

    def test_top_paths_bounded(self) -> None:
        """The most requested paths are ranked by requests; the table is bounded, the least requested give way."""
        savings = Savings(clock_at())
        for n in range(TOP_TRACKED + 50):
            savings.count_path(f"/nix/store/{'a' * 32}-p{n}", 100)
        for _ in range(5):
            savings.count_path(f"{'b' * 32}-hot", 2000)
        self.assertLessEqual(len(savings.paths), TOP_TRACKED)
        top = savings.snapshot().top
        self.assertEqual(len(top), TOP_SHOWN)
        self.assertEqual((top[0].path, top[0].requests, top[0].bytes), (f"{'b' * 32}-hot", 5, 10000))

    def test_least_requested_give_way_oldest_first(self) -> None:
        """
        A new path in a full table evicts the least requested (the oldest of
        equals first), never a more requested one, and a batch at a time.
        """
        savings = Savings(clock_at())
        name = "{:032d}-p".format
        # Half the table asked twice, then the other half once.
        for n in range(TOP_TRACKED // 2):
            savings.count_path(name(n), 1)
            savings.count_path(name(n), 1)
        for n in range(TOP_TRACKED // 2, TOP_TRACKED):
            savings.count_path(name(n), 1)
        self.assertEqual(len(savings.paths), TOP_TRACKED)
        savings.count_path("new-path", 1)
        # The oldest EVICT_BATCH of those asked once went; the rest stay.
        once = range(TOP_TRACKED // 2, TOP_TRACKED)
        gone = [n for n in once if name(n) not in savings.paths]
        self.assertEqual(gone, list(once)[:EVICT_BATCH])
        self.assertTrue(all(name(n) in savings.paths for n in range(TOP_TRACKED // 2)))
        self.assertEqual(savings.paths["new-path"], [1, 1])
        self.assertEqual(len(savings.paths), TOP_TRACKED - EVICT_BATCH + 1)
        # Room for the next ones without evicting anything.
        for n in range(EVICT_BATCH - 1):
            savings.count_path(f"more-{n}", 1)
        self.assertEqual(len(savings.paths), TOP_TRACKED)
        self.assertTrue(all(name(n) in savings.paths for n in list(once)[EVICT_BATCH:]))

    def test_restore_trims_to_the_most_requested(self) -> None:
        """A state with more paths than tracked keeps the most requested (the newest of equals)."""
        savings = Savings(clock_at())
        savings.count_path("x" * 32 + "-seed", 1)
        state = savings.state()
        state["paths"] = {f"{n:032d}-p": [1 + n % 3, 10] for n in range(TOP_TRACKED + 20)}
        again = Savings(clock_at())
        again.restore(state)
        self.assertEqual(len(again.paths), TOP_TRACKED)
        counts = sorted(entry[0] for entry in again.paths.values())
        # 20 of the 92 asked once went, the oldest first.
        self.assertEqual(counts.count(1), sum(1 for n in range(TOP_TRACKED + 20) if n % 3 == 0) - 20)
        ones = [n for n in range(TOP_TRACKED + 20) if n % 3 == 0]
        self.assertNotIn(f"{ones[19]:032d}-p", again.paths)
        self.assertIn(f"{ones[20]:032d}-p", again.paths)


class StateFileTests(SynchronousTestCase):
    """The state file: atomic, survives restarts, bad files are warnings."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())

    def test_round_trip(self) -> None:
        """What was saved is restored, since included, and the directory is created."""
        clock = clock_at()
        savings = Savings(clock)
        savings.add_from_peers(12345)
        savings.add_to_peers(678)
        savings.count_request("peer")
        savings.count_path("x" * 32 + "-y", 9)
        state = SavingsStateFile(self.dir)
        self.assertTrue(state.save(savings))
        self.assertEqual(os.listdir(self.dir), [STATE_FILE_NAME])
        clock.advance(3600)
        again = Savings(clock)
        self.assertTrue(state.load(again))
        self.assertEqual(again.since, NOON)
        self.assertEqual(again.snapshot().total, savings.snapshot().total)
        self.assertEqual(again.snapshot().today["bytes_from_peers"], 12345)
        self.assertEqual(again.snapshot().top, savings.snapshot().top)

    def test_missing_file(self) -> None:
        """No file yet: a warning, and counting starts now."""
        savings = Savings(clock_at())
        with _Capture() as warnings:
            self.assertFalse(SavingsStateFile(self.dir).load(savings))
        self.assertTrue(warnings)
        self.assertEqual(savings.total["bytes_from_peers"], 0)

    def test_corrupt_file_is_a_warning(self) -> None:
        """Garbage, a wrong version or bad counts: a warning, a fresh start, and the next save replaces it."""
        os.makedirs(self.dir)
        path = os.path.join(self.dir, STATE_FILE_NAME)
        state = SavingsStateFile(self.dir)
        for content in (b"\x00garbage{", b"[]", json.dumps({"version": 99}).encode(),
                        json.dumps({"version": 1, "since": 5, "total": {"bytes_from_peers": -1}}).encode(),
                        json.dumps({"version": 1, "since": "x"}).encode()):
            with open(path, "wb") as f:
                f.write(content)
            savings = Savings(clock_at())
            with _Capture() as warnings:
                self.assertFalse(state.load(savings))
            self.assertTrue(warnings, content)
            self.assertEqual(savings.since, NOON)
        self.assertTrue(state.save(savings))
        self.assertTrue(state.load(Savings(clock_at())))

    def test_unwritable_dir_is_a_warning(self) -> None:
        """A state directory that cannot be made or written: save() says so in the log and returns False."""
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file where the directory should be")
        state = SavingsStateFile(os.path.join(blocker, "state"))
        with _Capture() as warnings:
            self.assertFalse(state.save(Savings(clock_at())))
            self.assertFalse(state.save(Savings(clock_at())))
        # Said once, not at every periodic write.
        self.assertEqual(len([w for w in warnings if "Cannot write the savings state" in w]), 1)

    def test_atomic_write_leaves_no_temporary(self) -> None:
        """A save replaces the file by rename: no temporary file is left, the content is whole JSON."""
        state = SavingsStateFile(self.dir)
        savings = Savings(clock_at())
        for n in range(3):
            savings.add_from_peers(n + 1)
            state.save(savings)
        self.assertEqual(os.listdir(self.dir), [STATE_FILE_NAME])
        with open(state.path, "rb") as f:
            self.assertEqual(json.load(f)["total"]["bytes_from_peers"], 6)
        self.assertTrue(stat.S_ISREG(os.stat(state.path).st_mode))


class SavingsServiceTests(SynchronousTestCase):
    """The service loads at start, saves every minute and at stop: a restart keeps the figures."""

    def test_restart_keeps_figures(self) -> None:
        """A stopped and restarted service (a new process's objects) shows the same totals and since."""
        directory = os.path.abspath(self.mktemp())
        clock = clock_at()
        first = Savings(clock)
        service = SavingsService(first, SavingsStateFile(directory), clock, interval=60)
        service.startService()
        first.add_from_peers(5000)
        clock.advance(61)
        with open(os.path.join(directory, STATE_FILE_NAME)) as f:
            self.assertEqual(json.load(f)["total"]["bytes_from_peers"], 5000)
        first.add_to_peers(7)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(86400)
        second = Savings(clock)
        SavingsService(second, SavingsStateFile(directory), clock).startService()
        self.assertEqual(second.since, NOON)
        self.assertEqual((second.total["bytes_from_peers"], second.total["bytes_to_peers"]), (5000, 7))
        self.assertEqual(second.snapshot().week["bytes_from_peers"], 5000)
        self.assertEqual(second.snapshot().today["bytes_from_peers"], 0)


class RenderTests(SynchronousTestCase):
    """The status page leads with the savings; the chart is inline SVG."""

    def status(self) -> Status:
        clock = clock_at()
        savings = Savings(clock)
        savings.add_from_peers(3 * 1024 * 1024)
        savings.add_to_peers(1024)
        savings.count_request("local")
        savings.count_path("c" * 32 + "-<script>", 10)
        return Status(version="1", store_root="/", store_dir="/nix/store", priority=30, key_name=None,
                      public_key=None, valid_paths=1, requests={}, savings=savings.snapshot(),
                      serve_peers=False, max_upload_rate=20_000_000)

    def test_html_leads_with_savings(self) -> None:
        """The savings section comes before everything else, with the figures, the chart and escaped paths."""
        page = render_html(self.status()).decode()
        self.assertLess(page.index("What the LAN saves"), page.index("This node"))
        self.assertIn('id="bytes-from-peers">3.0 MiB<', page)
        self.assertIn('id="bytes-to-peers">1.0 KiB<', page)
        self.assertIn("&lt;script&gt;", page)
        self.assertNotIn("<script>", page)
        self.assertIn("consume only", page)
        self.assertIn("19.1 MiB/s (20000000 bytes/s", page)

    def test_chart_is_self_contained_svg(self) -> None:
        """The chart is an SVG with a bar per hour and series, and no external reference."""
        chart = render_chart(self.status().savings)  # type: ignore[arg-type]
        self.assertTrue(chart.startswith("<svg"))
        self.assertEqual(chart.count('class="bar bytes_from_peers"'), CHART_HOURS)
        self.assertEqual(chart.count('class="bar local"'), CHART_HOURS)
        self.assertNotIn("href", chart)
        self.assertNotIn("<script", chart)

    def test_json(self) -> None:
        """status.json has savings.bytes_from_peers, bytes_to_peers and since."""
        document = json.loads(render_json(self.status()))
        self.assertEqual(document["savings"]["bytes_from_peers"], 3 * 1024 * 1024)
        self.assertEqual(document["savings"]["bytes_to_peers"], 1024)
        self.assertTrue(document["savings"]["since"].endswith("Z"))
        self.assertEqual(document["giving"], {"serve_peers": False, "max_upload_rate": 20_000_000})


class _Capture:
    """Collect the formatted text of warnings logged while in the block."""

    def __enter__(self) -> list[str]:
        from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
        from zope.interface import provider

        self.messages: list[str] = []

        @provider(ILogObserver)
        def observer(event: LogEvent) -> None:
            if event.get("log_level") == LogLevel.warn:
                self.messages.append(formatEvent(event))

        self._observer = observer
        self._publisher = globalLogPublisher
        globalLogPublisher.addObserver(observer)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self._publisher.removeObserver(self._observer)
