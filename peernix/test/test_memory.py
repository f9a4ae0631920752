"""Tests for :mod:`peernix.memory`: giving freed memory back after streaming."""

from __future__ import annotations

import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from peernix.memory import IdleTrimmer, release_free_memory


class IdleTrimmerTests(SynchronousTestCase):
    """The trim runs once, a delay after the last stream ended, never while one runs."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[float] = []
        self.trimmer = IdleTrimmer(self.clock, trim=lambda: self.calls.append(self.clock.seconds()), delay=1.0)

    def test_after_last_stream(self) -> None:
        """Two overlapping streams: one trim, a delay after the second ended."""
        self.trimmer.started()
        self.trimmer.started()
        self.clock.advance(5)
        self.trimmer.ended()
        self.clock.advance(5)
        self.assertEqual(self.calls, [])  # one still runs
        self.trimmer.ended()
        self.assertEqual(self.trimmer.active, 0)
        self.clock.advance(0.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [11.0])
        self.assertEqual(self.trimmer.trims, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_new_stream_cancels(self) -> None:
        """A stream starting within the delay cancels the trim; its end schedules a new one."""
        self.trimmer.started()
        self.trimmer.ended()
        self.clock.advance(0.5)
        self.trimmer.started()
        self.clock.advance(5)
        self.assertEqual(self.calls, [])
        self.trimmer.ended()
        self.clock.advance(1)
        self.assertEqual(self.calls, [6.5])

    def test_back_to_back_streams_trim_once(self) -> None:
        """Streams ending in quick succession push the trim back instead of trimming each time."""
        for _ in range(10):
            self.trimmer.started()
            self.trimmer.ended()
            self.clock.advance(0.2)
        self.clock.advance(1)
        self.assertEqual(len(self.calls), 1)

    def test_unbalanced_end_and_stop(self) -> None:
        """An extra ended() does not go negative; stop() cancels a pending trim."""
        self.trimmer.ended()
        self.assertEqual(self.trimmer.active, 0)
        self.trimmer.stop()
        self.clock.advance(10)
        self.assertEqual(self.calls, [])

    def test_release_free_memory(self) -> None:
        """On glibc the real call runs and reports a bool; elsewhere it does nothing."""
        released = release_free_memory()
        self.assertIsInstance(released, bool)
        if not sys.platform.startswith("linux"):
            self.assertFalse(released)
