"""
End to end across subnets: two subnets joined by a router namespace, so
broadcast and mDNS stay inside each, and a real DNS server (the
``twisted.names`` server of :mod:`peernix.test.dnszone`) on the router,
serving ``_peernix._tcp.peernix.test`` with PTR, SRV, TXT and A records for
every node.

- subnet 0: A1 and A2, empty stores; subnet 1: B1, holding a closure signed
  by an "upstream" key every node trusts.
- Every daemon runs with ``--dns-sd peernix.test`` and a short
  ``--dns-sd-interval``, its ``/etc/resolv.conf`` (``/etc/netns/NAME``)
  naming the router, broadcast on, mDNS off.

Checked: every node knows every other (source ``dns-sd`` in its
``/status.json``) within one resolution interval of the last one's start; a
real Nix 2.8 client on A1 gets the closure only B1 has, through A1; a node
removed from the zone is dropped at the next resolution.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.test.daemon import SOURCE_ROOT, Daemon, http_get, shared_fixture
from peernix.test.netns import Host, RoutedTestNetwork, netns_unavailable
from peernix.test.nixenv import SKIP_NO_BUILD, ChrootStore, NixClient, generate_key, run_nix

#: Every daemon's HTTP and UDP port (each namespace has its own).
PORT = 9999
#: The zone's domain.
DOMAIN = "peernix.test"
#: --dns-sd-interval of every daemon, seconds.
INTERVAL = 2.0
#: Slack on top of what the behaviour guarantees (start-up, a loaded machine).
WAIT = 20.0

_SKIP = netns_unavailable() or SKIP_NO_BUILD


class _Fixture:
    """The upstream key, B1's store with the signed closure, one key per node."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-dnssd-")
        keys = os.path.join(self.tmp, "keys")
        self.upstream_sk, _, self.upstream_pk = generate_key(keys, "upstream-e2e-dnssd-1")
        self.keys = {name: generate_key(keys, f"{name}-peernix-1") for name in ("a1", "a2", "b1")}
        self.b_store = ChrootStore(os.path.join(self.tmp, "b1"))
        self.closure = self.b_store.build_closure(secret_key_file=self.upstream_sk, tag="dnssd")

    def destroy(self) -> None:
        self.b_store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


class DnsSdAcrossSubnetsTests(SynchronousTestCase):
    """Three daemons in two subnets find each other through a DNS-SD zone; a client in one gets a path from the other."""

    skip = _SKIP
    fx: _Fixture

    def setUp(self) -> None:
        self.fx = shared_fixture(__name__, _Fixture)
        self.work = tempfile.mkdtemp(prefix="peernix-e2e-dnssd-run-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.network = RoutedTestNetwork([2, 1])
        # Registered first, so it runs last: after every process in it stopped.
        self.addCleanup(self.network.destroy)
        (self.a1, self.a2), (self.b1,) = self.network.subnets
        self.nodes = {"a1": self.a1, "a2": self.a2, "b1": self.b1}
        for k, subnet in enumerate(self.network.subnets):
            for host in subnet:
                self.network.set_resolv_conf(host, f"nameserver {self.network.gateways[k].ipv4}\n")
        self.zone_path = os.path.join(self.work, "zone.json")
        self._write_zone(["a1", "a2", "b1"])
        self._start_dns()

    def _write_zone(self, names: list[str]) -> None:
        """Write the zone listing ``names`` (rewritten whole; the server notices the new mtime)."""
        instances = [{"instance": name, "targets": [[f"{name}.hosts.{DOMAIN}", PORT, [self.nodes[name].ipv4]]],
                      "txt": {"pubkey": self.fx.keys[name][2]}} for name in names]
        old = os.stat(self.zone_path).st_mtime if os.path.exists(self.zone_path) else 0.0
        with open(self.zone_path + ".new", "w") as f:
            json.dump({"origin": DOMAIN, "instances": instances}, f)
        os.replace(self.zone_path + ".new", self.zone_path)
        # A new mtime even within the file system's time granularity.
        os.utime(self.zone_path, (old + 1, old + 1))

    def _start_dns(self) -> None:
        self.dns_log_path = os.path.join(self.work, "dns.log")
        log = open(self.dns_log_path, "wb")
        self.addCleanup(log.close)
        environ = dict(os.environ, PYTHONPATH=SOURCE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.dns = subprocess.Popen(
            self.network.router.command([sys.executable, "-m", "peernix.test.dnszone", "--zone", self.zone_path,
                                         "--listen", "0.0.0.0", "--port", "53"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=SOURCE_ROOT, env=environ)
        self.addCleanup(self._stop_dns)
        deadline = time.monotonic() + WAIT
        while "serving DNS" not in self._dns_log():
            if self.dns.poll() is not None or time.monotonic() > deadline:
                self.fail(f"DNS server did not start: {self._dns_log()}")
            time.sleep(0.05)

    def _stop_dns(self) -> None:
        if self.dns.poll() is None:
            self.dns.terminate()
            try:
                self.dns.wait(10)
            except subprocess.TimeoutExpired:
                self.dns.kill()
                self.dns.wait(10)

    def _dns_log(self) -> str:
        with open(self.dns_log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def _daemon(self, name: str, store_root: str) -> Daemon:
        args = ["--store-root", store_root, "--no-mdns", "--udp-port", str(PORT),
                "--trusted-public-key", self.fx.upstream_pk, "--secret-key-file", self.fx.keys[name][0],
                "--dns-sd", DOMAIN, "--dns-sd-interval", str(INTERVAL)]
        daemon = Daemon(args, os.path.join(self.work, f"{name}.log"), port=PORT, host=self.nodes[name])
        self.addCleanup(daemon.stop)
        return daemon

    def _sources(self, host: Host) -> dict[str, list[str]]:
        """:returns: peer URL -> sources, from ``host``'s /status.json."""
        code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=host)
        self.assertEqual(code, 200)
        document: dict[str, Any] = json.loads(body)
        return {row["url"]: row["sources"] for row in document["peers"]}

    def _url(self, name: str) -> str:
        return f"http://{self.nodes[name].ipv4}:{PORT}"

    def _logs(self, daemons: dict[str, Daemon]) -> str:
        return "".join(f"\n--- {name}\n{d.log()[-3000:]}" for name, d in daemons.items()) + \
            f"\n--- dns\n{self._dns_log()[-3000:]}"

    def test_across_subnets(self) -> None:
        """Every node finds every other through the zone; A1's client gets B1's closure; a node leaving the zone is dropped."""
        fx = self.fx
        stores = {name: ChrootStore(os.path.join(self.work, f"{name}-store")) for name in ("a1", "a2")}
        for store in stores.values():
            self.addCleanup(store.remove)
        daemons = {"a1": self._daemon("a1", stores["a1"].root), "a2": self._daemon("a2", stores["a2"].root),
                   "b1": self._daemon("b1", fx.b_store.root)}
        for daemon in daemons.values():
            daemon.wait_ready()
        started = time.monotonic()
        # Each daemon resolved the zone at its start, and resolves it every
        # INTERVAL: within one interval (plus slack) all know all.
        deadline = started + INTERVAL + WAIT
        missing: dict[str, set[str]] = {}
        while True:
            missing = {}
            for name, host in self.nodes.items():
                sources = self._sources(host)
                wanted = {self._url(other) for other in self.nodes if other != name}
                lacking = {url for url in wanted if "dns-sd" not in sources.get(url, [])}
                if lacking:
                    missing[name] = lacking
                self.assertNotIn(self._url(name), sources, f"{name} lists itself")
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(missing, {}, self._logs(daemons))
        print(f"\nall three know each other by DNS-SD {time.monotonic() - started:.2f} s after the last was ready")
        # The zone's TXT keys are the peers' announced keys.
        code, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host=self.a1)
        rows = {row["url"]: row for row in json.loads(body)["peers"]}
        self.assertEqual(rows[self._url("b1")]["public_key"], fx.keys["b1"][2])

        # A real Nix client in subnet 0 gets what only B1, in subnet 1, has.
        client = NixClient(os.path.join(self.work, "client"))
        self.addCleanup(client.remove)
        args = ["nix-store", "--store", client.root, "-r", fx.closure.top,
                "--option", "substituters", f"http://127.0.0.1:{PORT}/nix-cache",
                "--option", "trusted-public-keys", fx.upstream_pk,
                "--option", "require-sigs", "true", "--option", "fallback", "false", "--option", "builders", ""]
        done = run_nix(self.a1.command(args), client.env, check=False)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace") + self._logs(daemons))
        for path in fx.closure.outputs:
            self.assertTrue(client.is_valid(path), path)
            self.assertEqual(client.verify(path).returncode, 0)

        # B1 leaves the zone: at the next resolution the others drop it as a DNS-SD peer.
        self._write_zone(["a1", "a2"])
        left = time.monotonic()
        deadline = left + INTERVAL + WAIT
        while True:
            still = [name for name in ("a1", "a2") if "dns-sd" in self._sources(self.nodes[name]).get(self._url("b1"), [])]
            if not still or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(still, [], self._logs(daemons))
        print(f"B1 dropped {time.monotonic() - left:.2f} s after it left the zone")
        # A1 and A2 still know each other.
        self.assertIn("dns-sd", self._sources(self.a1).get(self._url("a2"), []))
