"""Tests for :mod:`peernix.nix.ca`, against store paths a real Nix made."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.ca import ca_matches, compress_hash

# Recorded from a real Nix 2.8 (nix-store --add, --add-fixed, builtins.toFile).
KNOWN = [
    ("/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f", "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw", []),
    ("/nix/store/1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f", "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", []),
    ("/nix/store/pbqmppvgnnyqxagz7bnmwfdfvr3h43f2-f", "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", []),
    (
        "/nix/store/zg74fsdx7hvcwigs8gkxjd4xkvk4j1cx-d",
        "fixed:r:sha512:2h23a46qjhyvr43bygxpmhqjq1q6pzwhcaj0icgyl7ib47cm8ni6vaz1vxjqdvl3njdhnx5jxghjci3fmk6033ki04kbi92d3fiwh1w",
        [],
    ),
    ("/nix/store/hxk820apsjsq6709id0vbfsikipvfka6-t", "text:sha256:193s6bfb4ncbr0d3rpb177cac43b2z2h3afxi7grcswgci346hwg", []),
    (
        "/nix/store/0dpmgcrc0lj1zkw8ig04vqvbm8dlrf7w-t2",
        "text:sha256:1yjm2xxhfa2q1h65cs96qvg41q8n849zfdc1231wm5y6ps189sfq",
        ["hxk820apsjsq6709id0vbfsikipvfka6-t"],
    ),
]


def _tamper(path: str) -> str:
    """:returns: ``path`` with one character of its hash part changed."""
    i = len("/nix/store/") + 5
    return path[:i] + ("0" if path[i] != "0" else "1") + path[i + 1:]


class CaMatchesTests(SynchronousTestCase):
    """Recomputing store paths from CA fields."""

    def test_known_paths(self) -> None:
        """Every recorded (path, CA, references) from a real Nix matches."""
        for path, ca, refs in KNOWN:
            self.assertTrue(ca_matches(ca, path, refs), path)

    def test_full_path_references(self) -> None:
        """References may be given as full paths as well as basenames."""
        path, ca, refs = KNOWN[-1]
        self.assertTrue(ca_matches(ca, path, ["/nix/store/" + r for r in refs]))

    def test_tampered_path(self) -> None:
        """A different hash part or name does not match."""
        for path, ca, refs in KNOWN:
            self.assertFalse(ca_matches(ca, _tamper(path), refs), path)
            self.assertFalse(ca_matches(ca, path + "x", refs), path)

    def test_tampered_references(self) -> None:
        """Adding, dropping or changing references breaks a text CA."""
        path, ca, refs = KNOWN[-1]
        self.assertFalse(ca_matches(ca, path, []))
        self.assertFalse(ca_matches(ca, path, refs + ["0dpmgcrc0lj1zkw8ig04vqvbm8dlrf7w-x"]))
        flat_path, flat_ca, _ = KNOWN[1]
        self.assertFalse(ca_matches(flat_ca, flat_path, ["hxk820apsjsq6709id0vbfsikipvfka6-t"]))

    def test_other_method_same_hash(self) -> None:
        """The same digest under another ingestion method names another path."""
        path, ca, refs = KNOWN[0]
        self.assertFalse(ca_matches(ca.replace("fixed:r:", "fixed:"), path, refs))
        self.assertFalse(ca_matches(ca.replace("fixed:r:", "text:"), path, refs))

    def test_garbage_never_raises(self) -> None:
        """Unparsable input gives False, never an exception."""
        path = KNOWN[0][0]
        for ca in [
            "",
            "text",
            "text:",
            "text:sha256:xyz",
            "text:md5:00000000000000000000000000",
            "fixed:git:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm",
            "fixed:sha256-BLAH",
            "fixed:r:sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "nar:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
        ]:
            self.assertFalse(ca_matches(ca, path, []), ca)
        self.assertFalse(ca_matches(KNOWN[0][1], "not a path", []))
        self.assertFalse(ca_matches(KNOWN[0][1], path, ["not/a/ref"]))
        self.assertFalse(ca_matches(None, path, []))  # type: ignore[arg-type]

    def test_compress_hash(self) -> None:
        """Compression XOR-folds the digest onto the output size."""
        self.assertEqual(compress_hash(bytes(range(32)), 20), bytes(i ^ (i + 20) if i < 12 else i for i in range(20)))


class RealNixCaTests(SynchronousTestCase):
    """CA fields recorded by a real Nix in a chroot store's database."""

    if shutil.which("nix-store") is None:
        skip = "nix-store not installed"

    def test_real_store(self) -> None:
        """Paths added as text, flat and recursive fixed outputs all match their CA, tampered ones do not."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        store = os.path.join(tmp, "store")
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "dir", "sub"))
        with open(os.path.join(src, "file"), "w") as f:
            f.write("peernix ca test\n")
        with open(os.path.join(src, "dir", "sub", "x"), "w") as f:
            f.write("x\n")
        env = dict(os.environ, NIX_CONF_DIR=tmp, XDG_CACHE_HOME=os.path.join(tmp, "cache"), NIX_REMOTE="")

        def run(*args: str) -> str:
            # Blocking is fine here: this test is not on a reactor.
            out = subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=120)
            return out.stdout.strip()

        run("nix-store", "--store", store, "--add", os.path.join(src, "file"))
        run("nix-store", "--store", store, "--add-fixed", "sha256", os.path.join(src, "file"))
        run("nix-store", "--store", store, "--add-fixed", "--recursive", "sha256", os.path.join(src, "dir"))
        run("nix-store", "--store", store, "--add-fixed", "sha512", os.path.join(src, "file"))
        run(
            "nix-instantiate",
            "--store",
            store,
            "--read-write-mode",
            "--eval",
            "-E",
            'let a = builtins.toFile "peernix-a" "A"; in builtins.toFile "peernix-b" "B ${a}"',
        )
        db = sqlite3.connect(f"file:{store}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
        self.addCleanup(db.close)
        rows = db.execute(
            "select v.path, v.ca, (select group_concat(p.path) from Refs r join ValidPaths p"
            " on r.reference = p.id where r.referrer = v.id) from ValidPaths v"
        ).fetchall()
        kinds = set()
        for path, ca, refs in rows:
            references = refs.split(",") if refs else []
            kinds.add(ca.split(":")[0] + (":r" if ca.startswith("fixed:r:") else "") + (":refs" if references else ""))
            self.assertTrue(ca_matches(ca, path, references), (path, ca))
            self.assertFalse(ca_matches(ca, _tamper(path), references), (path, ca))
        self.assertEqual(kinds, {"fixed", "fixed:r", "text", "text:refs"})
