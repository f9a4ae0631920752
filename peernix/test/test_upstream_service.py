"""Tests of wiring fetching for the LAN into the daemon (build_service, web routes, status)."""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from peernix.test.test_service import NODE, build, quiet
from peernix.upstream.chain import FirstOf
from peernix.upstream.fetch import LanFetcher, StagedFirst
from peernix.upstream.service import LanFetchService


class WiringTests(SynchronousTestCase):
    def _build(self, **changes: Any) -> Any:
        staging = os.path.join(self.mktemp(), "staging")
        config = quiet(upstream=("http://upstream.test/cache",), staging_dir=staging, **changes)
        service, reactor = build(self, config)
        return service, reactor, staging

    def test_off_by_none(self) -> None:
        """--upstream none: no fetcher, the fan-out alone, no announce of fetching."""
        service, _ = build(self, quiet(upstream=()))
        self.assertIsNone(service.lan_fetcher)
        self.assertNotIsInstance(service.upstream, (FirstOf, StagedFirst))
        self.assertNotIn("lan-fetch", [c.name for c in service])

    def test_on(self) -> None:
        """With an upstream: peers first then the LAN fetcher, a sweep service, the staging dir made, announced."""
        service, _, staging = self._build()
        self.assertIsInstance(service.lan_fetcher, LanFetcher)
        # What is staged here first, then the chain of peers and the LAN fetcher.
        self.assertIsInstance(service.upstream, StagedFirst)
        self.assertIsInstance(service.upstream._rest, FirstOf)  # type: ignore[union-attr]
        names = [c.name for c in service]
        self.assertLess(names.index("peer-client"), names.index("lan-fetch"))
        self.assertLess(names.index("lan-fetch"), names.index("http [::]:9999"))
        self.assertTrue(os.path.isdir(staging))
        self.assertTrue(service.node.fetch_for_lan)
        self.assertEqual(service.node.node_id, NODE.node_id)
        self.assertEqual(service.lan_fetcher.table.node_id, NODE.node_id)
        self.assertEqual(service.lan_fetcher.upstreams, ("http://upstream.test/cache",))
        udp = next(c for c in service if c.name == "udp")
        self.assertIs(json.loads(udp.protocol.announce_datagram)["fetch_for_lan"], True)

    def test_fetch_for_lan_no(self) -> None:
        """--fetch-for-lan no: still fetching for itself, never announced as a fetcher."""
        service, _, _ = self._build(fetch_for_lan=False)
        self.assertFalse(service.lan_fetcher.table.fetch_for_lan)
        self.assertFalse(service.node.fetch_for_lan)
        udp = next(c for c in service if c.name == "udp")
        self.assertNotIn("fetch_for_lan", json.loads(udp.protocol.announce_datagram))

    def test_unusable_staging_dir_turns_it_off(self) -> None:
        """A staging directory that cannot be made turns fetching off; the daemon still builds."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        service, _ = build(self, quiet(upstream=("http://upstream.test",), staging_dir=os.path.join(blocker, "x")))
        self.assertIsNone(service.lan_fetcher)

    def test_sweep_and_stop(self) -> None:
        """The sweep and the questions to silent peers run on the reactor's clock and stop with the service."""
        service, reactor, _ = self._build()
        lan = next(c for c in service if c.name == "lan-fetch")
        self.assertIsInstance(lan, LanFetchService)
        lan.startService()
        self.assertTrue(reactor.getDelayedCalls())
        before = set(reactor.getDelayedCalls())
        names = " ".join(repr(c) for c in before)
        self.assertIn("sweep", names)
        self.assertIn("ask_silent_peers", names)
        lan.stopService()
        self.assertEqual([c for c in reactor.getDelayedCalls() if c in before and c.active()
                          and ("sweep" in repr(c) or "ask_silent_peers" in repr(c))], [])

    def test_status_and_route(self) -> None:
        """status.json has the upstream section with active_fetches; the fetch route is for peers only."""
        service, _, _ = self._build()
        treq: Any = StubTreq(service.app.resource())
        response = self.successResultOf(treq.get("http://localhost/status.json"))
        document = json.loads(self.successResultOf(response.content()))
        upstream = document["upstream"]
        self.assertEqual(upstream["active_fetches"], [])
        self.assertEqual(upstream["upstreams"], ["http://upstream.test/cache"])
        self.assertIn("bytes_fetched", upstream)
        page = self.successResultOf(self.successResultOf(treq.get("http://localhost/")).content())
        self.assertIn(b"Fetching for the LAN", page)
        response = self.successResultOf(treq.get(
            "http://localhost/peernix/fetch/" + "0" * 32 + "-" + "1" * 52 + ".nar"))
        self.assertEqual(response.code, 403)
        metrics = self.successResultOf(self.successResultOf(treq.get("http://localhost/metrics")).content())
        for name in (b"peernix_upstream_fetched_bytes_total", b"peernix_upstream_served_bytes_total",
                     b"peernix_upstream_download_requests_total", b"peernix_upstream_staging_bytes",
                     b"peernix_upstream_fetcher_fallbacks_total", b"peernix_upstream_verification_failures_total"):
            self.assertIn(name, metrics)
