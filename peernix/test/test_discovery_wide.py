"""
Wiring of the discovery beyond the broadcast domain into the daemon:
``--dns-sd`` and ``--tailscale`` add their services, which feed the one
registry, and ``/status.json`` names each peer's sources ``dns-sd`` and
``tailscale``.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import readBody

from peernix.discovery.dnssd import DnsSdDiscoveryService
from peernix.discovery.tailscale import TailscaleDiscoveryService
from peernix.options import parse_args
from peernix.test.dnszone import MemoryZone, add_instance
from peernix.test.test_discovery_tailscale import recorded
from peernix.test.test_service import build, quiet


class WiringTests(SynchronousTestCase):
    """build_service with the new options."""

    def test_off_by_default(self) -> None:
        """Neither service exists without the options."""
        service, _ = build(self, quiet())
        self.assertNotIn("dns-sd", [c.name for c in service])
        self.assertNotIn("tailscale", [c.name for c in service])

    def test_options(self) -> None:
        """The command line reaches the services: domains, intervals, tags, our port."""
        config = parse_args(["--dns-sd", "lan.example.com", "--dns-sd", "Lab.Example.Com.", "--dns-sd-interval", "30",
                             "--tailscale", "--tailscale-tag", "peernix", "--tailscale-interval", "45",
                             "--port", "9000"])
        service, _ = build(self, quiet(**{k: getattr(config, k) for k in
                                          ("dns_sd", "dns_sd_interval", "tailscale", "tailscale_tags",
                                           "tailscale_interval", "port")}))
        dnssd = service.getServiceNamed("dns-sd")
        self.assertIsInstance(dnssd, DnsSdDiscoveryService)
        self.assertEqual(dnssd.domains, ("lan.example.com", "lab.example.com"))
        self.assertEqual(dnssd.interval, 30.0)
        tailscale = service.getServiceNamed("tailscale")
        self.assertIsInstance(tailscale, TailscaleDiscoveryService)
        self.assertEqual(tailscale.tags, ("tag:peernix",))
        self.assertEqual(tailscale.interval, 45.0)

    def test_config_file(self) -> None:
        """The TOML keys: dns_sd, dns_sd_interval, tailscale, tailscale_tags, tailscale_interval."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('dns_sd = ["example.com"]\ndns_sd_interval = 10\ntailscale = true\n'
                    'tailscale_tags = ["tag:peernix", "ci"]\ntailscale_interval = 20\n')
        config = parse_args(["--config", path])
        self.assertEqual((config.dns_sd, config.dns_sd_interval, config.tailscale, config.tailscale_tags,
                          config.tailscale_interval),
                         (("example.com",), 10.0, True, ("tag:peernix", "tag:ci"), 20.0))

    def test_bad_values(self) -> None:
        """A bad domain or tag stops start-up with a message naming the option."""
        from twisted.python.usage import UsageError

        for argv, words in [(["--dns-sd", "bad domain"], "--dns-sd"), (["--dns-sd", "a..b"], "--dns-sd"),
                            (["--tailscale-tag", "tag:"], "--tailscale-tag"),
                            (["--tailscale-tag", "tag:has space"], "--tailscale-tag"),
                            (["--dns-sd-interval", "0"], "--dns-sd-interval")]:
            with self.assertRaises(UsageError) as caught:
                parse_args(argv)
            self.assertIn(words, str(caught.exception))

    def test_status_json_sources(self) -> None:
        """Peers found by DNS-SD and the tailnet appear in /status.json with sources dns-sd and tailscale."""
        service, reactor = build(self, quiet(dns_sd=("peernix.test",), tailscale=True))
        zone = MemoryZone("peernix.test")
        add_instance(zone, "peernix.test", "bob", [("bob.hosts.peernix.test", 9999, ["100.101.102.2"])])
        add_instance(zone, "peernix.test", "erin", [("erin.hosts.peernix.test", 9999, ["192.0.2.77"])])
        dnssd = service.getServiceNamed("dns-sd")
        dnssd._resolver_factory = lambda: zone
        dnssd._own_addresses = lambda: []
        tailscale = service.getServiceNamed("tailscale")
        tailscale._which = lambda name: "/usr/bin/tailscale"
        tailscale._run = lambda argv, timeout: succeed(recorded())
        service.startService()
        self.addCleanup(service.stopService)
        agent = RequestTraversalAgent(service.app.resource())
        out: list[Any] = []
        agent.request(b"GET", b"http://peernix/status.json").addCallback(readBody).addCallback(out.append)
        agent.flush()
        rows = {row["url"]: row["sources"] for row in json.loads(out[0])["peers"]}
        self.assertEqual(rows["http://192.0.2.77:9999"], ["dns-sd"])
        self.assertEqual(rows["http://100.101.102.4:9999"], ["tailscale"])
        # bob is in the zone and on the tailnet: one peer, both sources.
        self.assertEqual(rows["http://100.101.102.2:9999"], ["dns-sd", "tailscale"])
