"""
Tests for :mod:`peernix.store.share` (the ``--share`` policy and the
filtered store), its UDP and service wiring, the status page's counts, and
:meth:`peernix.store.local.LocalStore.tally_path_infos` on a real Nix store.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from peernix.discovery.datagrams import HasPathQuery, HasPathWithNarHashQuery, render_datagram
from peernix.discovery.nodeinfo import NodeInfo
from peernix.discovery.udp import UdpDiscoveryService
from peernix.interfaces import IStore
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo
from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import SecretKey
from peernix.options import ConfigError, parse_args, read_config_file
from peernix.store import local
from peernix.store.local import LocalStore, StoreError
from peernix.store.share import (
    SHARED,
    WITHHELD_REASONS,
    ShareCounts,
    SharedStore,
    SharePolicy,
    ShareStatus,
    make_share_policy,
    path_fingerprint,
)
from peernix.test import nixenv
from peernix.test.discoveryfakes import DictStore, FakeRegistry, MemoryUDPReactor
from peernix.test.fakes import MemoryStore, fake_hash_part
from peernix.test.test_service import build, quiet
from peernix.test.test_store_local import ManualPool, ThreadlessClock
from peernix.web.status import Status, render_html, render_json

#: Test keys from fixed seeds (nothing secret).
UPSTREAM = SecretKey("cache.example.org-1", bytes(range(32)))
OWN = SecretKey("alice-peernix-1", bytes(range(1, 33)))
STRANGER = SecretKey("mallory-1", bytes(range(2, 34)))
#: A different key with the upstream key's name.
IMPOSTOR = SecretKey("cache.example.org-1", bytes(range(3, 35)))

HASH = fake_hash_part("a")
REF = f"/nix/store/{fake_hash_part('ref')}-ref"


def info(name: str = "a", *, sigs: tuple[str, ...] = (), ca: str | None = None,
         references: tuple[str, ...] = (REF,)) -> PathInfo:
    """:returns: a path info named ``name`` with fixed hash and size."""
    return PathInfo(
        path=f"/nix/store/{fake_hash_part(name)}-{name}",
        nar_hash=Hash.sha256_of(name.encode()),
        nar_size=1234,
        references=references,
        sigs=sigs,
        ca=ca,
    )


def signed(base: PathInfo, *keys: SecretKey) -> PathInfo:
    """:returns: ``base`` with a signature by each of ``keys`` over its fingerprint."""
    fingerprint = path_fingerprint(base)
    return PathInfo(
        path=base.path, nar_hash=base.nar_hash, nar_size=base.nar_size, references=base.references,
        sigs=tuple(key.sign(fingerprint) for key in keys), ca=base.ca,
    )


def trusted_policy() -> SharePolicy:
    """:returns: the ``trusted`` policy with UPSTREAM trusted and OWN as this node's key."""
    return make_share_policy("trusted", [UPSTREAM.public_key], OWN)


class FingerprintTests(SynchronousTestCase):
    """path_fingerprint is what Nix signs."""

    def test_same_as_narinfo(self) -> None:
        """It equals NarInfo.from_path_info(...).fingerprint(), references included."""
        for references in ((), (REF,), (REF, "/nix/store/" + fake_hash_part("z") + "-aaa")):
            i = info(references=references)
            self.assertEqual(path_fingerprint(i), NarInfo.from_path_info(i, "nar/x.nar").fingerprint())

    def test_nix_vector(self) -> None:
        """The fingerprint of nix-protocol.md's shape: 1;path;sha256:nix32;size;refs."""
        i = info(references=())
        self.assertEqual(path_fingerprint(i), f"1;{i.path};{i.nar_hash.to_string()};1234;".encode())


class SharePolicyTests(SynchronousTestCase):
    """SharePolicy.classify: what ``trusted`` and ``all`` share, and why not."""

    def test_trusted_key_shared(self) -> None:
        """A path signed by a trusted key is shared."""
        self.assertEqual(trusted_policy().classify(signed(info(), UPSTREAM)), SHARED)

    def test_own_key_shared(self) -> None:
        """A path Nix signed with this node's own key is shared."""
        self.assertEqual(trusted_policy().classify(signed(info(), OWN)), SHARED)

    def test_own_key_only_when_given(self) -> None:
        """Without a secret key, a path signed by that key is withheld."""
        policy = make_share_policy("trusted", [UPSTREAM.public_key], None)
        self.assertEqual(policy.classify(signed(info(), OWN)), "untrusted_key")

    def test_untrusted_key_withheld(self) -> None:
        """A path signed only by a key nobody trusts is withheld as untrusted_key."""
        self.assertEqual(trusted_policy().classify(signed(info(), STRANGER)), "untrusted_key")

    def test_one_good_signature_enough(self) -> None:
        """An untrusted signature next to a trusted one does not matter."""
        self.assertEqual(trusted_policy().classify(signed(info(), STRANGER, UPSTREAM)), SHARED)

    def test_impostor_withheld(self) -> None:
        """A signature by another key of a trusted name does not verify: bad_signature."""
        self.assertEqual(trusted_policy().classify(signed(info(), IMPOSTOR)), "bad_signature")

    def test_signature_of_other_path_withheld(self) -> None:
        """A trusted signature over another fingerprint (other references) does not verify."""
        good = signed(info(), UPSTREAM)
        moved = PathInfo(path=good.path, nar_hash=good.nar_hash, nar_size=good.nar_size, references=(), sigs=good.sigs)
        self.assertEqual(trusted_policy().classify(moved), "bad_signature")

    def test_unsigned_withheld(self) -> None:
        """An unsigned path is withheld as unsigned."""
        self.assertEqual(trusted_policy().classify(info()), "unsigned")

    def test_ca_unsigned_withheld(self) -> None:
        """A content-addressed path without a signature is withheld too."""
        i = info(ca="fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", references=())
        self.assertEqual(trusted_policy().classify(i), "ca_unsigned")

    def test_ca_signed_shared(self) -> None:
        """A content-addressed path signed by a trusted key is shared."""
        i = info(ca="fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", references=())
        self.assertEqual(trusted_policy().classify(signed(i, UPSTREAM)), SHARED)

    def test_all_shares_everything(self) -> None:
        """Under ``all`` every path is shared, signed or not."""
        policy = make_share_policy("all", [], None)
        self.assertTrue(policy.shares_everything)
        for i in (info(), signed(info(), STRANGER), info(ca="fixed:r:sha256:x")):
            self.assertEqual(policy.classify(i), SHARED)
            self.assertTrue(policy.shares(i))

    def test_reasons_labelled(self) -> None:
        """Every reason classify can give has a label for the status page."""
        self.assertEqual(set(WITHHELD_REASONS), {"unsigned", "ca_unsigned", "untrusted_key", "bad_signature"})

    def test_unknown_mode(self) -> None:
        """An unknown mode is a ValueError."""
        self.assertRaises(ValueError, SharePolicy, "some")

    def test_keys(self) -> None:
        """keys lists the trusted keys and this node's, both kept when names collide."""
        policy = make_share_policy("trusted", [UPSTREAM.public_key, UPSTREAM.public_key], IMPOSTOR)
        self.assertEqual(policy.keys, (UPSTREAM.public_key, IMPOSTOR.public_key))
        self.assertEqual(policy.classify(signed(info(), IMPOSTOR)), SHARED)


class CountingPolicy(SharePolicy):
    """A SharePolicy counting its classify calls."""

    calls = 0

    def classify(self, info: PathInfo) -> str:
        self.calls += 1
        return super().classify(info)


class SharedStoreTests(SynchronousTestCase):
    """SharedStore answers withheld paths exactly like missing ones."""

    def setUp(self) -> None:
        root = self.mktemp()
        os.makedirs(root)
        self.inner = MemoryStore(root)
        self.public = self.inner.add_file("public", b"public\n")
        self.public = self.inner.evolve(self.public.hash_part, sigs=signed(self.public, UPSTREAM).sigs)
        self.private = self.inner.add_file("private", b"secret\n")
        self.policy = CountingPolicy("trusted", [UPSTREAM.public_key])
        self.store = SharedStore(self.inner, self.policy, clock=Clock())

    def test_provides_istore(self) -> None:
        """SharedStore provides IStore, with the wrapped store's store_dir."""
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertEqual(self.store.store_dir, "/nix/store")

    def test_shared_path(self) -> None:
        """A shared path's info is answered unchanged."""
        self.assertEqual(self.successResultOf(self.store.query_path_info(self.public.hash_part)), self.public)

    def test_withheld_path_is_none(self) -> None:
        """A withheld path is None, like a missing one."""
        self.assertIsNone(self.successResultOf(self.store.query_path_info(self.private.hash_part)))
        self.assertIsNone(self.successResultOf(self.store.query_path_info(fake_hash_part("missing"))))

    def test_verdict_cached(self) -> None:
        """A path is judged once while its row is unchanged, and again when its signatures change."""
        for _ in range(3):
            self.store.query_path_info(self.public.hash_part)
        self.assertEqual(self.policy.calls, 1)
        self.inner.evolve(self.public.hash_part, sigs=())
        self.assertIsNone(self.successResultOf(self.store.query_path_info(self.public.hash_part)))
        self.assertEqual(self.policy.calls, 2)

    def test_verdict_cache_bounded(self) -> None:
        """The verdict cache never grows past VERDICT_CACHE_SIZE."""
        from peernix.store import share

        self.patch(share, "VERDICT_CACHE_SIZE", 3)
        for n in range(10):
            self.store.shares(info(f"p{n}"))
        self.assertEqual(len(self.store._verdicts), 3)

    def test_all_passes_through(self) -> None:
        """Under ``all`` the wrapped store's Deferred is returned as is."""
        store = SharedStore(self.inner, SharePolicy("all"), clock=Clock())
        self.assertEqual(self.successResultOf(store.query_path_info(self.private.hash_part)), self.private)

    def test_cancel_reaches_store(self) -> None:
        """Cancelling a lookup cancels the wrapped store's lookup."""
        inner = DictStore({HASH: info()})
        inner.hold = True
        d = SharedStore(inner, trusted_policy(), clock=Clock()).query_path_info(HASH)
        d.cancel()
        self.assertEqual(inner.cancelled, [HASH])
        self.failureResultOf(d)

    def test_real_path_delegates(self) -> None:
        """real_path is the wrapped store's."""
        self.assertEqual(self.store.real_path(self.public.path), self.inner.real_path(self.public.path))

    def _drv(self, name: str, *keys: SecretKey) -> str:
        drv = self.inner.add_file(name, b"Derive(...)")
        if keys:
            self.inner.evolve(drv.hash_part, sigs=signed(drv, *keys).sigs)
        basename = drv.path.rsplit("/", 1)[1]
        self.inner.add_log(basename, b"log of " + name.encode())
        return basename

    def test_log_of_shared_drv(self) -> None:
        """The log of a derivation whose .drv is shared is found."""
        basename = self._drv("pub.drv", UPSTREAM)
        self.assertIsNotNone(self.successResultOf(self.store.find_log(basename)))

    def test_log_of_withheld_drv(self) -> None:
        """The log of an unsigned .drv, or of a .drv no longer in the store, is None."""
        basename = self._drv("priv.drv")
        self.assertIsNotNone(self.successResultOf(self.inner.find_log(basename)))
        self.assertIsNone(self.successResultOf(self.store.find_log(basename)))
        gone = self._drv("gone.drv", UPSTREAM)
        self.inner.remove(gone[:32])
        self.assertIsNone(self.successResultOf(self.store.find_log(gone)))

    def test_log_name_must_match_path(self) -> None:
        """A log asked under another name with a shared .drv's hash part is None."""
        basename = self._drv("pub.drv", UPSTREAM)
        other = basename[:33] + "other.drv"
        self.inner.add_log(other, b"x")
        self.assertIsNone(self.successResultOf(self.store.find_log(other)))

    def test_log_bad_names(self) -> None:
        """Names that are not .drv basenames fail with ValueError."""
        self.failureResultOf(self.store.find_log("../etc/passwd"), ValueError)
        self.failureResultOf(self.store.find_log(f"{HASH}-x.txt"), ValueError)

    def test_log_under_all(self) -> None:
        """Under ``all`` every log is found, also of an unsigned .drv."""
        basename = self._drv("priv.drv")
        store = SharedStore(self.inner, SharePolicy("all"), clock=Clock())
        self.assertIsNotNone(self.successResultOf(store.find_log(basename)))


class FakeTally:
    """A Tally whose scans the test finishes by hand."""

    def __init__(self) -> None:
        self.scans: list[tuple[Any, Deferred[dict[str, int]]]] = []

    def __call__(self, classify: Any) -> Deferred[dict[str, int]]:
        d: Deferred[dict[str, int]] = Deferred()
        self.scans.append((classify, d))
        return d


class ShareStatusTests(SynchronousTestCase):
    """SharedStore.share_status: counts made off the reactor thread, at most every interval."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.tally = FakeTally()
        self.store = SharedStore(DictStore(), trusted_policy(), clock=self.clock, tally=self.tally,
                                 count_interval=300.0)

    def test_counting_until_first(self) -> None:
        """The first call starts a count and says counting with no counts."""
        self.assertEqual(self.store.share_status(), ShareStatus("trusted", None, True))
        self.assertEqual(len(self.tally.scans), 1)
        self.assertEqual(self.store.share_status().counts, None)
        self.assertEqual(len(self.tally.scans), 1, "a second count while one runs")

    def test_counts(self) -> None:
        """A finished count is shown with the withheld paths by reason, zero reasons left out."""
        self.store.share_status()
        classify, d = self.tally.scans[0]
        self.assertEqual(classify(signed(info(), UPSTREAM)), SHARED)
        self.clock.advance(5)
        d.callback({SHARED: 3, "unsigned": 2, "untrusted_key": 1, "bad_signature": 0})
        status = self.store.share_status()
        self.assertEqual(status.counts, ShareCounts(3, {"unsigned": 2, "untrusted_key": 1}, 5.0))
        self.assertFalse(status.counting)
        assert status.counts is not None
        self.assertEqual(status.counts.withheld_total, 3)

    def test_recount_after_interval(self) -> None:
        """A new count starts only once the interval has passed; the old one is shown meanwhile."""
        self.store.share_status()
        self.tally.scans[0][1].callback({SHARED: 1})
        self.clock.advance(299)
        self.store.share_status()
        self.assertEqual(len(self.tally.scans), 1)
        self.clock.advance(1)
        status = self.store.share_status()
        self.assertEqual(len(self.tally.scans), 2)
        self.assertTrue(status.counting)
        self.assertEqual(status.counts, ShareCounts(1, {}, 0.0))

    def test_failed_count(self) -> None:
        """A failed count is logged, the page keeps the last count, and the next try waits for the interval."""
        self.store.share_status()
        self.tally.scans[0][1].errback(StoreError("db gone"))
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)
        self.assertEqual(self.store.share_status(), ShareStatus("trusted", None, False))
        self.assertEqual(len(self.tally.scans), 1)

    def test_no_tally(self) -> None:
        """Without a tally nothing is counted."""
        store = SharedStore(DictStore(), SharePolicy("all"), clock=self.clock)
        self.assertEqual(store.share_status(), ShareStatus("all", None, False))


class StatusRenderingTests(SynchronousTestCase):
    """The status page and status.json show the sharing mode and counts."""

    def status(self, sharing: ShareStatus | None) -> Status:
        return Status(version="1", store_root="/", store_dir="/nix/store", priority=30, key_name=None,
                      public_key=None, valid_paths=5, requests={}, sharing=sharing)

    def test_json_counting(self) -> None:
        """Before the first count, status.json says counting and has no numbers."""
        document = json.loads(render_json(self.status(ShareStatus("trusted", None, True))))
        self.assertEqual(document["sharing"], {"mode": "trusted", "counting": True, "counted": False})

    def test_json_counts(self) -> None:
        """status.json gives shared, withheld and every reason."""
        counts = ShareCounts(3, {"unsigned": 2, "ca_unsigned": 1}, 0.0)
        document = json.loads(render_json(self.status(ShareStatus("trusted", counts, False))))
        self.assertEqual(document["sharing"], {
            "mode": "trusted", "counting": False, "counted": True, "shared": 3, "withheld": 3,
            "withheld_by_reason": {"unsigned": 2, "ca_unsigned": 1, "untrusted_key": 0, "bad_signature": 0},
        })

    def test_json_without_sharing(self) -> None:
        """Without a share view status.json's sharing is null."""
        self.assertIsNone(json.loads(render_json(self.status(None)))["sharing"])

    def test_html(self) -> None:
        """The page says counting... first, then the counts with every reason's label."""
        page = render_html(self.status(ShareStatus("trusted", None, True))).decode()
        self.assertIn("Shared with peers", page)
        self.assertIn("counting...", page)
        counts = ShareCounts(7, {"untrusted_key": 4}, 0.0)
        page = render_html(self.status(ShareStatus("trusted", counts, False))).decode()
        self.assertIn("<th>Shared paths</th><td>7</td>", page)
        self.assertIn("<th>Withheld paths</th><td>4</td>", page)
        self.assertIn("signature by an untrusted key</th><td>4</td>", page)
        self.assertIn("content-addressed, unsigned</th><td>0</td>", page)
        page = render_html(self.status(ShareStatus("all", counts, False))).decode()
        self.assertIn("every valid path", page)


class OptionTests(SynchronousTestCase):
    """--share and share = ... in the config file."""

    def test_default_trusted(self) -> None:
        """The default is trusted."""
        self.assertEqual(parse_args([]).share, "trusted")

    def test_command_line(self) -> None:
        """--share all and --share TRUSTED are accepted (case-insensitively)."""
        self.assertEqual(parse_args(["--share", "all"]).share, "all")
        self.assertEqual(parse_args(["--share", "TRUSTED"]).share, "trusted")

    def test_bad_mode(self) -> None:
        """An unknown mode is a one-line usage error naming the option and the modes."""
        from twisted.python.usage import UsageError

        e = self.assertRaises(UsageError, parse_args, ["--share", "everything"])
        self.assertIn("--share", str(e))
        self.assertIn("trusted, all", str(e))

    def test_config_file(self) -> None:
        """share = "all" in the config file; a non-string is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('share = "all"\n')
        self.assertEqual(read_config_file(path), {"share": "all"})
        with open(path, "w") as f:
            f.write("share = true\n")
        self.assertRaises(ConfigError, read_config_file, path)


NODE = NodeInfo("0.1.0", "2.8.0", "x86_64-linux", (), "", "ourid")
PEER = ("192.0.2.7", 9999)


class UdpShareTests(SynchronousTestCase):
    """UDP has_path queries answered from the shared view."""

    def answers(self, mode: str, queries: list[bytes]) -> list[bytes]:
        withheld = info("private")
        public = signed(info("public"), UPSTREAM)
        store = SharedStore(DictStore({withheld.hash_part: withheld, public.hash_part: public}),
                            make_share_policy(mode, [UPSTREAM.public_key], None), clock=Clock())
        reactor = MemoryUDPReactor()
        service = UdpDiscoveryService(
            udp=reactor, clock=reactor, registry=FakeRegistry(), store=store, node=NODE, http_port=9999,
            udp_port=9999, broadcast=False, metrics=CollectorRegistry(),
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = reactor.udp_ports[-1]
        port.take()
        answers = []
        for query in queries:
            service.protocol.datagramReceived(query, PEER)
            answers += [data for data, _ in port.take()]
        return answers

    def queries(self) -> list[bytes]:
        withheld = info("private")
        public = signed(info("public"), UPSTREAM)
        return [
            render_datagram(HasPathQuery(withheld.hash_part)),
            render_datagram(HasPathWithNarHashQuery(withheld.hash_part, withheld.nar_hash)),
            render_datagram(HasPathWithNarHashQuery(withheld.hash_part, Hash.sha256_of(b"other"))),
            render_datagram(HasPathQuery(public.hash_part)),
            render_datagram(HasPathWithNarHashQuery(public.hash_part, public.nar_hash)),
            render_datagram(HasPathWithNarHashQuery(public.hash_part, Hash.sha256_of(b"other"))),
        ]

    def test_trusted(self) -> None:
        """A withheld path is not_found to both queries (never narhash_mismatch); a shared one is answered."""
        self.assertEqual(self.answers("trusted", self.queries()),
                         [b"not_found", b"not_found", b"not_found", b"yes", b"yes", b"narhash_mismatch"])

    def test_all(self) -> None:
        """Under ``all`` every path is answered."""
        self.assertEqual(self.answers("all", self.queries()),
                         [b"yes", b"yes", b"narhash_mismatch", b"yes", b"yes", b"narhash_mismatch"])


class ServiceWiringTests(SynchronousTestCase):
    """build_service gives peers the shared view on HTTP and UDP."""

    def test_peer_store(self) -> None:
        """The service's peer_store wraps its store with the configured mode and keys plus its own key."""
        service, _ = build(self, quiet(share="trusted", trusted_public_keys=(UPSTREAM.public_key.to_string(),)),
                           secret_key=OWN)
        self.assertIsInstance(service.peer_store, SharedStore)
        self.assertIs(service.peer_store.store, service.store)
        self.assertEqual(service.peer_store.policy.mode, "trusted")
        self.assertEqual(service.peer_store.policy.keys, (UPSTREAM.public_key, OWN.public_key))
        self.assertIs(service.app._peer_store, service.peer_store)
        udp = service.getServiceNamed("udp")
        self.assertIs(udp.protocol._store, service.peer_store)

    def test_all(self) -> None:
        """--share all wraps with the all policy."""
        service, _ = build(self, quiet(share="all"))
        self.assertTrue(service.peer_store.policy.shares_everything)

    def test_tally_of_local_store(self) -> None:
        """With a LocalStore the status counts come from its tally_path_infos."""
        from peernix.service import make_peer_store

        store = LocalStore(self.mktemp(), ThreadlessClock())
        shared = make_peer_store(quiet(share="all"), Clock(), store, None)
        self.assertEqual(shared._tally, store.tally_path_infos)
        root = self.mktemp()
        os.makedirs(root)
        self.assertIsNone(make_peer_store(quiet(share="all"), Clock(), MemoryStore(root), None)._tally)


class _ShareStoreFixture:
    """A chroot store with paths of every kind, built once for the tally tests."""

    def __init__(self, tmp: str) -> None:
        self.sk, _, self.pk = nixenv.generate_key(os.path.join(tmp, "keys"), "tally-1")
        self.store = nixenv.ChrootStore(os.path.join(tmp, "store"))
        self.closure = self.store.build_closure(secret_key_file=self.sk, tag="tally")
        self.unsigned = self.store.build_closure(tag="tally-unsigned")
        self.ca = self.store.add_text("tally.txt", "tally\n")


_fixture: list[_ShareStoreFixture] = []


class TallyTests(SynchronousTestCase):
    """LocalStore.tally_path_infos counts every servable row, in batches, on the store's pool."""

    skip = nixenv.SKIP_NO_BUILD

    def setUp(self) -> None:
        if not _fixture:
            _fixture.append(_ShareStoreFixture(os.path.abspath("share-tally-store")))
        self.fx = _fixture[0]
        self.clock = ThreadlessClock()
        self.pool = ManualPool()
        self.local = LocalStore(self.fx.store.root, self.clock, threadpool=self.pool)
        self.local.start()
        self.addCleanup(self.local.stop)

    def tally(self, classify: Any) -> dict[str, int]:
        d = self.local.tally_path_infos(classify)
        self.pool.run_all()
        result: dict[str, int] = self.successResultOf(d)
        return result

    def test_infos_match_lookups(self) -> None:
        """Each row is counted once with the same info as a lookup, references included, in small batches."""
        self.patch(local, "SCAN_BATCH", 2)
        seen: list[PathInfo] = []

        def record(i: PathInfo) -> str:
            seen.append(i)
            return "x"

        counts = self.tally(record)
        paths = [i.path for i in seen]
        self.assertEqual(paths, sorted(set(paths)))
        self.assertEqual(counts, {"x": len(seen)})
        for i in seen:
            self.assertEqual(self.local._lookup(i.hash_part), i)
        for path in (*self.fx.closure.outputs, *self.fx.unsigned.outputs, self.fx.ca):
            self.assertIn(path, paths)

    def test_trusted_counts(self) -> None:
        """Under trusted the signed outputs are shared; unsigned outputs, .drv files and the added file are withheld."""
        from peernix.nix.signing import parse_public_key

        policy = make_share_policy("trusted", [parse_public_key(self.fx.pk)], None)
        counts = self.tally(policy.classify)
        self.assertEqual(counts[SHARED], 3)
        # 3 unsigned outputs, the .drv files of both closures (text CA), the added file.
        self.assertGreaterEqual(counts["unsigned"], 3)
        self.assertGreaterEqual(counts["ca_unsigned"], 7)
        self.assertEqual(set(counts) - {SHARED}, {"unsigned", "ca_unsigned"})

    def test_stopped(self) -> None:
        """A stopped store fails the tally with StoreError."""
        self.local.stop()
        self.failureResultOf(self.local.tally_path_infos(lambda i: "x"), StoreError)

    def test_stop_during_scan(self) -> None:
        """A store stopped while the scan is queued fails it with StoreError instead of scanning on."""
        d = self.local.tally_path_infos(lambda i: "x")
        self.local._stopped = True
        self.pool.run_all()
        self.failureResultOf(d, StoreError)
        self.local._stopped = False

