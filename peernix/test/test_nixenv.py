"""Tests for :mod:`peernix.test.nixenv`, the real-Nix test fixtures."""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import sqlite3
import stat

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from peernix.test import nixenv
from peernix.test.nixenv import (
    NIX_2_8,
    NIX_2_24,
    NIX_CLIENTS,
    ChrootStore,
    Closure,
    Executable,
    NixInstall,
    RealClientTests,
    Symlink,
)


def _db_row(store: ChrootStore, path: str) -> tuple[str | None, str | None, int | None]:
    """:returns: ``(ca, sigs, narSize)`` of ``path`` read straight from the store DB."""
    with sqlite3.connect(f"file:{store.db_path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT ca, sigs, narSize FROM ValidPaths WHERE path = ?", (path,)).fetchone()
    assert row is not None, path
    return row[0], row[1], row[2]


@attrs.frozen
class _Shared:
    """One signed closure in one store, built on first use and shared by the tests."""

    tmp: str
    store: ChrootStore
    closure: Closure
    secret_key_file: str
    public_key: str


_shared: list[_Shared] = []


def _get_shared() -> _Shared:
    """
    :returns: the module's shared fixture, building it the first time.  It
        lives in trial's working directory (``_trial_temp``), which trial
        deletes on the next run; trial runs no per-class hooks, hence this.
    """
    if not _shared:
        tmp = os.path.abspath("nixenv-shared")
        sk, _, pk = nixenv.generate_key(os.path.join(tmp, "keys"), "test-1")
        store = ChrootStore(os.path.join(tmp, "store"))
        _shared.append(_Shared(tmp, store, store.build_closure(secret_key_file=sk), sk, pk))
    return _shared[0]


class ChrootStoreTests(SynchronousTestCase):
    """The chroot store fixtures, against the real Nix."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        shared = _get_shared()
        self.tmp = shared.tmp
        self.store = shared.store
        self.closure = shared.closure
        self.secret_key_file = shared.secret_key_file
        self.public_key = shared.public_key

    def test_generate_key_formats(self) -> None:
        """generate_key writes Nix-format key files and returns the public key text."""
        self.assertTrue(self.public_key.startswith("test-1:"))
        with open(self.secret_key_file) as f:
            self.assertTrue(f.read().startswith("test-1:"))

    def test_add_text(self) -> None:
        """add_text stores a regular file with the given name and contents and a fixed:r CA."""
        path = self.store.add_text("hello.txt", "hello\n")
        self.assertTrue(path.startswith("/nix/store/") and path.endswith("-hello.txt"))
        with open(self.store.real_path(path), "rb") as f:
            self.assertEqual(f.read(), b"hello\n")
        ca, _, nar_size = _db_row(self.store, path)
        self.assertEqual(ca, "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
        self.assertEqual(nar_size, 120)

    def test_to_file_text_ca(self) -> None:
        """to_file stores a path with a text: CA, like builtins.toFile."""
        path = self.store.to_file("note", 'quote " and ${dollar}')
        with open(self.store.real_path(path)) as f:
            self.assertEqual(f.read(), 'quote " and ${dollar}')
        ca, _, _ = _db_row(self.store, path)
        assert ca is not None
        self.assertTrue(ca.startswith("text:sha256:"))

    def test_add_tree(self) -> None:
        """add_tree stores files, executables, symlinks, empty files and directories."""
        path = self.store.add_tree(
            "tree",
            {"bin": {"run": Executable(b"#!/bin/sh\n")}, "link": Symlink("bin/run"), "empty": b"", "dir": {}},
        )
        real = self.store.real_path(path)
        self.assertTrue(os.stat(os.path.join(real, "bin", "run")).st_mode & stat.S_IXUSR)
        self.assertEqual(os.readlink(os.path.join(real, "link")), "bin/run")
        self.assertEqual(os.path.getsize(os.path.join(real, "empty")), 0)
        self.assertEqual(os.listdir(os.path.join(real, "dir")), [])
        nar = self.store.dump(path)
        self.assertTrue(nar.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1"))
        self.assertIn(b"executable", nar)

    def test_closure_references(self) -> None:
        """build_closure gives a chain of references and a self-reference."""
        c = self.closure
        self.assertEqual(self.store.query(c.leaf, "references"), [])
        self.assertEqual(self.store.query(c.mid, "references"), [c.leaf])
        self.assertEqual(sorted(self.store.query(c.top, "references")), sorted([c.mid, c.top]))

    def test_closure_derivers_and_sigs(self) -> None:
        """Closure outputs record their .drv deriver and are signed by the secret key."""
        for out in self.closure.outputs:
            self.assertTrue(self.closure.derivers[out].endswith(".drv"))
            ca, sigs, _ = _db_row(self.store, out)
            self.assertIsNone(ca)
            assert sigs is not None
            self.assertTrue(sigs.startswith("test-1:"))

    def test_sign(self) -> None:
        """sign adds a signature to a path that had none."""
        path = self.store.add_text("unsigned", "x")
        self.assertIsNone(_db_row(self.store, path)[1])
        self.store.sign([path], self.secret_key_file)
        sigs = _db_row(self.store, path)[1]
        assert sigs is not None
        self.assertTrue(sigs.startswith("test-1:"))

    def test_make_big_path(self) -> None:
        """make_big_path stores a file of exactly the requested size."""
        path = self.store.make_big_path(3 * 1024 * 1024 + 5)
        self.assertEqual(os.path.getsize(self.store.real_path(path)), 3 * 1024 * 1024 + 5)

    def test_delete(self) -> None:
        """delete removes an unreferenced path from disk and DB."""
        path = self.store.add_text("doomed", "z")
        self.store.delete(path)
        self.assertFalse(self.store.is_valid(path))
        self.assertFalse(os.path.lexists(self.store.real_path(path)))

    def test_real_path_rejects_outside(self) -> None:
        """real_path refuses paths outside /nix/store."""
        self.assertRaises(ValueError, self.store.real_path, "/etc/passwd")


class _ClientTests(RealClientTests):
    """A real client of each generation substitutes from a file cache made by Nix 2.8."""

    def test_copy_and_substitute(self) -> None:
        """A NixClient substitutes a signed closure from a file cache, and a miss or an untrusted key fails."""
        shared = _get_shared()
        store, closure, public_key = shared.store, shared.closure, shared.public_key
        cache = os.path.join(shared.tmp, "cache")
        if not os.path.exists(cache):
            store.copy_to_file_cache([closure.top], cache)
        narinfo = os.path.join(cache, closure.top.split("/")[3][:32] + ".narinfo")
        with open(narinfo) as f:
            self.assertIn("Sig: test-1:", f.read())
        client = self.nix_client(root=os.path.join(shared.tmp, f"client-{self.nix.release}"))
        self.assertIs(client.nix, self.nix)
        url = f"file://{cache}"
        untrusted = client.substitute([closure.top], url, ["other-1:" + public_key.split(":")[1]])
        self.assertEqual(untrusted.returncode, 1)
        self.assertIn(b"not signed by any of the keys", untrusted.stderr)
        ok = client.substitute([closure.top], url, [public_key])
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertEqual(client.verify(*closure.outputs).returncode, 0)
        self.assertTrue(client.is_valid(closure.leaf))
        miss = client.substitute([store.add_text("not-in-cache", "y")], url, [public_key])
        self.assertEqual(miss.returncode, 1)

    def test_version(self) -> None:
        """The client's tools are the release it claims to be, and its nix commands run."""
        version = self.nix.version
        assert version is not None
        self.assertEqual(".".join(map(str, version[:2])), self.nix.release)
        client = self.nix_client()
        done = client.nix_command(["--version"])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"(Nix) {self.nix.release}.".encode(), done.stdout)


class ClientNix28Tests(_ClientTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = nixenv.SKIP_NO_BUILD or NIX_2_8.missing


class ClientNix224Tests(_ClientTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = nixenv.SKIP_NO_BUILD or NIX_2_24.missing


class NixInstallTests(SynchronousTestCase):
    """NixInstall describes a client generation and says why it is missing."""

    def test_clients(self) -> None:
        """Both generations are listed; 2.8 runs from PATH, 2.24 from /opt/nix-modern."""
        self.assertEqual(NIX_CLIENTS, (NIX_2_8, NIX_2_24))
        self.assertEqual(NIX_2_8.tool("nix-store"), "nix-store")
        self.assertEqual(NIX_2_24.tool("nix-store"), "/opt/nix-modern/bin/nix-store")
        self.assertEqual(NIX_2_24.nix_command(),
                         ["/opt/nix-modern/bin/nix", "--extra-experimental-features", "nix-command"])
        self.assertEqual(NIX_2_24.name, "Nix 2.24")

    def test_missing(self) -> None:
        """A client whose tools are absent is missing, with the install hint as part of the reason."""
        absent = NixInstall(release="9.9", bin_dir=self.mktemp(), install_hint="run the installer")
        reason = absent.missing
        assert reason is not None
        self.assertIn("Nix 9.9 not installed", reason)
        self.assertIn("run the installer", reason)
        self.assertIsNone(absent.version)
        self.assertFalse(absent.at_least(2, 8))

    def test_wrong_release(self) -> None:
        """Tools of another release do not count as the client: 2.24's tools described as 2.8."""
        if NIX_2_24.missing:
            raise SkipTest(NIX_2_24.missing)
        wrong = NixInstall(release="2.8", bin_dir=NIX_2_24.bin_dir, install_hint="hint")
        reason = wrong.missing
        assert reason is not None
        self.assertIn("is 2.24.", reason)
        self.assertTrue(wrong.at_least(2, 16))
        self.assertFalse(wrong.at_least(2, 99))
