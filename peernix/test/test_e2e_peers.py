"""
End to end on loopback: several real ``twist peernix`` daemons fanning out
to each other, and real Nix clients of both generations (Debian's 2.8 and
2.24) substituting through them, the latter also 65 paths at once
(``max-substitution-jobs = 16``).

Every daemon runs with ``--no-broadcast --no-mdns --udp-port <free port>``
(no discovery traffic leaves loopback) and explicit ``--peer`` and
``--trusted-public-key`` options.  Peer ``B`` holds a closure signed by an
"upstream" key (as cache.nixos.org would have signed it) and signs what it
serves with its own key, which ``A`` does not trust.  Per-hash request
counts are read from the daemons' access logs (``--access-log``); the
measured latencies are printed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo, parse_narinfo
from peernix.test.daemon import Daemon, free_port, http_get, shared_fixture, start_fixture
from peernix.test.nixenv import (
    BUILD_PRELUDE,
    NIX_2_8,
    NIX_2_24,
    SKIP_NO_BUILD,
    ChrootStore,
    NixClient,
    RealClientTests,
    TestCaseMixin,
    generate_key,
)

#: The big NAR of the killed-peer test: large enough that the transfer is
#: still running when the test kills the peer.
BIG_SIZE = 200 * 1024 * 1024
#: The seed of the big path's bytes: the same seed gives the same store path
#: and NarHash in every store.
BIG_SEED = 42
#: Default ``--peer-timeout`` of the daemons (seconds).
PEER_TIMEOUT = 2.0
#: A miss with a frozen peer must be answered within this bound.
FROZEN_MISS_BOUND = 5.0
#: Bounded waits for things that normally take well under a second.
WAIT = 15.0
#: Leaves of the wide closure (plus one top referring to all of them).
WIDE = 64

PEER_HEADER = "X-Peernix-Peer"


def hash_part(store_path: str) -> str:
    """:returns: the 32-character hash part of ``/nix/store/<hash>-<name>``."""
    return store_path[len("/nix/store/"):][:32]


def metrics(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """:returns: every sample of ``daemon``'s ``/metrics``, keyed by name and sorted labels."""
    status, body = http_get(f"http://127.0.0.1:{daemon.port}/metrics")
    if status != 200:
        raise AssertionError(f"/metrics answered {status}")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """:returns: one sample of ``daemon``'s metrics, 0 when absent."""
    return metrics(daemon).get((name, tuple(sorted(labels.items()))), 0.0)


def status(daemon: Daemon) -> dict[str, Any]:
    """:returns: ``daemon``'s ``/status.json``."""
    code, body = http_get(f"http://127.0.0.1:{daemon.port}/status.json")
    if code != 200:
        raise AssertionError(f"/status.json answered {code}")
    document: dict[str, Any] = json.loads(body)
    return document


def all_peers_answered(daemon: Daemon, count: int) -> bool:
    """:returns: whether ``daemon`` knows ``count`` peers, each healthy and with a measured latency."""
    peers = status(daemon)["peers"]
    return len(peers) == count and all(p["healthy"] and p["latency"] is not None for p in peers)


def narinfo_requests(daemon: Daemon, store_path: str) -> int:
    """:returns: how many narinfo requests for ``store_path`` ``daemon``'s access log shows."""
    needle = f"/nix-cache/{hash_part(store_path)}.narinfo"
    return sum(1 for line in daemon.log().splitlines() if needle in line)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms until true; :raises AssertionError: after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def get_from(source_ip: str, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` with the connection's source address ``source_ip``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class _Fixture:
    """Keys, peer B's store and the shared daemons A and B; the big stores on demand."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-peers-")
        self.stores: list[ChrootStore] = []
        self.daemons: list[Daemon] = []
        #: The store holding the big path, made by :meth:`big`.
        self.big_store: ChrootStore | None = None
        self.big_path = ""

    def start(self) -> None:
        """Make the keys and B's store, start A and B and wait until they serve."""
        keys = os.path.join(self.tmp, "keys")
        self.upstream_sk, _, self.upstream_pk = generate_key(keys, "upstream-e2e-peers-1")
        self.a_sk, _, self.a_pk = generate_key(keys, "alice-peernix-1")
        self.b_sk, _, self.b_pk = generate_key(keys, "bob-peernix-1")
        self.b_store = self.store("b")
        self.closure = self.b_store.build_closure(secret_key_file=self.upstream_sk, tag="peers")
        # Signed by nobody in the DB: B serves it with only its own signature.
        self.untrusted = self.b_store.build_closure(tag="untrusted")
        # Trusted paths with no references, one per test that needs a fresh hash.
        self.singles = {
            name: self.b_store.add_text(f"{name}.txt", f"{name}\n")
            for name in ("coalesce", "header", "frozen-hit")
        }
        self.b_store.sign(list(self.singles.values()), self.upstream_sk)
        # A wide closure for parallel substitution: a top referring to
        # WIDE small leaves, all signed by upstream.
        [self.wide_top] = self.b_store.build(BUILD_PRELUDE + f"""
  leaves = builtins.genList (i: mk "wide-${{toString i}}" "mkdir $out; echo ${{toString i}} > $out/n") {WIDE};
  top = mk "wide-top" ''
    mkdir $out
    ${{builtins.concatStringsSep "\\n" (map (l: "echo ${{l}} >> $out/refs") leaves)}}
  '';
in [ top ]
""", secret_key_file=self.upstream_sk)
        self.wide = self.b_store.query(self.wide_top, "requisites")
        self.a_store = self.store("a")
        a_port, b_port = free_port(), free_port()
        # A and B list each other: the no-second-hop test needs the loop.
        # B shares everything (--share all), so A is offered B's unsigned
        # builds and its own trust check is what keeps them out.
        self.b = self.daemon("b", b_port, self.b_store, [a_port], self.b_sk, ["--share", "all"])
        # Only 127.0.0.1 may make A fan out, so 127.0.0.2 is a "non-proxy client".
        # A uses no store digests: it asks B for every path, as it would a
        # Go peer or an older peernix, so these tests see every request
        # (test_e2e_digests covers digests).
        self.a = self.daemon("a", a_port, self.a_store, [b_port], self.a_sk,
                             ["--proxy-client", "127.0.0.1/32", "--no-digest"])
        for d in (self.a, self.b):
            d.wait_ready()

    def store(self, name: str) -> ChrootStore:
        """:returns: a new empty chroot store, removed with the fixture."""
        store = ChrootStore(os.path.join(self.tmp, f"store-{name}"))
        self.stores.append(store)
        return store

    def daemon(self, name: str, port: int, store: ChrootStore, peers: Sequence[int],
               secret_key_file: str | None, extra: Sequence[str] = ()) -> Daemon:
        """Start a daemon on loopback (not waiting for it): no discovery traffic, trusting only upstream."""
        args = ["--store-root", store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(free_port()),
                "--trusted-public-key", self.upstream_pk, "--access-log",
                "--peer-timeout", str(PEER_TIMEOUT), *extra]
        for peer in peers:
            args += ["--peer", f"http://127.0.0.1:{peer}"]
        if secret_key_file is not None:
            args += ["--secret-key-file", secret_key_file]
        daemon = Daemon(args, os.path.join(self.tmp, f"{name}-{port}.log"), port=port)
        self.daemons.append(daemon)
        return daemon

    def big(self) -> str:
        """Build (once) the big path, signed by upstream, in a store of its own: :returns: its store path."""
        if self.big_store is None:
            first = self.store("big")
            path = first.make_big_path(BIG_SIZE, seed=BIG_SEED)
            first.sign([path], self.upstream_sk)
            self.big_store = first
            self.big_path = path
        return self.big_path

    def destroy(self) -> None:
        for d in self.daemons:
            d.stop()
        for store in self.stores:
            store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)




class _PeersTests(TestCaseMixin):
    """The shared fixture and helpers of this module's tests."""

    fx: _Fixture

    def setUp(self) -> None:
        # The stores and daemons A and B are made once, on first use, and
        # shared by the tests of both clients.
        self.fx = shared_fixture(__name__, lambda: start_fixture(_Fixture()))

    def _started(self, name: str, store: ChrootStore, peers: Sequence[int], port: int | None = None,
                 extra: Sequence[str] = ()) -> Daemon:
        """Start an extra daemon for one test, stopped by the test's cleanup."""
        daemon = self.fx.daemon(name, port or free_port(), store, peers, None, extra)
        self.addCleanup(daemon.stop)
        daemon.wait_ready()
        return daemon

    def _narinfo(self, daemon: Daemon, path: str) -> NarInfo:
        status, body = http_get(f"{daemon.url}/{hash_part(path)}.narinfo")
        self.assertEqual(status, 200, body)
        return parse_narinfo(body)


class PeersEndToEndTests(_PeersTests, SynchronousTestCase):
    """Real daemons on loopback fan out to each other (read over HTTP, no Nix client)."""

    skip = SKIP_NO_BUILD

    def test_untrusted_is_404(self) -> None:
        """Paths B holds but only B signed (a key A does not trust) are 404 at A, counted as untrusted answers."""
        fx = self.fx
        # A node of its own: untrusted answers put B in backoff at the node
        # that judged them, which must not touch the other tests' A.
        a = self._started("untrusted-http", fx.store("untrusted-http"), [fx.b.port])
        for path in fx.untrusted.outputs:
            status, _ = http_get(f"{a.url}/{hash_part(path)}.narinfo")
            self.assertEqual(status, 404, path)
            # B does have it (signed by B only).
            self.assertEqual(self._narinfo(fx.b, path).sigs[0].split(":")[0], "bob-peernix-1")
        self.assertGreater(metric(a, "peernix_peer_requests_total", result="untrusted"), 0)

    def test_no_second_hop(self) -> None:
        """A and B list each other; a miss on both is one request from A to B and none from B back to A."""
        fx = self.fx
        missing = "/nix/store/" + "1" * 32 + "-nowhere"
        started = time.monotonic()
        status, _ = http_get(f"{fx.a.url}/{hash_part(missing)}.narinfo")
        elapsed = time.monotonic() - started
        self.assertEqual(status, 404)
        print(f"\nmiss through A with B as peer: {elapsed * 1000:.0f} ms")
        self.assertLess(elapsed, PEER_TIMEOUT)
        wait_for(lambda: narinfo_requests(fx.b, missing) >= 1, what="B's access log line")
        time.sleep(0.5)  # anything looping would show up by now
        self.assertEqual(narinfo_requests(fx.b, missing), 1, fx.b.log()[-2000:])
        self.assertEqual(narinfo_requests(fx.a, missing), 1, fx.a.log()[-2000:])

    def test_peer_requests_answered_locally(self) -> None:
        """A request marked X-Peernix-Peer, or from a non-proxy client, gets A's local store only."""
        fx = self.fx
        path = fx.singles["header"]
        url = f"/nix-cache/{hash_part(path)}.narinfo"
        status, _ = http_get(f"http://127.0.0.1:{fx.a.port}{url}", headers={PEER_HEADER: "1"})
        self.assertEqual(status, 404)
        status, _ = get_from("127.0.0.2", fx.a.port, url)
        self.assertEqual(status, 404)
        time.sleep(0.3)
        self.assertEqual(narinfo_requests(fx.b, path), 0, "A asked B on behalf of a peer")
        # The same request from a proxy client does fan out.
        status, _ = http_get(f"http://127.0.0.1:{fx.a.port}{url}")
        self.assertEqual(status, 200)
        self.assertEqual(narinfo_requests(fx.b, path), 1)
        # A path a daemon holds itself is served to everyone.
        status, _ = get_from("127.0.0.2", fx.b.port, f"/nix-cache/{hash_part(fx.closure.top)}.narinfo",
                             {PEER_HEADER: "1"})
        self.assertEqual(status, 200)

    def test_coalescing(self) -> None:
        """50 concurrent identical narinfo requests to A cost B exactly one request."""
        fx = self.fx
        path = fx.singles["coalesce"]
        url = f"{fx.a.url}/{hash_part(path)}.narinfo"
        barrier = threading.Barrier(50)

        def one(_: int) -> int:
            barrier.wait(WAIT)
            with urllib.request.urlopen(url, timeout=WAIT) as r:
                status: int = r.status
                return status

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        self.assertEqual(statuses, [200] * 50)
        wait_for(lambda: narinfo_requests(fx.a, path) == 50, what="A's 50 access log lines")
        self.assertEqual(narinfo_requests(fx.b, path), 1, fx.b.log()[-3000:])


class _PeersClientTests(_PeersTests, RealClientTests):
    """Real Nix clients substitute through real daemons fanning out to each other."""

    def _client(self) -> NixClient:
        return self.nix_client("peernix-e2e-peers-client-")

    def test_closure_through_peer(self) -> None:
        """A, with an empty store, hands its Nix client B's whole closure, verified, with B's signatures untouched."""
        fx = self.fx
        client = self._client()
        done = client.substitute([fx.closure.top], fx.a.url, [fx.upstream_pk])
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + fx.a.log()[-3000:])
        for path in fx.closure.outputs:
            self.assertTrue(client.is_valid(path), path)
            verified = client.verify(path)
            self.assertEqual(verified.returncode, 0, verified.stderr)
        with open(client.real_path(fx.closure.top) + "/self") as f:
            self.assertEqual(f.read().strip(), fx.closure.top)
        for path in fx.closure.outputs:
            theirs = self._narinfo(fx.b, path)
            ours = self._narinfo(fx.a, path)
            nar_hash = ours.nar_hash.nix32()
            # The NAR's URL (whichever form A publishes) names the path and
            # its NarHash, and A serves exactly that NAR there.
            # The form a zw3rk node can route: directly under /nix-cache/.
            self.assertEqual(ours.url, f"{hash_part(path)}-{nar_hash}.nar")
            self.assertEqual(ours.compression, "none")
            status, nar = http_get(f"{fx.a.url}/{ours.url}")
            self.assertEqual(status, 200, ours.url)
            self.assertEqual(Hash.sha256_of(nar), ours.nar_hash, ours.url)
            for name in ("store_path", "nar_hash", "nar_size", "references", "deriver", "ca"):
                self.assertEqual(getattr(ours, name), getattr(theirs, name), name)
            # Passed through exactly: the upstream signature and B's own,
            # never re-signed with A's key.
            self.assertEqual(list(ours.sigs), list(theirs.sigs))
            self.assertTrue(any(s.startswith("upstream-e2e-peers-1:") for s in ours.sigs))
            self.assertTrue(any(s.startswith("bob-peernix-1:") for s in ours.sigs))
            self.assertFalse(any(s.startswith("alice-peernix-1:") for s in ours.sigs), ours.sigs)
        self.assertGreater(metric(fx.a, "peernix_narinfo_served_total", source="peer"), 0)
        self.assertGreater(metric(fx.a, "peernix_proxied_bytes_total"), 0)

    def test_small_nars_prefetched(self) -> None:
        """
        A fresh proxy fetches small NARs of the closure from B as soon as its
        client got the narinfo and hands them over from memory when the
        client asks for them: none crosses from B twice.
        """
        fx = self.fx
        store = fx.store(f"prefetch-{self.nix.name.replace(' ', '-')}")
        c = self._started("c", store, [fx.b.port], extra=["--proxy-client", "127.0.0.1/32", "--no-digest"])
        client = self._client()
        done = client.substitute([fx.closure.top], c.url, [fx.upstream_pk])
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + c.log()[-3000:])
        for path in fx.closure.outputs:
            self.assertEqual(client.verify(path).returncode, 0, path)
        sizes = [self._narinfo(fx.b, path).nar_size for path in fx.closure.outputs]
        self.assertTrue(all(size <= 64 * 1024 for size in sizes), sizes)
        # Most, if not all: a NAR asked for while its prefetch still waited
        # in the queue is relayed instead (not waited for), which only
        # depends on timing.
        self.assertGreaterEqual(metric(c, "peernix_nar_prefetches_total", outcome="used"), 1)
        self.assertEqual(metric(c, "peernix_nar_prefetches_total", outcome="failed"), 0)
        # Each NAR crossed from B once: the prefetch, never a second relay.
        self.assertEqual(metric(c, "peernix_proxied_bytes_total"), sum(sizes))

    def test_untrusted_refused(self) -> None:
        """Paths B holds but only B signed never reach A's client, even one trusting B's key; no 5xx."""
        fx = self.fx
        # A node of its own, as in test_untrusted_is_404.
        name = f"untrusted-{self.nix.release}"
        a = self._started(name, fx.store(name), [fx.b.port])
        client = self._client()
        # Even a client trusting B's key gets nothing: A never passes on what it does not trust.
        done = client.substitute([fx.untrusted.top], a.url, [fx.upstream_pk, fx.b_pk])
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertFalse(client.is_valid(fx.untrusted.top))
        self.assertNotIn(b"HTTP error 5", done.stderr)

    def test_frozen_peer(self) -> None:
        """With a peer frozen by SIGSTOP, a miss is answered within the timeout bound and a hit on B still works."""
        fx = self.fx
        frozen = self._started("f", fx.store("f"), [])
        # Without digests A2 asks the frozen peer for every path (as it would
        # a frozen peer that publishes none); with them it would not ask it
        # for a path its digest lacks at all.
        a2 = self._started("a2", fx.store("a2"), [fx.b.port, frozen.port], extra=["--no-digest"])
        # Both peers answered A2's first health probe.
        wait_for(lambda: all_peers_answered(a2, 2), what="A2's health probes")
        frozen.signal(signal.SIGSTOP)
        self.addCleanup(frozen.signal, signal.SIGCONT)
        hit = fx.singles["frozen-hit"]
        started = time.monotonic()
        status, _ = http_get(f"{a2.url}/{hash_part(hit)}.narinfo", timeout=WAIT)
        hit_elapsed = time.monotonic() - started
        self.assertEqual(status, 200)
        missing = "/nix/store/" + "2" * 32 + "-nowhere"
        started = time.monotonic()
        status, _ = http_get(f"{a2.url}/{hash_part(missing)}.narinfo", timeout=WAIT)
        miss_elapsed = time.monotonic() - started
        self.assertEqual(status, 404)
        print(f"\nfrozen peer: hit {hit_elapsed * 1000:.0f} ms, miss {miss_elapsed * 1000:.0f} ms"
              f" (--peer-timeout {PEER_TIMEOUT})")
        # Not held up by the frozen peer: its request would only end at the timeout.
        self.assertLess(hit_elapsed, PEER_TIMEOUT)
        self.assertLess(miss_elapsed, FROZEN_MISS_BOUND)
        # The whole closure still substitutes while F stays frozen.
        client = self._client()
        started = time.monotonic()
        done = client.substitute([fx.closure.top], a2.url, [fx.upstream_pk])
        print(f"closure through A2 with a frozen peer: {time.monotonic() - started:.2f} s")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + a2.log()[-3000:])
        for path in fx.closure.outputs:
            self.assertEqual(client.verify(path).returncode, 0, path)
        self.assertGreater(metric(a2, "peernix_peer_requests_total", result="timeout"), 0)

    def test_peer_killed_mid_nar(self) -> None:
        """A peer killed mid-NAR leaves the client with no corrupted path; the next attempt succeeds from another peer."""
        fx = self.fx
        big = fx.big()
        assert fx.big_store is not None
        # The late store is this test's own: with each client, C2 starts without the path.
        holder, late = fx.big_store, fx.store(f"late-{self.nix.release}")
        b2 = self._started("b2", holder, [])
        c2 = self._started("c2", late, [])
        c2_url = f"http://127.0.0.1:{c2.port}"
        # C2 publishes its (empty) digest before A3 first asks for it: a 404
        # "not built yet" would make A3 treat C2 as a node without a digest
        # and look again only after the normal interval (30 s), not the 2 s
        # of a quiet peer this test relies on.
        wait_for(lambda: http_get(f"{c2_url}/peernix/digest", headers={"X-Peernix-Peer": "1"})[0] == 200,
                 what="C2's first digest")
        a3 = self._started("a3", fx.store("a3"), [b2.port, c2.port])
        wait_for(lambda: all_peers_answered(a3, 2), what="A3's health probes")
        wait_for(lambda: status(a3)["digests"]["peers"].get(c2_url, {}).get("state") == "ok",
                 what="A3 to hold C2's empty digest")
        client = self._client()
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(client.substitute([big], a3.url, [fx.upstream_pk])), daemon=True)
        started = time.monotonic()
        thread.start()
        # Kill B2 once a few MB went through A3 (well before the 200 MB end).
        wait_for(lambda: metric(a3, "peernix_proxied_bytes_total") > 8 * 1024 * 1024, timeout=60,
                 what="the transfer to start")
        b2.process.kill()
        b2.process.wait(10)
        at_kill = metric(a3, "peernix_proxied_bytes_total")
        print(f"\nkilled B2 after {time.monotonic() - started:.2f} s, {at_kill / 2**20:.0f} MiB relayed")
        self.assertLess(at_kill, BIG_SIZE, "the transfer finished before the peer was killed")
        thread.join(120)
        self.assertFalse(thread.is_alive())
        first = result[0]
        assert isinstance(first, subprocess.CompletedProcess)
        print(f"first attempt: exit {first.returncode} after {time.monotonic() - started:.2f} s: "
              f"{first.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
        if first.returncode == 0:
            # Nix may have resumed elsewhere; then the path must be intact.
            self.assertEqual(client.verify(big).returncode, 0)
        else:
            self.assertFalse(client.is_valid(big), "a failed substitution left the path valid")
        # Now C2 gets the same signed content, and the next attempt gets it from there.
        copied = late.make_big_path(BIG_SIZE, seed=BIG_SEED)
        self.assertEqual(copied, big)
        late.sign([big], fx.upstream_sk)
        # C2's store answers from a cache of a couple of seconds: wait until
        # it serves the new path to peers, as a later real attempt would find.
        hash_part = big[len("/nix/store/"):][:32]
        wait_for(lambda: http_get(f"{c2.url}/{hash_part}.narinfo", headers={"X-Peernix-Peer": "1"})[0] == 200,
                 what="C2 to serve the copied path")
        # And until A3 holds C2's digest with it: C2 looks at its database
        # every second, and A3 revalidates the digest of a peer it hears no
        # announcements from (no broadcast here) every 2 s.
        wait_for(lambda: (status(a3)["digests"]["peers"][c2_url]["paths"] or 0) >= 1,
                 timeout=WAIT, what="A3 to hold C2's new digest (C2's store was empty before)")
        started = time.monotonic()
        done = client.substitute([big], a3.url, [fx.upstream_pk])
        print(f"second attempt from C2: {time.monotonic() - started:.2f} s")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + a3.log()[-3000:])
        self.assertEqual(client.verify(big).returncode, 0)
        # The status page shows the dead peer's failures.
        b2_row = [p for p in status(a3)["peers"] if p["url"] == f"http://127.0.0.1:{b2.port}"][0]
        self.assertTrue(b2_row["failures"], b2_row)

    def test_parallel_substitution(self) -> None:
        """With max-substitution-jobs = 16, a closure of 65 small paths substitutes through A from B, all verified."""
        self.require_nix("max-substitution-jobs", 2, 16)
        fx = self.fx
        self.assertEqual(len(fx.wide), WIDE + 1)
        client = self._client()
        started = time.monotonic()
        done = client.substitute([fx.wide_top], fx.a.url, [fx.upstream_pk],
                                 {"max-substitution-jobs": "16"})
        print(f"\n{len(fx.wide)} paths through A with max-substitution-jobs = 16: "
              f"{time.monotonic() - started:.2f} s")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + fx.a.log()[-3000:])
        verified = client.verify(*fx.wide)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        for path in fx.wide:
            self.assertTrue(client.is_valid(path), path)
        self.assertEqual(sorted(client.query(fx.wide_top, "requisites")), sorted(fx.wide))


class PeersNix28Tests(_PeersClientTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = SKIP_NO_BUILD or NIX_2_8.missing


class PeersNix224Tests(_PeersClientTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = SKIP_NO_BUILD or NIX_2_24.missing
