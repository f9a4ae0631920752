"""Tests of :mod:`peernix.upstream.staging`: late joiners, hold-back, eviction, crash leftovers."""

from __future__ import annotations

import os

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import Hash
from peernix.upstream.client import VerificationFailed
from peernix.upstream.staging import READ_CHUNK, ConsumerGone, Staging, staging_key

HASH_PART = "0" * 31 + "1"


def _part(n: int) -> str:
    return f"{n:032d}".replace("0", "a").replace("1", "b")[:32]


class ChunkConsumer(StringTransport):
    """A consumer recording each write's size."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.sizes.append(len(data))
        super().write(data)


class StagingTestCase(SynchronousTestCase):
    #: NARs up to this size are held in memory (0: every NAR gets a file).
    memory_max = 0

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.staging = Staging(self.directory, 10_000_000, self.clock, idle=600, memory_max=self.memory_max,
                               memory_budget=3000)
        self.staging.start()
        self.addCleanup(self.staging.close)

    def files(self) -> list[str]:
        """:returns: the staged files (not the directory's lock)."""
        return sorted(name for name in os.listdir(self.directory) if name != ".lock")

    def _stage(self, part: str, size: int) -> bytes:
        """Stage a verified NAR of ``size`` random bytes for ``part``; :returns: its bytes."""
        nar = os.urandom(size)
        download = self.staging.begin(part, Hash.sha256_of(nar), size)
        download.append(nar)
        download.finish()
        return nar

    def check_wrong_hash(self, size: int) -> None:
        """A NAR of ``size`` bytes failing NarHash fails its reader and leaves nothing staged or held."""
        nar = os.urandom(size)
        promised = Hash.sha256_of(b"something else")
        download = self.staging.begin(HASH_PART, promised, len(nar))
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, promised, consumer)
        assert reader is not None
        d = reader.start()
        download.append(nar)
        self.assertRaises(VerificationFailed, download.finish)
        self.failureResultOf(d, VerificationFailed)
        self.assertEqual(len(consumer.value()), len(nar) - 1)
        self.assertEqual(self.files(), [])
        self.assertIsNone(self.staging.open_reader(HASH_PART, promised, ChunkConsumer()))
        self.assertEqual((self.staging.usage, self.staging.memory_usage), (0, 0))

    def check_evicted_while_read(self) -> None:
        """A reader of a NAR evicted under it keeps reading it to the end."""
        self.staging.max_size = 1000
        nar = self._stage(_part(1), 1000)
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(_part(1), Hash.sha256_of(nar), consumer)
        assert reader is not None
        reader.pauseProducing()
        d = reader.start()
        self._stage(_part(2), 1000)
        self.assertFalse(self.staging.staged(staging_key(_part(1), Hash.sha256_of(nar))))
        self.assertNotIn(_part(1), {name[:32] for name in self.files()})
        reader.resumeProducing()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), nar)


class DownloadTests(StagingTestCase):
    def test_late_joiner_reads_file_then_follows_live(self) -> None:
        """A reader joining mid-download gets what arrived from the file, then the rest as it arrives."""
        nar = os.urandom(5000)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        early = ChunkConsumer()
        d_early = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), early)
        assert d_early is not None
        done_early = d_early.start()
        download.append(nar[:2000])
        self.assertEqual(early.value(), nar[:2000])
        late = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), late)
        assert reader is not None
        done_late = reader.start()
        self.assertEqual(late.value(), nar[:2000])
        download.append(nar[2000:])
        # Everything but the last byte, until the NAR verified.
        self.assertEqual(early.value(), nar[:-1])
        self.assertEqual(late.value(), nar[:-1])
        self.assertNoResult(done_early)
        download.finish()
        self.successResultOf(done_early)
        self.successResultOf(done_late)
        self.assertEqual(early.value(), nar)
        self.assertEqual(late.value(), nar)
        self.assertIsNone(early.producer)
        self.assertEqual(download.readers, 2)
        self.assertEqual(self.files(), [f"{HASH_PART}-{Hash.sha256_of(nar).nix32()}.nar"])

    def test_partial_never_served_whole(self) -> None:
        """Before verification no reader ever has all NarSize bytes; the file is a .partial."""
        nar = os.urandom(1000)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        download.append(nar)
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), consumer)
        assert reader is not None
        d = reader.start()
        self.assertEqual(len(consumer.value()), len(nar) - 1)
        self.assertNoResult(d)
        self.assertTrue(all(name.endswith(".partial") for name in self.files()))
        self.assertIsNone(self.staging.complete(staging_key(HASH_PART, Hash.sha256_of(nar))))
        download.finish()
        self.successResultOf(d)

    def test_wrong_hash_fails_every_reader(self) -> None:
        """A NAR failing NarHash is never finished: readers fail, the file goes, nothing is staged."""
        self.check_wrong_hash(3000)

    def test_too_many_bytes(self) -> None:
        """More bytes than NarSize fail the download at once."""
        nar = os.urandom(100)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        self.assertRaises(ValueError, download.append, nar + b"x")
        self.assertEqual(download.state, "failed")
        self.assertIsInstance(download.error, VerificationFailed)
        self.assertEqual(self.files(), [])

    def test_failure_from_source(self) -> None:
        """A download given up fails its readers with the error and leaves no file."""
        nar = os.urandom(100)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), ChunkConsumer())
        assert reader is not None
        d = reader.start()
        download.append(nar[:50])
        download.fail(RuntimeError("all sources failed"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.files(), [])

    def test_one_download_per_nar(self) -> None:
        """A second begin for the same NAR is refused: join the running one."""
        nar = os.urandom(10)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        self.assertIs(self.staging.running(download.key), download)
        self.assertRaises(ValueError, self.staging.begin, HASH_PART, Hash.sha256_of(nar), len(nar))


class ReaderTests(StagingTestCase):
    def _staged(self, nar: bytes, part: str = HASH_PART) -> None:
        download = self.staging.begin(part, Hash.sha256_of(nar), len(nar))
        download.append(nar)
        download.finish()

    def test_backpressure_and_bounded_chunks(self) -> None:
        """A paused consumer gets nothing more; writes are at most READ_CHUNK bytes."""
        nar = os.urandom(3 * READ_CHUNK + 10)
        self._staged(nar)
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), consumer)
        assert reader is not None
        # Pause from the first write on, as a full socket would.
        original = consumer.write

        def write(data: bytes) -> None:
            original(data)
            reader.pauseProducing()

        consumer.write = write  # type: ignore[method-assign]
        d = reader.start()
        self.assertEqual(consumer.sizes, [READ_CHUNK])
        reader.resumeProducing()
        self.assertEqual(consumer.sizes, [READ_CHUNK, READ_CHUNK])
        consumer.write = original  # type: ignore[method-assign]
        reader.resumeProducing()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), nar)
        self.assertLessEqual(max(consumer.sizes), READ_CHUNK)

    def test_offset(self) -> None:
        """A reader from an offset (Range) sends the rest only."""
        nar = os.urandom(1000)
        self._staged(nar)
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), consumer, offset=600)
        assert reader is not None
        self.successResultOf(reader.start())
        self.assertEqual(consumer.value(), nar[600:])

    def test_consumer_gone(self) -> None:
        """A consumer stopping fails the reader with ConsumerGone; the download goes on."""
        nar = os.urandom(100)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), ChunkConsumer())
        assert reader is not None
        d = reader.start()
        reader.stopProducing()
        self.failureResultOf(d, ConsumerGone)
        download.append(nar)
        download.finish()
        self.assertEqual(download.state, "done")

    def test_cancel(self) -> None:
        """Cancelling a reader stops it and unregisters it."""
        nar = os.urandom(100)
        self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), consumer)
        assert reader is not None
        d = reader.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIsNone(consumer.producer)

    def test_nothing_staged(self) -> None:
        """No reader for a NAR never staged."""
        self.assertIsNone(self.staging.open_reader(HASH_PART, Hash.sha256_of(b"x"), ChunkConsumer()))


class EvictionTests(StagingTestCase):
    def test_least_recently_used_first(self) -> None:
        """Past the maximum size, the least recently used staged NAR goes first."""
        self.staging.max_size = 3000
        a = self._stage(_part(1), 1000)
        self._stage(_part(2), 1000)
        self._stage(_part(3), 1000)
        self.clock.advance(1)
        self.assertIsNotNone(self.staging.complete(staging_key(_part(1), Hash.sha256_of(a))))
        self._stage(_part(4), 1000)
        staged = {name[:32] for name in self.files()}
        self.assertEqual(staged, {_part(1), _part(3), _part(4)})
        self.assertEqual(self.staging.usage, 3000)
        self.assertEqual(self.staging.evictions, 1)

    def test_running_downloads_count(self) -> None:
        """A download starting reserves its NarSize, evicting staged NARs to fit."""
        self.staging.max_size = 2500
        self._stage(_part(1), 1000)
        self._stage(_part(2), 1000)
        self.staging.begin(_part(3), Hash.sha256_of(b"x"), 1000)
        self.assertEqual({name[:32] for name in self.files() if name.endswith(".nar")}, {_part(2)})
        self.assertLessEqual(self.staging.usage, 2500)

    def test_larger_than_maximum_streams_then_goes(self) -> None:
        """A NAR larger than the maximum still reaches its readers, then is not kept."""
        self.staging.max_size = 500
        nar = os.urandom(2000)
        download = self.staging.begin(HASH_PART, Hash.sha256_of(nar), len(nar))
        consumer = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, Hash.sha256_of(nar), consumer)
        assert reader is not None
        d = reader.start()
        download.append(nar)
        download.finish()
        self.successResultOf(d)
        self.assertEqual(consumer.value(), nar)
        self.assertEqual(self.files(), [])

    def test_evicted_while_read(self) -> None:
        """A reader of a NAR evicted under it keeps reading its open file to the end."""
        self.check_evicted_while_read()

    def test_idle_dropped(self) -> None:
        """A staged NAR nobody asked for within the idle time goes at the next sweep; one in use stays."""
        a = self._stage(_part(1), 100)
        self._stage(_part(2), 100)
        self.clock.advance(500)
        self.staging.complete(staging_key(_part(1), Hash.sha256_of(a)))
        self.clock.advance(200)
        self.assertEqual(self.staging.sweep(), 1)
        self.assertEqual({name[:32] for name in self.files()}, {_part(1)})
        self.clock.advance(601)
        self.assertEqual(self.staging.sweep(), 1)
        self.assertEqual(self.files(), [])


class MemoryTierTests(StagingTestCase):
    """Small NARs held in memory: the same rules as files, and no file at all."""

    memory_max = 1000

    def test_small_nar_never_touches_the_disk(self) -> None:
        """A small NAR streams to an early and a late reader, the last byte only once verified, with no file."""
        nar = os.urandom(900)
        nar_hash = Hash.sha256_of(nar)
        download = self.staging.begin(HASH_PART, nar_hash, len(nar))
        early = ChunkConsumer()
        reader = self.staging.open_reader(HASH_PART, nar_hash, early)
        assert reader is not None
        done_early = reader.start()
        download.append(nar[:400])
        self.assertEqual(early.value(), nar[:400])
        late = ChunkConsumer()
        late_reader = self.staging.open_reader(HASH_PART, nar_hash, late, offset=100)
        assert late_reader is not None
        done_late = late_reader.start()
        self.assertEqual(late.value(), nar[100:400])
        download.append(nar[400:])
        self.assertEqual(early.value(), nar[:-1])
        self.assertNoResult(done_early)
        self.assertEqual(self.staging.memory_usage, 900)
        download.finish()
        self.successResultOf(done_early)
        self.successResultOf(done_late)
        self.assertEqual(early.value(), nar)
        self.assertEqual(late.value(), nar[100:])
        self.assertEqual(self.files(), [])
        self.assertTrue(self.staging.staged(staging_key(HASH_PART, nar_hash)))
        again = ChunkConsumer()
        third = self.staging.open_reader(HASH_PART, nar_hash, again)
        assert third is not None
        self.successResultOf(third.start())
        self.assertEqual(again.value(), nar)
        self.assertEqual((self.staging.usage, self.staging.memory_usage), (900, 900))

    def test_wrong_hash_frees_memory_and_fails_readers(self) -> None:
        """A small NAR failing verification fails its readers and leaves nothing held."""
        self.check_wrong_hash(500)

    def test_budget_full_small_nars_get_files(self) -> None:
        """Once the memory budget is taken, the next small NAR is staged in a file."""
        for n in range(3):
            self._stage(_part(n), 1000)
        self.assertEqual(self.staging.memory_usage, 3000)
        self.assertEqual(self.files(), [])
        self._stage(_part(3), 1000)
        self.assertEqual([name[:32] for name in self.files()], [_part(3)])
        self.assertEqual((self.staging.usage, self.staging.memory_usage), (4000, 3000))

    def test_larger_nars_get_files(self) -> None:
        """A NAR above the memory threshold is staged in a file."""
        self._stage(_part(1), 1001)
        self.assertEqual([name[:32] for name in self.files()], [_part(1)])
        self.assertEqual(self.staging.memory_usage, 0)

    def test_eviction_and_sweep_free_memory(self) -> None:
        """Memory-held NARs leave by least recent use and by idleness, and their bytes are freed."""
        self.staging.max_size = 2000
        dropped: list[object] = []
        self.staging.on_dropped = dropped.append
        a = self._stage(_part(1), 1000)
        b = self._stage(_part(2), 1000)
        self.clock.advance(1)
        reader = self.staging.open_reader(_part(1), Hash.sha256_of(a), ChunkConsumer())
        assert reader is not None
        self.successResultOf(reader.start())
        self._stage(_part(3), 1000)
        self.assertEqual(dropped, [staging_key(_part(2), Hash.sha256_of(b))])
        self.assertEqual((self.staging.usage, self.staging.memory_usage), (2000, 2000))
        self.clock.advance(601)
        self.assertEqual(self.staging.sweep(), 2)
        self.assertEqual((self.staging.usage, self.staging.memory_usage, self.staging.complete_count), (0, 0, 0))

    def test_evicted_while_read(self) -> None:
        """A reader of a memory-held NAR evicted under it still reads it to the end."""
        self.check_evicted_while_read()
        self.assertEqual(self.files(), [])


class StartTests(SynchronousTestCase):
    def test_crash_leftovers_removed(self) -> None:
        """Start-up removes partial and complete files of an earlier run, and nothing else."""
        directory = self.mktemp()
        os.makedirs(directory)
        name = f"{HASH_PART}-{'1' * 52}"
        for leftover in (f"{name}.0a1b2c3d.partial", f"{name}.nar", "unrelated.txt"):
            with open(os.path.join(directory, leftover), "wb") as f:
                f.write(b"x" * 10)
        staging = Staging(directory, 1000, Clock())
        self.assertEqual(staging.start(), 2)
        self.assertEqual(sorted(os.listdir(directory)), [".lock", "unrelated.txt"])
        self.assertIsNone(staging.open_reader(HASH_PART, Hash("sha256", b"\x00" * 32), ChunkConsumer()))
        self.assertEqual(staging.usage, 0)

    def test_one_daemon_per_directory(self) -> None:
        """A second staging on a directory in use is refused (it would delete the first one's files)."""
        directory = self.mktemp()
        first = Staging(directory, 1000, Clock())
        first.start()
        second = Staging(directory, 1000, Clock())
        with self.assertRaises(OSError) as caught:
            second.start()
        self.assertIn("another peernix", str(caught.exception))
        first.close()
        second.start()
        second.close()

    def test_creates_directory(self) -> None:
        """The directory is made (private to the daemon) if missing."""
        directory = os.path.join(self.mktemp(), "a", "b")
        Staging(directory, 1000, Clock()).start()
        self.assertTrue(os.path.isdir(directory))
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
