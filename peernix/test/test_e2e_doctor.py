"""
End to end: ``python -m peernix.cli doctor --json`` (the console script's
code) against real daemons on loopback, with a real nix.conf in a temporary
``NIX_CONF_DIR``: its JSON output and its exit status.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from peernix.test.daemon import SOURCE_ROOT, Daemon, free_port, http_get, shared_fixture, start_fixture
from peernix.test.nixenv import SKIP_NO_NIX, ChrootStore, generate_key


class _Fixture:
    """Daemons A (signing, the one checked) and B, static peers of each other, on loopback."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="peernix-e2e-doctor-")
        self.daemons: list[Daemon] = []
        self.stores: list[ChrootStore] = []

    def start(self) -> None:
        keys = os.path.join(self.tmp, "keys")
        self.a_sk, _, self.a_pk = generate_key(keys, "alice-doctor-1")
        self.b_sk, _, self.b_pk = generate_key(keys, "bob-doctor-1")
        self.a_port, self.b_port = free_port(), free_port()
        self.a_udp = free_port()
        self.a_args = ["--store-root", self.store("a"), "--no-broadcast", "--no-mdns",
                       "--udp-port", str(self.a_udp), "--peer", f"http://127.0.0.1:{self.b_port}",
                       "--secret-key-file", self.a_sk]
        self.a = self.daemon("a", self.a_port, self.a_args)
        self.b = self.daemon("b", self.b_port, ["--store-root", self.store("b"), "--no-broadcast", "--no-mdns",
                                                "--udp-port", str(free_port()),
                                                "--peer", f"http://127.0.0.1:{self.a_port}",
                                                "--secret-key-file", self.b_sk])
        # D and E: static peers of each other, signing with different keys of one name.
        _, _, self.clash_pk = generate_key(os.path.join(self.tmp, "keys-clash"), "alice-doctor-1")
        self.d_port, self.e_port = free_port(), free_port()
        self.d_udp = free_port()
        self.d = self.daemon("d", self.d_port, ["--store-root", self.store("d"), "--no-broadcast", "--no-mdns",
                                                "--udp-port", str(self.d_udp), "--secret-key-file", self.a_sk,
                                                "--peer", f"http://127.0.0.1:{self.e_port}"])
        self.e = self.daemon("e", self.e_port, ["--store-root", self.store("e"), "--no-broadcast", "--no-mdns",
                                                "--udp-port", str(free_port()),
                                                "--secret-key-file", os.path.join(self.tmp, "keys-clash",
                                                                                  "alice-doctor-1.sk"),
                                                "--peer", f"http://127.0.0.1:{self.d_port}"])
        for d in self.daemons:
            d.wait_ready()

    def store(self, name: str) -> str:
        store = ChrootStore(os.path.join(self.tmp, f"store-{name}"))
        self.stores.append(store)
        return store.root

    def daemon(self, name: str, port: int, args: Sequence[str]) -> Daemon:
        daemon = Daemon(args, os.path.join(self.tmp, f"{name}.log"), port=port)
        self.daemons.append(daemon)
        return daemon

    def destroy(self) -> None:
        for d in self.daemons:
            d.stop()
        for store in self.stores:
            store.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


class DoctorEndToEndTests(SynchronousTestCase):
    """The doctor command against running daemons."""

    skip = SKIP_NO_NIX

    def setUp(self) -> None:
        self.fx = shared_fixture(__name__, lambda: start_fixture(_Fixture()))
        self.conf_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.conf_dir)

    def nix_conf(self, text: str) -> None:
        with open(os.path.join(self.conf_dir, "nix.conf"), "w") as f:
            f.write(text)

    def doctor(self, args: Sequence[str]) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]]:
        """
        :returns: the exit status, the JSON document and its checks by name.
            Without ``--upstream`` in ``args`` the doctor runs with
            ``--upstream none``: the default (nix.conf's substituters) names
            cache.nixos.org, and tests never ask the internet.
        """
        if "--upstream" not in args:
            args = [*args, "--upstream", "none"]
        env = dict(os.environ, NIX_CONF_DIR=self.conf_dir,
                   PYTHONPATH=SOURCE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-m", "peernix.cli", "doctor", "--json", *args],
                              capture_output=True, env=env, cwd=SOURCE_ROOT, timeout=120, stdin=subprocess.DEVNULL)
        document = json.loads(done.stdout)
        return done.returncode, document, {c["name"]: c for c in document["checks"]}

    def good_conf(self, query: str = "") -> None:
        self.nix_conf(f"substituters = http://127.0.0.1:{self.fx.a_port}/nix-cache{query} https://cache.nixos.org\n"
                      "trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
                      f" {self.fx.a_pk}\nnarinfo-cache-negative-ttl = 60\n")

    def test_healthy_setup(self) -> None:
        """A sound set-up: exit 0, daemon, substituter, priority, keys, peers, reach and ports all ok."""
        self.good_conf()
        # The daemon's own options: its test harness turns fetching for the LAN off.
        status, document, checks = self.doctor(["--port", str(self.fx.a_port), "--udp-port", str(self.fx.a_udp),
                                                "--secret-key-file", self.fx.a_sk, "--upstream", "none"])
        self.assertEqual(status, 0, json.dumps(document, indent=1))
        self.assertTrue(document["ok"])
        for name in ("config", "daemon", "substituter", "priority", "trusted-keys", "key-names",
                     "negative-ttl", "peers", "reached-by-peers", "ports"):
            self.assertEqual(checks[name]["status"], "ok", checks[name])
        self.assertEqual(checks["priority"]["details"]["peernix_priority_from"], "its nix-cache-info")
        # B is a static peer (no UDP announcement): its key comes from its own status.json.
        self.assertEqual(checks["key-names"]["details"]["names"], {"alice-doctor-1": 1, "bob-doctor-1": 1})
        self.assertEqual(checks["peers"]["details"]["peers"][0]["url"], f"http://127.0.0.1:{self.fx.b_port}")
        self.assertEqual(checks["reached-by-peers"]["details"]["reach_us"], [f"http://127.0.0.1:{self.fx.b_port}"])
        self.assertTrue(checks["ports"]["details"]["tcp_addresses"])
        self.assertTrue(checks["ports"]["details"]["udp_addresses"])
        self.assertIn(checks["nix-version"]["status"], ("ok", "warning"))
        self.assertEqual(checks["upstreams"]["status"], "skipped")

    def upstream_server(self) -> str:
        """:returns: the URL of a binary cache answering ``nix-cache-info`` on 127.0.0.1 (stopped at cleanup)."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "nix-cache-info"), "w") as f:
            f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(10)

        self.addCleanup(stop)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def test_upstreams(self) -> None:
        """--upstream: a local cache answering is ok; one where nothing listens is a warning (exit still 0)."""
        self.good_conf()
        good = self.upstream_server()
        base = ["--port", str(self.fx.a_port), "--udp-port", str(self.fx.a_udp), "--secret-key-file", self.fx.a_sk]
        status, document, checks = self.doctor([*base, "--upstream", good])
        self.assertEqual(checks["upstreams"]["status"], "ok", checks["upstreams"])
        self.assertEqual(checks["upstreams"]["details"]["upstreams"], [good])
        dead = f"http://127.0.0.1:{free_port()}"
        status, document, checks = self.doctor([*base, "--upstream", good, "--upstream", dead])
        self.assertEqual(status, 0, json.dumps(document, indent=1))
        self.assertEqual(checks["upstreams"]["status"], "warning", checks["upstreams"])
        failing = checks["upstreams"]["details"]["failing"]
        self.assertEqual(len(failing), 1)
        self.assertTrue(failing[0].startswith(dead), failing)

    def test_trusted_1(self) -> None:
        """?trusted=1 in the real nix.conf: exit 1, the substituter check a problem."""
        self.good_conf("?trusted=1")
        status, _, checks = self.doctor(["--port", str(self.fx.a_port), "--udp-port", str(self.fx.a_udp)])
        self.assertEqual(status, 1)
        self.assertEqual(checks["substituter"]["status"], "problem")

    def test_config_file(self) -> None:
        """The daemon's TOML config file is read: its port is the one checked."""
        toml = os.path.join(self.conf_dir, "peernix.toml")
        with open(toml, "w") as f:
            f.write(f"port = {self.fx.a_port}\nudp_port = {self.fx.a_udp}\nsecret_key_file = {json.dumps(self.fx.a_sk)}\n")
        self.good_conf()
        status, _, checks = self.doctor(["--config", toml])
        self.assertEqual(checks["daemon"]["status"], "ok", checks["daemon"])
        self.assertEqual(checks["trusted-keys"]["status"], "ok", checks["trusted-keys"])
        self.assertEqual(checks["config"]["details"]["config_file"], toml)

    def test_key_name_clash(self) -> None:
        """A peer signing with another key of this node's key name: exit 1, key-names a problem naming it."""
        self.nix_conf(f"substituters = http://127.0.0.1:{self.fx.d_port}/nix-cache https://cache.nixos.org\n"
                      "trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
                      f" {self.fx.a_pk}\nnarinfo-cache-negative-ttl = 60\n")
        status, _, checks = self.doctor(["--port", str(self.fx.d_port), "--udp-port", str(self.fx.d_udp),
                                         "--secret-key-file", self.fx.a_sk])
        self.assertEqual(status, 1)
        self.assertEqual(checks["key-names"]["status"], "problem", checks["key-names"])
        self.assertIn(f"http://127.0.0.1:{self.fx.e_port}", checks["key-names"]["summary"])
        self.assertEqual(checks["substituter"]["status"], "ok")

    def test_daemon_down(self) -> None:
        """Nothing on the port: exit 1, the daemon check a problem with the fix."""
        port = free_port()
        self.nix_conf(f"substituters = http://127.0.0.1:{port}/nix-cache https://cache.nixos.org\n")
        status, _, checks = self.doctor(["--port", str(port)])
        self.assertEqual(status, 1)
        self.assertEqual(checks["daemon"]["status"], "problem")
        self.assertIn("twistd", checks["daemon"]["fix"])
        self.assertEqual(checks["peers"]["status"], "unknown")


class ConsoleScriptDaemonTests(SynchronousTestCase):
    """``peernix [daemon options]`` (no command) runs the daemon in the foreground."""

    skip = SKIP_NO_NIX

    def test_runs_daemon(self) -> None:
        """python -m peernix.cli --port P ... serves nix-cache-info, and stops on SIGTERM."""
        tmp = os.path.abspath(self.mktemp())
        store = ChrootStore(os.path.join(tmp, "store"))
        self.addCleanup(store.remove)
        port = free_port()
        env = dict(os.environ, PYTHONPATH=SOURCE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(os.path.join(tmp, "log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen([sys.executable, "-m", "peernix.cli", "--port", str(port), "--store-root",
                                    store.root, "--no-broadcast", "--no-mdns", "--udp-port", str(free_port())],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=SOURCE_ROOT)

        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)

        self.addCleanup(stop)
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and process.poll() is None:
            status, body = http_get(f"http://127.0.0.1:{port}/nix-cache/nix-cache-info", timeout=2)
            if status == 200:
                break
            time.sleep(0.1)
        self.assertEqual(status, 200, f"the daemon did not answer (exit status {process.poll()})")
        self.assertIn(b"StoreDir: /nix/store", body)
        stop()
        # twistd ends by re-raising the signal that stopped it.
        self.assertIn(process.returncode, (0, -15))
