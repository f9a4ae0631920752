"""
Several hosts on one machine, for end-to-end tests: network namespaces joined
by a bridge (:class:`TestNetwork`), or several bridges joined by a router
namespace (:class:`RoutedTestNetwork`, subnets beyond each other's
broadcast domain).

The bridge lives in a namespace of its own, so nothing the tests send ever
touches the machine's own network namespace: every address used is inside a
namespace this module created, and ``destroy()`` removes them all (also at
interpreter exit, as a safety net).
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


class RoutedTestNetwork:
    """
    Several subnets, each a bridge of its own, joined by a router namespace:
    broadcast and multicast stay on each bridge, unicast is routed.

    Subnet ``k`` (from 0) is 10.<a+k>.<b>.0/24 and fd71:<a+k>:<b>::/64; its
    hosts are .1, .2, ...; the router is .254 (``::fe``) on every subnet,
    with IPv4 and IPv6 forwarding on, and each host's default route points
    at it.  :attr:`subnets` holds the hosts per subnet, :attr:`router` the
    router (as a :class:`Host` with its address on subnet 0).

    :meth:`set_resolv_conf` gives a host namespace its own
    ``/etc/resolv.conf`` (``ip netns exec`` bind-mounts
    ``/etc/netns/NAME/resolv.conf`` over it); :meth:`destroy` removes those
    files with the namespaces.
    """

    def __init__(self, counts: Sequence[int], tag: str | None = None) -> None:
        """:param counts: hosts per subnet (at most 250 subnets of 253 hosts)."""
        pid = os.getpid()
        self.tag = tag or f"pnr{pid % 100000}"
        # Second octets 100-149, distinct from TestNetwork's 200-249.
        self._a, self._b = 100 + (pid >> 8) % 50, pid % 256
        self.subnets: list[list[Host]] = []
        self.gateways: list[Host] = []
        self._made: list[str] = []
        self._etc: list[str] = []
        atexit.register(self.destroy)
        try:
            self._create(list(counts))
        except BaseException:
            self.destroy()
            raise

    @property
    def hosts(self) -> list[Host]:
        """:returns: every host, subnet by subnet."""
        return [host for subnet in self.subnets for host in subnet]

    @property
    def router(self) -> Host:
        """:returns: the router, at its address on subnet 0."""
        return self.gateways[0]

    def _add_netns(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def _create(self, counts: list[int]) -> None:
        router = f"{self.tag}-rt"
        self._add_netns(router)
        for setting in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            done = subprocess.run(["ip", "netns", "exec", router, "sysctl", "-w", setting],
                                  capture_output=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"sysctl {setting} failed: {done.stderr.decode(errors='replace').strip()}")
        for k, count in enumerate(counts):
            a, b = self._a + k, self._b
            v4, v6 = f"10.{a}.{b}", f"fd71:{a:x}:{b:x}:"
            switch = f"{self.tag}-sw{k}"
            self._add_netns(switch)
            _ip("link", "add", "br0", "type", "bridge", netns=switch)
            _ip("link", "set", "br0", "up", netns=switch)
            # The router's leg on this subnet.
            leg = f"eth{k}"
            _ip("link", "add", "pr", "type", "veth", "peer", "name", leg, netns=switch)
            _ip("link", "set", leg, "netns", router, netns=switch)
            _ip("link", "set", "pr", "master", "br0", netns=switch)
            _ip("link", "set", "pr", "up", netns=switch)
            _ip("addr", "add", f"{v4}.254/24", "broadcast", f"{v4}.255", "dev", leg, netns=router)
            _ip("-6", "addr", "add", f"{v6}:fe/64", "dev", leg, "nodad", netns=router)
            _ip("link", "set", leg, "up", netns=router)
            self.gateways.append(Host(router, f"{v4}.254", f"{v6}:fe"))
            hosts = []
            for i in range(1, count + 1):
                ns = f"{self.tag}-s{k}h{i}"
                self._add_netns(ns)
                _ip("link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", netns=switch)
                _ip("link", "set", "eth0", "netns", ns, netns=switch)
                _ip("link", "set", f"p{i}", "master", "br0", netns=switch)
                _ip("link", "set", f"p{i}", "up", netns=switch)
                ipv4, ipv6 = f"{v4}.{i}", f"{v6}:{i:x}"
                _ip("addr", "add", f"{ipv4}/24", "broadcast", f"{v4}.255", "dev", "eth0", netns=ns)
                _ip("-6", "addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad", netns=ns)
                _ip("link", "set", "eth0", "up", netns=ns)
                _ip("route", "add", "default", "via", f"{v4}.254", netns=ns)
                _ip("-6", "route", "add", "default", "via", f"{v6}:fe", netns=ns)
                # As in TestNetwork: multicast and the limited broadcast stay on the bridge.
                _ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=ns)
                _ip("route", "add", "255.255.255.255/32", "dev", "eth0", netns=ns)
                hosts.append(Host(ns, ipv4, ipv6))
            self.subnets.append(hosts)

    def set_resolv_conf(self, host: Host, text: str) -> None:
        """Make ``text`` the ``/etc/resolv.conf`` of programs run in ``host`` (with ``ip netns exec``)."""
        directory = os.path.join("/etc/netns", host.netns)
        os.makedirs(directory, exist_ok=True)
        if directory not in self._etc:
            self._etc.append(directory)
        with open(os.path.join(directory, "resolv.conf"), "w") as f:
            f.write(text)

    def destroy(self) -> None:
        """Remove every namespace made (with the veths and bridges) and every /etc/netns file written."""
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True, timeout=30)
        while self._etc:
            shutil.rmtree(self._etc.pop(), ignore_errors=True)
            try:
                # Gone once no test uses it (a directory in use is not empty).
                os.rmdir("/etc/netns")
            except OSError:
                pass
