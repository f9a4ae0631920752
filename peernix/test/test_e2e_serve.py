"""
End to end: a real ``twist peernix`` serving a chroot store, and real Nix
clients of both generations (Debian's 2.8 and 2.24) substituting from it
over loopback and reading it as an ``http://`` store (``nix path-info``,
``nix store ls``, ``nix store cat``, ``nix log``, ``nix store verify``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import parse_hash
from peernix.nix.narinfo import parse_narinfo
from peernix.test.daemon import Daemon, free_port, http_get, shared_fixture, start_fixture
from peernix.test.nixenv import (
    BUILD_PRELUDE,
    NIX_2_8,
    NIX_2_24,
    SKIP_NO_BUILD,
    ChrootStore,
    Executable,
    NixClient,
    RealClientTests,
    Symlink,
    generate_key,
)

BIG_SIZE = 100 * 1024 * 1024
#: What the logged build prints, so ``nix log`` must show it.
LOG_LINE = "peernix-e2e-build-log-line"


class _Fixture:
    """One source store with every kind of path, shared by the tests of this module."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-serve-")
        self.store = ChrootStore(os.path.join(self.tmp, "src"))
        self.upstream_sk, _, self.upstream_pk = generate_key(self.tmp, "upstream-e2e-1")
        self.own_sk, _, self.own_pk = generate_key(self.tmp, "e2ehost-peernix-1")
        s = self.store
        self.text = s.add_text("hello.txt", "hello\n")
        self.empty_file = s.add_text("empty", "")
        self.odd_name = s.add_text("odd+name=x?y.txt", "odd characters\n")
        self.tree = s.add_tree("tree", {
            "bin": {"run": Executable(b"#!/bin/sh\necho run\n")},
            "link": Symlink("bin/run"),
            "dangling": Symlink("nowhere"),
            "empty": b"",
            "emptydir": {},
            "a": {"b": {"c": {"deep.txt": b"deep\n"}}},
        })
        self.closure = s.build_closure(secret_key_file=self.upstream_sk, tag="e2e")
        # A build whose builder prints: its log is what `nix log` shows.
        [self.logged] = s.build(BUILD_PRELUDE + f"""
  logged = mk "e2e-logged" "echo {LOG_LINE}; mkdir $out; echo logged > $out/data";
in [ logged ]
""", secret_key_file=self.upstream_sk)
        self.big = s.make_big_path(BIG_SIZE)
        self.small = [self.text, self.empty_file, self.odd_name, self.tree]
        # Pass-through: the DB carries the upstream signature for everything.
        s.sign(self.small + [self.big], self.upstream_sk)
        self.everything = self.small + list(self.closure.outputs) + [self.logged, self.big]
        self.daemon: Daemon | None = None

    def start(self) -> None:
        """Start the daemon serving the store (signing with the own key) and wait until it serves."""
        port = free_port()
        self.daemon = Daemon(
            ["--store-root", self.store.root, "--secret-key-file", self.own_sk,
             "--no-broadcast", "--no-mdns", "--udp-port", str(port)],
            os.path.join(self.tmp, "daemon.log"), port=port)
        self.daemon.wait_ready()

    def destroy(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self.store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fixture() -> _Fixture:
    """:returns: the module's store and daemon, made on first use (trial has no setUpClass), removed at exit."""
    fixture = shared_fixture(__name__, lambda: start_fixture(_Fixture()))
    assert fixture.daemon is not None
    return fixture


class ServeEndToEndTests(SynchronousTestCase):
    """What the daemon serves, read without a Nix client (the client tests are below)."""

    skip = SKIP_NO_BUILD
    fixture: _Fixture
    daemon: Daemon

    def setUp(self) -> None:
        self.fixture = _fixture()
        assert self.fixture.daemon is not None
        self.daemon = self.fixture.daemon

    def test_narinfo_fields_equal_nix_copy(self) -> None:
        """Each narinfo field equals what nix copy --to file://...?compression=none writes, but URL and our own Sig."""
        dest = os.path.join(self.fixture.tmp, "filecache")
        self.fixture.store.copy_to_file_cache(self.fixture.everything, dest)
        for path in self.fixture.everything:
            hash_part = path[len("/nix/store/"):][:32]
            with open(os.path.join(dest, hash_part + ".narinfo"), "rb") as f:
                theirs = parse_narinfo(f.read())
            status, body = http_get(f"{self.daemon.url}/{hash_part}.narinfo")
            self.assertEqual(status, 200)
            ours = parse_narinfo(body)
            for field in ("store_path", "compression", "file_hash", "file_size", "nar_hash", "nar_size",
                          "references", "deriver", "ca"):
                self.assertEqual(getattr(ours, field), getattr(theirs, field), f"{field} of {path}")
            own = [s for s in ours.sigs if s.startswith("e2ehost-peernix-1:")]
            self.assertEqual(len(own), 1)
            self.assertEqual([s for s in ours.sigs if s not in own], list(theirs.sigs))

    def test_loads_only_what_it_uses(self) -> None:
        """The daemon serves without pyOpenSSL or cryptography (plain HTTP) and, with --no-mdns, without zeroconf."""
        with open(f"/proc/{self.daemon.process.pid}/maps") as f:
            maps = f.read()
        self.assertIn("zstandard", maps)  # the check reads the right process
        self.assertNotIn("/cryptography/", maps)
        self.assertNotIn("/OpenSSL/", maps)
        self.assertNotIn("/zeroconf/", maps)

    def test_bad_requests_are_4xx_and_leave_the_server_serving(self) -> None:
        """Malformed hashes, traversal, oversize requests and wrong methods get 4xx; the server keeps serving."""
        base = f"http://127.0.0.1:{self.daemon.port}"
        hash_part = self.fixture.text[len("/nix/store/"):][:32]
        for path in [
            "/nix-cache/" + "e" * 32 + ".narinfo",          # e is not in the nix32 alphabet
            "/nix-cache/" + "0" * 31 + ".narinfo",          # too short
            "/nix-cache/" + "0" * 33 + ".narinfo",          # too long
            "/nix-cache/nar/" + hash_part + "-xyz.nar",      # bad narhash
            "/nix-cache/../../etc/passwd",
            "/nix-cache/%2e%2e/%2e%2e/etc/passwd",
            "/nix-cache/log/../../../etc/passwd",
            "/nix-cache/" + "a" * 5000,
        ]:
            status, _ = http_get(base + path)
            self.assertTrue(400 <= status < 500, f"{path!r} gave {status}")
        for method in ("PUT", "POST", "DELETE"):
            status = _raw_status(self.daemon.port, f"{method} /nix-cache/{hash_part}.narinfo HTTP/1.1\r\n"
                                 "Host: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.assertEqual(status, 405, method)
        status = _raw_status(self.daemon.port, "GET /" + "x" * 70000 + " HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(status == 0 or 400 <= status < 500, status)
        status = _raw_status(self.daemon.port, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + "y" * 70000 + "\r\n\r\n")
        self.assertTrue(status == 0 or 400 <= status < 500, status)
        status, _ = http_get(f"{self.daemon.url}/{hash_part}.narinfo")
        self.assertEqual(status, 200)


def _raw_status(port: int, request: str) -> int:
    """Send a raw HTTP request; :returns: the status code, or 0 if the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request.encode())
        except OSError:
            pass
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return 0
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _hash_part(path: str) -> str:
    return path[len("/nix/store/"):][:32]


def _path_infos(out: bytes) -> dict[str, dict[str, Any]]:
    """
    :returns: ``nix path-info --json`` output keyed by store path: Nix 2.8
        prints a list of objects with a ``path``, Nix 2.19 and newer an
        object keyed by path.
    """
    data = json.loads(out)
    if isinstance(data, list):
        return {info["path"]: info for info in data}
    infos: dict[str, dict[str, Any]] = data
    return infos


class _ServeClientTests(RealClientTests):
    """A real Nix client substitutes every kind of path from a real daemon, and reads it as an http:// store."""

    fixture: _Fixture
    daemon: Daemon

    def setUp(self) -> None:
        self.fixture = _fixture()
        assert self.fixture.daemon is not None
        self.daemon = self.fixture.daemon

    def _client(self) -> NixClient:
        return self.nix_client("peernix-e2e-client-")

    def _substitute_all(self, keys: list[str]) -> NixClient:
        client = self._client()
        done = client.substitute(self.fixture.everything, self.daemon.url, keys)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + self.daemon.log()[-3000:])
        verified = client.verify(*self.fixture.everything)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        for path in self.fixture.everything:
            self.assertTrue(client.is_valid(path), path)
        return client

    def _nix(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``nix ARGS --store <the daemon>`` with a fresh client's config and cache; when ``ok``, check it exited 0."""
        done = self._client().nix_command([*args, "--store", self.daemon.url])
        if ok:
            self.assertEqual(done.returncode, 0,
                             done.stderr.decode(errors="replace") + self.daemon.log()[-3000:])
        return done

    def test_substitutes_trusting_only_our_key(self) -> None:
        """Every kind of path, closure and 100 MB path included, substitutes trusting only the daemon's key."""
        client = self._substitute_all([self.fixture.own_pk])
        with open(client.real_path(self.fixture.closure.top) + "/self") as f:
            self.assertEqual(f.read().strip(), self.fixture.closure.top)
        self.assertTrue(os.access(client.real_path(self.fixture.tree) + "/bin/run", os.X_OK))
        self.assertEqual(os.readlink(client.real_path(self.fixture.tree) + "/link"), "bin/run")
        self.assertEqual(client.query(self.fixture.closure.top, "deriver"),
                         [self.fixture.closure.derivers[self.fixture.closure.top]])

    def test_substitutes_trusting_only_the_upstream_key(self) -> None:
        """Signatures already in the DB pass through, so trusting only the original signer works."""
        self._substitute_all([self.fixture.upstream_pk])

    def test_untrusted_is_refused_by_nix(self) -> None:
        """A client trusting neither key refuses the non-CA paths and imports nothing."""
        client = self._client()
        done = client.substitute([self.fixture.closure.top], self.daemon.url, ["other-1:" + "A" * 43 + "="])
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"not signed by any of the keys", done.stderr)
        self.assertFalse(client.is_valid(self.fixture.closure.top))

    def test_path_info(self) -> None:
        """nix path-info --store http://... -r --json --sigs gives each path's NarHash, size, references, deriver and signatures."""
        fx = self.fixture
        paths = [fx.closure.top, fx.tree, fx.logged]
        done = self._nix("path-info", "-r", "--json", "--sigs", *paths)
        theirs = _path_infos(done.stdout)
        expected: dict[str, dict[str, Any]] = {
            str(info["path"]): info for info in fx.store.path_info_json(list(fx.closure.outputs) + [fx.tree, fx.logged])
        }
        self.assertEqual(sorted(theirs), sorted(expected))
        for path, info in theirs.items():
            source = expected[path]
            self.assertEqual(parse_hash(info["narHash"]), parse_hash(source["narHash"]), path)
            self.assertEqual(info["narSize"], source["narSize"], path)
            self.assertEqual(sorted(info["references"]), sorted(source["references"]), path)
            self.assertEqual(info.get("deriver"), source.get("deriver"), path)
            self.assertEqual(info.get("ca"), source.get("ca"), path)
            sigs = info["signatures"]
            self.assertTrue(any(sig.startswith("e2ehost-peernix-1:") for sig in sigs), (path, sigs))
            self.assertTrue(any(sig.startswith("upstream-e2e-1:") for sig in sigs), (path, sigs))
        # Without --json: the path, once.
        plain = self._nix("path-info", fx.text)
        self.assertEqual(plain.stdout.decode().split(), [fx.text])
        # A path the daemon lacks is an error, not a crash of the store.
        missing = self._nix("path-info", "/nix/store/" + "1" * 32 + "-nowhere", ok=False)
        self.assertNotEqual(missing.returncode, 0)
        self.assertNotIn(b"HTTP error 5", missing.stderr)

    def test_store_ls(self) -> None:
        """nix store ls --store http://... -R lists every entry of a tree: files, executables, symlinks, empty dirs."""
        fx = self.fixture
        done = self._nix("store", "ls", "-R", "-l", fx.tree)
        lines = done.stdout.decode().splitlines()
        names = {line.split()[-1] if " -> " not in line else line.split()[-3] for line in lines}
        for entry in ("./bin", "./bin/run", "./link", "./dangling", "./empty", "./emptydir", "./a/b/c/deep.txt"):
            self.assertIn(entry, names, lines)
        by_name = {(line.split()[-1] if " -> " not in line else line.split()[-3]): line for line in lines}
        self.assertTrue(by_name["./bin/run"].startswith("-r-xr-xr-x"), by_name["./bin/run"])
        self.assertTrue(by_name["./empty"].startswith("-r--r--r--"), by_name["./empty"])
        self.assertTrue(by_name["./emptydir"].startswith("dr-xr-xr-x"), by_name["./emptydir"])
        self.assertTrue(by_name["./link"].startswith("lrwxrwxrwx"), by_name["./link"])
        self.assertTrue(by_name["./link"].endswith(" -> bin/run"), by_name["./link"])
        self.assertTrue(by_name["./dangling"].endswith(" -> nowhere"), by_name["./dangling"])
        # A single regular file lists as itself.
        single = self._nix("store", "ls", fx.text)
        self.assertEqual(single.stdout.decode().split(), [fx.text.split("/")[-1]])

    def test_store_cat(self) -> None:
        """nix store cat --store http://... prints a file of a path, a nested one, an empty one, and a self-reference."""
        fx = self.fixture
        self.assertEqual(self._nix("store", "cat", fx.tree + "/a/b/c/deep.txt").stdout, b"deep\n")
        self.assertEqual(self._nix("store", "cat", fx.tree + "/empty").stdout, b"")
        self.assertEqual(self._nix("store", "cat", fx.text).stdout, b"hello\n")
        self.assertEqual(self._nix("store", "cat", fx.closure.top + "/self").stdout.strip(),
                         fx.closure.top.encode())
        missing = self._nix("store", "cat", fx.tree + "/no-such-file", ok=False)
        self.assertNotEqual(missing.returncode, 0)

    def test_log(self) -> None:
        """nix log --store http://... OUTPUT prints the build log of the output's deriver."""
        fx = self.fixture
        done = self._nix("log", fx.logged)
        self.assertIn(LOG_LINE.encode(), done.stdout)

    def test_store_verify(self) -> None:
        """nix store verify --store http://... checks contents and signatures: our key or upstream's pass, another fails."""
        fx = self.fixture
        paths = [fx.closure.top, fx.tree, fx.text]
        for key in (fx.own_pk, fx.upstream_pk):
            self._nix("store", "verify", "-r", "--option", "trusted-public-keys", key, *paths)
        other = "other-1:" + "A" * 43 + "="
        untrusted = self._nix("store", "verify", "-r", "--option", "trusted-public-keys", other, *paths, ok=False)
        # Exit status bit 2: untrusted paths; bit 1 (corrupted) must be clear.
        self.assertEqual(untrusted.returncode & 3, 2, untrusted.stderr)
        # Only the unsigned-by-anyone-trusted paths are named; none is corrupted.
        self.assertNotIn(b"corrupted", untrusted.stderr)
        # --sigs-needed 2: both keys trusted, and every path carries both signatures.
        both = " ".join((fx.own_pk, fx.upstream_pk))
        self._nix("store", "verify", "-r", "--sigs-needed", "2", "--option", "trusted-public-keys", both, *paths)


class ServeNix28Tests(_ServeClientTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = SKIP_NO_BUILD or NIX_2_8.missing


class ServeNix224Tests(_ServeClientTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = SKIP_NO_BUILD or NIX_2_24.missing
