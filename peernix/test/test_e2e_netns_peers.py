"""
End to end in network namespaces: a real Nix client (Debian's 2.8, and
2.24) on host A substitutes a closure that only host B has, through A's
peernix, while host C is a malicious peer answering faster than B.

Three hosts on a bridge made (and removed) by the test, every process on
port 9999 of its own namespace, so nothing leaves them:

- B: a real peernix serving a closure signed by an "upstream" key.
- C: :mod:`peernix.test.malicious_peer`, answering every request at once:
  forged narinfos (the right store path, the NarHash of garbage, a signature
  that verifies against nothing) for ``mid``, and B's genuine signed
  narinfos replayed for ``leaf`` and ``top``, whose NAR URLs serve B's NARs
  with a few bytes flipped (same length).
- A: a real peernix with ``--peer`` B and C (no broadcast or mDNS, so the
  peer set is fixed), trusting only the upstream key.

The closure's NARs are small, and peernix's relay holds NARs of up to
2 MiB back until they are verified whole, falling back to the next peer
when one fails: so a corrupted NAR from C never reaches the client, and the
*first* ``nix-store -r`` must succeed, with nothing retried by Nix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import peernix.test.malicious_peer
from peernix.nix.narinfo import parse_narinfo
from peernix.test.daemon import Daemon, http_get, shared_fixture
from peernix.test.netns import Host, TestNetwork, netns_unavailable
from peernix.test.nixenv import (
    NIX_2_8,
    NIX_2_24,
    SKIP_NO_BUILD,
    ChrootStore,
    NixClient,
    RealClientTests,
    generate_key,
)

#: Every process's port, TCP and UDP (each namespace has its own).
PORT = 9999
#: The upstream key's name: C forges signatures under it.
UPSTREAM_NAME = "upstream-e2e-netns-1"
WAIT = 15.0

_SKIP = netns_unavailable() or SKIP_NO_BUILD


def hash_part(store_path: str) -> str:
    """:returns: the 32-character hash part of ``/nix/store/<hash>-<name>``."""
    return store_path[len("/nix/store/"):][:32]


class _Fixture:
    """The upstream key, B's store with the signed closure, and per-path material for C."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-netns-peers-")
        keys = os.path.join(self.tmp, "keys")
        self.upstream_sk, _, self.upstream_pk = generate_key(keys, UPSTREAM_NAME)
        self.b_sk, _, _ = generate_key(keys, "bob-peernix-1")
        self.a_sk, _, _ = generate_key(keys, "alice-peernix-1")
        self.b_store = ChrootStore(os.path.join(self.tmp, "b"))
        self.closure = self.b_store.build_closure(secret_key_file=self.upstream_sk, tag="netns")
        self.nars = {path: self.b_store.dump(path) for path in self.closure.outputs}

    def destroy(self) -> None:
        self.b_store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)




class _MaliciousPeerTests(RealClientTests):
    """An honest and a lying peer, a real Nix client: the client gets the honest bytes, first time."""

    fx: _Fixture

    def setUp(self) -> None:
        self.fx = shared_fixture(__name__, _Fixture)
        self.work = tempfile.mkdtemp(prefix="peernix-e2e-netns-run-")
        self.addCleanup(shutil.rmtree, self.work, True)
        network = TestNetwork(3)
        # Registered first, so it runs last: after every process in it stopped.
        self.addCleanup(network.destroy)
        self.host_a, self.host_b, self.host_c = network.hosts
        self.b = self._daemon("b", self.host_b, [], self.fx.b_sk, self.fx.b_store.root)
        self.b.wait_ready()
        self._start_malicious()

    def _daemon(self, name: str, host: Host, peers: list[Host], key: str, store_root: str) -> Daemon:
        args = ["--store-root", store_root, "--no-broadcast", "--no-mdns", "--udp-port", str(PORT),
                "--trusted-public-key", self.fx.upstream_pk, "--secret-key-file", key]
        for peer in peers:
            args += ["--peer", f"http://{peer.ipv4}:{PORT}"]
        daemon = Daemon(args, os.path.join(self.work, f"{name}.log"), port=PORT, host=host)
        self.addCleanup(daemon.stop)
        return daemon

    def _start_malicious(self) -> None:
        """Give C B's genuine narinfos (fetched from B) for leaf and top, and forge mid's."""
        directory = os.path.join(self.work, "malicious")
        os.makedirs(os.path.join(directory, "replay"))
        os.makedirs(os.path.join(directory, "forge"))
        closure = self.fx.closure
        for path in (closure.leaf, closure.top):
            status, body = http_get(f"http://{self.host_b.ipv4}:{PORT}/nix-cache/{hash_part(path)}.narinfo",
                                    host=self.host_c, headers={"X-Peernix-Peer": "1"})
            self.assertEqual(status, 200)
            with open(os.path.join(directory, "replay", f"{hash_part(path)}.narinfo"), "wb") as f:
                f.write(body)
            with open(os.path.join(directory, "replay", f"{hash_part(path)}.nar"), "wb") as f:
                f.write(self.fx.nars[path])
        with open(os.path.join(directory, "forge", hash_part(closure.mid)), "w") as f:
            f.write(closure.mid)
        self.c_log_path = os.path.join(self.work, "c.log")
        c_log = open(self.c_log_path, "wb")
        self.addCleanup(c_log.close)
        program = peernix.test.malicious_peer.__file__
        self.c = subprocess.Popen(
            self.host_c.command([sys.executable, program, "--listen", self.host_c.ipv4, "--port", str(PORT),
                                 "--dir", directory, "--key-name", UPSTREAM_NAME]),
            stdout=c_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.addCleanup(self._stop_malicious)
        deadline = time.monotonic() + WAIT
        while http_get(f"http://{self.host_c.ipv4}:{PORT}/nix-cache/nix-cache-info", host=self.host_a)[0] != 200:
            if self.c.poll() is not None or time.monotonic() > deadline:
                self.fail(f"malicious peer did not start: {self._c_log()}")
            time.sleep(0.1)

    def _stop_malicious(self) -> None:
        if self.c.poll() is None:
            self.c.terminate()
            try:
                self.c.wait(10)
            except subprocess.TimeoutExpired:
                self.c.kill()
                self.c.wait(10)

    def _c_log(self) -> str:
        with open(self.c_log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def _substitute_in(self, host: Host, client: NixClient, url: str) -> subprocess.CompletedProcess[bytes]:
        """
        ``client.substitute([top], url, [upstream])`` run inside ``host``'s
        namespace: the same command line and environment, wrapped in
        ``ip netns exec``.
        """
        return client.substitute([self.fx.closure.top], url, [self.fx.upstream_pk], wrap=host.command)

    def _status(self, host: Host) -> dict[str, Any]:
        code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=host)
        self.assertEqual(code, 200)
        document: dict[str, Any] = json.loads(body)
        return document

    def _client(self) -> NixClient:
        return self.nix_client(root=os.path.join(self.work, "client"))

    def _wait_healthy(self, a_host: Host, peers: list[Host]) -> None:
        """Wait until A's first health probes answered: every peer known, healthy and measured."""
        urls = {f"http://{peer.ipv4}:{PORT}" for peer in peers}
        deadline = time.monotonic() + WAIT
        while True:
            rows = {row["url"]: row for row in self._status(a_host)["peers"]}
            if set(rows) == urls and all(rows[u]["healthy"] and rows[u]["latency"] is not None for u in urls):
                return
            self.assertLess(time.monotonic(), deadline, f"A's peers not all healthy: {rows}")
            time.sleep(0.1)

    def test_honest_peer_wins_over_faster_liar(self) -> None:
        """A's client gets B's closure on the first try, verified, though C answers first with forgeries and corrupted NARs."""
        fx = self.fx
        a_store = ChrootStore(os.path.join(self.work, "a-store"))
        self.addCleanup(a_store.remove)
        a = self._daemon("a", self.host_a, [self.host_b, self.host_c], fx.a_sk, a_store.root)
        a.wait_ready()
        # Both peers answered A's health probe, so A's first lookup asks both.
        self._wait_healthy(self.host_a, [self.host_b, self.host_c])
        client = self._client()
        started = time.monotonic()
        done = self._substitute_in(self.host_a, client, f"http://127.0.0.1:{PORT}/nix-cache")
        elapsed = time.monotonic() - started
        self.assertEqual(done.returncode, 0,
                         done.stderr.decode(errors="replace") + a.log()[-4000:] + self._c_log()[-2000:])
        print(f"\nclosure through A with a lying peer: {elapsed:.2f} s")
        for path in fx.closure.outputs:
            self.assertTrue(client.is_valid(path), path)
            verified = client.verify(path)
            self.assertEqual(verified.returncode, 0, verified.stderr)
        # What A told its client is B's truth, not C's forgery.
        for path in fx.closure.outputs:
            code, body = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{hash_part(path)}.narinfo", host=self.host_a)
            self.assertEqual(code, 200)
            self.assertEqual(parse_narinfo(body).nar_hash.nix32(), client.query(path, "hash")[0].split(":")[1])
        # C really took part: A's first lookup (whichever path Nix or A's
        # prefetch asked first) went to every healthy peer, so C was asked
        # for a narinfo of the closure.  Not necessarily the top one, nor
        # more than one: its first lie puts it in backoff, and a lookup
        # that B wins cancels the request to C.
        c_log = self._c_log()
        asked = [path for path in fx.closure.outputs if f"GET /nix-cache/{hash_part(path)}.narinfo" in c_log]
        self.assertTrue(asked, c_log)
        status = self._status(self.host_a)
        rows = {row["url"]: row for row in status["peers"]}
        c_failures = rows[f"http://{self.host_c.ipv4}:{PORT}"]["failures"]
        b_failures = rows[f"http://{self.host_b.ipv4}:{PORT}"]["failures"]
        counters = status["peer_counters"]
        print(f"C's failures at A: {c_failures}; B's: {b_failures}; A's counters: {counters}")
        self.assertEqual(b_failures, {})
        # Whether A judged (and counted) one of C's lies depends on who
        # answered first: when B's honest answer wins the race, C's request
        # is cancelled unjudged.  Which is fine: the client got B's paths.
        # test_liar_alone_gives_nothing checks C's lies are refused and counted.

    def test_liar_alone_gives_nothing(self) -> None:
        """With only C as peer, A passes on no forged narinfo and no corrupted NAR; the client fails cleanly."""
        fx = self.fx
        a_store = ChrootStore(os.path.join(self.work, "a-store"))
        self.addCleanup(a_store.remove)
        a = self._daemon("a", self.host_a, [self.host_c], fx.a_sk, a_store.root)
        a.wait_ready()
        # The forged narinfo is refused outright.
        code, _ = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{hash_part(fx.closure.mid)}.narinfo", host=self.host_a)
        self.assertEqual(code, 404)
        # That lie put C in backoff for a moment; wait until A asks it again.
        c_url = f"http://{self.host_c.ipv4}:{PORT}"
        deadline = time.monotonic() + WAIT
        while not all(row["healthy"] for row in self._status(self.host_a)["peers"] if row["url"] == c_url):
            self.assertLess(time.monotonic(), deadline, "C stayed in backoff")
            time.sleep(0.1)
        # The replayed one is genuine (B's signature), but its NAR never verifies:
        # held back whole, so the client gets a clean 404, not bad bytes.
        leaf = fx.closure.leaf
        code, body = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{hash_part(leaf)}.narinfo", host=self.host_a)
        self.assertEqual(code, 200)
        url = parse_narinfo(body).url
        code, _ = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{url}", host=self.host_a)
        self.assertEqual(code, 404)
        client = self._client()
        done = self._substitute_in(self.host_a, client, f"http://127.0.0.1:{PORT}/nix-cache")
        self.assertNotEqual(done.returncode, 0)
        for path in fx.closure.outputs:
            self.assertFalse(client.is_valid(path), path)
        counters = self._status(self.host_a)["peer_counters"]
        self.assertGreater(counters["verification_failures"], 0)
        self.assertGreater(counters["untrusted_answers"], 0)


class MaliciousPeerNix28Tests(_MaliciousPeerTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = _SKIP or NIX_2_8.missing


class MaliciousPeerNix224Tests(_MaliciousPeerTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = _SKIP or NIX_2_24.missing
