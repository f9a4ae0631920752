"""
The soak load: worker processes, each acting as a local Nix client of all
three daemons in turn (every daemon is at once some client's local cache and
the others' peer), asking narinfo hits, misses and NARs over keep-alive
connections to 127.0.0.1.

A worker does not judge errors that may come from the chaos (it does not know
what the chaos loop did); it reports one :data:`Record` per operation with
what it saw, and :mod:`bench.soak.verdict` classifies it against the
timeline of disruptions.  What a worker *does* judge is correctness: a 200
narinfo must name the asked path, carry the fixture's NarHash and NarSize
and a good ``soak-1`` signature; a NAR must have exactly the narinfo's size
and SHA-256.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Protocol

from attrs import frozen

from peernix.nix.hashes import Hash, HashError, parse_hash
from peernix.nix.narinfo import NarInfo, NarInfoError, parse_narinfo
from peernix.nix.signing import PublicKey, parse_public_key, verify_any
from peernix.zstd import ZstdDecompressor, ZstdError

_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"

#: Largest narinfo a worker reads; anything longer is a wrong answer.
NARINFO_LIMIT = 64 << 10
#: Read size for NAR bodies (and the most one zstd step may expand to).
CHUNK = 256 << 10

#: Operation kinds.
HIT_LOCAL = "hit-local"
HIT_PEER = "hit-peer"
MISS = "miss"
NAR_LOCAL = "nar-local"
NAR_PEER = "nar-peer"
OPS = (HIT_LOCAL, HIT_PEER, MISS, NAR_LOCAL, NAR_PEER)

#: Outcomes a worker reports.
OK = "ok"
#: A 5xx status (always an error: every worker is a local client).
SERVER_ERROR = "5xx"
#: A wrong narinfo (bad path, hash, size, signature, unparsable) or a 200 for a miss.
WRONG = "wrong"
#: A complete NAR whose SHA-256 is not the narinfo's NarHash.
WRONG_BYTES = "wrong-bytes"
#: No answer: connection refused or reset, timeout, broken response.
CONN = "conn"
#: A NAR cut short (connection closed or aborted before NarSize bytes).
TRUNCATED = "truncated"
#: A 404 for a path some store holds.
NOT_FOUND = "404"
#: Any other status.
OTHER_STATUS = "status"

Record = tuple[float, float, int, str, int, str, int, int, str]
"""
One operation: ``(start, end, daemon, op, holder, outcome, status, nar
bytes, detail)``.  Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same
in every process); ``holder`` is the daemon holding the path (-1 for a miss).
"""


@frozen
class Target:
    """
    A path a worker asks for.

    :ivar hash_part: the path's hash part.
    :ivar store_path: the full store path.
    :ivar nar_hash: the fixture's NarHash text.
    :ivar nar_size: the fixture's NarSize.
    :ivar holder: the daemon index whose store holds it.
    """

    hash_part: str
    store_path: str
    nar_hash: str
    nar_size: int
    holder: int


@frozen
class Plan:
    """
    What every worker needs (picklable, sent to spawned processes).

    :ivar ports: daemon index -> its HTTP port on 127.0.0.1.
    :ivar targets: every path of the fixture.
    :ivar public_key: the ``soak-1`` public key text.
    :ivar rate: requests per second per worker (paced, not a burst).
    :ivar timeout: socket timeout of one request, seconds.
    :ivar nar_deadline: the longest one NAR download may take, seconds.
    :ivar weights: relative weight of each of :data:`OPS`.
    :ivar big_share: the share of NAR operations that pick an MB-sized path.
    """

    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    public_key: str
    rate: float = 15.0
    timeout: float = 15.0
    nar_deadline: float = 60.0
    weights: tuple[float, ...] = (30, 25, 20, 15, 10)
    big_share: float = 0.1


class Body(Protocol):
    """What :func:`check_nar` reads: an :class:`http.client.HTTPResponse` (or a test double)."""

    def read(self, amt: int | None = None, /) -> bytes:
        """:returns: up to ``amt`` more bytes of the body, ``b""`` at its end."""

    def getheader(self, name: str, default: str, /) -> str:
        """:returns: the value of header ``name``, or ``default``."""


class Wrong(Exception):
    """An answer is wrong (the message says how)."""


class NoAnswer(Exception):
    """A request got no (complete) answer; ``truncated`` when a NAR body was cut short."""

    def __init__(self, message: str, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def random_hash(rng: random.Random) -> str:
    """:returns: a random nix32 hash part, in no store."""
    return "".join(rng.choice(_NIX32) for _ in range(32))


class Connections:
    """
    One keep-alive connection per daemon, like a Nix client's curl handle.
    A request that fails on a *reused* connection before any answer is
    retried once on a fresh one: the server may have closed an idle
    connection or restarted, which is no error (curl does the same).
    """

    def __init__(self, ports: tuple[int, ...], timeout: float) -> None:
        self._ports = ports
        self._timeout = timeout
        self._conns: dict[int, http.client.HTTPConnection] = {}

    def close(self, daemon: int) -> None:
        """Close the connection to ``daemon``, if any."""
        conn = self._conns.pop(daemon, None)
        if conn is not None:
            conn.close()

    def close_all(self) -> None:
        """Close every connection."""
        for daemon in list(self._conns):
            self.close(daemon)

    def request(self, daemon: int, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """
        Send ``GET path`` to ``daemon`` and read the status line and headers.

        :returns: the response; read its body before the next request.
        :raises NoAnswer: when there is no answer.
        """
        for attempt in (0, 1):
            reused = daemon in self._conns
            conn = self._conns.get(daemon)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self._ports[daemon], timeout=self._timeout)
                self._conns[daemon] = conn
            try:
                conn.request("GET", path, headers=headers)
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close(daemon)
                stale = isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt == 0 and reused and stale:
                    continue
                raise NoAnswer(f"{type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")


def _read_limited(resp: http.client.HTTPResponse, limit: int) -> bytes:
    """
    :returns: the whole (small) body of ``resp``.
    :raises Wrong: when it is longer than ``limit``.
    :raises NoAnswer: when reading it fails.
    """
    try:
        body = resp.read(limit + 1)
    except (OSError, http.client.HTTPException) as e:
        raise NoAnswer(f"reading the body: {type(e).__name__}: {e}") from e
    if len(body) > limit:
        raise Wrong(f"body over {limit} bytes")
    return body


def check_narinfo(body: bytes, target: Target, keys: dict[str, PublicKey]) -> NarInfo:
    """
    Check a 200 narinfo answer for ``target``.

    :returns: the parsed narinfo.
    :raises Wrong: when it does not parse, names another path, differs from
        the fixture's NarHash or NarSize, or lacks a good ``soak-1`` signature.
    """
    try:
        info = parse_narinfo(body)
    except NarInfoError as e:
        raise Wrong(f"unparsable narinfo: {e}") from e
    if info.store_path != target.store_path:
        raise Wrong(f"narinfo names {info.store_path}, asked {target.store_path}")
    if info.nar_hash != parse_hash(target.nar_hash) or info.nar_size != target.nar_size:
        raise Wrong(f"narinfo of {target.store_path}: NarHash/NarSize differ from the store's")
    if not verify_any(info.fingerprint(), info.sigs, keys):
        raise Wrong(f"narinfo of {target.store_path} has no valid soak-1 signature")
    return info


def _body_chunks(resp: Body, deadline: float) -> Iterator[bytes]:
    """Yield the body of ``resp`` in chunks; :class:`NoAnswer` (truncated) on a failure or past ``deadline``."""
    while True:
        if time.monotonic() > deadline:
            raise NoAnswer("NAR download over its deadline", truncated=True)
        try:
            # read(), not read1(): read1() never marks a Content-Length
            # response complete, and the keep-alive connection would refuse
            # the next request.
            chunk = resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise NoAnswer(f"NAR body: {type(e).__name__}: {e}", truncated=True) from e
        if not chunk:
            return
        yield chunk


def _expand(decompressor: ZstdDecompressor, data: bytes, size: int) -> tuple[list[bytes], ZstdDecompressor]:
    """
    Expand one chunk of a zstd stream in steps of at most :data:`CHUNK`
    bytes (a bomb cannot blow the worker up), starting a new decompressor at
    each frame boundary (a stream may be several frames).

    :returns: the expanded pieces and the decompressor for the next chunk.
    :raises Wrong: on a corrupt stream.
    """
    pieces: list[bytes] = []
    try:
        while True:
            out = decompressor.decompress(data, max_length=CHUNK)
            data = b""
            if out:
                pieces.append(out)
            if decompressor.eof:
                rest = decompressor.unused_data
                decompressor = ZstdDecompressor()
                if not rest:
                    break
                data = rest
            elif not out and decompressor.needs_input:
                break
    except ZstdError as e:
        raise Wrong(f"bad zstd stream: {e}", size) from e
    return pieces, decompressor


def check_nar(resp: Body, info: NarInfo, deadline: float) -> int:
    """
    Read a 200 NAR answer, decoding NAR-level (``Compression: zstd``) or
    transport (``Content-Encoding: zstd``) compression in bounded steps, and
    compare its SHA-256 and size with the narinfo's.

    :returns: the number of NAR bytes received.
    :raises Wrong: for a complete NAR with the wrong bytes (``args[1]`` is
        the byte count), or a NAR longer than NarSize.
    :raises NoAnswer: (``truncated``) when the body ends early.
    """
    zstd = info.compression == "zstd" or resp.getheader("Content-Encoding", "") == "zstd"
    decompressor = ZstdDecompressor() if zstd else None
    digest = hashlib.sha256()
    size = 0
    for chunk in _body_chunks(resp, deadline):
        pieces = [chunk]
        if decompressor is not None:
            pieces, decompressor = _expand(decompressor, chunk, size)
        for piece in pieces:
            size += len(piece)
            if size > info.nar_size:
                raise Wrong(f"NAR longer than NarSize {info.nar_size}", size)
            digest.update(piece)
    if size < info.nar_size:
        raise NoAnswer(f"NAR ended after {size} of {info.nar_size} bytes", truncated=True)
    if Hash(algo="sha256", digest=digest.digest()) != info.nar_hash:
        raise Wrong(f"NAR of {info.store_path}: SHA-256 differs from NarHash", size)
    return size


def one_operation(conns: Connections, plan: Plan, rng: random.Random, keys: dict[str, PublicKey],
                  daemon: int, op: str) -> Record:
    """
    Run one operation against ``daemon`` and describe what happened.

    :returns: the :data:`Record`.
    """
    others = [t for t in plan.targets if t.holder != daemon]
    mine = [t for t in plan.targets if t.holder == daemon]
    if op in (HIT_LOCAL, NAR_LOCAL) and not mine:
        op = HIT_PEER if op == HIT_LOCAL else NAR_PEER
    pool = mine if op in (HIT_LOCAL, NAR_LOCAL) else others
    target: Target | None = None
    if op != MISS:
        if op in (NAR_LOCAL, NAR_PEER) and rng.random() < plan.big_share:
            big = [t for t in pool if t.nar_size >= 1 << 20]
            target = rng.choice(big or pool)
        else:
            target = rng.choice(pool)
    hash_part = target.hash_part if target is not None else random_hash(rng)
    holder = target.holder if target is not None else -1
    start = time.monotonic()
    status = 0
    nbytes = 0

    def record(outcome: str, detail: str = "") -> Record:
        return (start, time.monotonic(), daemon, op, holder, outcome, status, nbytes, detail[:300])

    query = "?compression=zstd" if op in (NAR_LOCAL, NAR_PEER) and rng.random() < 0.15 else ""
    try:
        resp = conns.request(daemon, f"/nix-cache/{hash_part}.narinfo{query}", {})
        status = resp.status
        body = _read_limited(resp, NARINFO_LIMIT)
        if status >= 500:
            return record(SERVER_ERROR, f"narinfo {hash_part}: {body[:100]!r}")
        if target is None:
            if status == 404:
                return record(OK)
            return record(WRONG if status == 200 else OTHER_STATUS, f"miss {hash_part} answered {status}")
        if status == 404:
            return record(NOT_FOUND, f"narinfo {target.store_path}")
        if status != 200:
            return record(OTHER_STATUS, f"narinfo {target.store_path} answered {status}")
        info = check_narinfo(body, target, keys)
        if op in (HIT_LOCAL, HIT_PEER):
            return record(OK)
        headers = {"Accept-Encoding": "zstd"} if rng.random() < 0.25 else {}
        resp = conns.request(daemon, f"/nix-cache/{info.url}", headers)
        status = resp.status
        if status != 200:
            _read_limited(resp, NARINFO_LIMIT)
            if status >= 500:
                return record(SERVER_ERROR, f"NAR {target.store_path}")
            return record(NOT_FOUND if status == 404 else OTHER_STATUS, f"NAR {target.store_path} answered {status}")
        try:
            nbytes = check_nar(resp, info, time.monotonic() + plan.nar_deadline)
        except Wrong as e:
            conns.close(daemon)
            nbytes = int(e.args[1]) if len(e.args) > 1 else 0
            return record(WRONG_BYTES, str(e.args[0]))
        return record(OK)
    except Wrong as e:
        conns.close(daemon)
        return record(WRONG, str(e))
    except NoAnswer as e:
        conns.close(daemon)
        return record(TRUNCATED if e.truncated else CONN, str(e))
    except HashError as e:
        return record(WRONG, f"hash: {e}")


def worker_main(index: int, plan: Plan, seed: int, queue: Queue[list[Record]], stop: Event) -> None:
    """
    A worker process: operations at ``plan.rate`` per second until ``stop``
    is set (or its parent dies), records sent to ``queue`` in batches.

    SIGINT is ignored: the parent handles Ctrl-C and stops the workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    rng = random.Random(seed * 1000 + index)
    keys = {"soak-1": parse_public_key(plan.public_key)}
    conns = Connections(plan.ports, plan.timeout)
    batch: list[Record] = []
    sent = time.monotonic()
    interval = 1.0 / plan.rate
    next_at = time.monotonic()
    socket.setdefaulttimeout(plan.timeout)
    try:
        while not stop.is_set() and os.getppid() == parent:
            daemon = rng.randrange(len(plan.ports))
            op = rng.choices(OPS, weights=plan.weights)[0]
            batch.append(one_operation(conns, plan, rng, keys, daemon, op))
            now = time.monotonic()
            if now - sent >= 0.5:
                queue.put(batch)
                batch = []
                sent = now
            # Paced, not back-to-back: the load stays moderate on a shared
            # machine, and a slow answer does not make the next ones burst.
            next_at = max(next_at + interval, now)
            stop.wait(max(0.0, next_at - time.monotonic()))
    finally:
        if batch:
            queue.put(batch)
        conns.close_all()
