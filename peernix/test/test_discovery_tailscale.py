"""
Tests for :mod:`peernix.discovery.tailscale`: a recorded ``tailscale status
--json`` (``tailscale-status.json``: alice is us; bob online and tagged
``tag:peernix``; carol tagged but offline; daves-phone online, untagged;
ci-runner-7 online, IPv6 only, tagged ``tag:ci`` and ``tag:peernix``;
builder online, tagged ``tag:ci`` only), fed through a fake runner, and the
real runner with small programs standing in for ``tailscale``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from peernix.discovery.tailscale import (
    SOURCE,
    CommandFailed,
    StatusError,
    TailscaleDiscoveryService,
    parse_status,
    peer_urls,
    run_command,
)
from peernix.interfaces import IDiscovery
from peernix.test.discoveryfakes import FakeRegistry

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tailscale-status.json")
PORT = 9999
BOB = "http://100.101.102.2:9999"
DAVE = "http://100.101.102.4:9999"
CI_RUNNER = "http://[fd7a:115c:a1e0::7]:9999"
BUILDER = "http://100.101.102.8:9999"
CAROL = "http://100.101.102.3:9999"


def recorded() -> bytes:
    with open(FIXTURE, "rb") as f:
        return f.read()


def edited(change: Any) -> bytes:
    """:returns: the recorded status after ``change(data)``."""
    data = json.loads(recorded())
    change(data)
    return json.dumps(data).encode()


def peer(data: dict[str, Any], host: str) -> dict[str, Any]:
    for item in data["Peer"].values():
        if item["HostName"] == host:
            found: dict[str, Any] = item
            return found
    raise KeyError(host)


class ParseTests(SynchronousTestCase):
    """Reading the recorded status."""

    def test_recorded(self) -> None:
        """Every peer of the recording, with addresses, tags and online state; our own addresses."""
        status = parse_status(recorded())
        self.assertEqual(status.backend_state, "Running")
        self.assertEqual(status.self_addresses, ("100.101.102.1", "fd7a:115c:a1e0::1"))
        by_name = {p.host_name: p for p in status.peers}
        self.assertEqual(set(by_name), {"bob", "carol", "daves-phone", "ci-runner-7", "builder"})
        self.assertEqual(by_name["bob"].addresses, ("100.101.102.2", "fd7a:115c:a1e0::2"))
        self.assertEqual(by_name["bob"].dns_name, "bob.tail1234.ts.net")
        self.assertEqual(by_name["ci-runner-7"].tags, ("tag:ci", "tag:peernix"))
        self.assertEqual(by_name["daves-phone"].tags, ())
        self.assertFalse(by_name["carol"].online)

    def test_online_peers(self) -> None:
        """Without tags: every online peer, at its IPv4 address (else IPv6) and our port; offline carol is skipped."""
        self.assertEqual(set(peer_urls(parse_status(recorded()), PORT)), {BOB, DAVE, CI_RUNNER, BUILDER})

    def test_tag_filter(self) -> None:
        """With tags: only online peers that carry one of them."""
        status = parse_status(recorded())
        self.assertEqual(set(peer_urls(status, PORT, ["tag:peernix"])), {BOB, CI_RUNNER})
        self.assertEqual(set(peer_urls(status, PORT, ["tag:ci"])), {CI_RUNNER, BUILDER})
        self.assertEqual(set(peer_urls(status, PORT, ["tag:ci", "tag:peernix"])), {BOB, CI_RUNNER, BUILDER})
        self.assertEqual(peer_urls(status, PORT, ["tag:nothing"]), {})

    def test_not_running(self) -> None:
        """A backend that is not Running has no peers."""
        status = parse_status(edited(lambda d: d.update(BackendState="Stopped")))
        self.assertEqual(peer_urls(status, PORT), {})

    def test_malformed(self) -> None:
        """Output that is not the status object is a StatusError naming the problem."""
        for output, problem in [(b"", "not JSON"), (b"{\"BackendState\": ", "not JSON"), (b"\xff", "not JSON"),
                                (b"[]", "not a JSON object"), (b"{}", "BackendState"),
                                (b'{"BackendState": "Running", "Peer": []}', "Peer")]:
            with self.assertRaises(StatusError) as caught:
                parse_status(output)
            self.assertIn(problem, str(caught.exception))

    def test_odd_fields(self) -> None:
        """Peers that are not objects, fields of the wrong type, bad addresses: skipped, no error."""
        def change(d: dict[str, Any]) -> None:
            d["Peer"]["junk"] = "not an object"
            peer(d, "bob")["TailscaleIPs"] = ["not an address", "100.101.102.2"]
            peer(d, "daves-phone")["Online"] = "yes"
            peer(d, "builder")["Tags"] = "tag:peernix"
            del peer(d, "ci-runner-7")["Online"]

        status = parse_status(edited(change))
        self.assertEqual(set(peer_urls(status, PORT)), {BOB, BUILDER})
        self.assertEqual(set(peer_urls(status, PORT, ["tag:peernix"])), {BOB})

    def test_no_peers(self) -> None:
        """A tailnet of one: Peer is null or missing."""
        self.assertEqual(parse_status(b'{"BackendState": "Running", "Peer": null}').peers, ())
        self.assertEqual(parse_status(b'{"BackendState": "NeedsLogin"}').peers, ())

    def test_own_address_skipped(self) -> None:
        """A peer entry with one of our own addresses is not a peer."""
        status = parse_status(edited(lambda d: peer(d, "bob").update(TailscaleIPs=["100.101.102.1"])))
        self.assertNotIn("http://100.101.102.1:9999", peer_urls(status, PORT))


class FakeRunner:
    """Answers each run with :attr:`output` (bytes, an exception, or a Deferred left pending)."""

    def __init__(self) -> None:
        self.output: bytes | Exception | None = recorded()
        self.runs: list[tuple[list[str], float]] = []
        self.pending: list[Deferred[bytes]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> Deferred[bytes]:
        self.runs.append((list(argv), timeout))
        if self.output is None:
            d: Deferred[bytes] = Deferred()
            self.pending.append(d)
            return d
        if isinstance(self.output, Exception):
            return fail(self.output)
        return succeed(self.output)


class ServiceTests(SynchronousTestCase):
    """The service over a fake runner, a Clock and a FakeRegistry."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry()
        self.runner = FakeRunner()
        self.installed: str | None = "/usr/bin/tailscale"

    def start(self, **kwargs: Any) -> TailscaleDiscoveryService:
        service = TailscaleDiscoveryService(self.registry, PORT, self.clock, self.runner, interval=60.0,
                                            which=lambda name: self.installed, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def urls(self) -> set[str]:
        return self.registry.urls(SOURCE)

    def warnings(self, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_level") == LogLevel.warn]

    def test_interface(self) -> None:
        """An IDiscovery named tailscale."""
        service = self.start()
        self.assertTrue(verifyObject(IDiscovery, service))
        self.assertEqual(service.name, "tailscale")

    def test_peers_at_start(self) -> None:
        """At start: runs `tailscale status --json` (bounded) and adds the online peers as source tailscale."""
        self.start(timeout=7.0)
        self.assertEqual(self.runner.runs, [(["/usr/bin/tailscale", "status", "--json"], 7.0)])
        self.assertEqual(self.urls(), {BOB, DAVE, CI_RUNNER, BUILDER})
        self.assertIn(("add", BOB, SOURCE, None), self.registry.calls)

    def test_tags(self) -> None:
        """With tags, only tagged online peers."""
        self.start(tags=["tag:peernix"])
        self.assertEqual(self.urls(), {BOB, CI_RUNNER})

    def test_changes(self) -> None:
        """Read again every interval: a peer going offline or losing its tag is removed, one coming online added."""
        self.start(tags=["tag:peernix"])

        def change(d: dict[str, Any]) -> None:
            peer(d, "bob")["Online"] = False
            peer(d, "carol")["Online"] = True
            peer(d, "ci-runner-7")["Tags"] = ["tag:ci"]

        self.runner.output = edited(change)
        self.clock.advance(59)
        self.assertEqual(self.urls(), {BOB, CI_RUNNER})
        self.clock.advance(1)
        self.assertEqual(self.urls(), {CAROL})
        self.assertIn(("remove", BOB, SOURCE), self.registry.calls)
        self.assertEqual(len(self.runner.runs), 2)

    def test_missing_command(self) -> None:
        """No tailscale command: one warning at start-up, nothing run, no peers; found later, it is used."""
        self.installed = None
        with capturedLogs() as events:
            self.start()
            for _ in range(5):
                self.clock.advance(60)
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 1)
        self.assertIn("not installed", warnings[0]["log_format"])
        self.assertEqual(self.runner.runs, [])
        self.assertEqual(self.urls(), set())
        self.installed = "/usr/local/bin/tailscale"
        self.clock.advance(60)
        self.assertEqual(self.urls(), {BOB, DAVE, CI_RUNNER, BUILDER})

    def test_malformed_keeps_peers(self) -> None:
        """Malformed output keeps the peers read before, and is logged once until it is fixed."""
        self.start()
        self.runner.output = b"{not json"
        with capturedLogs() as events:
            for _ in range(3):
                self.clock.advance(60)
        self.assertEqual(self.urls(), {BOB, DAVE, CI_RUNNER, BUILDER})
        warnings = self.warnings(events)
        self.assertEqual(len(warnings), 1)
        self.assertIn("unexpected output", warnings[0]["problem"])
        self.runner.output = edited(lambda d: peer(d, "bob").update(Online=False))
        with capturedLogs() as events:
            self.clock.advance(60)
        self.assertEqual(self.urls(), {DAVE, CI_RUNNER, BUILDER})
        self.assertTrue(any("works again" in e.get("log_format", "") for e in events))

    def test_command_fails(self) -> None:
        """A failing command (tailscaled down, timeout) keeps the peers, one warning."""
        self.start()
        self.runner.output = CommandFailed("exited with 1: failed to connect to local tailscaled")
        with capturedLogs() as events:
            self.clock.advance(60)
            self.clock.advance(60)
        self.assertEqual(self.urls(), {BOB, DAVE, CI_RUNNER, BUILDER})
        self.assertEqual(len(self.warnings(events)), 1)

    def test_logged_out(self) -> None:
        """A backend that is no longer Running: its peers are removed, with one warning."""
        self.start()
        self.runner.output = edited(lambda d: d.update(BackendState="NeedsLogin"))
        with capturedLogs() as events:
            self.clock.advance(60)
            self.clock.advance(60)
        self.assertEqual(self.urls(), set())
        self.assertEqual(len(self.warnings(events)), 1)

    def test_stop(self) -> None:
        """Stopping removes the peers and cancels a reading in flight; nothing is scheduled after."""
        service = self.start()
        self.runner.output = None
        self.clock.advance(60)
        self.assertEqual(len(self.runner.pending), 1)
        service.stopService()
        self.assertEqual(self.urls(), set())
        self.assertTrue(self.runner.pending[0].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RunCommandTests(TestCase):
    """The real runner, with small programs as the command."""

    def script(self, body: str) -> str:
        """:returns: the path of an executable Python script running ``body``."""
        path: str = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"#!{sys.executable}\nimport sys, time\n{body}\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return path

    @inlineCallbacks
    def test_output(self) -> Any:
        """The standard output of a command that exits 0."""
        path = self.script(f"sys.stdout.buffer.write(open({FIXTURE!r}, 'rb').read())")
        output = yield run_command(reactor, [path, "status", "--json"], 10.0)
        self.assertEqual(output, recorded())

    @inlineCallbacks
    def test_exit_status(self) -> Any:
        """A non-zero exit fails with the first line of stderr."""
        path = self.script("sys.stderr.write('failed to connect to local tailscaled\\nmore\\n'); sys.exit(1)")
        with self.assertRaises(CommandFailed) as caught:
            yield run_command(reactor, [path], 10.0)
        self.assertEqual("exited with status 1: failed to connect to local tailscaled", str(caught.exception))
        self.assertNotIn("more", str(caught.exception))

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """A command that hangs is killed after the timeout."""
        path = self.script("time.sleep(60)")
        started = reactor.seconds()  # type: ignore[attr-defined]
        with self.assertRaises(CommandFailed) as caught:
            yield run_command(reactor, [path], 0.5)
        self.assertIn("no answer within 0.5 s", str(caught.exception))
        elapsed: float = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertLess(elapsed, 30)

    @inlineCallbacks
    def test_too_much(self) -> Any:
        """A command saying more than the limit is killed."""
        path = self.script("sys.stdout.write('x' * 100000); sys.stdout.flush(); time.sleep(60)")
        with self.assertRaises(CommandFailed) as caught:
            yield run_command(reactor, [path], 30.0, limit=1000)
        self.assertIn("more than 1000 bytes", str(caught.exception))

    @inlineCallbacks
    def test_service_with_real_command(self) -> Any:
        """The service running a stand-in `tailscale` that prints the recording: the peers arrive."""
        path = self.script(f"assert sys.argv[1:] == ['status', '--json']\n"
                           f"sys.stdout.buffer.write(open({FIXTURE!r}, 'rb').read())")
        registry = FakeRegistry()
        service = TailscaleDiscoveryService(registry, PORT, reactor, lambda argv, t: run_command(reactor, argv, t),
                                            command=path, tags=["tag:peernix"], interval=3600)
        service.startService()
        self.addCleanup(service.stopService)
        while service.readings < 1:
            d: Deferred[None] = Deferred()
            reactor.callLater(0.02, d.callback, None)  # type: ignore[attr-defined]
            yield d
        self.assertEqual(registry.urls(SOURCE), {BOB, CI_RUNNER})
