"""
Tests for :mod:`peernix.store.digest` (this node's store digest), its route
(:mod:`peernix.web.digest`) and :meth:`LocalStore.scan_paths` on a real
Nix store with the ``--share`` filter.
"""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from peernix.interfaces import IStoreScanner
from peernix.nix import nix32
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import parse_public_key
from peernix.store import digest as digest_module
from peernix.store import local
from peernix.store.digest import (
    DELTA_CONTENT_TYPE,
    DIGEST_CONTENT_TYPE,
    DigestError,
    DigestPublisher,
    digest_key,
    load_digest,
    new_digest,
    parse_delta,
)
from peernix.store.local import LocalStore
from peernix.store.scan import PathScan
from peernix.store.share import make_share_policy
from peernix.test import nixenv
from peernix.test.test_store_local import ManualPool, ThreadlessClock, _copy_store, _write
from peernix.test.test_store_share import OWN, UPSTREAM, info, signed, trusted_policy
from peernix.web.digest import DigestResource, etag_matches


def random_hash_parts(n: int, seed: int = 0) -> list[str]:
    """:returns: ``n`` distinct pseudo-random hash parts (deterministic per ``seed``)."""
    import random

    rng = random.Random(seed)
    return [nix32.encode(rng.randbytes(20)) for _ in range(n)]


class DigestFormatTests(SynchronousTestCase):
    """The digest's items, serialisation and parsing."""

    def test_key_is_fixed(self) -> None:
        """A hash part's key is a fixed signed 128-bit number (the same in every process and version)."""
        key = digest_key("0" * 32)
        self.assertEqual(key, -(2**127))
        self.assertEqual(digest_key("z" * 32), 2**127 - 1)
        h = "1b9p07z77phvv2hf6gm9f28syp39f1ag"
        self.assertEqual(digest_key(h), digest_key(h))
        self.assertTrue(-(2**127) <= digest_key(h) < 2**127)

    def test_stable_across_processes(self) -> None:
        """A digest made in another Python process (another hash() salt) has the same bytes and answers."""
        parts = random_hash_parts(200)
        bloom = new_digest(200, 0.01)
        bloom.update(map(digest_key, parts))
        code = (
            "import sys; from peernix.store.digest import new_digest, digest_key\n"
            "parts = sys.stdin.read().split()\n"
            "b = new_digest(200, 0.01); b.update(map(digest_key, parts))\n"
            "sys.stdout.buffer.write(b.save_bytes())\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(digest_module.__file__))))
        env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=root)
        other = subprocess.run(
            [sys.executable, "-c", code], input="\n".join(parts).encode(), capture_output=True, check=True, env=env,
            cwd=root,
        ).stdout
        self.assertEqual(other, bloom.save_bytes())
        loaded = load_digest(other)
        self.assertTrue(all(digest_key(h) in loaded for h in parts))

    def test_fp_rate_within_tolerance(self) -> None:
        """Filled to capacity, the digest's measured false-positive rate over 100k hash parts is within 1.5x of the configured one."""
        for rate in (0.01, 0.05):
            members = random_hash_parts(5000, seed=1)
            bloom = new_digest(len(members), rate)
            bloom.update(map(digest_key, members))
            self.assertTrue(all(digest_key(h) in bloom for h in members))
            strangers = random_hash_parts(100_000, seed=2)
            measured = sum(digest_key(h) in bloom for h in strangers) / len(strangers)
            self.assertLessEqual(measured, 1.5 * rate, f"rate {rate}")

    def test_load_rejects_bad_headers(self) -> None:
        """Digests too short, too large, or with 0 or too many hash functions are refused (no endless lookups)."""
        good = new_digest(10, 0.01).save_bytes()
        self.assertEqual(load_digest(good).size_in_bits, new_digest(10, 0.01).size_in_bits)
        for bad in (b"", good[:8], (0).to_bytes(8, "little") + good[8:], (2**63).to_bytes(8, "little") + good[8:]):
            self.assertRaises(DigestError, load_digest, bad)
        self.patch(digest_module, "MAX_DIGEST_BYTES", 100)
        self.assertRaises(DigestError, load_digest, good[:8] + b"\0" * 200)

    def test_parse_delta(self) -> None:
        """A delta is hash parts, one a line; anything else is refused."""
        parts = random_hash_parts(3)
        self.assertEqual(parse_delta("".join(p + "\n" for p in parts).encode()), parts)
        self.assertEqual(parse_delta(b""), [])
        for bad in (b"nope\n", parts[0].encode() + b"\n\n", "é".encode(), parts[0].upper().encode()):
            self.assertRaises(DigestError, parse_delta, bad)
        self.assertRaises(DigestError, parse_delta, "".join(p + "\n" for p in parts).encode(), max_items=2)


@implementer(IStoreScanner)
class FakeScanner:
    """A store's rows in memory: (id, info); a change bumps the database state."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, PathInfo]] = []
        self.next_id = 1
        self.state = 0
        self.scans: list[int] = []

    def add(self, *infos: PathInfo) -> None:
        for i in infos:
            self.rows.append((self.next_id, i))
            self.next_id += 1
        self.state += 1

    def delete(self, path: str) -> None:
        self.rows = [(n, i) for n, i in self.rows if i.path != path]
        self.state += 1

    def touch(self) -> None:
        self.state += 1

    def database_state(self) -> Deferred[object]:
        return succeed(self.state)

    def scan_paths(self, after_id: int, accept: Callable[[PathInfo], bool]) -> Deferred[PathScan]:
        self.scans.append(after_id)
        newer = [(n, i) for n, i in self.rows if n > after_id]
        return succeed(PathScan(
            hash_parts=tuple(i.hash_part for _, i in newer if accept(i)),
            rows=len(self.rows),
            max_id=max((n for n, _ in self.rows), default=0),
            scanned=len(newer),
        ))


def shared(name: str) -> PathInfo:
    """:returns: a path the trusted policy shares (signed by the upstream key)."""
    return signed(info(name), UPSTREAM)


class DigestPublisherTests(SynchronousTestCase):
    """Building and updating this node's digest."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.scanner = FakeScanner()
        self.publisher = DigestPublisher(self.scanner, trusted_policy().shares, self.clock, fp_rate=0.01)
        self.changes: list[str | None] = []
        self.publisher.subscribe(lambda: self.changes.append(self.publisher.tag))

    def test_fake_provides_interface(self) -> None:
        """The fake scanner and LocalStore provide IStoreScanner."""
        verifyObject(IStoreScanner, self.scanner)
        self.assertTrue(IStoreScanner.implementedBy(LocalStore))

    def test_first_build_applies_share_filter(self) -> None:
        """The first update builds the digest from the shared paths only; withheld paths are never in it."""
        self.assertIsNone(self.publisher.tag)
        self.assertEqual(self.publisher.digest_bytes(), b"")
        self.scanner.add(shared("a"), info("private"), shared("b"), signed(info("mine"), OWN))
        self.publisher.update()
        self.assertEqual(self.publisher.paths, 3)
        for name in ("a", "b", "mine"):
            self.assertTrue(self.publisher.contains(info(name).hash_part))
        self.assertFalse(self.publisher.contains(info("private").hash_part))
        loaded = load_digest(self.publisher.digest_bytes())
        self.assertNotIn(digest_key(info("private").hash_part), loaded)
        self.assertIn(digest_key(info("a").hash_part), loaded)
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.publisher.etag, f'"{self.publisher.tag}"')

    def test_unchanged_database_no_scan(self) -> None:
        """While the database state is unchanged an update scans nothing and keeps the version."""
        self.scanner.add(shared("a"))
        self.publisher.update()
        tag = self.publisher.tag
        self.publisher.update()
        self.assertEqual(self.scanner.scans, [0])
        self.assertEqual(self.publisher.tag, tag)

    def test_incremental_update(self) -> None:
        """Added paths are scanned from the last row on, added in place, and a delta names exactly them."""
        self.scanner.add(shared("a"))
        self.publisher.update()
        first = self.publisher.tag
        assert first is not None
        self.scanner.add(shared("b"), info("private2"))
        self.publisher.update()
        second = self.publisher.tag
        self.assertNotEqual(first, second)
        self.assertEqual(self.scanner.scans, [0, 1])
        self.assertEqual(first.split("-")[0], second.split("-")[0] if second else None)
        self.assertTrue(self.publisher.contains(info("b").hash_part))
        self.assertEqual(self.publisher.delta_since(first), [info("b").hash_part])
        self.scanner.add(shared("c"))
        self.publisher.update()
        self.assertEqual(self.publisher.delta_since(first), [info("b").hash_part, info("c").hash_part])
        self.assertEqual(self.publisher.delta_since(f'"{second}"'), [info("c").hash_part])
        self.assertEqual(self.publisher.delta_since(self.publisher.tag or ""), [])
        self.assertEqual(len(self.changes), 3)
        # The delta applied to the old digest gives exactly the new one.
        old = new_digest(self.publisher.snapshot().capacity, 0.01)
        old.update(map(digest_key, [info("a").hash_part]))
        old.update(map(digest_key, self.publisher.delta_since(first) or []))
        self.assertEqual(old.save_bytes(), self.publisher.digest_bytes())

    def test_delta_refused_for_other_versions(self) -> None:
        """Another generation, a future or malformed version get no delta (the whole digest instead)."""
        self.scanner.add(shared("a"))
        self.publisher.update()
        tag = self.publisher.tag or ""
        generation = tag.split("-")[0]
        for other in ("ffffffff-0", f"{generation}-9", f"{generation}-x", "", "-", f"{generation}-" + "9" * 30):
            self.assertIsNone(self.publisher.delta_since(other), other)

    def test_deletion_rebuilds(self) -> None:
        """A deleted path makes a full rebuild: a new generation without it; old versions get no delta."""
        self.scanner.add(shared("a"), shared("b"))
        self.publisher.update()
        old = self.publisher.tag or ""
        self.scanner.delete(info("a").path)
        self.scanner.add(shared("c"))
        self.publisher.update()
        self.assertEqual(self.scanner.scans, [0, 2, 0])
        self.assertNotEqual(self.publisher.tag.split("-")[0], old.split("-")[0])  # type: ignore[union-attr]
        self.assertFalse(self.publisher.contains(info("a").hash_part))
        self.assertTrue(self.publisher.contains(info("c").hash_part))
        self.assertEqual(self.publisher.paths, 2)
        self.assertIsNone(self.publisher.delta_since(old))
        self.assertEqual(self.publisher.snapshot().builds, 2)

    def test_full_rebuilds_bigger(self) -> None:
        """Past its capacity the digest is rebuilt for the new count, so its false-positive rate holds."""
        self.patch(digest_module, "MIN_CAPACITY", 4)
        self.scanner.add(*[shared(f"p{i}") for i in range(4)])
        self.publisher.update()
        capacity = self.publisher.snapshot().capacity
        self.assertEqual(capacity, 5)
        self.scanner.add(shared("q1"))
        self.publisher.update()
        self.assertEqual(self.publisher.snapshot().builds, 1)
        self.scanner.add(shared("q2"))
        self.publisher.update()
        snap = self.publisher.snapshot()
        self.assertEqual(snap.builds, 2)
        self.assertEqual(snap.paths, 6)
        self.assertGreaterEqual(snap.capacity, 7)

    def test_periodic_full_rebuild(self) -> None:
        """A change seen long after the last full build rebuilds in full (new signatures on old rows count)."""
        self.scanner.add(shared("a"), info("later-signed"))
        self.publisher.update()
        self.assertFalse(self.publisher.contains(info("later-signed").hash_part))
        self.scanner.rows[1] = (self.scanner.rows[1][0], shared("later-signed"))
        self.scanner.touch()
        self.clock.advance(601)
        self.publisher.update()
        self.assertTrue(self.publisher.contains(info("later-signed").hash_part))

    def test_delta_log_bounded(self) -> None:
        """Past the delta log's bound, versions older than what it keeps get the whole digest."""
        publisher = DigestPublisher(self.scanner, lambda i: True, self.clock, delta_log_limit=2)
        self.scanner.add(shared("a"))
        publisher.update()
        first = publisher.tag or ""
        for name in ("b", "c", "d"):
            self.scanner.add(shared(name))
            publisher.update()
        self.assertIsNone(publisher.delta_since(first))
        self.assertEqual(publisher.delta_since(f"{first.split('-')[0]}-1"), [info("c").hash_part, info("d").hash_part])

    def test_loop(self) -> None:
        """start() builds at once and looks again every check_interval; stop() leaves no timer."""
        self.scanner.add(shared("a"))
        self.publisher.start()
        self.assertEqual(self.publisher.paths, 1)
        self.scanner.add(shared("b"))
        self.clock.advance(1.0)
        self.assertEqual(self.publisher.paths, 2)
        self.publisher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_update_during_update(self) -> None:
        """An update asked while one runs makes it look again afterwards; errors are logged, not raised."""
        slow: Deferred[object] = Deferred()
        states = [slow]
        original = self.scanner.database_state
        self.scanner.database_state = lambda: states.pop(0) if states else original()  # type: ignore[method-assign]
        self.scanner.add(shared("a"))
        self.publisher.update()
        self.publisher.update()
        self.assertIsNone(self.publisher.tag)
        self.scanner.add(shared("b"))
        slow.callback(0)
        self.assertEqual(self.publisher.paths, 2)
        self.scanner.database_state = lambda: succeed(object())  # type: ignore[method-assign]
        self.scanner.scan_paths = lambda a, b: self.fail_deferred()  # type: ignore[method-assign, assignment]
        self.publisher.update()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def fail_deferred(self) -> Deferred[PathScan]:
        d: Deferred[PathScan] = Deferred()
        d.errback(RuntimeError("boom"))
        return d


class DigestRouteTests(SynchronousTestCase):
    """GET /peernix/digest."""

    def setUp(self) -> None:
        self.scanner = FakeScanner()
        self.publisher = DigestPublisher(self.scanner, lambda i: True, Clock())
        self.http = StubTreq(DigestResource(self.publisher))

    def get(self, query: str = "", headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, object, bytes]:
        response = self.successResultOf(
            self.http.get(f"http://node/peernix/digest{query}", headers=headers)  # type: ignore[attr-defined]
        )
        body = self.successResultOf(response.content())
        return response.code, response.headers, body

    def test_before_build(self) -> None:
        """Before the first build the route is a 404 (peers ask this node for everything meanwhile)."""
        code, _, _ = self.get()
        self.assertEqual(code, 404)

    def test_full_etag_304(self) -> None:
        """200 with the digest and its ETag; 304 when If-None-Match names it."""
        self.scanner.add(shared("a"))
        self.publisher.update()
        code, headers, body = self.get()
        self.assertEqual(code, 200)
        self.assertEqual(body, self.publisher.digest_bytes())
        etag = headers.getRawHeaders(b"ETag")[0]  # type: ignore[attr-defined]
        self.assertEqual(etag, (self.publisher.etag or "").encode())
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [DIGEST_CONTENT_TYPE])  # type: ignore[attr-defined]
        self.assertEqual(headers.getRawHeaders(b"X-Peernix-Digest-Format"), [b"rbloom1"])  # type: ignore[attr-defined]
        code, _, body = self.get(headers={b"If-None-Match": [etag]})
        self.assertEqual((code, body), (304, b""))
        code, _, _ = self.get(headers={b"If-None-Match": [b'"other-1", W/' + etag]})
        self.assertEqual(code, 304)

    def test_delta(self) -> None:
        """?since= an older version of this generation answers only the added hash parts."""
        self.scanner.add(*[shared(f"p{i}") for i in range(50)])
        self.publisher.update()
        old = self.publisher.tag
        self.scanner.add(shared("new"))
        self.publisher.update()
        code, headers, body = self.get(f"?since={old}", {b"If-None-Match": [f'"{old}"'.encode()]})
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [DELTA_CONTENT_TYPE])  # type: ignore[attr-defined]
        self.assertEqual(headers.getRawHeaders(b"X-Peernix-Digest-Base"), [(old or "").encode()])  # type: ignore[attr-defined]
        self.assertEqual(parse_delta(body), [info("new").hash_part])
        # An unknown version gets the whole digest.
        code, headers, body = self.get("?since=nope-1")
        self.assertEqual(body, self.publisher.digest_bytes())
        code, headers, body = self.get("?since=%ff")
        self.assertEqual((code, body), (200, self.publisher.digest_bytes()))

    def test_etag_matches(self) -> None:
        """If-None-Match lists, weak tags and * are understood; garbage is not a match."""
        self.assertTrue(etag_matches(b'"a-1"', '"a-1"'))
        self.assertTrue(etag_matches(b'"x", "a-1"', '"a-1"'))
        self.assertTrue(etag_matches(b"*", '"a-1"'))
        self.assertFalse(etag_matches(b'"a-2"', '"a-1"'))
        self.assertFalse(etag_matches(None, '"a-1"'))
        self.assertFalse(etag_matches(b"\xff", '"a-1"'))


class _ScanFixture:
    """A chroot store with signed, unsigned and content-addressed paths, built once."""

    def __init__(self, tmp: str) -> None:
        self.sk, _, self.pk = nixenv.generate_key(os.path.join(tmp, "keys"), "digest-1")
        self.store = nixenv.ChrootStore(os.path.join(tmp, "store"))
        self.closure = self.store.build_closure(secret_key_file=self.sk, tag="digest")
        self.unsigned = self.store.build_closure(tag="digest-unsigned")
        self.ca = self.store.add_text("digest.txt", "digest\n")


_fixture: list[_ScanFixture] = []


class ScanPathsTests(SynchronousTestCase):
    """LocalStore.scan_paths on a real store, with the share filter, feeding a DigestPublisher."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        if not _fixture:
            _fixture.append(_ScanFixture(os.path.abspath("digest-scan-store")))
        self.fx = _fixture[0]
        self.root = _copy_store(self, self.fx.store)
        self.clock = ThreadlessClock()
        self.pool = ManualPool()
        self.local = LocalStore(self.root, self.clock, threadpool=self.pool)
        self.local.start()
        self.addCleanup(self.local.stop)
        self.policy = make_share_policy("trusted", [parse_public_key(self.fx.pk)], None)

    def scan(self, after: int = 0) -> PathScan:
        d = self.local.scan_paths(after, self.policy.shares)
        self.pool.run_all()
        result: PathScan = self.successResultOf(d)
        return result

    def test_only_shared_paths(self) -> None:
        """Only the signed outputs are listed; unsigned outputs, .drv files and the added file are withheld."""
        self.patch(local, "SCAN_BATCH", 2)
        scan = self.scan()
        expected = sorted(p.split("/")[3][:32] for p in self.fx.closure.outputs)
        self.assertEqual(sorted(scan.hash_parts), expected)
        conn = sqlite3.connect(os.path.join(self.root, local.DB_RELPATH))
        rows, max_id = conn.execute("SELECT COUNT(*), MAX(id) FROM ValidPaths").fetchone()
        conn.close()
        self.assertEqual((scan.rows, scan.max_id, scan.scanned), (rows, max_id, rows))
        everything = self.local.scan_paths(0, lambda i: True)
        self.pool.run_all()
        self.assertEqual(len(self.successResultOf(everything).hash_parts), rows)

    def test_incremental_and_deletion(self) -> None:
        """A scan after the last row sees only new rows; a deletion shows as fewer rows than expected."""
        first = self.scan()
        self.assertEqual(self.scan(first.max_id), PathScan((), first.rows, first.max_id, 0))
        # A row Nix would add: same columns, a new id.
        conn = sqlite3.connect(os.path.join(self.root, local.DB_RELPATH))
        row = conn.execute(
            "SELECT path, hash, registrationTime, narSize, sigs FROM ValidPaths WHERE path = ?",
            (self.fx.closure.outputs[0],),
        ).fetchone()
        conn.close()
        _write(self.root, "DELETE FROM ValidPaths WHERE path = ?", row[0])
        after_delete = self.scan(first.max_id)
        self.assertLess(after_delete.rows, first.rows + after_delete.scanned)
        _write(self.root, "INSERT INTO ValidPaths (path, hash, registrationTime, narSize, sigs) VALUES (?, ?, ?, ?, ?)", *row)
        again = self.scan(first.max_id)
        self.assertEqual(again.scanned, 1)
        self.assertEqual(again.hash_parts, (row[0].split("/")[3][:32],))

    def test_publisher_on_local_store(self) -> None:
        """A publisher over the real store follows its database: a deletion rebuilds without the path."""
        publisher = DigestPublisher(self.local, self.policy.shares, self.clock)
        publisher.update()
        for _ in range(3):
            self.pool.run_all()
        # An output no other path refers to (deleting a referenced row would
        # change its referrers' fingerprints, and so their signatures).
        conn = sqlite3.connect(os.path.join(self.root, local.DB_RELPATH))
        [gone] = [
            p for p in self.fx.closure.outputs
            if not conn.execute(
                "SELECT 1 FROM Refs JOIN ValidPaths v ON v.id = reference WHERE v.path = ? AND referrer != reference",
                (p,),
            ).fetchone()
        ][:1]
        conn.close()
        hash_part = gone.split("/")[3][:32]
        self.assertTrue(publisher.contains(hash_part))
        self.assertEqual(publisher.paths, len(self.fx.closure.outputs))
        _write(self.root, "DELETE FROM ValidPaths WHERE path = ?", gone)
        publisher.update()
        for _ in range(4):
            self.pool.run_all()
        self.assertFalse(publisher.contains(hash_part))
        self.assertEqual(publisher.paths, len(self.fx.closure.outputs) - 1)


class DigestExtraTests(SynchronousTestCase):
    """Hash parts shared from outside the store (NARs staged for the LAN) are in the digest."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.scanner = FakeScanner()
        self.publisher = DigestPublisher(self.scanner, trusted_policy().shares, self.clock, fp_rate=0.01)
        self.staged: list[str] = []
        self.publisher.include(lambda: list(self.staged))

    def test_build_reads_extra(self) -> None:
        """A full build covers the store's shared paths and what include() lists."""
        self.scanner.add(shared("a"))
        self.staged.append(info("staged").hash_part)
        self.publisher.update()
        self.assertEqual(self.publisher.paths, 2)
        self.assertTrue(self.publisher.contains(info("staged").hash_part))
        self.assertTrue(self.publisher.contains(info("a").hash_part))

    def test_add_is_incremental(self) -> None:
        """add() puts a staged path in at once, as a new version a delta carries."""
        self.scanner.add(shared("a"))
        self.publisher.update()
        tag = self.publisher.tag
        assert tag is not None
        part = info("staged").hash_part
        self.staged.append(part)
        self.publisher.add([part])
        self.assertTrue(self.publisher.contains(part))
        self.assertEqual(self.publisher.delta_since(tag), [part])
        self.assertEqual(self.publisher.paths, 2)

    def test_add_before_build_waits_for_it(self) -> None:
        """Before the first build add() does nothing; the build reads the source."""
        part = info("staged").hash_part
        self.publisher.add([part])
        self.assertIsNone(self.publisher.tag)
        self.staged.append(part)
        self.publisher.update()
        self.assertTrue(self.publisher.contains(part))

    def test_rebuild_soon_forgets_dropped(self) -> None:
        """After rebuild_soon() (coalesced, within its delay) a path no longer listed is gone."""
        self.scanner.add(shared("a"))
        part = info("staged").hash_part
        self.staged.append(part)
        self.publisher.update()
        self.assertTrue(self.publisher.contains(part))
        self.staged.remove(part)
        for _ in range(3):
            self.publisher.rebuild_soon(2.0)
        self.assertTrue(self.publisher.contains(part))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2.0)
        self.assertFalse(self.publisher.contains(part))
        self.assertTrue(self.publisher.contains(info("a").hash_part))
        self.assertEqual(self.publisher.paths, 1)

    def test_stop_cancels_rebuild(self) -> None:
        """stop() cancels a pending rebuild."""
        self.publisher.update()
        self.publisher.rebuild_soon()
        self.publisher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
