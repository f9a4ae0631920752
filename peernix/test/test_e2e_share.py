"""
End to end on loopback: ``--share`` with real daemons over a real Nix store.

One chroot store holds a closure signed by an "upstream" key the daemons
trust, a closure Nix signed with the daemons' own key at build time, a
closure nobody signed (a private build) and a ``nix-store --add``ed
(content-addressed, unsigned) file.  Two daemons serve it on loopback
(``--no-broadcast --no-mdns``), one with the default ``--share trusted``,
one with ``--share all``; both take only ``127.0.0.1/32`` as a proxy
client, so requests from ``127.0.0.2`` play the stranger on the LAN.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.discovery.datagrams import HasPathQuery, HasPathWithNarHashQuery, render_datagram
from peernix.nix.hashes import Hash
from peernix.nix.narinfo import NarInfo, parse_narinfo
from peernix.test.daemon import Daemon, free_port, http_get, shared_fixture, start_fixture
from peernix.test.nixenv import NIX_2_8, NIX_2_24, SKIP_NO_BUILD, ChrootStore, RealClientTests, generate_key
from peernix.test.test_e2e_peers import PEER_HEADER, get_from, hash_part, wait_for

#: The stranger's source address (outside ``--proxy-client 127.0.0.1/32``).
STRANGER = "127.0.0.2"


class _Fixture:
    """The store and the two daemons, made once for the module."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-share-")
        self.daemons: list[Daemon] = []
        self.store: ChrootStore | None = None

    def start(self) -> None:
        keys = os.path.join(self.tmp, "keys")
        self.upstream_sk, _, self.upstream_pk = generate_key(keys, "upstream-e2e-share-1")
        self.own_sk, _, self.own_pk = generate_key(keys, "alice-e2e-share-1")
        self.store = store = ChrootStore(os.path.join(self.tmp, "store"))
        self.signed = store.build_closure(secret_key_file=self.upstream_sk, tag="share-signed")
        self.own = store.build_closure(secret_key_file=self.own_sk, tag="share-own")
        self.private = store.build_closure(tag="share-private")
        self.ca = store.add_text("private-notes.txt", "token=hunter2\n")
        self.trusted = self.daemon("trusted", [])
        self.all = self.daemon("all", ["--share", "all"])
        for d in (self.trusted, self.all):
            d.wait_ready()

    def daemon(self, name: str, extra: list[str]) -> Daemon:
        assert self.store is not None
        port = free_port()
        self.udp_ports = getattr(self, "udp_ports", {})
        udp_port = free_port()
        self.udp_ports[port] = udp_port
        args = ["--store-root", self.store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(udp_port),
                "--trusted-public-key", self.upstream_pk, "--secret-key-file", self.own_sk,
                "--proxy-client", "127.0.0.1/32", *extra]
        daemon = Daemon(args, os.path.join(self.tmp, f"{name}.log"), port=port)
        self.daemons.append(daemon)
        return daemon

    def destroy(self) -> None:
        for d in self.daemons:
            d.stop()
        if self.store is not None:
            self.store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)




def udp_ask(port: int, datagram: bytes, source: str = STRANGER) -> bytes:
    """:returns: the daemon's UDP answer to ``datagram`` sent from ``source`` (b"" after 3 s of silence)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(3.0)
        s.sendto(datagram, ("127.0.0.1", port))
        try:
            return s.recvfrom(2048)[0]
        except socket.timeout:
            return b""


class ShareEndToEndTests(SynchronousTestCase):
    """A stranger gets only what is already public; local clients get everything."""

    skip = SKIP_NO_BUILD
    fx: _Fixture

    def setUp(self) -> None:
        # The store and daemons are made once, on first use.
        self.fx = shared_fixture(__name__, lambda: start_fixture(_Fixture()))

    def local_narinfo(self, daemon: Daemon, path: str) -> NarInfo:
        status, body = http_get(f"{daemon.url}/{hash_part(path)}.narinfo")
        self.assertEqual(status, 200, (path, body))
        return parse_narinfo(body)

    def urls(self, daemon: Daemon, path: str) -> dict[str, str]:
        """:returns: every route of ``path``: narinfo, NAR in both URL forms, .ls, and its deriver's log."""
        info = self.local_narinfo(daemon, path)
        nar_hash = info.nar_hash.nix32()
        urls = {
            "narinfo": f"/nix-cache/{hash_part(path)}.narinfo",
            "nar": f"/nix-cache/nar/{hash_part(path)}-{nar_hash}.nar",
            "nar-direct": f"/nix-cache/{hash_part(path)}-{nar_hash}.nar",
            "ls": f"/nix-cache/{hash_part(path)}.ls",
        }
        if info.deriver is not None:
            urls["log"] = f"/nix-cache/log/{info.deriver}"
        return urls

    def shared_paths(self) -> list[str]:
        return [*self.fx.signed.outputs, *self.fx.own.outputs]

    def withheld_paths(self) -> list[str]:
        return [*self.fx.private.outputs, self.fx.ca]

    def test_stranger_under_trusted(self) -> None:
        """Under trusted a stranger gets 404 on every route of withheld paths and 200 for signed ones."""
        fx = self.fx
        for path in self.withheld_paths():
            for name, url in self.urls(fx.trusted, path).items():
                self.assertEqual(get_from(STRANGER, fx.trusted.port, url)[0], 404, (name, path))
                # Also a loopback request marked as another daemon's.
                self.assertEqual(get_from("127.0.0.1", fx.trusted.port, url, {PEER_HEADER: "1"})[0], 404,
                                 (name, path))
        for path in self.shared_paths():
            for name, url in self.urls(fx.trusted, path).items():
                if name == "log":
                    # A .drv is never signed by Nix, so its log stays private.
                    self.assertEqual(get_from(STRANGER, fx.trusted.port, url)[0], 404, (name, path))
                else:
                    self.assertEqual(get_from(STRANGER, fx.trusted.port, url)[0], 200, (name, path))

    def test_withheld_like_missing(self) -> None:
        """A withheld path's 404 body is the same as a missing path's."""
        fx = self.fx
        path = fx.private.top
        missing = "/nix/store/" + "1" * 32 + "-nowhere"
        withheld = get_from(STRANGER, fx.trusted.port, f"/nix-cache/{hash_part(path)}.narinfo")
        absent = get_from(STRANGER, fx.trusted.port, f"/nix-cache/{hash_part(missing)}.narinfo")
        self.assertEqual(withheld, absent)

    def test_stranger_under_all(self) -> None:
        """Under all a stranger gets every path on every route."""
        fx = self.fx
        for path in self.withheld_paths() + self.shared_paths():
            for name, url in self.urls(fx.all, path).items():
                status, body = get_from(STRANGER, fx.all.port, url)
                self.assertEqual(status, 200, (name, path, body))

    def test_local_client_sees_everything(self) -> None:
        """The local client gets every path on every route, build logs included, in both modes."""
        fx = self.fx
        for daemon in (fx.trusted, fx.all):
            for path in self.withheld_paths() + self.shared_paths():
                for name, url in self.urls(daemon, path).items():
                    self.assertEqual(http_get(f"http://127.0.0.1:{daemon.port}{url}")[0], 200, (name, path))

    def test_udp(self) -> None:
        """UDP has_path and has_path_with_narhash are not_found for withheld paths under trusted, yes under all."""
        fx = self.fx
        cases = [(fx.private.top, b"not_found"), (fx.ca, b"not_found"), (fx.signed.top, b"yes"), (fx.own.top, b"yes")]
        for path, expected in cases:
            nar_hash = self.local_narinfo(fx.trusted, path).nar_hash
            wrong = Hash.sha256_of(b"other")
            for daemon, answer in ((fx.trusted, expected), (fx.all, b"yes")):
                udp = fx.udp_ports[daemon.port]
                self.assertEqual(udp_ask(udp, render_datagram(HasPathQuery(hash_part(path)))), answer, path)
                self.assertEqual(udp_ask(udp, render_datagram(HasPathWithNarHashQuery(hash_part(path), nar_hash))),
                                 answer, path)
                mismatch = b"narhash_mismatch" if answer == b"yes" else b"not_found"
                self.assertEqual(udp_ask(udp, render_datagram(HasPathWithNarHashQuery(hash_part(path), wrong))),
                                 mismatch, path)
                # Under the per-source reply rate limit.
                time.sleep(0.05)

    def test_status_counts(self) -> None:
        """status.json counts the signed outputs as shared and the rest as withheld, by reason."""
        fx = self.fx

        def sharing(daemon: Daemon) -> dict[str, Any]:
            status, body = http_get(f"http://127.0.0.1:{daemon.port}/status.json")
            self.assertEqual(status, 200)
            document: dict[str, Any] = json.loads(body)["sharing"]
            return document

        for daemon in (fx.trusted, fx.all):
            sharing(daemon)  # starts the first count
            wait_for(lambda: bool(sharing(daemon)["counted"]), what="the first count")
        trusted = sharing(fx.trusted)
        self.assertEqual(trusted["mode"], "trusted")
        self.assertEqual(trusted["shared"], 6)
        reasons = trusted["withheld_by_reason"]
        self.assertEqual(reasons["unsigned"], 3)
        # The added file and the .drv files (text CA) of the three closures.
        self.assertGreaterEqual(reasons["ca_unsigned"], 1 + 9)
        self.assertEqual(trusted["withheld"], sum(reasons.values()))
        everything = sharing(fx.all)
        self.assertEqual(everything["mode"], "all")
        self.assertEqual(everything["withheld"], 0)
        self.assertEqual(everything["shared"], trusted["shared"] + trusted["withheld"])
        page = http_get(f"http://127.0.0.1:{fx.trusted.port}/")[1].decode()
        self.assertIn("Shared with peers", page)
        self.assertIn("no signature", page)


class _ShareClientTests(RealClientTests):
    """A real Nix client of the node itself substitutes what the node withholds from strangers."""

    def test_local_nix_substitutes_private_build(self) -> None:
        """A real Nix trusting the node's key substitutes an unsigned private build as the local client."""
        fx = shared_fixture(__name__, lambda: start_fixture(_Fixture()))
        client = self.nix_client("peernix-e2e-share-client-")
        done = client.substitute([fx.private.top], fx.trusted.url, [fx.own_pk])
        self.assertEqual(done.returncode, 0, done.stderr)
        for path in fx.private.outputs:
            self.assertTrue(client.is_valid(path), path)
        verified = client.verify(*fx.private.outputs)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        # The node signed them for its own client: a client trusting only
        # the upstream key refuses them.
        other = self.nix_client("peernix-e2e-share-client-")
        refused = other.substitute([fx.private.top], fx.trusted.url, [fx.upstream_pk])
        self.assertNotEqual(refused.returncode, 0)
        self.assertFalse(other.is_valid(fx.private.top))


class ShareNix28Tests(_ShareClientTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = SKIP_NO_BUILD or NIX_2_8.missing


class ShareNix224Tests(_ShareClientTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = SKIP_NO_BUILD or NIX_2_24.missing
