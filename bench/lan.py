"""
A shaped LAN link for the benchmark: two network namespaces ("local" and
"peer") joined by one veth pair, both ends shaped with ``tc qdisc ... tbf``
(netem is not available here).  The peer side runs a serving peernix and
nginx over the same file cache; the local side runs the client's peernix
and the Nix client.  Every address lives inside the two namespaces made
here, and :meth:`ShapedLink.destroy` removes them (also at exit).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess

from peernix.test.netns import netns_unavailable


def link_unavailable() -> str | None:
    """:returns: why a shaped link cannot be made here (root, ``ip`` or ``tc`` missing), or ``None``."""
    why = netns_unavailable()
    if why is not None:
        return why
    if shutil.which("tc") is None:
        return "shaping a link needs the 'tc' command (iproute2)"
    return None


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()}")


class ShapedLink:
    """
    Namespaces ``<tag>-l`` (10.A.B.1) and ``<tag>-p`` (10.A.B.2) joined by a
    veth pair whose two ends each carry ``tbf rate RATE burst 512kb latency
    50ms``.

    :ivar local: the local namespace's name.
    :ivar peer: the peer namespace's name.
    :ivar local_ip: the local end's address.
    :ivar peer_ip: the peer end's address.
    """

    def __init__(self, rate: str, tag: str | None = None) -> None:
        pid = os.getpid()
        self.tag = tag or f"pnxb{pid % 100000}"
        self.local, self.peer = f"{self.tag}-l", f"{self.tag}-p"
        a, b = 150 + (pid >> 8) % 40, pid % 256
        self.local_ip, self.peer_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self.rate = rate
        self._made: list[str] = []
        atexit.register(self.destroy)
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        for ns in (self.local, self.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            _run(["ip", "netns", "add", ns])
            self._made.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.local, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
              "netns", self.peer])
        for ns, ip in ((self.local, self.local_ip), (self.peer, self.peer_ip)):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                  "rate", self.rate, "burst", "512kb", "latency", "50ms"])

    def wrap(self, ns: str) -> list[str]:
        """:returns: the command prefix that runs a program in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def destroy(self) -> None:
        """Remove both namespaces (and with them the veth pair and its shaping)."""
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True, timeout=30)
