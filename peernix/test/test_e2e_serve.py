"""
End to end: a real ``twist peernix`` serving a chroot store, and real Nix 2.8
clients substituting from it over loopback.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import parse_narinfo
from peernix.test.daemon import Daemon, free_port, http_get
from peernix.test.nixenv import SKIP_NO_BUILD, ChrootStore, Executable, NixClient, Symlink, generate_key

BIG_SIZE = 100 * 1024 * 1024


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
        self.big = s.make_big_path(BIG_SIZE)
        self.small = [self.text, self.empty_file, self.odd_name, self.tree]
        # Pass-through: the DB carries the upstream signature for everything.
        s.sign(self.small + [self.big], self.upstream_sk)
        self.everything = self.small + list(self.closure.outputs) + [self.big]

    def destroy(self) -> None:
        self.store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


_shared: tuple[_Fixture, Daemon] | None = None


class ServeEndToEndTests(SynchronousTestCase):
    """A real Nix client substitutes every kind of path from a real daemon."""

    skip = SKIP_NO_BUILD
    fixture: _Fixture
    daemon: Daemon

    def setUp(self) -> None:
        # trial has no setUpClass: build the store and start the daemon once,
        # on first use; they are removed when the test process exits.
        global _shared
        if _shared is None:
            fixture = _Fixture()
            atexit.register(fixture.destroy)
            port = free_port()
            daemon = Daemon(
                ["--store-root", fixture.store.root, "--secret-key-file", fixture.own_sk,
                 "--no-broadcast", "--no-mdns", "--udp-port", str(port)],
                os.path.join(fixture.tmp, "daemon.log"), port=port)
            atexit.register(daemon.stop)
            daemon.wait_ready()
            _shared = (fixture, daemon)
        self.fixture, self.daemon = _shared

    def _client(self) -> NixClient:
        client = NixClient(tempfile.mkdtemp(prefix="peernix-e2e-client-"))
        self.addCleanup(client.remove)
        return client

    def _substitute_all(self, keys: list[str]) -> NixClient:
        client = self._client()
        done = client.substitute(self.fixture.everything, self.daemon.url, keys)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + self.daemon.log()[-3000:])
        for path in self.fixture.everything:
            verified = client.verify(path)
            self.assertEqual(verified.returncode, 0, verified.stderr)
        return client

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
        """A client trusting neither key refuses the non-CA paths."""
        client = self._client()
        done = client.substitute([self.fixture.closure.top], self.daemon.url, ["other-1:" + "A" * 43 + "="])
        self.assertNotEqual(done.returncode, 0)

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
