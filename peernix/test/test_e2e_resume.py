"""
End to end: Nix 2.24 resumes an interrupted NAR download from peernix with
``Range``, for a NAR peernix serves from its own store and for one it relays
from a peer.

Between the Nix client and the daemon it substitutes from sits a small TCP
proxy (:class:`InterruptingProxy`, in this module) that reads the HTTP
exchanges passing through it, cuts the first NAR response after
:data:`CUT_AFTER` body bytes (closing both connections) and passes every
later connection through untouched.  Nix 2.24 resumes only when the cut
response said ``Accept-Ranges: bytes`` and had no ``Content-Encoding``, so
the test also shows what a local client gets: identity NARs (although Nix
2.24 offers zstd), ``FileSize`` in the narinfo, and a correct 206.

Nix 2.24 is the one at ``/opt/nix-modern`` (``../shared/tools/nix-2.24/install``);
it is run with a chroot store, its own absolute ``NIX_CONF_DIR`` and
``XDG_CACHE_HOME``.  The stores are made with Debian's Nix 2.8.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence

import attrs
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.narinfo import parse_narinfo
from peernix.test.daemon import Daemon, free_port, shared_fixture, start_fixture
from peernix.test.nixenv import NIX_2_24, SKIP_NO_NIX, ChrootStore, NixClient, generate_key

#: Why the resume tests cannot run here, if they cannot (they need Nix 2.24).
SKIP_NO_MODERN_NIX: str | None = SKIP_NO_NIX or NIX_2_24.missing

#: The big paths' size: a NAR of a few MB, so the cut lands well inside its body.
BIG_SIZE = 6 * 1024 * 1024
#: Body bytes of the first NAR response let through before the cut.
CUT_AFTER = 1024 * 1024
#: Seconds a proxy thread waits on a silent socket before giving up.
PROXY_SOCKET_TIMEOUT = 120.0
#: The most bytes of a non-NAR response body (narinfo, nix-cache-info) kept for assertions.
KEEP_BODY = 64 * 1024


@attrs.define
class Exchange:
    """One HTTP request and its response as the proxy saw them (header names lower-cased)."""

    method: str
    path: str
    request_headers: dict[str, str]
    status: int = 0
    response_headers: dict[str, str] = attrs.field(factory=dict)
    #: Body bytes passed to the client.
    body_bytes: int = 0
    #: The start of the body (non-NAR responses only).
    body: bytes = b""
    #: Whether the proxy cut this response short.
    cut: bool = False


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """:returns: the start line and the lower-cased headers of an HTTP message head."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class InterruptingProxy:
    """
    A TCP proxy on 127.0.0.1 in front of ``127.0.0.1:target_port`` that
    records every HTTP/1.1 exchange and cuts the body of the first response
    to a ``.nar`` request after ``cut_after`` bytes (then closes both sides
    of that connection).  Later connections pass through.  Only plain GET
    and HEAD requests without bodies are expected (what Nix sends).

    :ivar exchanges: every exchange seen, in the order responses started.
    :ivar errors: unexpected errors in proxy threads (a test asserts it empty).
    """

    def __init__(self, target_port: int, cut_after: int) -> None:
        self._target_port = target_port
        self._cut_after = cut_after
        self._cut_done = False
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.exchanges: list[Exchange] = []
        self.errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        """:returns: the cache URL through the proxy."""
        return f"http://127.0.0.1:{self.port}/nix-cache"

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = _connect_small_window(self._target_port)
            except OSError as e:
                self.errors.append(f"connecting to the daemon: {e}")
                client.close()
                continue
            for s in (client, server):
                s.settimeout(PROXY_SOCKET_TIMEOUT)
            with self._lock:
                self._sockets += [client, server]
            pending: queue.Queue[Exchange] = queue.Queue()
            self._spawn(self._upstream, client, server, pending)
            self._spawn(self._downstream, client, server, pending)

    def _upstream(self, client: socket.socket, server: socket.socket, pending: queue.Queue[Exchange]) -> None:
        """Client to daemon: forward bytes, noting each request."""
        buffer = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    start, headers = _parse_head(head)
                    method, path, _ = start.split(" ", 2)
                    pending.put(Exchange(method, path, headers))
                server.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(server, socket.SHUT_WR)

    def _downstream(self, client: socket.socket, server: socket.socket, pending: queue.Queue[Exchange]) -> None:
        """Daemon to client: forward responses one by one, cutting the first NAR body."""
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = server.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                start, headers = _parse_head(head)
                exchange = pending.get(timeout=PROXY_SOCKET_TIMEOUT)
                exchange.status = int(start.split(" ", 2)[1])
                exchange.response_headers = headers
                self.exchanges.append(exchange)
                client.sendall(head + b"\r\n\r\n")
                if exchange.method == "HEAD" or exchange.status in (204, 304):
                    continue
                if "content-length" not in headers:
                    # Not expected from peernix; forward to the end.
                    self.errors.append(f"no Content-Length for {exchange.path} ({exchange.status})")
                    remaining = -1
                else:
                    remaining = int(headers["content-length"])
                is_nar = exchange.path.split("?")[0].endswith(".nar")
                cut_at: int | None = None
                with self._lock:
                    if is_nar and exchange.status == 200 and not self._cut_done:
                        self._cut_done = True
                        cut_at = self._cut_after
                while remaining != 0:
                    if not buffer:
                        buffer = server.recv(65536)
                        if not buffer:
                            return
                    take = len(buffer) if remaining < 0 else min(len(buffer), remaining)
                    if cut_at is not None:
                        take = min(take, cut_at - exchange.body_bytes)
                    piece, buffer = buffer[:take], buffer[take:]
                    client.sendall(piece)
                    exchange.body_bytes += len(piece)
                    if not is_nar and len(exchange.body) < KEEP_BODY:
                        exchange.body += piece[: KEEP_BODY - len(exchange.body)]
                    if remaining > 0:
                        remaining -= len(piece)
                    if cut_at is not None and exchange.body_bytes >= cut_at:
                        # Mid-body: the client saw a clean close before the
                        # Content-Length was reached, the daemon a lost client.
                        exchange.cut = True
                        return
        except (OSError, queue.Empty) as e:
            if not self._closed and not isinstance(e, (ConnectionResetError, BrokenPipeError)):
                self.errors.append(f"proxying a response: {e!r}")
        finally:
            _shutdown(client, socket.SHUT_RDWR)
            _shutdown(server, socket.SHUT_RDWR)
            client.close()
            server.close()

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._closed = True
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            _shutdown(s, socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)


#: The proxy's receive buffer towards the daemon.  Small, so the daemon
#: cannot have written a whole NAR into the kernel's buffers (its own send
#: buffer and the proxy's receive buffer, which Linux grows to many MB on
#: loopback) by the time the first one is cut: it is still sending then, and
#: sees its client go, as a daemon sending to a real client would.
PROXY_RECEIVE_BUFFER = 64 * 1024


def _connect_small_window(port: int) -> socket.socket:
    """:returns: a connection to the daemon on ``port`` with a :data:`PROXY_RECEIVE_BUFFER` receive buffer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Before connect(), so the window offered to the daemon is small from the start.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXY_RECEIVE_BUFFER)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        raise
    return s


def _shutdown(s: socket.socket, how: int) -> None:
    try:
        s.shutdown(how)
    except OSError:
        pass


class _Fixture:
    """
    Daemon S serving a store with two big paths (signed by an upstream key
    both daemons trust), and daemon P with an empty store and S as its peer.
    """

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-resume-")
        self.daemons: list[Daemon] = []
        self.stores: list[ChrootStore] = []

    def start(self) -> None:
        self.upstream_sk, _, self.upstream_pk = generate_key(os.path.join(self.tmp, "keys"), "upstream-e2e-resume-1")
        store = ChrootStore(os.path.join(self.tmp, "store-s"))
        self.stores.append(store)
        self.local_path = store.make_big_path(BIG_SIZE, name="local-big", seed=1)
        self.relayed_path = store.make_big_path(BIG_SIZE, name="relayed-big", seed=2)
        store.sign([self.local_path, self.relayed_path], self.upstream_sk)
        self.nar_sizes = {p: int(store.query(p, "size")[0]) for p in (self.local_path, self.relayed_path)}
        empty = ChrootStore(os.path.join(self.tmp, "store-p"))
        self.stores.append(empty)
        s_port, p_port = free_port(), free_port()
        self.s = self._daemon("s", s_port, store, [])
        self.p = self._daemon("p", p_port, empty, [s_port])
        for d in (self.s, self.p):
            d.wait_ready()

    def _daemon(self, name: str, port: int, store: ChrootStore, peers: Sequence[int]) -> Daemon:
        args = ["--store-root", store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(free_port()),
                "--trusted-public-key", self.upstream_pk]
        for peer in peers:
            args += ["--peer", f"http://127.0.0.1:{peer}"]
        daemon = Daemon(args, os.path.join(self.tmp, f"{name}-{port}.log"), port=port)
        self.daemons.append(daemon)
        return daemon

    def destroy(self) -> None:
        for d in self.daemons:
            d.stop()
        for store in self.stores:
            store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


class ResumeEndToEndTests(SynchronousTestCase):
    """Nix 2.24 resumes an interrupted NAR with Range, from a local NAR and from a relayed one."""

    skip = SKIP_NO_MODERN_NIX
    fx: _Fixture

    def setUp(self) -> None:
        self.fx = shared_fixture(__name__, lambda: start_fixture(_Fixture()))

    def _resume(self, daemon: Daemon, path: str) -> None:
        """
        Substitute ``path`` with Nix 2.24 from ``daemon`` through an
        :class:`InterruptingProxy`, and check the resume and what the client got.
        """
        nar_size = self.fx.nar_sizes[path]
        self.assertGreater(nar_size, 2 * CUT_AFTER)
        proxy = InterruptingProxy(daemon.port, CUT_AFTER)
        self.addCleanup(proxy.close)
        client = NixClient(tempfile.mkdtemp(prefix="peernix-e2e-resume-client-"), nix=NIX_2_24)
        self.addCleanup(client.remove)
        log_start = len(daemon.log())

        # download-attempts 5 is the default, said out loud: the resume is one of them.
        done = client.substitute([path], proxy.url, [self.fx.upstream_pk], {"download-attempts": "5"})
        details = (done.stderr.decode(errors="replace") + "\n" + repr(proxy.exchanges)
                   + "\n" + daemon.log()[log_start:][-3000:])
        self.assertEqual(done.returncode, 0, details)
        verified = client.verify(path)
        self.assertEqual(verified.returncode, 0, verified.stderr.decode(errors="replace"))
        self.assertEqual(proxy.errors, [])
        # Nix's own account of it.
        self.assertIn("retrying from offset", done.stderr.decode(errors="replace"), details)

        # The narinfo: our URL form and FileSize/FileHash of the raw NAR.
        [narinfo_exchange] = [e for e in proxy.exchanges if e.path.endswith(".narinfo")]
        narinfo = parse_narinfo(narinfo_exchange.body)
        self.assertEqual(narinfo.compression, "none")
        self.assertEqual((narinfo.file_size, narinfo.nar_size), (nar_size, nar_size))
        self.assertEqual(narinfo.file_hash, narinfo.nar_hash)
        self.assertNotIn("/", narinfo.url)

        nars = [e for e in proxy.exchanges if e.path.split("?")[0].endswith(".nar")]
        self.assertGreaterEqual(len(nars), 2, details)
        first, resumed = nars[0], nars[1]
        # The first answer: identity although Nix 2.24 offers zstd, whole length, ranges.
        self.assertIn("zstd", first.request_headers.get("accept-encoding", ""))
        self.assertNotIn("range", first.request_headers)
        self.assertEqual((first.status, first.cut, first.body_bytes), (200, True, CUT_AFTER), details)
        self.assertEqual(first.response_headers.get("accept-ranges"), "bytes")
        self.assertEqual(first.response_headers.get("content-length"), str(nar_size))
        # The resume: a Range from where the cut left off, answered 206.
        offset = int(resumed.request_headers["range"].removeprefix("bytes=").rstrip("-"))
        self.assertTrue(0 < offset <= CUT_AFTER, resumed.request_headers["range"])
        self.assertEqual(resumed.status, 206, details)
        self.assertEqual(resumed.response_headers.get("content-range"), f"bytes {offset}-{nar_size - 1}/{nar_size}")
        self.assertEqual(resumed.response_headers.get("content-length"), str(nar_size - offset))
        self.assertEqual(resumed.body_bytes, nar_size - offset)
        self.assertFalse(resumed.cut)
        # No Content-Encoding ever reached the local client.
        self.assertEqual([e.path for e in proxy.exchanges if "content-encoding" in e.response_headers], [])
        # The client leaving mid-NAR is a normal event for the daemon: one
        # info line (written when the daemon saw the connection go, which
        # may trail the client's exit a little), no traceback, no critical.
        hash_part = path[len("/nix/store/"):][:32]

        def left_lines(log: str) -> list[str]:
            return [line for line in log.splitlines() if "Client of nar" in line and hash_part in line]

        deadline = time.monotonic() + 15
        while not left_lines(daemon.log()[log_start:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        log = daemon.log()[log_start:]
        [line] = left_lines(log)
        self.assertIn("[peernix.web#info]", line)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("#critical", log)

    def test_local_nar_resumed(self) -> None:
        """A NAR from the daemon's own store, cut mid-body, is resumed by Nix 2.24 with Range and verifies."""
        self._resume(self.fx.s, self.fx.local_path)

    def test_relayed_nar_resumed(self) -> None:
        """A NAR the daemon relays from its peer, cut mid-body, is resumed with Range through the relay and verifies."""
        self._resume(self.fx.p, self.fx.relayed_path)
