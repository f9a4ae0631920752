"""Tests for :mod:`peernix.nix.listing`."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.listing import NarListingBuilder, listing_from_entries, nar_listing, render_listing
from peernix.nix.nar import NarEntry, NarError, NarReader, nar_chunks
from peernix.test.test_nar import edge_tree, write
from peernix.test.test_narinfo import NIX_MISSING, NIX_SKIP, NixEnv, make_tree, read_cache_file, scratch_dir

# Written by Nix 2.8 (`nix copy --to 'file://...?write-nar-listing=true'`)
# for the directory of nix-protocol.md section 1.6.
PROTOCOL_LS = (
    b'{"version":1,"root":{"type":"directory","entries":{'
    b'"B":{"type":"regular","size":1,"narOffset":232},'
    b'"link":{"type":"symlink","target":"sub/a"},'
    b'"run.sh":{"type":"regular","size":18,"executable":true,"narOffset":648},'
    b'"sub":{"type":"directory","entries":{"a":{"type":"regular","size":4,"narOffset":992}}}}}}'
)


def _listing_from_nar(fs_path: str) -> dict[str, object]:
    """:returns: the listing built by parsing the NAR we write for ``fs_path``."""
    builder = NarListingBuilder()
    reader = NarReader(builder)
    for chunk in nar_chunks(fs_path, 4096):
        reader.feed(chunk)
    reader.finish()
    return builder.document()


def _offsets(node: object) -> list[tuple[int, int]]:
    """:returns: (narOffset, size) of every regular file in a listing node."""
    assert isinstance(node, dict)
    if node["type"] == "regular":
        return [(node["narOffset"], node["size"])]
    if node["type"] == "directory":
        return [o for child in node["entries"].values() for o in _offsets(child)]
    return []


class ListingTests(SynchronousTestCase):
    """nar_listing writes what Nix writes."""

    def tmpdir(self) -> str:
        path = str(self.mktemp())
        os.mkdir(path)
        return path

    def test_protocol_tree(self) -> None:
        """The protocol tree's listing equals Nix's, byte for byte once rendered."""
        root = os.path.join(self.tmpdir(), "d")
        make_tree(root)
        listing = nar_listing(root)
        self.assertEqual(listing, json.loads(PROTOCOL_LS))
        self.assertEqual(render_listing(listing), PROTOCOL_LS)

    def test_offsets_point_at_contents(self) -> None:
        """Every narOffset points at the file's contents inside the NAR we write."""
        root = edge_tree(self.tmpdir())
        data = b"".join(nar_chunks(root))
        listing = nar_listing(root)
        offsets = _offsets(listing["root"])
        self.assertGreater(len(offsets), 5)
        for offset, size in offsets:
            self.assertEqual(data[offset - 8:offset], size.to_bytes(8, "little"))
        with open(os.path.join(root, "n", "e", "s", "t", "deep"), "rb") as f:
            deep = f.read()
        node = listing["root"]
        for name in ("n", "e", "s", "t", "deep"):
            assert isinstance(node, dict)
            node = node["entries"][name]
        assert isinstance(node, dict)
        self.assertEqual(data[node["narOffset"]:node["narOffset"] + node["size"]], deep)
        self.assertEqual(node.get("executable"), True)

    def test_node_shapes(self) -> None:
        """Empty files have an offset, only executables say executable, empty dirs have no entries."""
        root = edge_tree(self.tmpdir())
        entries = nar_listing(root)["root"]["entries"]  # type: ignore[index]
        self.assertEqual(set(entries["empty"]), {"type", "size", "narOffset"})
        self.assertEqual(entries["emptyx"]["executable"], True)
        self.assertEqual(entries["emptydir"], {"type": "directory", "entries": {}})
        self.assertEqual(entries["abs"], {"type": "symlink", "target": "/abs/dangling"})
        self.assertIn("a+b=c?d.e", entries)
        self.assertIn("\xe9t\xe9", entries)

    def test_key_order(self) -> None:
        """Keys come in Nix's order: type, size, executable, narOffset; entries sorted."""
        root = edge_tree(self.tmpdir())
        listing = nar_listing(root)
        self.assertEqual(list(listing), ["version", "root"])
        entries = listing["root"]["entries"]  # type: ignore[index]
        self.assertEqual(list(entries["emptyx"]), ["type", "size", "executable", "narOffset"])
        names = list(entries)
        self.assertEqual([n.encode() for n in names], sorted(n.encode() for n in names))

    def test_single_file_and_symlink(self) -> None:
        """A lone file sits at offset 96; a lone symlink has no offset."""
        d = self.tmpdir()
        f = write(os.path.join(d, "f"), b"")
        self.assertEqual(nar_listing(f), {"version": 1, "root": {"type": "regular", "size": 0, "narOffset": 96}})
        x = write(os.path.join(d, "x"), b"abc", 0o755)
        self.assertEqual(
            nar_listing(x),
            {"version": 1, "root": {"type": "regular", "size": 3, "executable": True, "narOffset": 128}},
        )
        os.symlink("f", os.path.join(d, "l"))
        self.assertEqual(nar_listing(os.path.join(d, "l")), {"version": 1, "root": {"type": "symlink", "target": "f"}})

    def test_does_not_read_contents(self) -> None:
        """Listing never opens a file (directories only, to walk them): offsets come from lstat alone."""
        root = edge_tree(self.tmpdir())
        expected = _listing_from_nar(root)
        real_open = os.open
        opened: list[object] = []

        def directories_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if not flags & os.O_DIRECTORY:
                raise AssertionError(f"nar_listing opened the file {path!r}")
            opened.append(path)
            return real_open(path, flags, *args, **kwargs)

        self.patch(os, "open", directories_only)
        self.assertEqual(nar_listing(root), expected)
        self.assertTrue(opened)

    def test_same_as_from_stream(self) -> None:
        """Listing the filesystem equals listing a NAR stream of it."""
        d = self.tmpdir()
        make_tree(os.path.join(d, "proto"))
        edge_tree(os.path.join(d, "edge"))
        for top in ("proto", "edge", "proto/run.sh", "proto/link"):
            path = os.path.join(d, top)
            self.assertEqual(nar_listing(path), _listing_from_nar(path), top)

    def test_errors(self) -> None:
        """A special file is a NarError; a missing path an OSError."""
        d = self.tmpdir()
        self.assertRaises(OSError, nar_listing, os.path.join(d, "missing"))
        os.mkfifo(os.path.join(d, "fifo"))
        self.assertRaises(NarError, nar_listing, d)


class BuilderTests(SynchronousTestCase):
    """NarListingBuilder assembles entries in NAR order."""

    def test_orphan_entry(self) -> None:
        """An entry whose directory was never added is a NarError."""
        builder = NarListingBuilder()
        builder(NarEntry(b"", "directory"))
        self.assertRaises(NarError, builder, NarEntry(b"a/b", "regular", 1, False, 100))

    def test_no_root(self) -> None:
        """A document without a root entry is a NarError."""
        self.assertRaises(NarError, NarListingBuilder().document)
        self.assertRaises(NarError, listing_from_entries, [])

    def test_non_utf8_names(self) -> None:
        """Names that are not UTF-8 survive as surrogate escapes and still render as JSON."""
        listing = listing_from_entries(
            [NarEntry(b"", "directory"), NarEntry(b"\xff", "symlink", target=b"\xfe")]
        )
        rendered = render_listing(listing)
        self.assertEqual(json.loads(rendered)["root"]["entries"]["\udcff"]["target"], "\udcfe")


class RealNixTests(SynchronousTestCase):
    """Listings against what ``nix copy ... write-nar-listing=true`` writes."""

    if NIX_MISSING:
        skip = NIX_SKIP

    def test_same_as_nix(self) -> None:
        """For the protocol tree, the edge-case tree, a file and a symlink, our listing equals Nix's .ls."""
        env = NixEnv("listing")
        src = scratch_dir("lsrc")
        make_tree(os.path.join(src, "proto"))
        edge_tree(os.path.join(src, "edge"))
        write(os.path.join(src, "file"), b"hello\n", 0o755)
        os.symlink("/nowhere", os.path.join(src, "sym"))
        for name in ("proto", "edge", "file", "sym"):
            path = env.add(os.path.join(src, name))
            cache = env.copy_to_file_cache(path, listing=True)
            theirs = read_cache_file(cache, path, "ls")
            ours = nar_listing(env.real_path(path))
            self.assertEqual(ours, json.loads(theirs), name)
            if name in ("proto", "file", "sym"):
                self.assertEqual(render_listing(ours), theirs, name)
