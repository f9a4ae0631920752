"""
Several hosts on one machine, for end-to-end tests: network namespaces joined
by a bridge.

The bridge lives in a namespace of its own, so nothing the tests send ever
touches the machine's own network namespace: every address used is inside a
namespace this module created, and :meth:`TestNetwork.destroy` removes them
all (also at interpreter exit, as a safety net).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from collections.abc import Sequence

from attrs import frozen


def netns_unavailable() -> str | None:
    """
    :returns: why namespace tests cannot run here (to use as a trial ``skip``
        reason), or ``None`` when they can.
    """
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "network namespace tests need the 'ip' command (iproute2)"
    probe = f"pnxprobe{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create network namespaces: {e}"
    if made.returncode != 0:
        return "cannot create network namespaces: " + made.stderr.decode(errors="replace").strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.decode(errors='replace').strip()}")


@frozen
class Host:
    """One test host: a namespace with ``eth0`` on the bridge."""

    netns: str
    ipv4: str
    ipv6: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """:returns: ``argv`` wrapped to run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class TestNetwork:
    """
    ``count`` hosts on one bridge, 10.<a>.<b>.<i>/24 and fd70:<a>:<b>::<i>/64.

    The subnet is derived from the process id so concurrent runs do not
    collide.  Addresses exist only inside the namespaces made here.
    """

    def __init__(self, count: int, tag: str | None = None) -> None:
        pid = os.getpid()
        self.tag = tag or f"pnx{pid % 100000}"
        a, b = 200 + (pid >> 8) % 50, pid % 256
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self._made: list[str] = []
        atexit.register(self.destroy)
        try:
            self._create(count, a, b)
        except BaseException:
            self.destroy()
            raise

    def _add_netns(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def _create(self, count: int, a: int, b: int) -> None:
        self._add_netns(self.switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        _ip("link", "set", "br0", "up", netns=self.switch)
        for i in range(1, count + 1):
            ns = f"{self.tag}-h{i}"
            self._add_netns(ns)
            # Create the pair inside the switch namespace, then move one end.
            _ip("link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", netns=self.switch)
            _ip("link", "set", "eth0", "netns", ns, netns=self.switch)
            _ip("link", "set", f"p{i}", "master", "br0", netns=self.switch)
            _ip("link", "set", f"p{i}", "up", netns=self.switch)
            ipv4, ipv6 = f"10.{a}.{b}.{i}", f"fd70:{a:x}:{b:x}::{i:x}"
            _ip("addr", "add", f"{ipv4}/24", "broadcast", f"10.{a}.{b}.255", "dev", "eth0", netns=ns)
            _ip("-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            # Multicast (mDNS) and the limited broadcast need a route; they stay
            # on the bridge, which leads nowhere else.
            _ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=ns)
            _ip("route", "add", "255.255.255.255/32", "dev", "eth0", netns=ns)
            self.hosts.append(Host(ns, ipv4, ipv6))

    def destroy(self) -> None:
        """Remove every namespace made (and with them the veths and bridge)."""
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True, timeout=30)
