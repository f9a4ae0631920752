"""
Tests for ``peernix doctor`` without sockets: every check of
:mod:`peernix.doctor`, fed by :func:`peernix.doctor_io.gather` reading real
nix.conf files in a temporary ``NIX_CONF_DIR`` with the network, ``/proc``
and ``nix-store`` injected; and the command line of :mod:`peernix.cli`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from peernix import cli, doctor, doctor_io
from peernix.doctor import (PROBLEM, OK, SKIPPED, UNKNOWN, WARNING, CheckResult, Facts, HttpAnswer, Sockets,
                            check_config, check_key_names, check_nix_version, check_ports, has_problem,
                            parse_proc_net, report_document, run_checks)
from peernix.doctor_io import gather, read_sockets
from peernix.nix.signing import SecretKey
from peernix.nixconf import CACHE_NIXOS_ORG_KEY
from peernix.options import Config

PORT = 9999
CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
ALICE = SecretKey("alice-peernix-1", b"a" * 32).public_key
ALICE_OTHER = SecretKey("alice-peernix-1", b"b" * 32).public_key
BOB = SecretKey("bob-peernix-1", b"c" * 32).public_key

#: /proc/net tables where 9999 listens on TCP (all IPv6 addresses) and is bound on UDP (0.0.0.0).
PROC_NET = {
    "/proc/net/tcp": "  sl  local_address rem_address   st\n"
                     "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n",
    "/proc/net/tcp6": "  sl  local_address rem_address   st\n"
                      "   0: 00000000000000000000000000000000:270F 00000000000000000000000000000000:0000 0A x\n",
    "/proc/net/udp": "  sl  local_address rem_address   st\n"
                     "   0: 00000000:270F 00000000:0000 07 00000000:00000000 00:00000000 00000000\n",
    "/proc/net/udp6": "  sl  local_address rem_address   st\n",
}


def status_document(peers: Sequence[Mapping[str, Any]] = (), public_key: str | None = None) -> bytes:
    """:returns: a /status.json body as the daemon renders it (the fields the doctor reads)."""
    rows = [{"url": p["url"], "healthy": p.get("healthy", True), "public_key": p.get("public_key"),
             "failures": p.get("failures", {})} for p in peers]
    return json.dumps({"version": "0.test", "priority": 30, "public_key": public_key, "peers": rows}).encode()


def fake_run(version: str | None = "nix-store (Nix) 2.24.10\n") -> Any:
    """:returns: a subprocess.run double printing ``version`` (``None``: Nix missing)."""
    def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if version is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        return subprocess.CompletedProcess(list(argv), 0, version, "")
    return run


class DoctorTestCase(SynchronousTestCase):
    """A temporary NIX_CONF_DIR and a fake LAN: answers by URL, refused otherwise."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.answers: dict[str, HttpAnswer] = {}
        self.asked: list[str] = []
        self.daemon_up()
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org\n"
                      "narinfo-cache-negative-ttl = 60\n")

    def nix_conf(self, text: str, name: str = "nix.conf") -> None:
        """Write ``name`` in the NIX_CONF_DIR."""
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def answer(self, url: str, status: int, body: bytes = b"") -> None:
        """Make ``url`` answer ``status`` with ``body``."""
        self.answers[url] = HttpAnswer(url, status, body)

    def daemon_up(self, port: int = PORT, cache_info: bytes = CACHE_INFO,
                  peers: Sequence[Mapping[str, Any]] = ()) -> None:
        """Make a daemon answer on ``port`` (at 127.0.0.1) with ``peers`` in its status."""
        base = f"http://127.0.0.1:{port}"
        self.answer(f"{base}/nix-cache/nix-cache-info", 200, cache_info)
        self.answer(f"{base}/status.json", 200, status_document(peers))

    def get(self, url: str, timeout: float) -> HttpAnswer:
        self.asked.append(url)
        return self.answers.get(url, HttpAnswer(url, error="connection refused"))

    def facts(self, config: Config | None = None, *, run: Any = None, opener: Any = None,
              proc: Mapping[str, str] | None = PROC_NET, config_error: str | None = None) -> Facts:
        """:returns: the facts gathered from the temporary nix.conf and the fakes."""
        table = proc

        def read_proc(path: str) -> str:
            if table is None:
                raise PermissionError(13, "Permission denied", path)
            if path not in table:
                raise FileNotFoundError(2, "No such file", path)
            return table[path]

        return gather(config or Config(), config_error=config_error, env={"NIX_CONF_DIR": self.dir},
                      get=self.get, opener=opener, run=run or fake_run(), read_proc=read_proc,
                      addresses=("192.0.2.10", "2001:db8::10"))

    def check(self, name: str, config: Config | None = None, **kwargs: Any) -> CheckResult:
        """:returns: the result of the check called ``name``."""
        results = {r.name: r for r in run_checks(self.facts(config, **kwargs))}
        return results[name]


class SubstituterTests(DoctorTestCase):
    """nix.conf lists this daemon as a substituter, safely."""

    def test_listed(self) -> None:
        """peernix first in substituters: ok, and nix.conf's URL itself was asked."""
        result = self.check("substituter")
        self.assertEqual(result.status, OK, result.line())
        self.assertIn("http://127.0.0.1:9999/nix-cache/nix-cache-info", self.asked)

    def test_missing(self) -> None:
        """No peernix URL (only Nix's default cache.nixos.org): a problem, with the line to add."""
        self.nix_conf("narinfo-cache-negative-ttl = 60\n")
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org", result.fix or "")

    def test_no_nix_conf(self) -> None:
        """No nix.conf at all: Nix's defaults apply, peernix is missing."""
        os.remove(os.path.join(self.dir, "nix.conf"))
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("missing", result.summary)

    def test_extra_substituters_through_include(self) -> None:
        """extra-substituters in an included file counts, after Nix's default."""
        self.nix_conf("include peernix.conf\n")
        self.nix_conf("extra-substituters = http://localhost:9999/nix-cache/\n", "peernix.conf")
        self.answer("http://localhost:9999/nix-cache/nix-cache-info", 200, CACHE_INFO)
        result = self.check("substituter")
        self.assertEqual(result.status, OK, result.line())
        self.assertEqual(result.details["peernix"], "http://localhost:9999/nix-cache/")

    def test_host_address_and_ipv6_loopback(self) -> None:
        """This host's own address and [::1] reach the daemon listening on all addresses."""
        for url in ("http://192.0.2.10:9999/nix-cache", "http://[::1]:9999/nix-cache"):
            self.answer(f"{url}/nix-cache-info", 200, CACHE_INFO)
            self.nix_conf(f"substituters = {url} https://cache.nixos.org\n")
            self.assertEqual(self.check("substituter").status, OK, url)

    def test_wrong_port_or_path(self) -> None:
        """A URL at this machine with another port or without /nix-cache is named in the problem."""
        self.nix_conf("substituters = http://127.0.0.1:8080/nix-cache http://localhost:9999 https://cache.nixos.org\n")
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("port 8080", result.summary)
        self.assertIn("lacks the /nix-cache path", result.summary)

    def test_other_port_option(self) -> None:
        """--port is honoured: a daemon on 8080 is not the one nix.conf lists at 9999."""
        self.daemon_up(port=8080)
        result = self.check("substituter", Config(port=8080))
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("port 9999, but the daemon listens on port 8080", result.summary)

    def test_interface(self) -> None:
        """With --interface 192.0.2.10, 127.0.0.1 does not reach the daemon; its address does."""
        config = Config(interface="192.0.2.10")
        self.assertEqual(self.check("substituter", config).status, PROBLEM)
        self.answer("http://192.0.2.10:9999/nix-cache/nix-cache-info", 200, CACHE_INFO)
        self.nix_conf("substituters = http://192.0.2.10:9999/nix-cache https://cache.nixos.org\n")
        self.assertEqual(self.check("substituter", config).status, OK)

    def test_trusted_1(self) -> None:
        """?trusted=1 (or true) is a problem: Nix would skip signature checks."""
        for query in ("?trusted=1", "?priority=10&trusted=true"):
            self.nix_conf(f"substituters = http://127.0.0.1:9999/nix-cache{query} https://cache.nixos.org\n")
            result = self.check("substituter")
            self.assertEqual(result.status, PROBLEM, query)
            self.assertIn("signature checks", result.summary)

    def test_trusted_substituters(self) -> None:
        """peernix in trusted-substituters is a problem, in substituters too or not."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org\n"
                      "trusted-substituters = http://127.0.0.1:9999/nix-cache\n")
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("trusted-substituters", result.summary)
        self.nix_conf("trusted-substituters = http://127.0.0.1:9999/nix-cache\n")
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("only in trusted-substituters", result.summary)

    def test_listed_url_does_not_answer(self) -> None:
        """nix.conf's URL is asked itself: [::1] when the daemon listens on IPv4 only is a problem."""
        self.nix_conf("substituters = http://[::1]:9999/nix-cache https://cache.nixos.org\n")
        result = self.check("substituter")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("connection refused", result.summary)

    def test_unreadable(self) -> None:
        """An unreadable nix.conf makes every nix.conf check unknown, and is no problem."""
        def opener(path: str) -> IO[bytes]:
            raise PermissionError(13, "Permission denied", path)

        results = {r.name: r for r in run_checks(self.facts(opener=opener))}
        for name in ("substituter", "priority", "trusted-keys", "negative-ttl"):
            self.assertEqual(results[name].status, UNKNOWN, name)
            self.assertIn("Permission denied", results[name].summary)

    def test_malformed(self) -> None:
        """A nix.conf Nix refuses is a problem for the nix.conf checks."""
        self.nix_conf("substituters\n")
        self.assertEqual(self.check("substituter").status, PROBLEM)


class PriorityTests(DoctorTestCase):
    """peernix comes before cache.nixos.org by priority; ties keep listed order."""

    def test_default(self) -> None:
        """30 (nix-cache-info) before cache.nixos.org's 40: ok."""
        result = self.check("priority")
        self.assertEqual(result.status, OK, result.line())
        self.assertEqual((result.details["peernix_priority"], result.details["cache_nixos_org_priority"]), (30, 40))

    def test_listed_second_still_first(self) -> None:
        """Listed after cache.nixos.org, priority 30 still goes first."""
        self.nix_conf("substituters = https://cache.nixos.org http://127.0.0.1:9999/nix-cache\n")
        self.assertEqual(self.check("priority").status, OK)

    def test_peernix_override(self) -> None:
        """?priority=50 on peernix's URL puts it after cache.nixos.org: a problem."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache?priority=50 https://cache.nixos.org\n")
        result = self.check("priority")
        self.assertEqual(result.status, PROBLEM)
        self.assertEqual(result.details["peernix_priority_from"], "?priority= in nix.conf")

    def test_cache_nixos_org_override(self) -> None:
        """?priority=10 on cache.nixos.org puts it first: a problem."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org?priority=10\n")
        self.assertEqual(self.check("priority").status, PROBLEM)

    def test_ties_keep_order(self) -> None:
        """Equal priorities: the one listed first is asked first."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache?priority=40 https://cache.nixos.org/\n")
        self.assertEqual(self.check("priority").status, OK)
        self.nix_conf("substituters = https://cache.nixos.org/ http://127.0.0.1:9999/nix-cache?priority=40\n")
        result = self.check("priority")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("tie", result.summary)

    def test_advertised_priority(self) -> None:
        """The daemon's nix-cache-info Priority counts (a daemon started with --priority 45)."""
        self.daemon_up(cache_info=b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 45\n")
        self.assertEqual(self.check("priority").status, PROBLEM)

    def test_configured_priority_when_down(self) -> None:
        """With the daemon down, its --priority is what it will say."""
        self.answers.clear()
        result = self.check("priority", Config(priority=50))
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("--priority", result.details["peernix_priority_from"])

    def test_no_cache_nixos_org(self) -> None:
        """Without cache.nixos.org there is nothing to come before: ok."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache\n")
        self.assertEqual(self.check("priority").status, OK)

    def test_no_peernix(self) -> None:
        """Without peernix the check does not apply (the substituter check says why)."""
        self.nix_conf("substituters = https://cache.nixos.org\n")
        self.assertEqual(self.check("priority").status, SKIPPED)


class TrustedKeysTests(DoctorTestCase):
    """trusted-public-keys holds cache.nixos.org's key and this node's own."""

    def key_file(self, key: SecretKey) -> str:
        path = os.path.join(self.dir, "secret-key")
        with open(path, "w") as f:
            f.write(key.to_string())
        return path

    def test_default(self) -> None:
        """Never set: Nix's default, cache.nixos.org's key: ok when the node does not sign."""
        self.assertEqual(self.check("trusted-keys").status, OK)

    def test_missing_cache_nixos_org(self) -> None:
        """A list without cache.nixos.org's key is a problem naming the key to add."""
        self.nix_conf(f"trusted-public-keys = {BOB.to_string()}\n")
        result = self.check("trusted-keys")
        self.assertEqual(result.status, PROBLEM)
        self.assertIn(CACHE_NIXOS_ORG_KEY, result.fix or "")

    def test_own_key(self) -> None:
        """A signing node's own key: missing is a warning, present ok, another key of its name a problem."""
        secret = SecretKey("alice-peernix-1", b"a" * 32)
        config = Config(secret_key_file=self.key_file(secret))
        result = self.check("trusted-keys", config)
        self.assertEqual(result.status, WARNING)
        self.assertIn(ALICE.to_string(), result.fix or "")
        self.nix_conf(f"extra-trusted-public-keys = {ALICE.to_string()}\n")
        self.assertEqual(self.check("trusted-keys", config).status, OK)
        self.nix_conf(f"extra-trusted-public-keys = {ALICE_OTHER.to_string()}\n")
        self.assertEqual(self.check("trusted-keys", config).status, PROBLEM)

    def test_bad_key_file(self) -> None:
        """A --secret-key-file the daemon would refuse is a config problem."""
        path = os.path.join(self.dir, "not-a-key")
        with open(path, "w") as f:
            f.write("nonsense\n")
        result = self.check("config", Config(secret_key_file=path))
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("not-a-key", result.summary)


class DaemonTests(DoctorTestCase):
    """The daemon answers, as peernix, with the settings the doctor was given."""

    def test_answers(self) -> None:
        """nix-cache-info and status.json answer: ok, with the version."""
        result = self.check("daemon")
        self.assertEqual(result.status, OK, result.line())
        self.assertEqual(result.details["version"], "0.test")

    def test_other_program(self) -> None:
        """Something else on the port (404 for nix-cache-info): a problem."""
        self.answer("http://127.0.0.1:9999/nix-cache/nix-cache-info", 404)
        self.assertEqual(self.check("daemon").status, PROBLEM)

    def test_no_status_page(self) -> None:
        """A cache without /status.json (zw3rk/peernix): a warning, peer checks cannot run."""
        self.answers.pop("http://127.0.0.1:9999/status.json")
        results = {r.name: r for r in run_checks(self.facts())}
        self.assertEqual(results["daemon"].status, WARNING)
        self.assertEqual(results["peers"].status, UNKNOWN)

    def test_other_settings(self) -> None:
        """A daemon running with another priority or key than the doctor's options: a warning saying which."""
        self.answer("http://127.0.0.1:9999/status.json", 200, status_document(public_key=BOB.to_string()))
        result = self.check("daemon", Config(priority=20))
        self.assertEqual(result.status, WARNING)
        self.assertIn("priority 30, not 20", result.summary)
        self.assertIn("no --secret-key-file was given", result.summary)

    def test_running_key_is_checked(self) -> None:
        """Without --secret-key-file, the key the daemon reports is the one trusted-public-keys must hold."""
        self.answer("http://127.0.0.1:9999/status.json", 200, status_document(public_key=BOB.to_string()))
        result = self.check("trusted-keys")
        self.assertEqual(result.status, WARNING)
        self.assertIn(BOB.to_string(), result.fix or "")


class KeyNameTests(SynchronousTestCase):
    """No key name is used by two different keys."""

    def test_clash_with_peer(self) -> None:
        """A peer announcing another key under this node's key name is a problem."""
        document = json.loads(status_document([{"url": "http://192.0.2.7:9999",
                                                "public_key": ALICE_OTHER.to_string()}]))
        result = check_key_names(ALICE, document)
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("http://192.0.2.7:9999", result.summary)

    def test_clash_from_peer_status(self) -> None:
        """The key a (static) peer's own /status.json names counts too."""
        document = json.loads(status_document([{"url": "http://192.0.2.7:9999"}]))
        peer = json.loads(status_document(public_key=ALICE_OTHER.to_string()))
        result = check_key_names(ALICE, document, (), {"http://192.0.2.7:9999": peer})
        self.assertEqual(result.status, PROBLEM)
        self.assertEqual(check_key_names(ALICE, document, (), {}).status, OK)

    def test_clash_between_peers(self) -> None:
        """Two peers with different keys of one name are a problem too."""
        document = json.loads(status_document([
            {"url": "http://192.0.2.7:9999", "public_key": ALICE.to_string()},
            {"url": "http://192.0.2.8:9999", "public_key": ALICE_OTHER.to_string()}]))
        self.assertEqual(check_key_names(BOB, document).status, PROBLEM)

    def test_clash_with_trusted_key(self) -> None:
        """A peer announcing a key named like a trusted key, but another one, is a problem."""
        document = json.loads(status_document([{"url": "http://192.0.2.7:9999",
                                                "public_key": ALICE_OTHER.to_string()}]))
        self.assertEqual(check_key_names(None, document, [ALICE.to_string()]).status, PROBLEM)

    def test_no_clash(self) -> None:
        """Distinct names, or the same key announced twice: ok."""
        document = json.loads(status_document([
            {"url": "http://192.0.2.7:9999", "public_key": BOB.to_string()},
            {"url": "http://192.0.2.8:9999", "public_key": None}]))
        self.assertEqual(check_key_names(ALICE, document, [ALICE.to_string()]).status, OK)

    def test_shared_default_name(self) -> None:
        """zw3rk's default name peernix-1 is a warning even without a clash."""
        key = SecretKey("peernix-1", b"d" * 32).public_key
        self.assertEqual(check_key_names(key, json.loads(status_document())).status, WARNING)

    def test_unknown_without_status(self) -> None:
        """Without the daemon's status the peers' keys are unknown: said so, not guessed."""
        self.assertEqual(check_key_names(ALICE, None).status, UNKNOWN)


class NegativeTtlTests(DoctorTestCase):
    """narinfo-cache-negative-ttl."""

    def test_default(self) -> None:
        """Never set: 3600 s, a warning that explains the trade-off."""
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache https://cache.nixos.org\n")
        result = self.check("negative-ttl")
        self.assertEqual(result.status, WARNING)
        self.assertIn("3600 s (Nix's default)", result.summary)
        self.assertIn("narinfo-cache-negative-ttl = 60", result.fix or "")

    def test_short(self) -> None:
        """60 s (set in an included file): ok."""
        self.nix_conf("!include ttl.conf\n")
        self.nix_conf("narinfo-cache-negative-ttl = 60\n", "ttl.conf")
        self.assertEqual(self.check("negative-ttl").status, OK)

    def test_longer(self) -> None:
        """Longer than the default: a warning."""
        self.nix_conf("narinfo-cache-negative-ttl = 86400\n")
        self.assertEqual(self.check("negative-ttl").status, WARNING)

    def test_not_a_number(self) -> None:
        """A value Nix refuses: a problem."""
        self.nix_conf("narinfo-cache-negative-ttl = soon\n")
        self.assertEqual(self.check("negative-ttl").status, PROBLEM)


class NixVersionTests(DoctorTestCase):
    """The local Nix's version and what it means."""

    def test_2_8(self) -> None:
        """Nix 2.8 sends no Accept-Encoding: a warning; it resumes identity downloads."""
        result = self.check("nix-version", run=fake_run("nix-store (Nix) 2.8.0\n"))
        self.assertEqual(result.status, WARNING)
        self.assertIn("no Accept-Encoding", result.summary)
        self.assertIn("Accept-Ranges", result.summary)
        self.assertEqual(result.details["version"], "2.8.0")

    def test_2_24(self) -> None:
        """Nix 2.24 sends Accept-Encoding: ok."""
        result = self.check("nix-version")
        self.assertEqual(result.status, OK)
        self.assertTrue(result.details["accept_encoding"])
        self.assertIn("Content-Encoding: identity", result.summary)

    def test_2_35(self) -> None:
        """Nix 2.35 makes 401 a hard error: said, and peernix never sends it."""
        result = check_nix_version("nix (Nix) 2.35.1\n")
        self.assertEqual(result.status, OK)
        self.assertIn("401", result.summary)
        self.assertTrue(result.details["unauthorized_is_error"])

    def test_missing(self) -> None:
        """No Nix on PATH: unknown, not a problem."""
        result = self.check("nix-version", run=fake_run(None))
        self.assertEqual(result.status, UNKNOWN)
        self.assertIn("not found", result.summary)


class PeerTests(DoctorTestCase):
    """Peers known, healthy, and whether they reach us."""

    def test_no_peers(self) -> None:
        """No peers yet: a warning; reached-by-peers does not apply."""
        self.assertEqual(self.check("peers").status, WARNING)
        self.assertEqual(self.check("reached-by-peers").status, SKIPPED)

    def test_healthy_and_reaching(self) -> None:
        """A healthy peer whose status.json lists one of our addresses and our port: ok twice."""
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999"}])
        self.answer("http://192.0.2.7:9999/status.json", 200, status_document([{"url": "http://192.0.2.10:9999"}]))
        self.assertEqual(self.check("peers").status, OK)
        result = self.check("reached-by-peers")
        self.assertEqual(result.status, OK, result.line())

    def test_peer_on_this_machine(self) -> None:
        """A peer on loopback listing us at 127.0.0.1 reaches us."""
        self.daemon_up(peers=[{"url": "http://127.0.0.1:9998"}])
        self.answer("http://127.0.0.1:9998/status.json", 200, status_document([{"url": "http://127.0.0.1:9999"}]))
        self.assertEqual(self.check("reached-by-peers").status, OK)

    def test_not_listed(self) -> None:
        """A peer that does not list us (another port, another address): a warning naming it."""
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999"}])
        self.answer("http://192.0.2.7:9999/status.json", 200,
                    status_document([{"url": "http://192.0.2.10:8888"}, {"url": "http://192.0.2.99:9999"}]))
        result = self.check("reached-by-peers")
        self.assertEqual(result.status, WARNING)
        self.assertIn("192.0.2.7", result.summary)

    def test_consume_only(self) -> None:
        """A node serving no peers (--serve-peers no, where it exists) is not expected to be asked."""
        class ConsumeOnly:
            serve_peers = "no"

        self.assertFalse(doctor.serves_peers(ConsumeOnly()))  # type: ignore[arg-type]
        self.assertTrue(doctor.serves_peers(Config()))
        self.patch(doctor, "serves_peers", lambda config: False)
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999"}])
        self.assertEqual(self.check("reached-by-peers").status, SKIPPED)

    def test_peer_without_status(self) -> None:
        """A peer without status.json (a Go node): unknown, not a warning."""
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999"}])
        self.answer("http://192.0.2.7:9999/status.json", 404)
        self.assertEqual(self.check("reached-by-peers").status, UNKNOWN)

    def test_unhealthy(self) -> None:
        """A peer backing off: a warning naming it and its failures."""
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999", "healthy": False, "failures": {"timeout": 3}}])
        result = self.check("peers")
        self.assertEqual(result.status, WARNING)
        self.assertIn("timeout 3", result.summary)

    def test_daemon_down(self) -> None:
        """Daemon down: a problem; the peer checks say they cannot tell."""
        self.answers.clear()
        results = {r.name: r for r in run_checks(self.facts())}
        self.assertEqual(results["daemon"].status, PROBLEM)
        self.assertEqual(results["peers"].status, UNKNOWN)
        self.assertEqual(results["key-names"].status, UNKNOWN)


class PortTests(SynchronousTestCase):
    """The TCP and UDP ports bound, from /proc/net."""

    def test_parse(self) -> None:
        """Addresses are decoded from the kernel's word order; IPv4-mapped IPv6 becomes IPv4."""
        text = ("  sl  local_address rem_address   st\n"
                "   0: 0100007F:270F 00000000:0000 0A\n"
                "   1: 0100007F:270E 0200007F:0016 01\n"
                "   2: 0000000000000000FFFF00000100007F:1F90 00000000000000000000000000000000:0000 0A\n"
                "   3: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A\n")
        self.assertEqual(parse_proc_net(text, listening_only=True),
                         {("127.0.0.1", 9999), ("127.0.0.1", 8080), ("::1", 22)})
        self.assertIn(("127.0.0.1", 9998), parse_proc_net(text, listening_only=False))

    def test_bound(self) -> None:
        """TCP 9999 on :: and UDP 9999 bound: ok."""
        sockets = read_sockets(PROC_NET.__getitem__)
        result = check_ports(Config(), sockets)
        self.assertEqual(result.status, OK, result.line())
        self.assertEqual(result.details["tcp_addresses"], ["::"])

    def test_loopback_only_and_no_udp(self) -> None:
        """TCP on loopback only and no UDP socket: a warning saying peers cannot reach us."""
        sockets = Sockets(frozenset({("127.0.0.1", 9999)}), frozenset())
        result = check_ports(Config(), sockets)
        self.assertEqual(result.status, WARNING)
        self.assertIn("loopback only", result.summary)
        self.assertIn("UDP port 9999", result.summary)

    def test_udp_port_option(self) -> None:
        """--udp-port is the UDP port looked for."""
        sockets = Sockets(frozenset({("::", 9999)}), frozenset({("0.0.0.0", 7777)}))
        self.assertEqual(check_ports(Config(udp_port=7777), sockets).status, OK)

    def test_nothing_listens(self) -> None:
        """No TCP listener on the port: a problem."""
        self.assertEqual(check_ports(Config(), Sockets(frozenset(), frozenset())).status, PROBLEM)

    def test_unreadable(self) -> None:
        """/proc/net unreadable: unknown."""
        self.assertEqual(check_ports(Config(), None, "Permission denied").status, UNKNOWN)


class UpstreamTests(DoctorTestCase):
    """Upstreams reachable, where the LAN fetch feature exists and is on."""

    def test_not_applicable(self) -> None:
        """Without an upstream setting in peernix.options (an older peernix): skipped, saying so."""
        self.patch(doctor, "upstream_setting", lambda: None)
        result = self.check("upstreams")
        self.assertEqual(result.status, SKIPPED)
        self.assertIn("not applicable", result.summary)

    def test_default_upstreams(self) -> None:
        """With the feature, the default upstreams are nix.conf's substituters minus peernix, asked once each."""
        self.patch(doctor, "upstream_setting", lambda: "upstreams")
        self.answer("https://cache.nixos.org/nix-cache-info", 200, b"StoreDir: /nix/store\n")
        result = self.check("upstreams")
        self.assertEqual(result.status, OK, result.line())
        self.assertEqual(result.details["upstreams"], ["https://cache.nixos.org"])
        self.answers.clear()
        self.assertEqual(self.check("upstreams").status, WARNING)


class ReportTests(DoctorTestCase):
    """The verdict as a whole: exit status and documents."""

    def test_all_ok(self) -> None:
        """A sound set-up has no problem."""
        self.daemon_up(peers=[{"url": "http://192.0.2.7:9999"}])
        self.answer("http://192.0.2.7:9999/status.json", 200, status_document([{"url": "http://192.0.2.10:9999"}]))
        results = run_checks(self.facts())
        self.assertFalse(has_problem(results), "\n".join(r.line() for r in results))
        document = report_document(results)
        self.assertTrue(document["ok"])
        self.assertEqual(document["counts"]["problem"], 0)
        self.assertEqual(len(document["checks"]), len(results))

    def test_line(self) -> None:
        """A result is one line: status, name, summary, fix."""
        line = CheckResult("x", PROBLEM, "broken\nreally.", "do this.").line()
        self.assertEqual(line, "problem  x: broken really. Fix: do this.")

    def test_config_error(self) -> None:
        """A config file the daemon would refuse is a problem; the rest is still checked."""
        result = check_config(Facts(config=Config(config_file="/x.toml"), config_error="unknown key 'prot'"))
        self.assertEqual(result.status, PROBLEM)
        self.assertIn("prot", result.summary)


class CommandLineTests(DoctorTestCase):
    """peernix doctor's command line: the daemon's options and config file, --json, exit status."""

    def run_cli(self, argv: Sequence[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(doctor_io, "gather", lambda config, **kw: self.gathered(config, **kw))
        status = cli.main(list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def gathered(self, config: Config, config_error: str | None = None, timeout: float = 3.0) -> Facts:
        self.seen = (config, config_error, timeout)
        return self.facts(config, config_error=config_error)

    def test_daemon_options(self) -> None:
        """Every daemon option is accepted and merged with the config file as the daemon does."""
        toml = os.path.join(self.dir, "peernix.toml")
        with open(toml, "w") as f:
            f.write('port = 8080\npeers = ["http://192.0.2.7:9999"]\npriority = 20\n')
        status, out, err = self.run_cli(["doctor", "--config", toml, "--port", "9999", "--no-mdns",
                                         "--udp-port", "7777", "--timeout", "1.5"])
        config, config_error, timeout = self.seen
        self.assertEqual((config.port, config.peers, config.priority, config.mdns, config.udp_port),
                         (9999, ("http://192.0.2.7:9999",), 20, False, 7777))
        self.assertIsNone(config_error)
        self.assertEqual(timeout, 1.5)
        self.assertEqual(len(out.splitlines()), len(run_checks(self.facts(config))))

    def test_exit_status(self) -> None:
        """0 without a problem, 1 with one (here: ?trusted=1)."""
        status, out, _ = self.run_cli(["doctor"])
        self.assertEqual(status, 0, out)
        self.nix_conf("substituters = http://127.0.0.1:9999/nix-cache?trusted=1 https://cache.nixos.org\n")
        status, out, _ = self.run_cli(["doctor"])
        self.assertEqual(status, 1)
        self.assertIn("problem  substituter:", out)

    def test_json(self) -> None:
        """--json prints one document: ok, counts and every check."""
        status, out, _ = self.run_cli(["doctor", "--json"])
        document = json.loads(out)
        self.assertEqual(status, 0)
        self.assertTrue(document["ok"])
        self.assertEqual({c["name"] for c in document["checks"]},
                         {"config", "daemon", "substituter", "priority", "trusted-keys", "key-names",
                          "negative-ttl", "nix-version", "peers", "reached-by-peers", "ports", "upstreams"})

    def test_broken_config_file(self) -> None:
        """A config file the daemon would refuse is reported as a problem (exit 1), not a usage error."""
        toml = os.path.join(self.dir, "bad.toml")
        with open(toml, "w") as f:
            f.write("prot = 1\n")
        status, out, _ = self.run_cli(["doctor", "--config", toml])
        self.assertEqual(status, 1)
        self.assertIn("problem  config:", out)
        self.assertIn("prot", out)

    def test_usage_errors(self) -> None:
        """A bad option or value: exit 2 with one line on stderr."""
        for argv in (["doctor", "--bogus"], ["doctor", "--port", "x"], ["doctor", "--timeout", "0"]):
            status, out, err = self.run_cli(argv)
            self.assertEqual(status, 2, argv)
            self.assertEqual(out, "")
            self.assertIn("peernix doctor: error:", err)
            self.assertEqual(len(err.splitlines()), 1)

    def test_help(self) -> None:
        """peernix --help names both uses and lists the daemon options."""
        status, out, _ = self.run_cli(["--help"])
        self.assertEqual(status, 0)
        self.assertIn("peernix doctor", out)
        self.assertIn("--secret-key-file", out)

    def test_daemon(self) -> None:
        """Without 'doctor', peernix runs the daemon: twistd --nodaemon --pidfile= peernix ARGS."""
        started: list[list[str]] = []
        self.patch(cli, "run_daemon", lambda argv: started.append(list(argv)))
        status, _, _ = self.run_cli(["--port", "9999", "--no-mdns"])
        self.assertEqual((status, started), (0, [["--port", "9999", "--no-mdns"]]))
        self.run_cli([])
        self.assertEqual(started[-1], [])
