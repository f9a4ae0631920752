"""
End to end in network namespaces: fetching for the LAN with real Nix clients.

Hosts on one bridge, all made (and removed) by the test:

- U, the upstream: nginx serving a binary cache made with ``nix copy --to
  file://DIR?compression=xz`` (signed by a test key), with an access log;
- A, B, C: peernix nodes with empty stores, ``--upstream http://U:8080``,
  finding each other by UDP broadcast, each with a Nix client (Debian's
  2.8, and Nix 2.24 where installed) using only its local peernix.

What is checked: all clients substituting the same closure at the same
moment cost one upstream download per NAR (U's access log), with peers
found by broadcast or given statically; the fetcher
killed mid-NAR leaves every other client successful; an unreachable
upstream is a fast 404 and the clients complete from their next
substituter; a lying upstream (a signed narinfo whose NAR is another) never
reaches a client's store.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.hashes import Hash
from peernix.test.daemon import Daemon, http_get, shared_fixture
from peernix.test.netns import Host, TestNetwork, netns_unavailable
from peernix.test.nixenv import SKIP_NO_BUILD, ChrootStore, NixClient, generate_key, isolated_env, run_nix

PORT = 9999
UPSTREAM_PORT = 8080
UPSTREAM_NAME = "upstream-e2e-fetch-1"
#: The big path: long enough to kill its fetcher mid-download on a shaped link.
BIG_SIZE = 16 * 1024 * 1024
#: U's uplink while a fetcher is killed mid-NAR: 16 MiB take about 7 s, time enough to watch it.
SHAPED_RATE = "20mbit"
MODERN_NIX_STORE = "/opt/nix-modern/bin/nix-store"
WAIT = 30.0

_SKIP = netns_unavailable() or SKIP_NO_BUILD


def hash_part(store_path: str) -> str:
    return store_path[len("/nix/store/"):][:32]


def _nix_copy_xz(store: ChrootStore, paths: Sequence[str], dest: str) -> None:
    """``nix copy --to file://DEST?compression=xz``: a cache laid out as cache.nixos.org's."""
    run_nix(["nix", "--extra-experimental-features", "nix-command", "copy", "--store", store.root,
             "--to", f"file://{dest}?compression=xz", *paths], store.env)


class _Fixture:
    """The upstream key, a closure plus a big path, an honest and a lying xz cache of them."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-upstream-")
        keys = os.path.join(self.tmp, "keys")
        self.upstream_sk, _, self.upstream_pk = generate_key(keys, UPSTREAM_NAME)
        self.origin = ChrootStore(os.path.join(self.tmp, "origin"))
        self.closure = self.origin.build_closure(secret_key_file=self.upstream_sk, tag="fetch")
        self.big = self.origin.make_big_path(BIG_SIZE, name="fetch-big", seed=13)
        self.origin.sign([self.big], self.upstream_sk)
        self.cache = os.path.join(self.tmp, "cache")
        _nix_copy_xz(self.origin, [self.closure.top, self.big], self.cache)
        self.lying = os.path.join(self.tmp, "lying")
        shutil.copytree(self.cache, self.lying)
        self._lie_about(self.closure.leaf)

    def _lie_about(self, path: str) -> None:
        """
        Make the lying cache serve another NAR for ``path``: its narinfo keeps
        the genuine signature and NarHash, FileHash and FileSize describe the
        substituted file, so only the NarHash check can catch it.
        """
        narinfo_path = os.path.join(self.lying, f"{hash_part(path)}.narinfo")
        with open(narinfo_path) as f:
            text = f.read()
        url = re.search(r"^URL: (.*)$", text, re.M).group(1)  # type: ignore[union-attr]
        with open(os.path.join(self.lying, url), "rb") as f:
            nar = lzma.decompress(f.read())
        # Same length, other bytes (the file's contents, near the end).
        forged = nar[:-16] + bytes(b ^ 0xFF for b in nar[-16:-8]) + nar[-8:]
        data = lzma.compress(forged, format=lzma.FORMAT_XZ)
        with open(os.path.join(self.lying, url), "wb") as f:
            f.write(data)
        text = re.sub(r"^FileHash: .*$", f"FileHash: {Hash.sha256_of(data).to_string()}", text, flags=re.M)
        text = re.sub(r"^FileSize: .*$", f"FileSize: {len(data)}", text, flags=re.M)
        with open(narinfo_path, "w") as f:
            f.write(text)

    def nar_files(self) -> dict[str, str]:
        """:returns: store path -> its NAR file's URL path in the cache."""
        files = {}
        for path in (*self.closure.outputs, self.big):
            with open(os.path.join(self.cache, f"{hash_part(path)}.narinfo")) as f:
                files[path] = "/" + re.search(r"^URL: (.*)$", f.read(), re.M).group(1)  # type: ignore[union-attr]
        return files

    def destroy(self) -> None:
        self.origin.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Nginx:
    """
    nginx in ``host``'s namespace serving ``root`` on port 8080, logging every
    request; where nginx is not installed, Python's ``http.server`` instead
    (the same files, its log lines carry the same request and status).
    """

    def __init__(self, host: Host, root: str, work: str) -> None:
        self.access_log = os.path.join(work, "nginx-access.log")
        self.url = f"http://{host.ipv4}:{UPSTREAM_PORT}"
        self._log_file = None
        if shutil.which("nginx") is None:
            self._log_file = open(self.access_log, "wb")
            self.process = subprocess.Popen(
                host.command([sys.executable, "-m", "http.server", "--bind", host.ipv4, "--directory", root,
                              str(UPSTREAM_PORT)]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log_file)
            self._wait(host)
            return
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                "daemon off;\nworker_processes 1;\nuser root;\n"
                f"pid {work}/nginx.pid;\nerror_log {work}/nginx-error.log;\n"
                "events { worker_connections 256; }\n"
                "http {\n"
                f"  access_log {self.access_log};\n"
                f"  client_body_temp_path {work}/nginx-body;\n"
                f"  proxy_temp_path {work}/nginx-proxy;\n"
                f"  fastcgi_temp_path {work}/nginx-fastcgi;\n"
                f"  uwsgi_temp_path {work}/nginx-uwsgi;\n"
                f"  scgi_temp_path {work}/nginx-scgi;\n"
                "  types { text/x-nix-narinfo narinfo; }\n"
                f"  server {{ listen {host.ipv4}:{UPSTREAM_PORT}; root {root}; }}\n"
                "}\n"
            )
        self.process = subprocess.Popen(host.command(["nginx", "-c", conf, "-e", f"{work}/nginx-error.log"]),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._wait(host)

    def _wait(self, host: Host) -> None:
        deadline = time.monotonic() + WAIT
        while http_get(self.url + "/nix-cache-info", host=host)[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.1)

    def gets(self) -> Counter[str]:
        """:returns: successful GETs by path, from the access log."""
        counts: Counter[str] = Counter()
        with open(self.access_log) as f:
            for line in f:
                m = re.search(r'"GET (\S+) HTTP/[0-9.]+" (\d{3})', line)
                if m and m.group(2) in ("200", "206"):
                    counts[m.group(1)] += 1
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log_file is not None:
            self._log_file.close()


class _Client:
    """A Nix client (2.8 or 2.24) with an empty chroot store, run inside a host's namespace."""

    def __init__(self, root: str, modern: bool) -> None:
        self.modern = modern
        self.store = NixClient(root)
        self.env = isolated_env(self.store.env_dir)

    def substitute(self, host: Host, paths: Sequence[str], substituters: str, keys: str,
                   extra: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
        program = MODERN_NIX_STORE if self.modern else "nix-store"
        args = [program, "--store", self.store.root, "-r", *paths,
                "--option", "substituters", substituters,
                "--option", "trusted-public-keys", keys,
                "--option", "require-sigs", "true",
                "--option", "fallback", "false",
                "--option", "builders", "",
                *extra]
        return run_nix(host.command(args), self.env, check=False)


class FetchForLanEndToEndTests(SynchronousTestCase):
    """Real Nix clients behind three peernix nodes and an nginx upstream, in namespaces."""

    skip = _SKIP
    fx: _Fixture

    def setUp(self) -> None:
        self.fx = shared_fixture(__name__, _Fixture)
        self.work = tempfile.mkdtemp(prefix="peernix-e2e-upstream-run-")
        self.addCleanup(shutil.rmtree, self.work, True)
        network = TestNetwork(4)
        self.addCleanup(network.destroy)
        self.network = network
        self.u, *self.node_hosts = network.hosts
        self.daemons: dict[str, Daemon] = {}

    def _nginx(self, root: str) -> Nginx:
        nginx = Nginx(self.u, root, self.work)
        self.addCleanup(nginx.stop)
        return nginx

    def _node(self, name: str, host: Host, upstream: str, *extra: str) -> Daemon:
        store = ChrootStore(os.path.join(self.work, f"store-{name}"))
        self.addCleanup(store.remove)
        args = ["--store-root", store.root, "--no-mdns", "--udp-port", str(PORT),
                "--announce-interval", "2",
                "--trusted-public-key", self.fx.upstream_pk,
                "--upstream", upstream,
                "--staging-dir", os.path.join(self.work, f"staging-{name}"), *extra]
        daemon = Daemon(args, os.path.join(self.work, f"{name}.log"), port=PORT, host=host)
        self.addCleanup(daemon.stop)
        self.daemons[name] = daemon
        return daemon

    def _status(self, host: Host) -> dict[str, Any]:
        code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=host)
        if code != 200:
            return {}
        document: dict[str, Any] = json.loads(body)
        return document

    def _wait_for_lan(self, hosts: Sequence[Host]) -> None:
        """Wait until every node knows every other one as a fetcher."""
        deadline = time.monotonic() + WAIT
        while True:
            ready = all(len((self._status(h).get("upstream") or {}).get("fetching_peers", [])) == len(hosts) - 1
                        for h in hosts)
            if ready:
                return
            if time.monotonic() > deadline:
                self.fail("nodes did not find each other: " + "".join(d.log()[-2000:] for d in self.daemons.values()))
            time.sleep(0.2)

    def _clients(self, count: int) -> list[_Client]:
        modern = os.access(MODERN_NIX_STORE, os.X_OK)
        clients = []
        for i in range(count):
            client = _Client(os.path.join(self.work, f"client-{i}"), modern=modern and i % 2 == 1)
            self.addCleanup(client.store.remove)
            clients.append(client)
        return clients

    def _run_together(self, jobs: list[tuple[_Client, Host]], paths: Sequence[str], substituters: str | None = None
                      ) -> list[subprocess.CompletedProcess[bytes]]:
        """Start every client's ``nix-store -r`` at the same moment; :returns: their results in order."""
        results: list[subprocess.CompletedProcess[bytes] | None] = [None] * len(jobs)
        start = threading.Barrier(len(jobs))

        def run(i: int, client: _Client, host: Host) -> None:
            start.wait()
            results[i] = client.substitute(host, paths, substituters or f"http://127.0.0.1:{PORT}/nix-cache",
                                           self.fx.upstream_pk)

        threads = [threading.Thread(target=run, args=(i, c, h)) for i, (c, h) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        return [r for r in results if r is not None]

    def _logs(self) -> str:
        return "".join(f"\n--- {n} ---\n{d.log()[-3000:]}" for n, d in self.daemons.items())

    def test_concurrent_clients_one_upstream_download_per_nar(self) -> None:
        """Three nodes' clients (2.8 and 2.24) asking at once: every NAR leaves the upstream once."""
        nginx = self._nginx(self.fx.cache)
        for name, host in zip("abc", self.node_hosts):
            self._node(name, host, nginx.url, "--access-log").wait_ready()
        self._wait_for_lan(self.node_hosts)
        clients = self._clients(3)
        paths = [self.fx.closure.top, self.fx.big]
        results = self._run_together(list(zip(clients, self.node_hosts)), paths)
        for client, result in zip(clients, results):
            self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace") + self._logs())
            for path in (*self.fx.closure.outputs, self.fx.big):
                self.assertTrue(client.store.is_valid(path), path)
                self.assertEqual(client.store.verify(path).returncode, 0)
        gets = nginx.gets()
        for path, url in self.fx.nar_files().items():
            self.assertEqual(gets[url], 1, f"{path}: {gets[url]} upstream downloads\n{gets}")
        print(f"\nupstream requests: {sum(gets.values())}, NAR downloads: "
              f"{sum(n for u, n in gets.items() if '/nar/' in u)}")
        fetched = sum((self._status(h)["upstream"]["bytes_fetched"]) for h in self.node_hosts)
        unique = sum(os.path.getsize(os.path.join(self.fx.cache, url[1:])) for url in self.fx.nar_files().values())
        self.assertEqual(fetched, unique)
        # Every path has one fetcher, so the other nodes' answers for it say
        # "upstream URL via FETCHER" (in the header and the access log),
        # naming another node, never the one answering.
        urls = {name: f"http://{host.ipv4}:{PORT}" for name, host in zip("abc", self.node_hosts)}
        via_lines = 0
        for name in "abc":
            for line in self.daemons[name].log().splitlines():
                marker = f'source="upstream {nginx.url} via '
                if marker in line and ".nar" in line:
                    via = line.split(marker, 1)[1].split('"', 1)[0]
                    self.assertIn(via, set(urls.values()) - {urls[name]}, line)
                    via_lines += 1
        self.assertGreaterEqual(via_lines, 2, self._logs())

    def test_static_peers_one_download(self) -> None:
        """Static peers without broadcast learn who fetches by asking; the closure leaves the upstream once."""
        nginx = self._nginx(self.fx.cache)
        hosts = self.node_hosts[:2]
        for name, host, other in (("a", hosts[0], hosts[1]), ("b", hosts[1], hosts[0])):
            self._node(name, host, nginx.url, "--no-broadcast", "--peer", f"http://{other.ipv4}:{PORT}").wait_ready()
        self._wait_for_lan(hosts)
        clients = self._clients(2)
        results = self._run_together(list(zip(clients, hosts)), [self.fx.closure.top])
        for client, result in zip(clients, results):
            self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace") + self._logs())
            self.assertTrue(client.store.is_valid(self.fx.closure.top))
        gets = nginx.gets()
        for path in self.fx.closure.outputs:
            self.assertEqual(gets[self.fx.nar_files()[path]], 1, f"{path}\n{gets}")

    def test_fetcher_killed_mid_nar(self) -> None:
        """The big path's fetcher killed mid-download: the other nodes' clients still succeed."""
        nginx = self._nginx(self.fx.cache)
        # U's uplink shaped, so the big NAR takes seconds to download.
        subprocess.run(self.u.command(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", SHAPED_RATE,
                                       "burst", "64kb", "latency", "50ms"]), check=True)
        hosts = dict(zip("abc", self.node_hosts))
        for name, host in hosts.items():
            self._node(name, host, nginx.url).wait_ready()
        self._wait_for_lan(self.node_hosts)
        clients = self._clients(3)
        results: dict[str, subprocess.CompletedProcess[bytes]] = {}

        def run(name: str, client: _Client) -> None:
            results[name] = client.substitute(hosts[name], [self.fx.big], f"http://127.0.0.1:{PORT}/nix-cache",
                                              self.fx.upstream_pk)

        threads = {n: threading.Thread(target=run, args=(n, c)) for n, c in zip(hosts, clients)}
        for t in threads.values():
            t.start()
        killed = None
        deadline = time.monotonic() + WAIT
        while killed is None and time.monotonic() < deadline:
            for name, host in hosts.items():
                upstream = self._status(host).get("upstream") or {}
                for fetch in upstream.get("active_fetches", []):
                    if fetch["source"].startswith(nginx.url) and fetch["received"] > BIG_SIZE // 8:
                        killed = name
            time.sleep(0.05)
        self.assertIsNotNone(killed, "no node was seen fetching the big path" + self._logs())
        assert killed is not None
        self.daemons[killed].process.kill()
        for t in threads.values():
            t.join(600)
        for (name, client) in zip(hosts, clients):
            if name == killed:
                continue
            result = results[name]
            self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace") + self._logs())
            self.assertTrue(client.store.is_valid(self.fx.big))
            self.assertEqual(client.store.verify(self.fx.big).returncode, 0)
        big_url = self.fx.nar_files()[self.fx.big]
        self.assertLessEqual(nginx.gets()[big_url], 2)
        fallbacks = sum(self._status(h)["upstream"]["fetcher_fallbacks"] for n, h in hosts.items() if n != killed)
        self.assertGreaterEqual(fallbacks, 1)

    def test_upstream_unreachable(self) -> None:
        """An unreachable upstream: 404 within 5 s, and the client completes from its next substituter."""
        nginx = self._nginx(self.fx.cache)
        # An address on the bridge nobody has: connections time out.
        dead = f"http://{self.u.ipv4.rsplit('.', 1)[0]}.250:{UPSTREAM_PORT}"
        host = self.node_hosts[0]
        self._node("a", host, dead).wait_ready()
        started = time.monotonic()
        code, _ = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{hash_part(self.fx.closure.top)}.narinfo",
                           host=host, timeout=10)
        elapsed = time.monotonic() - started
        self.assertEqual(code, 404)
        self.assertLess(elapsed, 5.0)
        # Nix 2.8, and 2.24 where installed: peernix first, the upstream itself next.
        for client in self._clients(2):
            result = client.substitute(host, [self.fx.closure.top],
                                       f"http://127.0.0.1:{PORT}/nix-cache {nginx.url}", self.fx.upstream_pk)
            self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace") + self._logs())
            self.assertTrue(client.store.is_valid(self.fx.closure.top))

    def test_lying_upstream_never_reaches_a_store(self) -> None:
        """A signed narinfo whose NAR is another: no client's store gets the path; the failure is counted."""
        nginx = self._nginx(self.fx.lying)
        for name, host in zip("ab", self.node_hosts[:2]):
            self._node(name, host, nginx.url).wait_ready()
        self._wait_for_lan(self.node_hosts[:2])
        clients = self._clients(2)
        leaf = self.fx.closure.leaf
        results = self._run_together(list(zip(clients, self.node_hosts[:2])), [leaf])
        for client, result in zip(clients, results):
            self.assertNotEqual(result.returncode, 0)
            self.assertFalse(client.store.is_valid(leaf))
        failures = sum(self._status(h)["upstream"]["verification_failures"] for h in self.node_hosts[:2])
        self.assertGreaterEqual(failures, 1)
