# mypy: disallow-untyped-calls=False
# (trial's assert methods carry no annotations; setup.cfg says the same for peernix.test.*)
"""
Tests of the soak's judging code (no daemons, no sockets):
``python -m twisted.trial bench.soak.test_soak``.
"""

from __future__ import annotations

import hashlib
import io

from backports.zstd import ZstdCompressor
from twisted.trial.unittest import SynchronousTestCase

from bench.soak import client, verdict
from bench.soak.cluster import Disruption, Sample, Timeline
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo


class _Body:
    """A NAR response body: its bytes served ``step`` at a time, and its headers."""

    def __init__(self, data: bytes, headers: dict[str, str] | None = None, step: int = 1000) -> None:
        self._data = io.BytesIO(data)
        self._headers = headers or {}
        self._step = step

    def read(self, amt: int | None = None, /) -> bytes:
        return self._data.read(min(amt or self._step, self._step))

    def getheader(self, name: str, default: str, /) -> str:
        return self._headers.get(name, default)


def _info(nar: bytes, compression: str = "none") -> NarInfo:
    return NarInfo(store_path="/nix/store/" + "a" * 32 + "-x", url="nar/x.nar", compression=compression,
                   nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))


def _timeline(*items: Disruption) -> Timeline:
    t = Timeline()
    t._items.extend(items)  # noqa: SLF001 - a fixed history for the test
    return t


def _rec(outcome: str, daemon: int = 0, holder: int = 0, start: float = 100.0, end: float = 101.0,
         op: str = client.HIT_LOCAL) -> client.Record:
    return (start, end, daemon, op, holder, outcome, 0, 0, "")


class CheckNarTests(SynchronousTestCase):
    """:func:`client.check_nar` accepts exactly the NarHash's bytes."""

    nar = bytes(range(256)) * 40

    def test_right_bytes(self) -> None:
        """A complete NAR with the right hash is accepted and its size returned."""
        self.assertEqual(client.check_nar(_Body(self.nar), _info(self.nar), 1e12), len(self.nar))

    def test_wrong_bytes(self) -> None:
        """A complete NAR with one byte changed is Wrong, with the byte count."""
        bad = b"X" + self.nar[1:]
        e = self.assertRaises(client.Wrong, client.check_nar, _Body(bad), _info(self.nar), 1e12)
        self.assertEqual(e.args[1], len(self.nar))

    def test_truncated(self) -> None:
        """A NAR that ends early is a truncated NoAnswer, not wrong bytes."""
        e = self.assertRaises(client.NoAnswer, client.check_nar, _Body(self.nar[:-1]), _info(self.nar), 1e12)
        self.assertTrue(e.truncated)

    def test_too_long(self) -> None:
        """A NAR longer than NarSize is Wrong."""
        self.assertRaises(client.Wrong, client.check_nar, _Body(self.nar + b"x"), _info(self.nar), 1e12)

    def test_zstd_transport_several_frames(self) -> None:
        """A Content-Encoding zstd body made of two frames is decoded whole."""
        half = len(self.nar) // 2
        data = ZstdCompressor().compress(self.nar[:half], ZstdCompressor.FLUSH_FRAME)
        data += ZstdCompressor().compress(self.nar[half:], ZstdCompressor.FLUSH_FRAME)
        body = _Body(data, {"Content-Encoding": "zstd"}, step=7)
        self.assertEqual(client.check_nar(body, _info(self.nar), 1e12), len(self.nar))

    def test_zstd_compression_field(self) -> None:
        """A narinfo with Compression zstd makes the NAR be decoded, even without Content-Encoding."""
        data = ZstdCompressor().compress(self.nar, ZstdCompressor.FLUSH_FRAME)
        self.assertEqual(client.check_nar(_Body(data), _info(self.nar, "zstd"), 1e12), len(self.nar))

    def test_corrupt_zstd(self) -> None:
        """A corrupt zstd stream is Wrong."""
        self.assertRaises(client.Wrong, client.check_nar, _Body(b"\x28\xb5\x2f\xfd" + b"\xff" * 50,
                                                                {"Content-Encoding": "zstd"}), _info(self.nar), 1e12)


class ClassifyTests(SynchronousTestCase):
    """:func:`verdict.classify` excuses only what a disruption explains."""

    def test_5xx_always_error(self) -> None:
        """A 5xx is an error even while the asked daemon is disrupted."""
        t = _timeline(Disruption(0, "stop", 99.0, 105.0))
        self.assertEqual(verdict.classify(_rec(client.SERVER_ERROR), t), verdict.C_5XX)

    def test_conn_during_own_stop(self) -> None:
        """No answer while the asked daemon is stopped is excused."""
        t = _timeline(Disruption(0, "stop", 100.5, 104.0))
        self.assertEqual(verdict.classify(_rec(client.CONN), t), verdict.C_EXCUSED)

    def test_conn_without_disruption(self) -> None:
        """No answer with no disruption nearby is unexpected."""
        t = _timeline(Disruption(0, "stop", 10.0, 14.0), Disruption(1, "freeze", 100.0, 102.0))
        self.assertEqual(verdict.classify(_rec(client.CONN), t), verdict.C_UNEXPECTED)

    def test_truncated_relay_when_holder_stopped(self) -> None:
        """A peer's NAR cut short while the holder was stopped is excused."""
        t = _timeline(Disruption(1, "stop", 100.2, None))
        rec = _rec(client.TRUNCATED, daemon=0, holder=1, op=client.NAR_PEER)
        self.assertEqual(verdict.classify(rec, t), verdict.C_EXCUSED)

    def test_local_404(self) -> None:
        """A 404 for a path the asked daemon holds is unexpected, disruption or not."""
        t = _timeline(Disruption(0, "freeze", 100.0, 101.0))
        self.assertEqual(verdict.classify(_rec(client.NOT_FOUND), t), verdict.C_UNEXPECTED)

    def test_peer_404_within_recovery(self) -> None:
        """A 404 for a peer's path shortly after that peer was disrupted is excused."""
        t = _timeline(Disruption(1, "stop", 80.0, 90.0))
        rec = _rec(client.NOT_FOUND, daemon=0, holder=1, op=client.HIT_PEER)
        self.assertEqual(verdict.classify(rec, t), verdict.C_EXCUSED)

    def test_peer_404_long_after(self) -> None:
        """A 404 for a peer's path long after any disruption is a lost peer hit."""
        t = _timeline(Disruption(1, "stop", 10.0, 20.0), Disruption(2, "freeze", 99.0, 102.0))
        rec = _rec(client.NOT_FOUND, daemon=0, holder=1, op=client.HIT_PEER)
        self.assertEqual(verdict.classify(rec, t), verdict.C_LOST)

    def test_peer_404_while_asked_daemon_frozen(self) -> None:
        """A 404 for a peer's path from a daemon frozen during the request is excused."""
        t = _timeline(Disruption(0, "freeze", 95.0, 100.9))
        rec = _rec(client.NOT_FOUND, daemon=0, holder=1, op=client.HIT_PEER)
        self.assertEqual(verdict.classify(rec, t), verdict.C_EXCUSED)


def _series(rss: list[int], fds: list[int], daemon: int = 0, inc: int = 0) -> list[Sample]:
    return [(5.0 * i, daemon, inc, r, f) for i, (r, f) in enumerate(zip(rss, fds))]


class FlatnessTests(SynchronousTestCase):
    """:func:`verdict.flatness` flags growth of the mean, not noise."""

    def test_flat_with_noise(self) -> None:
        """RSS and fds that wobble without a trend are flat."""
        rss = [70000 + (i % 3) * 500 for i in range(30)]
        fds = [20 + (i % 4) for i in range(30)]
        [f] = verdict.flatness(_series(rss, fds), warmup=0)
        self.assertTrue(f.rss_ok and f.fds_ok)

    def test_rss_growth(self) -> None:
        """RSS growing by 1 MiB a sample is not flat."""
        [f] = verdict.flatness(_series([70000 + 1024 * i for i in range(30)], [20] * 30), warmup=0)
        self.assertFalse(f.rss_ok)
        self.assertTrue(f.fds_ok)

    def test_fd_growth(self) -> None:
        """One more descriptor per sample is not flat."""
        [f] = verdict.flatness(_series([70000] * 30, [20 + i for i in range(30)]), warmup=0)
        self.assertFalse(f.fds_ok)

    def test_warmup_not_judged(self) -> None:
        """Growth during the warm-up only does not count."""
        rss = [50000 + 2048 * i for i in range(10)] + [70000] * 20
        [f] = verdict.flatness(_series(rss, [20] * 30), warmup=50)
        self.assertTrue(f.rss_ok)

    def test_short_incarnation_not_judged(self) -> None:
        """A process with too few samples after its warm-up is skipped."""
        self.assertEqual(verdict.flatness(_series([1] * 5, [1] * 5), warmup=0), [])


class TimelineTests(SynchronousTestCase):
    """:class:`Timeline` records disruptions and answers overlaps."""

    def test_open_disruption_overlaps_later(self) -> None:
        """A disruption that has not ended overlaps any later interval."""
        t = Timeline()
        t.begin(2, "freeze")
        self.assertTrue(t.overlaps([2], 1e12, 1e12 + 1))
        self.assertFalse(t.overlaps([1], 0, 1e12))
        t.end(2)
        [d] = t.items()
        self.assertIsNotNone(d.end)
