"""
A malicious peernix peer for end-to-end tests: a standalone asyncio program
(no peernix imports) speaking just enough of the binary cache protocol, and
answering every request at once, faster than an honest daemon.

Usage::

    python malicious_peer.py --listen 10.1.2.3 --port 9999 --dir DIR --key-name NAME

``DIR/replay/<hash>.narinfo`` and ``DIR/replay/<hash>.nar``: a genuine,
correctly signed narinfo taken from an honest peer, and the genuine NAR.  The
narinfo is replayed as is; its NAR URL (any ``.nar`` URL, under ``nar/`` or
not, starting with the hash part) serves the NAR with a few bytes flipped,
same length.

Any other hash part gets a forged narinfo: ``StorePath`` from
``DIR/forge/<hash>`` (the right path; ``<hash>-forged`` without that file),
the NarHash and NarSize of garbage bytes served at its URL, and a
signature with the trusted key's ``NAME`` that verifies against nothing.

Every request is logged to stdout as ``<METHOD> <path>``, so a test can
count what this peer was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import sys

#: The Nix base-32 alphabet (no e, o, u, t).
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
#: Garbage NARs served for forged narinfos.
_GARBAGE = b"garbage, not a NAR at all\n" * 40
_MAX_HEADER = 64 * 1024


def nix32(data: bytes) -> str:
    """:returns: ``data`` in Nix's base-32 (as in ``sha256:<nix32>``)."""
    length = (len(data) * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = (data[i] >> j) | (data[i + 1] << (8 - j) if i + 1 < len(data) else 0)
        out.append(_NIX32[c & 0x1F])
    return "".join(out)


def corrupt(nar: bytes) -> bytes:
    """:returns: ``nar`` with three bytes flipped in its second half (same length)."""
    data = bytearray(nar)
    for offset in (len(data) // 2, (3 * len(data)) // 4, len(data) - 9):
        if 0 <= offset < len(data):
            data[offset] ^= 0x5A
    return bytes(data)


class Peer:
    """The answers, computed from the directory on each request (it is tiny)."""

    def __init__(self, directory: str, key_name: str) -> None:
        self.directory = directory
        self.key_name = key_name

    def _file(self, *parts: str) -> bytes | None:
        try:
            with open(os.path.join(self.directory, *parts), "rb") as f:
                return f.read()
        except OSError:
            return None

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """:returns: ``(status, content type, body)`` for a GET of ``path``."""
        if path == "/nix-cache/nix-cache-info":
            return 200, "text/x-nix-cache-info", b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
        name = path[len("/nix-cache/"):] if path.startswith("/nix-cache/") else ""
        if name.endswith(".narinfo") and len(name) == 40 and "/" not in name:
            return 200, "text/x-nix-narinfo", self.narinfo(name[:32])
        if name.endswith(".nar"):
            # Any NAR URL form: nar/<hash>-..., <hash>-<narhash>.nar, <hash>.nar.
            hash_part = name.removeprefix("nar/")[:32]
            nar = self._file("replay", f"{hash_part}.nar") if "/" not in hash_part else None
            return 200, "application/x-nix-nar", corrupt(nar) if nar is not None else _GARBAGE
        return 404, "text/plain", b"not found\n"

    def narinfo(self, hash_part: str) -> bytes:
        genuine = self._file("replay", f"{hash_part}.narinfo")
        if genuine is not None:
            return genuine
        store_path = (self._file("forge", hash_part) or f"/nix/store/{hash_part}-forged".encode()).decode().strip()
        nar_hash = nix32(hashlib.sha256(_GARBAGE).digest())
        bogus_sig = base64.b64encode(hashlib.sha512(store_path.encode()).digest()).decode()
        return (
            f"StorePath: {store_path}\n"
            f"URL: nar/{hash_part}-{nar_hash}.nar\n"
            "Compression: none\n"
            f"NarHash: sha256:{nar_hash}\n"
            f"NarSize: {len(_GARBAGE)}\n"
            "References: \n"
            f"Sig: {self.key_name}:{bogus_sig}\n"
        ).encode()


async def serve_connection(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer HTTP/1.1 requests on one connection (keep-alive) until the client closes it."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            method, target, _version = parts
            path = target.split("?", 1)[0]
            print(f"{method} {path}", flush=True)
            status, content_type, body = peer.answer(path)
            if method not in ("GET", "HEAD"):
                status, content_type, body = 405, "text/plain", b"method not allowed\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
    finally:
        writer.close()


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--dir", required=True, help="directory with replay/ and forge/")
    parser.add_argument("--key-name", required=True, help="the trusted key name to forge signatures with")
    args = parser.parse_args(argv)
    peer = Peer(args.dir, args.key_name)
    server = await asyncio.start_server(
        lambda r, w: serve_connection(peer, r, w), args.listen, args.port, limit=_MAX_HEADER
    )
    print(f"malicious peer listening on {args.listen}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
