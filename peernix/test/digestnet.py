"""
A LAN of real peernix daemons exchanging store digests, in network
namespaces: shared by the end-to-end test (``test_e2e_digests``) and the
benchmark (``python -m bench``).

Each node has a chroot store of its own small paths (``nix-store --add``,
content-addressed, so every peer trusts them without keys) and runs with
``--share all`` and broadcast discovery only.  A driver script run inside a
namespace reads the daemons' own counters (``/metrics``, ``/status.json``)
and makes the lookups, so every figure comes from what the daemons counted.
Optionally a Go-zw3rk-like peer (a tiny HTTP server that serves narinfos,
answers 404 to ``/peernix/digest`` and broadcasts Go-style announcements
without a ``digest`` field) joins the LAN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from zope.interface import implementer

from peernix.nix.narinfo import NarInfo, render_narinfo
from peernix.store.local import LocalStore
from peernix.test.daemon import Daemon, http_get
from peernix.test.netns import Host, TestNetwork
from peernix.test.nixenv import ChrootStore, generate_key, run_nix

#: Every daemon's HTTP and UDP port (each namespace has its own).
PORT = 9999

#: Run inside a namespace: ``python -c DRIVER '<json command>'``; prints one
#: JSON document.  Commands: ``metrics`` (per base: narinfo requests
#: answered, UDP queries received, peers known), ``status`` (per base: the
#: digest section of /status.json), ``lookups`` (GET narinfos from one base
#: over one persistent connection: status and seconds of each).
DRIVER = r"""
import http.client, json, re, sys, time, urllib.request
cmd = json.loads(sys.argv[1])

def get(base, path, timeout=5):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return r.read()

def number(pattern, text):
    return sum(float(v) for v in re.findall(pattern, text, re.M))

if cmd["op"] == "metrics":
    out = {}
    for base in cmd["bases"]:
        try:
            text = get(base, "/metrics").decode()
        except OSError:
            out[base] = None
            continue
        out[base] = {
            "narinfo": number(r'^peernix_http_requests_total\{route="narinfo",status="\d+"\} (\S+)$', text),
            "udp_queries": number(r'^peernix_udp_datagrams_received_total\{kind="has_path(?:_with_narhash)?"\} (\S+)$', text),
            "peers": number(r"^peernix_peers (\S+)$", text),
            "avoided": number(r"^peernix_digest_requests_avoided_total (\S+)$", text),
            "skipped": number(r"^peernix_digest_lookups_skipped_total (\S+)$", text),
        }
    print(json.dumps(out))
elif cmd["op"] == "status":
    out = {}
    for base in cmd["bases"]:
        try:
            out[base] = json.loads(get(base, "/status.json"))["digests"]
        except (OSError, ValueError, KeyError):
            out[base] = None
    print(json.dumps(out))
elif cmd["op"] == "lookups":
    host, port = cmd["host"], cmd["port"]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    results = []
    for h in cmd["hashes"]:
        start = time.perf_counter()
        try:
            conn.request("GET", f"/nix-cache/{h}.narinfo")
            r = conn.getresponse()
            r.read()
            code = r.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            code = 0
        results.append([code, time.perf_counter() - start])
    print(json.dumps(results))
"""

#: A Go-zw3rk-like peer: ``python -c GO_PEER <ip> <broadcast> <narinfo dir>``.
#: Serves ``nix-cache-info`` and the narinfos in the directory (one file per
#: hash part), 404 for everything else (``/peernix/digest`` included), counts
#: narinfo requests (``GET /count``), and broadcasts a Go-style announce
#: (no node_id, no digest) every second.
GO_PEER = r"""
import http.server, json, os, socket, sys, threading, time
ip, broadcast, directory = sys.argv[1], sys.argv[2], sys.argv[3]
count = {"narinfo": 0, "digest": 0}
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/count":
            with lock:
                return self.send(200, json.dumps(count).encode(), "application/json")
        if path == "/nix-cache/nix-cache-info":
            return self.send(200, b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
        if path.endswith(".narinfo"):
            with lock:
                count["narinfo"] += 1
            name = os.path.join(directory, os.path.basename(path)[:-len(".narinfo")])
            if os.path.isfile(name):
                with open(name, "rb") as f:
                    return self.send(200, f.read(), "text/x-nix-narinfo")
        if path == "/peernix/digest":
            with lock:
                count["digest"] += 1
        return self.send(404, b"404 page not found\n")

server = http.server.ThreadingHTTPServer((ip, 9999), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
announce = json.dumps({"cmd": "announce", "peernix_version": "0.1.0", "nix_version": "2.18.1",
                       "platform": "x86_64-linux", "features": ["compression"], "port": 9999}).encode()
while True:
    try:
        s.sendto(announce, (broadcast, 9999))
    except OSError:
        pass
    time.sleep(1)
"""


def add_files(store: ChrootStore, tmp: str, prefix: str, count: int, salt: str) -> list[str]:
    """
    ``nix-store --add`` ``count`` small distinct files in one call.

    :returns: their store paths, in order.
    """
    directory = tempfile.mkdtemp(prefix=f"{prefix}-", dir=tmp)
    files = []
    for i in range(count):
        name = os.path.join(directory, f"{prefix}-{i}")
        with open(name, "w") as f:
            f.write(f"{salt} {prefix} {i}\n")
        files.append(name)
    out = run_nix(["nix-store", "--store", store.root, "--add", *files], store.env).stdout
    paths = out.decode().split()
    if len(paths) != count:
        raise RuntimeError(f"nix-store --add gave {len(paths)} paths for {count} files")
    return paths


def hash_part(path: str) -> str:
    """:returns: the hash part of ``/nix/store/<hash>-<name>``."""
    return path[len("/nix/store/"):][:32]


def narinfo_text(store: ChrootStore, path: str) -> bytes:
    """:returns: the narinfo of ``path`` in ``store``, as a peer serves it (read from its database)."""
    local = LocalStore(store.root, _NoReactor())  # type: ignore[arg-type]
    try:
        info = local._lookup(hash_part(path))
    finally:
        local.stop()
    if info is None:
        raise RuntimeError(f"{path} not in {store.root}")
    narinfo = NarInfo.from_path_info(info, f"nar/{hash_part(path)}-{info.nar_hash.nix32()}.nar")
    return render_narinfo(narinfo).encode()


@implementer(IReactorFromThreads)
class _NoReactor:
    """Enough of a reactor for a :class:`LocalStore` used synchronously."""

    def seconds(self) -> float:
        return time.time()

    def callFromThread(self, callable: Any, *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


class DigestCluster:
    """
    ``nodes`` daemons with ``paths`` paths each (and optionally a Go-like
    peer), in namespaces under ``tmp``.  Call :meth:`destroy` at the end.

    :param extra: more daemon options for every node.
    :param letter: makes namespace names unique among concurrent tests.
    """

    def __init__(self, tmp: str, nodes: int, paths: int, *, go_peer: bool = False,
                 extra: Sequence[str] = (), letter: str = "d", go_paths: int = 3) -> None:
        self.tmp = tmp
        self.daemons: list[Daemon] = []
        self.stores: list[ChrootStore] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self.net = TestNetwork(nodes + (1 if go_peer else 0), tag=f"pnx{os.getpid() % 100000}{letter}")
        try:
            self._build(nodes, paths, go_peer, extra, go_paths)
        except BaseException:
            self.destroy()
            raise

    def _build(self, nodes: int, paths: int, go_peer: bool, extra: Sequence[str], go_paths: int) -> None:
        _, _, self.public_key = generate_key(os.path.join(self.tmp, "keys"), "digest-lan-1")
        self.hosts = self.net.hosts[:nodes]
        self.paths: list[list[str]] = []
        for i in range(nodes):
            store = ChrootStore(os.path.join(self.tmp, f"store-{i + 1}"))
            self.stores.append(store)
            self.paths.append(add_files(store, self.tmp, f"n{i + 1}", paths, f"{os.getpid()}-{time.time()}"))
        self.go_host: Host | None = None
        self.go_paths: list[str] = []
        if go_peer:
            self.go_host = self.net.hosts[nodes]
            go_store = ChrootStore(os.path.join(self.tmp, "store-go"))
            self.stores.append(go_store)
            self.go_paths = add_files(go_store, self.tmp, "go", go_paths, f"go-{time.time()}")
            directory = os.path.join(self.tmp, "go-narinfos")
            os.makedirs(directory)
            for path in self.go_paths:
                with open(os.path.join(directory, hash_part(path)), "wb") as f:
                    f.write(narinfo_text(go_store, path))
            broadcast = self.go_host.ipv4.rsplit(".", 1)[0] + ".255"
            log = open(os.path.join(self.tmp, "go-peer.log"), "wb")
            self._processes.append(subprocess.Popen(
                self.go_host.command([sys.executable, "-c", GO_PEER, self.go_host.ipv4, broadcast, directory]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))
            log.close()
        for i, host in enumerate(self.hosts):
            args = [
                "--store-root", self.stores[i].root,
                "--share", "all",
                "--no-mdns",
                "--trusted-public-key", self.public_key,
                *extra,
            ]
            self.daemons.append(Daemon(args, os.path.join(self.tmp, f"node-{i + 1}.log"), port=PORT, host=host))

    # -- reading the daemons -------------------------------------------------

    def base(self, i: int) -> str:
        """:returns: node ``i``'s base URL (0-based) as the other namespaces reach it."""
        return f"http://{self.hosts[i].ipv4}:{PORT}"

    @property
    def bases(self) -> list[str]:
        return [self.base(i) for i in range(len(self.hosts))]

    def drive(self, command: dict[str, Any], host: Host | None = None, timeout: float = 120.0) -> Any:
        """:returns: what :data:`DRIVER` printed for ``command``, run in ``host`` (node 1's by default)."""
        where = host if host is not None else self.hosts[0]
        done = subprocess.run(where.command([sys.executable, "-c", DRIVER, json.dumps(command)]),
                              capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"driver failed: {done.stderr.decode(errors='replace')}")
        return json.loads(done.stdout)

    def metrics(self) -> dict[str, Any]:
        """:returns: every node's counters, by base URL (``None`` for a node not answering)."""
        result: dict[str, Any] = self.drive({"op": "metrics", "bases": self.bases})
        return result

    def status(self) -> dict[str, Any]:
        """:returns: every node's ``digests`` status section, by base URL."""
        result: dict[str, Any] = self.drive({"op": "status", "bases": self.bases})
        return result

    def lookups(self, node: int, hashes: Sequence[str]) -> list[tuple[int, float]]:
        """:returns: ``(status, seconds)`` of each narinfo GET of node ``node``'s local client (127.0.0.1)."""
        result = self.drive({"op": "lookups", "host": "127.0.0.1", "port": PORT, "hashes": list(hashes)},
                            host=self.hosts[node])
        return [(int(code), float(seconds)) for code, seconds in result]

    def go_count(self) -> dict[str, int]:
        """:returns: the Go-like peer's request counts (``narinfo``, ``digest``)."""
        assert self.go_host is not None
        status, body = http_get(f"http://{self.go_host.ipv4}:{PORT}/count", self.hosts[0])
        if status != 200:
            raise RuntimeError("the Go-like peer does not answer")
        counts: dict[str, int] = json.loads(body)
        return counts

    def rss_bytes(self) -> list[int]:
        """:returns: every daemon's resident memory (``VmRSS``), bytes."""
        sizes = []
        for d in self.daemons:
            with open(f"/proc/{d.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]) * 1024)
        return sizes

    def wait_converged(self, timeout: float = 60.0) -> float:
        """
        Wait until every node holds an up-to-date digest of every other
        peernix node (and knows the Go-like peer, publishing none).

        :returns: seconds waited.
        :raises AssertionError: with the last status after ``timeout``.
        """
        start = time.monotonic()
        nodes = len(self.hosts)
        go_url = f"http://{self.go_host.ipv4}:{PORT}" if self.go_host is not None else None
        last: Any = None
        while time.monotonic() - start < timeout:
            for d in self.daemons:
                if d.process.poll() is not None:
                    raise AssertionError(f"a daemon exited:\n{d.log()[-3000:]}")
            last = self.status()
            tags = {base: ((doc or {}).get("own") or {}).get("tag") for base, doc in last.items()}
            done = True
            for base, doc in last.items():
                peers = (doc or {}).get("peers") or {}
                for other in self.bases:
                    if other == base:
                        continue
                    held = peers.get(other)
                    if not held or held.get("state") != "ok" or held.get("tag") != tags.get(other):
                        done = False
                if go_url is not None and (peers.get(go_url) or {}).get("state") != "none":
                    done = False
            if done:
                return time.monotonic() - start
            time.sleep(0.3)
        raise AssertionError(f"digests not exchanged within {timeout}s: {json.dumps(last)[:4000]}")

    def logs(self) -> str:
        """:returns: the end of every daemon's log."""
        return "".join(f"\n--- {d.log_path}:\n{d.log()[-2000:]}" for d in self.daemons)

    def destroy(self) -> None:
        """Stop the daemons and the Go-like peer, remove the namespaces and stores."""
        for d in self.daemons:
            d.stop()
        for p in self._processes:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        self.net.destroy()
        for store in self.stores:
            store.remove()
