"""
Tests of ``--share`` on the web layer: peers get the shared view on every
route (a withheld path answers byte for byte like a missing one), local
clients the whole store.  Socket-free: a WebApp over a MemoryStore.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.pathinfo import PathInfo
from peernix.nix.signing import SecretKey
from peernix.store.share import SharedStore, make_share_policy, path_fingerprint
from peernix.test.fakes import FakeUpstream, fake_hash_part
from peernix.test.test_web_app import Harness
from peernix.web.app import WebApp

UPSTREAM = SecretKey("cache.example.org-1", bytes(range(32)))
OWN = SecretKey("alice-peernix-1", bytes(range(1, 33)))
STRANGER = SecretKey("mallory-1", bytes(range(2, 34)))

#: A LAN address outside the default proxy clients.
PEER_ADDRESS = "192.0.2.7"
MISSING = fake_hash_part("missing")


class ShareHarness(Harness):
    """A Harness whose WebApp serves peers through a SharedStore of ``mode``."""

    def __init__(self, testcase: SynchronousTestCase, mode: str, **kwargs: Any) -> None:
        super().__init__(testcase, **kwargs)
        policy = make_share_policy(mode, [UPSTREAM.public_key], OWN)
        self.shared = SharedStore(self.store, policy, clock=self.clock)
        self.app = WebApp(
            self.store,
            reactor=self.clock,
            defer_to_thread=self.app._defer_to_thread,
            secret_key=kwargs.get("key"),
            priority=30,
            metrics=self.metrics,
            upstream=kwargs.get("upstream"),
            store_root=self.store.root,
            version="9.9.9-test",
            peer_store=self.shared,
        )
        self.resource = self.app.resource()
        self.agent = RequestTraversalAgent(self.resource)

    def from_peer(self, method: str, path: str, headers: str = "") -> tuple[int, bytes, bytes]:
        """:returns: status, raw headers and raw body of a request from :data:`PEER_ADDRESS`."""
        request = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
        transport, _ = self.raw(request, peer=PEER_ADDRESS)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        code = int(head.split(b" ", 2)[1])
        return code, head, body

    def sign(self, info: PathInfo, *keys: SecretKey) -> PathInfo:
        """Give ``info``'s DB row a signature by each of ``keys``."""
        return self.store.evolve(info.hash_part, sigs=tuple(k.sign(path_fingerprint(info)) for k in keys))


def routes(info: PathInfo) -> dict[str, str]:
    """:returns: every cache route of ``info`` but ``log/``, by name."""
    hp = info.hash_part
    nar_hash = info.nar_hash.nix32()
    return {
        "narinfo": f"/nix-cache/{hp}.narinfo",
        "narinfo-zstd": f"/nix-cache/{hp}.narinfo?compression=zstd",
        "nar": f"/nix-cache/nar/{hp}-{nar_hash}.nar",
        "nar-zst": f"/nix-cache/nar/{hp}-{nar_hash}.nar.zst",
        "nar-direct": f"/nix-cache/{hp}-{nar_hash}.nar",
        "nar-direct-zst": f"/nix-cache/{hp}-{nar_hash}.nar.zst",
        "nar-hash-only": f"/nix-cache/{hp}.nar",
        "nar-harmonia": f"/nix-cache/nar/{nar_hash}.nar?hash={hp}",
        "ls": f"/nix-cache/{hp}.ls",
    }


class ShareWebTests(SynchronousTestCase):
    """Every route, for peers and local clients, under ``trusted`` and ``all``."""

    def make(self, mode: str, **kwargs: Any) -> ShareHarness:
        h = ShareHarness(self, mode, **kwargs)
        store = h.store
        self.public = h.sign(store.add_tree("public", {"a": b"public\n"}), UPSTREAM)
        self.own = h.sign(store.add_file("own", b"built here, signed\n"), OWN)
        self.private = store.add_tree("private", {"secret": b"token=hunter2\n"})
        self.foreign = h.sign(store.add_file("foreign", b"x\n"), STRANGER)
        self.ca = store.add_file("fetched", b"private repo\n",
                                 ca="fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s")
        drv = store.add_file("public.drv", b"Derive()")
        self.public_drv = h.sign(drv, UPSTREAM).path.rsplit("/", 1)[1]
        self.private_drv = store.add_file("private.drv", b"Derive()").path.rsplit("/", 1)[1]
        for basename in (self.public_drv, self.private_drv):
            store.add_log(basename, b"log of " + basename.encode())
        return h

    def withheld(self) -> list[PathInfo]:
        return [self.private, self.foreign, self.ca]

    def shared(self) -> list[PathInfo]:
        return [self.public, self.own]

    def assert_like_missing(self, h: ShareHarness, send: Callable[[str, str], tuple[int, bytes, bytes]],
                            info: PathInfo) -> None:
        """Every route of ``info`` answers exactly as the same route of a missing path."""
        mine = routes(info)
        missing = {name: url.replace(info.hash_part, MISSING) for name, url in mine.items()}
        for method in ("GET", "HEAD"):
            for name in mine:
                got = send(method, mine[name])
                expected = send(method, missing[name])
                self.assertEqual(got[0], 404, (method, name, info.path))
                self.assertEqual((got[0], got[2]), (expected[0], expected[2]), (method, name))
                self.assertEqual(_headers(got[1]), _headers(expected[1]), (method, name))

    def test_trusted_peer_address(self) -> None:
        """Under trusted a LAN peer gets 404 on every route for withheld paths, like for a missing one."""
        h = self.make("trusted")
        for info in self.withheld():
            self.assert_like_missing(h, h.from_peer, info)

    def test_trusted_peer_header(self) -> None:
        """A loopback request marked X-Peernix-Peer gets the peers' view too."""
        h = self.make("trusted")

        def send(method: str, path: str) -> tuple[int, bytes, bytes]:
            response, body = h.request(method.encode(), path, {b"X-Peernix-Peer": [b"1"]})
            raw = b"\r\n".join(b"%s: %s" % (k, v) for k, vs in response.headers.getAllRawHeaders()
                               for v in vs if k.lower() != b"date")
            return response.code, raw, body

        for info in self.withheld():
            self.assert_like_missing(h, send, info)
        for info in self.shared():
            self.assertEqual(send("GET", routes(info)["narinfo"])[0], 200)

    def test_trusted_shared_to_peer(self) -> None:
        """Paths signed by a trusted key or this node's key are 200 on every route for a peer."""
        h = self.make("trusted")
        for info in self.shared():
            for method in ("GET", "HEAD"):
                for name, url in routes(info).items():
                    self.assertEqual(h.from_peer(method, url)[0], 200, (method, name, info.path))

    def test_local_client_sees_everything(self) -> None:
        """A local client gets every path on every route, in both modes."""
        for mode in ("trusted", "all"):
            h = self.make(mode)
            for info in self.shared() + self.withheld():
                for name, url in routes(info).items():
                    response, _ = h.get(url)
                    self.assertEqual(response.code, 200, (mode, name, info.path))
            for basename in (self.public_drv, self.private_drv):
                response, body = h.get(f"/nix-cache/log/{basename}")
                self.assertEqual((response.code, body), (200, b"log of " + basename.encode()))

    def test_all_shares_everything(self) -> None:
        """Under all a peer gets every path and every log."""
        h = self.make("all")
        for info in self.shared() + self.withheld():
            for name, url in routes(info).items():
                self.assertEqual(h.from_peer("GET", url)[0], 200, (name, info.path))
        for basename in (self.public_drv, self.private_drv):
            self.assertEqual(h.from_peer("GET", f"/nix-cache/log/{basename}")[0], 200)

    def test_logs(self) -> None:
        """Under trusted a peer gets the log of a shared .drv only; an unshared one answers like no log."""
        h = self.make("trusted")
        code, _, body = h.from_peer("GET", f"/nix-cache/log/{self.public_drv}")
        self.assertEqual(code, 200)
        self.assertIn(b"log of", body)
        missing_drv = f"{MISSING}-nothing.drv"
        for method in ("GET", "HEAD"):
            got = h.from_peer(method, f"/nix-cache/log/{self.private_drv}")
            expected = h.from_peer(method, f"/nix-cache/log/{missing_drv}")
            self.assertEqual(got[0], 404)
            self.assertEqual((got[0], got[2], _headers(got[1])), (expected[0], expected[2], _headers(expected[1])))

    def test_narinfo_cache_kept_apart(self) -> None:
        """A narinfo a local client fetched (and the cache kept) is still 404 for a peer, and the reverse."""
        h = self.make("trusted")
        url = routes(self.private)["narinfo"]
        self.assertEqual(h.get(url)[0].code, 200)
        self.assertEqual(h.from_peer("GET", url)[0], 404)
        h.clock.advance(5)
        self.assertEqual(h.from_peer("GET", url)[0], 404)
        self.assertEqual(h.get(url)[0].code, 200)

    def test_withheld_never_fans_out(self) -> None:
        """A peer's request for a withheld path is 404 without asking the upstream."""
        upstream = FakeUpstream()
        h = self.make("trusted", upstream=upstream)
        for url in routes(self.private).values():
            self.assertEqual(h.from_peer("GET", url)[0], 404)
        self.assertEqual(upstream.lookups, [])

    def test_status_counts_without_tally(self) -> None:
        """status.json shows the mode; without a tally (a MemoryStore) there are no counts."""
        h = self.make("trusted")
        response, body = h.get("/status.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["sharing"], {"mode": "trusted", "counting": False, "counted": False})

    def test_no_peer_store_no_sharing(self) -> None:
        """A WebApp without peer_store serves everyone the whole store and shows no sharing."""
        h = Harness(self)
        info = h.store.add_file("private", b"x")
        transport, _ = h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % info.hash_part.encode(),
                             peer=PEER_ADDRESS)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertIsNone(json.loads(h.get("/status.json")[1])["sharing"])

    def test_client_decision_cache_bounded(self) -> None:
        """The per-address decision cache never grows past its bound."""
        from peernix.web import app

        self.patch(app, "CLIENT_DECISION_CACHE_SIZE", 2)
        h = self.make("trusted")
        for n in range(5):
            h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % self.private.hash_part.encode(),
                  peer=f"192.0.2.{n + 1}")
        self.assertLessEqual(len(h.app._local_hosts), 2)


def _headers(head: bytes) -> list[bytes]:
    """:returns: the header lines of a raw response head, without Date (it varies), sorted."""
    lines = head.split(b"\r\n")
    if lines and lines[0].startswith(b"HTTP/"):
        lines = lines[1:]
    return sorted(line for line in lines if not line.lower().startswith(b"date:"))
