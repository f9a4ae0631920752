"""
Peers beyond the broadcast domain: two subnets joined by a router
namespace (broadcast and mDNS stay inside each), a DNS server on the
router serving ``_peernix._tcp`` with PTR, SRV, TXT and A records for every
node, and every daemon started with ``--dns-sd`` and a 2 s
``--dns-sd-interval``.

It runs the end-to-end scenario of :mod:`peernix.test.test_e2e_dnssd` (the
same namespaces, zone, daemons and real Nix client, so the benchmark and the
test cannot drift apart) and reads the figures it prints:

- ``know_all_s``: seconds from the last daemon being ready until every node
  lists every other with the source ``dns-sd`` (target: within one
  resolution interval);
- ``dropped_s``: seconds from a node leaving the zone until the others drop
  it (target: within one interval);
- ``across_ok``: 1 when a real Nix client in one subnet got, through its own
  peernix, a closure only a node in the other subnet has (the test fails
  otherwise).

Needs root and ``ip``; otherwise the row is not measured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from peernix.test.netns import netns_unavailable

#: The daemons' ``--dns-sd-interval`` in the scenario (seconds).
INTERVAL = 2.0
#: The longest the scenario may take (it builds a small closure first).
TIMEOUT = 600.0

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(Exception):
    """Network namespaces cannot be made here."""


def measure(workdir: str) -> dict[str, float]:
    """
    Run the two-subnet DNS-SD scenario once.

    :param workdir: where trial's temporary directory goes.
    :returns: ``know_all_s``, ``dropped_s`` and ``across_ok``.
    :raises Unavailable: without network namespaces.
    :raises RuntimeError: the scenario failed (its output in the message).
    """
    why = netns_unavailable()
    if why is not None:
        raise Unavailable(why)
    temp = tempfile.mkdtemp(prefix="dnssd-", dir=workdir)
    done = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "--temp-directory", os.path.join(temp, "_trial_temp"),
         "peernix.test.test_e2e_dnssd"],
        capture_output=True, cwd=_SOURCE_ROOT, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=_SOURCE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    know = re.search(r"know each other by DNS-SD ([0-9.]+) s", output)
    dropped = re.search(r"dropped ([0-9.]+) s after it left the zone", output)
    if done.returncode != 0 or know is None or dropped is None:
        raise RuntimeError(f"the DNS-SD scenario failed (exit {done.returncode}):\n{output[-4000:]}")
    return {"know_all_s": float(know.group(1)), "dropped_s": float(dropped.group(1)), "across_ok": 1.0}
