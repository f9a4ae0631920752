"""
End to end, what a zw3rk/peernix (Go) node sees of a real peernix daemon,
in network namespaces (the Go program itself has no licence and is not run
here; the other host speaks its protocol, datagram for datagram, as its
``main.go`` at commit e74df7c does):

* UDP: the daemon's broadcast carries every field a Go node records (key,
  platform, features, Nix version); a Go node's answer to it (from port
  9999) and a Go node's own announce (from an ephemeral port) add the Go
  node with its key and get no answer, which would overwrite that record.
* mDNS: the daemon's records, resolved by a real mDNS client (zeroconf) on
  another host, hold its IPv4 address only: no AAAA record a Go node could
  keep last (it can use IPv4 only), and never an unscoped link-local
  ``fe80::`` address, although the daemon's host has link-local and ULA
  IPv6 addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from peernix.test.daemon import Daemon, http_get
from peernix.test.netns import Host, TestNetwork, netns_unavailable
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore, generate_key
from peernix.test.test_discovery_datagrams import GO_ANNOUNCE_SIGNED, PUBKEY, go_record_after

#: The daemon's HTTP and UDP port, and the Go program's (its default).
PORT = 9999

_SKIP = netns_unavailable() or SKIP_NO_NIX

#: A Go node on the other host: waits for the daemon's broadcast on port
#: 9999, answers it from port 9999 as Go's server does, announces itself
#: from an ephemeral port, then records for 3 s every datagram the daemon
#: sends to either socket.  Prints one JSON object.
_GO_UDP_SCRIPT = """\
import json, socket, sys, time
target, announce = sys.argv[1], sys.argv[2].encode()
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
server.bind(("", %(port)d))
server.settimeout(0.2)
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
client.settimeout(0.2)
broadcast = None
deadline = time.time() + 20
while broadcast is None and time.time() < deadline:
    try:
        data, source = server.recvfrom(4096)
    except socket.timeout:
        continue
    if source[0] == target and data.startswith(b"{"):
        broadcast = data
if broadcast is None:
    print(json.dumps({"error": "no broadcast from the daemon"}))
    sys.exit(0)
server.sendto(announce, source)
client.sendto(announce, (target, %(port)d))
later = []
end = time.time() + 3
while time.time() < end:
    for name, sock in (("server", server), ("client", client)):
        try:
            data, source = sock.recvfrom(4096)
        except socket.timeout:
            continue
        if source[0] == target:
            later.append([name, data.decode(errors="replace")])
print(json.dumps({"broadcast": broadcast.decode(), "later": later}))
""" % {"port": PORT}

#: A real mDNS client on the other host: browses _peernix._tcp and prints
#: every address the first service found resolves to, as JSON.
_MDNS_SCRIPT = """\
import json, sys, time
from zeroconf import ServiceBrowser, Zeroconf
kind = "_peernix._tcp.local."
names = []
class Listener:
    def add_service(self, zc, type_, name): names.append(name)
    def update_service(self, zc, type_, name): pass
    def remove_service(self, zc, type_, name): pass
zc = Zeroconf()
try:
    ServiceBrowser(zc, kind, Listener())
    deadline = time.time() + 15
    while not names and time.time() < deadline:
        time.sleep(0.05)
    if not names:
        print(json.dumps({"error": "no service found"}))
    else:
        info = zc.get_service_info(kind, names[0], 3000)
        # Let answers to the resolution on the other address family arrive.
        time.sleep(1.0)
        info = zc.get_service_info(kind, names[0], 3000)
        print(json.dumps({"name": names[0], "addresses": info.parsed_scoped_addresses() if info else None}))
finally:
    zc.close()
"""


class _Base(SynchronousTestCase):
    """Two hosts: the daemon on host 1, the Go-speaking side on host 2."""

    skip = _SKIP
    letter = "g"

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-go-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.store = ChrootStore(os.path.join(self.tmp, "store"))
        self.sk, _, self.pk = generate_key(self.tmp, f"e2e-go-{self.letter}-1")
        net = TestNetwork(2, tag=f"pnx{os.getpid() % 100000}{self.letter}")
        self.addCleanup(net.destroy)
        self.hosts = net.hosts

    def daemon(self, host: Host, extra: list[str]) -> Daemon:
        d = Daemon(["--store-root", self.store.root, "--secret-key-file", self.sk, *extra],
                   os.path.join(self.tmp, "daemon.log"), port=PORT, host=host)
        self.addCleanup(d.stop)
        return d

    def run_in(self, host: Host, script: str, *args: str) -> dict[str, object]:
        done = subprocess.run(host.command([sys.executable, "-c", script, *args]),
                              capture_output=True, text=True, timeout=90)
        self.assertEqual(done.returncode, 0, done.stderr)
        result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
        return result


class GoUdpTests(_Base):
    """The UDP exchange with a Go node, with the real daemon."""

    letter = "u"

    def test_go_node_keeps_our_fields(self) -> None:
        """Our broadcast gives a Go node every field; its answer and its announce get nothing back; we add it with its key."""
        d = self.daemon(self.hosts[0], ["--no-mdns"])
        result = self.run_in(self.hosts[1], _GO_UDP_SCRIPT, self.hosts[0].ipv4, GO_ANNOUNCE_SIGNED.decode())
        self.assertNotIn("error", result, d.log()[-4000:])
        broadcast = str(result["broadcast"]).encode()
        record = go_record_after({}, broadcast)
        self.assertEqual(record["public_key"], self.pk)
        self.assertEqual(record["platform"], json.loads(broadcast)["platform"])
        self.assertTrue(record["platform"] and record["features"] and record["nix_version"], record)
        later = result["later"]
        assert isinstance(later, list)
        for where, data in later:
            # Only the daemon's own periodic broadcasts (never a reply), and
            # nothing at all to the Go node's ephemeral port.
            self.assertEqual(where, "server", data)
            self.assertNotIn('"reply"', data)
            record = go_record_after(record, data.encode())
        self.assertEqual(record["public_key"], self.pk)
        status, body = http_get(f"http://127.0.0.1:{PORT}/status.json", self.hosts[0])
        self.assertEqual(status, 200)
        peers = json.loads(body)["peers"]
        self.assertEqual([(p["url"], p["public_key"]) for p in peers],
                         [(f"http://{self.hosts[1].ipv4}:{PORT}", PUBKEY)], d.log()[-4000:])


class GoMdnsTests(_Base):
    """The daemon's mDNS records, as another host's mDNS client resolves them."""

    letter = "n"

    def test_ipv4_records_only(self) -> None:
        """The daemon's host has link-local and ULA IPv6 addresses; its mDNS service resolves to its IPv4 address alone."""
        addresses = subprocess.run(["ip", "-n", self.hosts[0].netns, "addr", "show", "dev", "eth0"],
                                   capture_output=True, text=True, timeout=10).stdout
        self.assertIn(self.hosts[0].ipv6, addresses)
        d = self.daemon(self.hosts[0], ["--no-broadcast"])
        d.wait_ready()
        result = self.run_in(self.hosts[1], _MDNS_SCRIPT)
        self.assertNotIn("error", result, d.log()[-4000:])
        self.assertEqual(result["addresses"], [self.hosts[0].ipv4], d.log()[-4000:])
