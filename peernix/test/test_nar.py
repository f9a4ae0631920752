"""Tests for :mod:`peernix.nix.nar`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import Hash, parse_hash
from peernix.nix.nar import (
    MAX_DEPTH,
    NarEntry,
    NarError,
    NarReader,
    NarVerifier,
    nar_chunks,
    nar_entries,
    nar_size,
)
from peernix.test.test_narinfo import make_tree

HELLO_NAR_HASH = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
TREE_NAR_HASH = "sha256:0ba7mwn6wz5h8v1hlcc8bz4nvg9jhplgjzvj06lj39b47qp5qfya"
HAVE_NIX = shutil.which("nix-store") is not None


# -- a tiny NAR writer for hand-made (and deliberately broken) archives ------


def s(data: bytes) -> bytes:
    """:returns: ``data`` as a framed NAR string."""
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def reg(contents: bytes, executable: bool = False) -> bytes:
    """:returns: a regular file node."""
    exe = s(b"executable") + s(b"") if executable else b""
    return s(b"(") + s(b"type") + s(b"regular") + exe + s(b"contents") + s(contents) + s(b")")


def sym(target: bytes) -> bytes:
    """:returns: a symlink node."""
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def dir_(*entries: tuple[bytes, bytes]) -> bytes:
    """:returns: a directory node with ``entries`` in the given (not necessarily sorted) order."""
    body = b"".join(
        s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")") for name, node in entries
    )
    return s(b"(") + s(b"type") + s(b"directory") + body + s(b")")


def nar(node: bytes) -> bytes:
    """:returns: a complete NAR around ``node``."""
    return s(b"nix-archive-1") + node


def nested(depth: int) -> bytes:
    """:returns: a root directory with ``depth`` levels of directories below it."""
    node = dir_()
    for _ in range(depth):
        node = dir_((b"d", node))
    return nar(node)


def parse(data: bytes, step: int = 0, entries: list[NarEntry] | None = None) -> None:
    """Feed ``data`` to a NarReader, in pieces of ``step`` bytes (0: at once), then finish."""
    reader = NarReader(entries.append if entries is not None else None)
    if step:
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
    else:
        reader.feed(data)
    reader.finish()


def dump(path: str) -> bytes:
    """:returns: ``nix-store --dump path``."""
    return subprocess.run(["nix-store", "--dump", path], check=True, capture_output=True).stdout


class _TempDir:
    """Mixin giving tests a fresh directory."""

    def tmpdir(self) -> str:
        path: str = self.mktemp()  # type: ignore[attr-defined]
        os.mkdir(path)
        return path


def write(path: str, data: bytes, mode: int = 0o644) -> str:
    """Create a file with ``data`` and ``mode``; :returns: ``path``."""
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def edge_tree(root: str) -> str:
    """Create a tree with empty files, empty dirs, nesting, odd names and symlinks; :returns: ``root``."""
    os.makedirs(os.path.join(root, "n", "e", "s", "t"))
    os.mkdir(os.path.join(root, "emptydir"))
    write(os.path.join(root, "empty"), b"")
    write(os.path.join(root, "emptyx"), b"", 0o755)
    write(os.path.join(root, "a+b=c?d.e"), b"q")
    write(os.path.join(root, ".hidden"), b"h" * 9)
    write(os.path.join(root, "n", "e", "s", "t", "deep"), b"deep\n" * 100, 0o700)
    write(os.path.join(root, "Z"), b"8bytes!!")
    write(os.path.join(root, "_"), b"underscore")
    write(os.path.join(root, "\xe9t\xe9"), b"utf-8 name")
    os.symlink("/abs/dangling", os.path.join(root, "abs"))
    os.symlink("n/e", os.path.join(root, "rel"))
    os.symlink("x" * 300, os.path.join(root, "long"))
    return root


class WriterTests(SynchronousTestCase, _TempDir):
    """nar_chunks and nar_size produce Nix's bytes."""

    def test_hello(self) -> None:
        """A file containing "hello\\n" gives the 120-byte NAR with the documented hash."""
        path = write(os.path.join(self.tmpdir(), "hello"), b"hello\n")
        data = b"".join(nar_chunks(path))
        self.assertEqual(len(data), 120)
        self.assertEqual(data, nar(reg(b"hello\n")))
        self.assertEqual(Hash.sha256_of(data), parse_hash(HELLO_NAR_HASH))
        self.assertEqual(nar_size(path), 120)

    def test_protocol_tree(self) -> None:
        """The directory of nix-protocol.md 1.6 gives the 1080-byte NAR with the documented hash."""
        root = os.path.join(self.tmpdir(), "d")
        make_tree(root)
        data = b"".join(nar_chunks(root))
        self.assertEqual(len(data), 1080)
        self.assertEqual(Hash.sha256_of(data), parse_hash(TREE_NAR_HASH))
        self.assertEqual(nar_size(root), 1080)
        expected = nar(dir_(
            (b"B", reg(b"x")),
            (b"link", sym(b"sub/a")),
            (b"run.sh", reg(b"#!/bin/sh\necho hi\n", executable=True)),
            (b"sub", dir_((b"a", reg(b"data")))),
        ))
        self.assertEqual(data, expected)

    def test_byte_order(self) -> None:
        """Entries are sorted by bytes: upper case and punctuation before lower case, UTF-8 last."""
        root = edge_tree(self.tmpdir())
        names = [e.path for e in nar_entries(root) if e.path and b"/" not in e.path]
        self.assertEqual(names, sorted(names))
        self.assertEqual(names[:3], [b".hidden", b"Z", b"_"])
        self.assertEqual(names[-1], "\xe9t\xe9".encode())

    def test_edge_tree_parses(self) -> None:
        """The edge-case tree's NAR is accepted by the reader and its size is exact."""
        root = edge_tree(self.tmpdir())
        data = b"".join(nar_chunks(root))
        self.assertEqual(nar_size(root), len(data))
        entries: list[NarEntry] = []
        parse(data, entries=entries)
        self.assertEqual(entries, list(nar_entries(root)))

    def test_symlink_root(self) -> None:
        """A symlink is archived as a symlink, not followed."""
        path = os.path.join(self.tmpdir(), "l")
        os.symlink("target/../x", path)
        self.assertEqual(b"".join(nar_chunks(path)), nar(sym(b"target/../x")))
        self.assertEqual(nar_size(path), len(nar(sym(b"target/../x"))))

    def test_empty_file_and_dir(self) -> None:
        """An empty file and an empty directory are archived as Nix does."""
        d = self.tmpdir()
        self.assertEqual(b"".join(nar_chunks(d)), nar(dir_()))
        f = write(os.path.join(d, "f"), b"")
        self.assertEqual(b"".join(nar_chunks(f)), nar(reg(b"")))
        self.assertEqual(nar_size(f), 112)

    def test_only_owner_exec_bit(self) -> None:
        """Only S_IXUSR makes a file executable; group/other exec bits are ignored."""
        d = self.tmpdir()
        self.assertEqual(b"".join(nar_chunks(write(os.path.join(d, "g"), b"x", 0o655))), nar(reg(b"x")))
        self.assertEqual(b"".join(nar_chunks(write(os.path.join(d, "u"), b"x", 0o500))), nar(reg(b"x", True)))

    def test_chunking(self) -> None:
        """Chunks are exactly chunk_size bytes except the last, for any chunk size."""
        root = edge_tree(self.tmpdir())
        write(os.path.join(root, "big"), random.Random(1).randbytes(100_000))
        whole = b"".join(nar_chunks(root))
        for size in (1, 7, 8, 1000, 4096, 65536, 1 << 20):
            chunks = list(nar_chunks(root, size))
            self.assertEqual(b"".join(chunks), whole)
            self.assertTrue(all(len(c) == size for c in chunks[:-1]))
            self.assertTrue(0 < len(chunks[-1]) <= size)

    def test_bad_chunk_size(self) -> None:
        """A chunk size below 1 is refused."""
        self.assertRaises(ValueError, lambda: next(nar_chunks(self.tmpdir(), 0)))

    def test_large_file_streams(self) -> None:
        """A large file is read in pieces: the first chunk comes before the file is read through."""
        path = os.path.join(self.tmpdir(), "sparse")
        with open(path, "wb") as f:
            f.truncate(64 * 1024 * 1024)
        reads: list[int] = []
        real_read = os.read

        def counting_read(fd: int, n: int) -> bytes:
            reads.append(n)
            return real_read(fd, n)

        self.patch(os, "read", counting_read)
        gen = nar_chunks(path, 64 * 1024)
        first = next(gen)
        self.assertEqual(len(first), 64 * 1024)
        self.assertLessEqual(sum(reads), 2 * 64 * 1024)
        self.assertTrue(all(n <= 64 * 1024 for n in reads))
        gen.close()

    def test_close_releases_file(self) -> None:
        """Closing the generator half-way closes the file it was reading."""
        path = write(os.path.join(self.tmpdir(), "f"), b"z" * 100_000)
        before = set(os.listdir("/proc/self/fd"))
        gen = nar_chunks(path, 1024)
        next(gen)
        next(gen)
        self.assertGreater(len(set(os.listdir("/proc/self/fd")) - before), 0)
        gen.close()
        self.assertEqual(set(os.listdir("/proc/self/fd")) - before, set())

    def test_special_file(self) -> None:
        """A fifo cannot be archived: NarError."""
        d = self.tmpdir()
        os.mkfifo(os.path.join(d, "fifo"))
        self.assertRaises(NarError, lambda: b"".join(nar_chunks(d)))
        self.assertRaises(NarError, nar_size, d)

    def test_missing_path(self) -> None:
        """A missing path raises OSError."""
        missing = os.path.join(self.tmpdir(), "nope")
        self.assertRaises(OSError, lambda: list(nar_chunks(missing)))
        self.assertRaises(OSError, nar_size, missing)

    def test_concurrent_walks_share_big_listings(self) -> None:
        """Walks inside the same big directory share one listing; a changed directory gets a fresh one; none is kept after."""
        from peernix.nix import nar as nar_module

        root = self.tmpdir()
        big = os.path.join(root, "big")
        os.mkdir(big)
        for i in range(3000):
            write(os.path.join(big, f"manual-page-{i:05d}.1.gz"), b"x")
        expected = b"".join(nar_chunks(root, chunk_size=4096))
        self.assertEqual(len(nar_module._shared_listings), 0)
        first, second = nar_chunks(root, chunk_size=4096), nar_chunks(root, chunk_size=4096)
        out_first, out_second = [next(first)], [next(second)]
        self.assertEqual(len(nar_module._shared_listings), 1)  # one copy for both
        # The directory changes (a file added) while they are inside: a new
        # walk lists it afresh, the two running ones go on with what they saw.
        write(os.path.join(big, "manual-page-99999.1.gz"), b"y")
        changed = b"".join(nar_chunks(root, chunk_size=4096))
        self.assertIn(b"manual-page-99999.1.gz", changed)
        out_first += list(first)
        out_second += list(second)
        self.assertEqual(b"".join(out_first), expected)
        self.assertEqual(b"".join(out_second), expected)
        self.assertEqual(len(nar_module._shared_listings), 0)

    def test_case_hack(self) -> None:
        """With the macOS case hack the suffix is stripped, and names that then collide are an error."""
        d = self.tmpdir()
        write(os.path.join(d, "foo~nix~case~hack~1"), b"1")
        write(os.path.join(d, "Foo"), b"2")
        self.assertEqual(
            b"".join(nar_chunks(d, case_hack=True)),
            nar(dir_((b"Foo", reg(b"2")), (b"foo", reg(b"1")))),
        )
        self.assertEqual(nar_size(d, case_hack=True), len(b"".join(nar_chunks(d, case_hack=True))))
        write(os.path.join(d, "foo"), b"3")
        self.assertRaises(NarError, lambda: b"".join(nar_chunks(d, case_hack=True)))
        # Without the case hack the names are kept verbatim.
        self.assertIn(b"foo~nix~case~hack~1", b"".join(nar_chunks(d, case_hack=False)))

    def test_deep_tree(self) -> None:
        """A tree deeper than Python's recursion limit still archives (no recursion)."""
        root = self.tmpdir()
        made = []
        path = root
        for _ in range(1100):
            path = os.path.join(path, "d")
            os.mkdir(path)
            made.append(path)

        def remove() -> None:
            # trial's own temp-dir cleanup recurses, so remove the tree here.
            for p in reversed(made):
                os.rmdir(p)

        self.addCleanup(remove)
        data = b"".join(nar_chunks(root))
        self.assertEqual(nar_size(root), len(data))


class RealNixWriterTests(SynchronousTestCase, _TempDir):
    """Our NARs are byte-identical to ``nix-store --dump``."""

    if not HAVE_NIX:
        skip = "nix-store not installed"

    def test_same_as_nix(self) -> None:
        """The protocol tree, the edge-case tree and each of their entries dump exactly as Nix does."""
        d = self.tmpdir()
        make_tree(os.path.join(d, "proto"))
        edge_tree(os.path.join(d, "edge"))
        for top in ("proto", "edge"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(d, top)):
                for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    expected = dump(p)
                    self.assertEqual(b"".join(nar_chunks(p, 100)), expected, p)
                    self.assertEqual(nar_size(p), len(expected), p)

    def test_protocol_tree_hash_from_nix(self) -> None:
        """nix-store --dump of the protocol tree has the documented hash too."""
        root = os.path.join(self.tmpdir(), "d")
        make_tree(root)
        self.assertEqual(Hash.sha256_of(dump(root)), parse_hash(TREE_NAR_HASH))


class ReaderAcceptTests(SynchronousTestCase, _TempDir):
    """NarReader accepts valid NARs however they are split."""

    def test_hand_made(self) -> None:
        """Hand-made NARs of every node type parse, at once and byte by byte."""
        for data in (
            nar(reg(b"hello\n")),
            nar(reg(b"", True)),
            nar(sym(b"x")),
            nar(sym(b"t" * 4095)),
            nar(dir_()),
            nar(dir_((b"a", dir_()), (b"b", reg(b"12345678")), (b"c" * 255, sym(b"/")))),
            nested(MAX_DEPTH - 1),
        ):
            parse(data)
            parse(data, 1)
            parse(data, 3)

    def test_entries(self) -> None:
        """on_entry sees every node in order, with paths, sizes, offsets and targets."""
        entries: list[NarEntry] = []
        data = nar(dir_((b"B", reg(b"x")), (b"s", dir_((b"l", sym(b"../B")), (b"x", reg(b"ab", True))))))
        parse(data, 5, entries)
        self.assertEqual([e.path for e in entries], [b"", b"B", b"s", b"s/l", b"s/x"])
        self.assertEqual([e.type for e in entries], ["directory", "regular", "directory", "symlink", "regular"])
        self.assertEqual(entries[3].target, b"../B")
        self.assertEqual((entries[4].size, entries[4].executable), (2, True))
        for e in (entries[1], entries[4]):
            self.assertEqual(data[e.nar_offset - 8:e.nar_offset], e.size.to_bytes(8, "little"))
        self.assertEqual(data[entries[1].nar_offset:entries[1].nar_offset + 1], b"x")
        self.assertEqual(data[entries[4].nar_offset:entries[4].nar_offset + 2], b"ab")

    def test_done_and_offset(self) -> None:
        """done turns true exactly when the last byte arrives; offset counts bytes fed."""
        data = nar(reg(b"hi"))
        reader = NarReader()
        reader.feed(data[:-1])
        self.assertFalse(reader.done)
        reader.feed(data[-1:])
        self.assertTrue(reader.done)
        self.assertEqual(reader.offset, len(data))
        reader.feed(b"")
        reader.finish()

    def test_large_contents_not_buffered(self) -> None:
        """Declared contents are counted, not buffered: feeding 64 MiB allocates almost nothing."""
        size = 3 * 1024**3 + 5
        reader = NarReader()
        head = s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"contents")
        reader.feed(head + size.to_bytes(8, "little"))
        chunk = b"\0" * (1 << 20)
        tracemalloc.start()
        try:
            for _ in range(64):
                reader.feed(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 64 * 1024)
        self.assertEqual(reader.offset, len(head) + 8 + 64 * len(chunk))
        self.assertFalse(reader.done)
        self.assertRaises(NarError, reader.finish)

    def test_real_nix_dumps(self) -> None:
        """NarReader accepts nix-store --dump of trees with every kind of entry."""
        if not HAVE_NIX:
            raise self.skipTest("nix-store not installed")
        d = self.tmpdir()
        make_tree(os.path.join(d, "proto"))
        edge_tree(os.path.join(d, "edge"))
        for top in ("proto", "edge"):
            data = dump(os.path.join(d, top))
            entries: list[NarEntry] = []
            parse(data, 13, entries)
            self.assertEqual(entries, list(nar_entries(os.path.join(d, top))))


class ReaderRejectTests(SynchronousTestCase):
    """NarReader rejects every kind of malformed NAR with NarError only."""

    def assertBad(self, data: bytes) -> None:
        """``data`` is rejected, whether fed at once or byte by byte."""
        for step in (0, 1, 7):
            self.assertRaises(NarError, parse, data, step)

    def test_bad_magic(self) -> None:
        """A wrong magic string is rejected."""
        self.assertBad(s(b"nix-archive-2") + reg(b"x"))
        self.assertBad(s(b"nix-archive-1x") + reg(b"x"))
        self.assertBad(reg(b"x"))
        self.assertBad(b"\xff" * 8 + b"\0" * 100)

    def test_truncated_everywhere(self) -> None:
        """Every proper prefix of a valid NAR is rejected at finish, never earlier as something else."""
        data = nar(dir_((b"a", reg(b"hello", True)), (b"b", sym(b"a")), (b"c", dir_())))
        for n in range(len(data)):
            reader = NarReader()
            reader.feed(data[:n])
            self.assertFalse(reader.done)
            self.assertRaises(NarError, reader.finish)

    def test_trailing_garbage(self) -> None:
        """Bytes after the root node are rejected, also when fed separately."""
        data = nar(reg(b"x"))
        self.assertBad(data + b"\0")
        self.assertBad(data + s(b"("))
        reader = NarReader()
        reader.feed(data)
        self.assertRaises(NarError, reader.feed, b"x")

    def test_non_zero_padding(self) -> None:
        """Non-zero padding after a token or after file contents is rejected."""
        good = nar(reg(b"abc"))
        # Padding of the "(" token: byte 24 + 8 + 1.
        bad = bytearray(good)
        bad[24 + 8 + 1] = 1
        self.assertBad(bytes(bad))
        # Padding after the 3 content bytes.
        bad = bytearray(good)
        bad[good.index(b"abc") + 3] = 0x20
        self.assertBad(bytes(bad))
        # Padding of an entry name.
        data = nar(dir_((b"n", reg(b""))))
        bad = bytearray(data)
        bad[data.index(s(b"n")) + 9] = 1
        self.assertBad(bytes(bad))

    def test_unsorted(self) -> None:
        """Entries out of order or repeated are rejected."""
        self.assertBad(nar(dir_((b"b", reg(b"")), (b"a", reg(b"")))))
        self.assertBad(nar(dir_((b"a", reg(b"")), (b"a", reg(b"")))))
        self.assertBad(nar(dir_((b"a", reg(b"")), (b"B", reg(b"")))))
        self.assertBad(nar(dir_((b"d", dir_((b"y", reg(b"")), (b"x", reg(b"")))))))

    def test_bad_names(self) -> None:
        """Empty, ``.``, ``..``, slash, NUL and over-long names are rejected."""
        for name in (b"", b".", b"..", b"a/b", b"/", b"a\0", b"n" * 256):
            self.assertBad(nar(dir_((name, reg(b"")))))
        parse(nar(dir_((b"...", reg(b"")), (b".a", reg(b"")), (b"n" * 255, reg(b"")))))

    def test_bad_symlink_targets(self) -> None:
        """Empty, NUL-containing and over-long symlink targets are rejected."""
        for target in (b"", b"a\0b", b"t" * 4096):
            self.assertBad(nar(sym(target)))

    def test_too_deep(self) -> None:
        """Nesting of MAX_DEPTH levels below the root is rejected; one less is fine."""
        parse(nested(MAX_DEPTH - 1))
        self.assertBad(nested(MAX_DEPTH))

    def test_bad_tokens(self) -> None:
        """Unknown node types, missing tokens and misplaced tokens are rejected."""
        o, c = s(b"("), s(b")")
        for node in (
            o + s(b"type") + s(b"fifo") + c,
            o + s(b"type") + s(b"regular") + c,
            o + s(b"type") + s(b"regular") + s(b"executable") + s(b"x") + s(b"contents") + s(b"") + c,
            o + s(b"type") + s(b"regular") + s(b"executable") + s(b"") + c,
            o + s(b"type") + s(b"regular") + s(b"contents") + s(b"") + s(b"executable") + s(b"") + c,
            o + s(b"type") + s(b"regular") + s(b"contents") + s(b"") + s(b"contents") + s(b"") + c,
            o + s(b"typ") + s(b"regular") + s(b"contents") + s(b"") + c,
            s(b"[") + s(b"type") + s(b"regular") + s(b"contents") + s(b"") + c,
            o + s(b"type") + s(b"symlink") + s(b"targets") + s(b"x") + c,
            o + s(b"type") + s(b"symlink") + s(b"target") + s(b"x") + s(b"x") + c,
            o + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"nam") + s(b"a"),
            o + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name") + s(b"a") + s(b"nod"),
            o + s(b"type") + s(b"directory") + s(b"entries") + c,
            o + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name") + s(b"a") + s(b"node")
            + reg(b"") + s(b"]"),
            o + s(b"type") + s(b"directory") + s(b"entry") + c,
            o + s(b"type") + s(b"directory"),
        ):
            self.assertBad(nar(node))

    def test_huge_length_rejected_early(self) -> None:
        """A token claiming an enormous length is rejected at once, without waiting for or buffering it."""
        reader = NarReader()
        self.assertRaises(NarError, reader.feed, (2**63).to_bytes(8, "little"))
        for n in (14, 2**64 - 1):
            reader = NarReader()
            reader.feed(s(b"nix-archive-1") + s(b"("))
            self.assertRaises(NarError, reader.feed, n.to_bytes(8, "little"))

    def test_error_is_sticky(self) -> None:
        """After an error every feed and finish raises NarError again."""
        reader = NarReader()
        self.assertRaises(NarError, reader.feed, s(b"nope"))
        self.assertRaises(NarError, reader.feed, b"")
        self.assertRaises(NarError, reader.feed, s(b"nix-archive-1"))
        self.assertRaises(NarError, reader.finish)

    def test_mutations_raise_only_nar_error(self) -> None:
        """Flipping any single byte of a valid NAR either still parses or raises NarError."""
        data = nar(dir_((b"a", reg(b"hello", True)), (b"b", sym(b"a")), (b"c", dir_((b"d", reg(b""))))))
        rejected = 0
        for i in range(len(data)):
            for delta in (1, 0x80):
                bad = bytearray(data)
                bad[i] ^= delta
                try:
                    parse(bytes(bad), 16)
                except NarError:
                    rejected += 1
        # Only flips inside file contents or inside names/targets that stay
        # valid and sorted can survive.
        self.assertGreater(rejected, 2 * len(data) * 0.9)

    def test_callback_error_is_sticky(self) -> None:
        """If on_entry raises, that exception propagates and the reader refuses further input."""

        def boom(entry: NarEntry) -> None:
            raise KeyError(entry.path)

        reader = NarReader(boom)
        self.assertRaises(KeyError, reader.feed, nar(reg(b"x")))
        self.assertFalse(reader.done)
        self.assertRaises(NarError, reader.feed, b"")
        self.assertRaises(NarError, reader.finish)

    def test_empty_input(self) -> None:
        """No input at all is a truncated NAR."""
        reader = NarReader()
        reader.feed(b"")
        self.assertRaises(NarError, reader.finish)


class VerifierTests(SynchronousTestCase):
    """NarVerifier checks hash, size and grammar."""

    data = nar(dir_((b"a", reg(b"hello\n", True)), (b"b", sym(b"a"))))

    def verifier(self, data: bytes | None = None) -> NarVerifier:
        payload = self.data if data is None else data
        return NarVerifier(Hash.sha256_of(payload), len(payload))

    def test_good(self) -> None:
        """The exact NAR passes, whatever the chunking."""
        for step in (1, 5, 64, len(self.data)):
            v = self.verifier()
            for i in range(0, len(self.data), step):
                v.feed(self.data[i:i + step])
            v.finish()
            self.assertEqual(v.size, len(self.data))

    def test_hello_vector(self) -> None:
        """The hello NAR verifies against the documented NarHash and NarSize."""
        v = NarVerifier(parse_hash(HELLO_NAR_HASH), 120)
        v.feed(nar(reg(b"hello\n")))
        v.finish()

    def test_hash_mismatch(self) -> None:
        """A same-size NAR with other contents fails with "hash mismatch"."""
        other = self.data.replace(b"hello\n", b"HELLO\n")
        v = NarVerifier(Hash.sha256_of(self.data), len(self.data))
        v.feed(other)
        e = self.assertRaises(NarError, v.finish)
        self.assertIn("hash mismatch", str(e))

    def test_too_short(self) -> None:
        """A truncated NAR fails with "size mismatch"."""
        v = self.verifier()
        v.feed(self.data[:-8])
        e = self.assertRaises(NarError, v.finish)
        self.assertIn("size mismatch", str(e))

    def test_too_long_fails_at_once(self) -> None:
        """Feeding more than the expected size fails in feed, before finish."""
        v = self.verifier()
        v.feed(self.data[:10])
        e = self.assertRaises(NarError, v.feed, self.data[10:] + b"\0")
        self.assertIn("size mismatch", str(e))
        self.assertRaises(NarError, v.finish)

    def test_grammar_checked(self) -> None:
        """Bytes that match hash and size but are not a NAR still fail."""
        garbage = s(b"nix-archive-1") + s(b"junk")
        v = self.verifier(garbage)
        self.assertRaises(NarError, v.feed, garbage)
        self.assertRaises(NarError, v.finish)
        truncated = self.data[:-16]
        v = self.verifier(truncated)
        v.feed(truncated)
        e = self.assertRaises(NarError, v.finish)
        self.assertIn("truncated", str(e))

    def test_other_algorithm(self) -> None:
        """An expected hash of another algorithm is checked with that algorithm."""
        v = NarVerifier(Hash("sha512", hashlib.sha512(self.data).digest()), len(self.data))
        v.feed(self.data)
        v.finish()
