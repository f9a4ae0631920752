"""
End to end in network namespaces: a ``--serve-peers no`` node consumes only.

Four hosts on one bridge, each with a real daemon on port 9999:

* h1 holds a closure signed by the upstream key and serves it;
* h2 runs ``--serve-peers no`` and holds a path of its own (signed by the
  upstream key too, so it would be shared if it served);
* h3 finds the others by UDP broadcast (and so reads h2's
  ``"serve_peers": false``);
* h4 hears no broadcast (another UDP port) and knows h1 and h2 only as
  static peers: it learns that h2 serves nobody from its health probe.

A real Nix client on h2 substitutes h1's closure through h2's peernix (the
consumer gets paths from others); h3 and h4 never send h2 a narinfo or NAR
request (its access log shows only health probes), their peernix answers
404 for h2's path, and h2 answers 404 to a peer asking it directly.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from peernix.test.daemon import http_get
from peernix.test.netns import Host
from twisted.trial.unittest import SynchronousTestCase

from peernix.test.nixenv import NIX_2_8, NIX_2_24
from peernix.test.test_e2e_discovery import _SKIP, PORT, WAIT, _hash_part, _SubstitutingBase


class _ConsumeOnlyTests(_SubstitutingBase):
    """A consume-only node gets paths from its peers and is never asked by them."""

    letter = "c"

    def peers_of(self, host: Host) -> dict[str, dict[str, Any]]:
        """:returns: ``host``'s daemon's peer table by URL (``{}`` while it does not answer)."""
        status, body = http_get(f"http://127.0.0.1:{PORT}/status.json", host, timeout=5)
        if status != 200:
            return {}
        return {p["url"]: p for p in json.loads(body)["peers"]}

    def wait_for(self, what: str, check: Any) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            if time.monotonic() > deadline:
                self.fail(f"not within {WAIT}s: {what}" + self.logs())
            time.sleep(0.1)

    def test_consume_only_node(self) -> None:
        """h2 (--serve-peers no) substitutes from h1; h3 (broadcast) and h4 (static) never ask h2 and get 404."""
        h1, h2, h3, h4 = self.network(4).hosts
        own = self.fixture.empty_store()
        own_path = own.add_text("consumer-only-path", "only the consumer has this\n")
        own.sign([own_path], self.fixture.upstream_sk)
        quiet = ["--no-mdns", "--access-log"]
        self.daemon(h1, "h1", self.fixture.owner, quiet)
        consumer = self.daemon(h2, "h2", own, [*quiet, "--serve-peers", "no"])
        self.daemon(h3, "h3", self.fixture.empty_store(), quiet)
        self.daemon(h4, "h4", self.fixture.empty_store(),
                    [*quiet, "--no-broadcast", "--udp-port", "9998",
                     "--peer", f"http://{h1.ipv4}:{PORT}", "--peer", f"http://{h2.ipv4}:{PORT}"])
        for d in self.daemons:
            d.wait_ready()
        h2_url = f"http://{h2.ipv4}:{PORT}"
        h1_url = f"http://{h1.ipv4}:{PORT}"
        # h3 learns it from h2's announcement, h4 from its health probe of a static peer.
        for host in (h3, h4):
            self.wait_for(f"{host.netns} knows h1 and h2, and that h2 serves no peers",
                          lambda host=host: (lambda peers: h1_url in peers and h2_url in peers
                                             and peers[h2_url]["serving"] is False
                                             and peers[h1_url]["serving"] is True)(self.peers_of(host)))

        # The consumer gets paths from others, through its own peernix.
        self.substitute(h2, [self.fixture.top])
        self.assertIn(f'source="peer {h1_url}"', consumer.log())

        # Peers never get h2's path: their peernix does not ask h2, and h2 would say 404.
        own_hash = _hash_part(own_path)
        for host in (h3, h4):
            status, _ = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{own_hash}.narinfo", host)
            self.assertEqual(status, 404, host.netns + self.logs())
        status, body = http_get(f"{h2_url}/nix-cache/{own_hash}.narinfo", h3)
        self.assertEqual(status, 404, body)
        status, body = http_get(f"{h2_url}/nix-cache/nix-cache-info", h3)
        self.assertEqual(status, 200, body)
        # h2's own machine is served as ever.
        status, _ = http_get(f"http://127.0.0.1:{PORT}/nix-cache/{own_hash}.narinfo", h2)
        self.assertEqual(status, 200)

        # h2's access log: from h3 and h4 only health probes and the one direct request above.
        asked: list[str] = []
        for line in consumer.log().splitlines():
            # The client address as a dual-stack socket reports it: ::ffff:10.x.y.z.
            found = re.search(r'"(?:::ffff:)?(\S+)" - - \[[^]]*\] "GET (\S+) ', line)
            if found and found.group(1) in (h3.ipv4, h4.ipv4):
                asked.append(f"{found.group(1)} {found.group(2)}")
        fan_outs = [a for a in asked if not a.endswith("/nix-cache/nix-cache-info")
                    and a != f"{h3.ipv4} /nix-cache/{own_hash}.narinfo"]
        self.assertEqual(fan_outs, [], self.logs())
        # The direct request was seen, so the log is read right.
        self.assertIn(f"{h3.ipv4} /nix-cache/{own_hash}.narinfo", asked)
        self.assertTrue(any(a.startswith(h4.ipv4) for a in asked), "h4 never probed h2" + self.logs())


class ConsumeOnlyNix28Tests(_ConsumeOnlyTests, SynchronousTestCase):
    nix = NIX_2_8
    skip = _SKIP or NIX_2_8.missing


class ConsumeOnlyNix224Tests(_ConsumeOnlyTests, SynchronousTestCase):
    nix = NIX_2_24
    skip = _SKIP or NIX_2_24.missing
