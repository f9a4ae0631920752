"""Tests for the start-up warning about the predecessor's shared key name (:mod:`peernix.service`)."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.signing import SecretKey
from peernix.service import SHARED_KEY_NAME, warn_about_key_name
from peernix.test.test_service import build, quiet

#: A seed that is obviously a test value.
SEED = bytes(range(32))


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:returns: the warning events about the key name among ``events``."""
    return [e for e in events if e.get("log_level") is LogLevel.warn and "key_name" in e]


class KeyNameWarningTests(SynchronousTestCase):
    """Start-up warns when the signing key has zw3rk/peernix's shared default name."""

    def write_key(self, name: str) -> tuple[str, SecretKey]:
        """:returns: ``(path, key)`` of a new secret key file for a key called ``name``."""
        key = SecretKey(name, SEED)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(key.to_string() + "\n")
        return path, key

    def test_shared_name_is_predecessors(self) -> None:
        """The shared name is the one zw3rk/peernix signs with by default."""
        self.assertEqual(SHARED_KEY_NAME, "peernix-1")

    def test_warns_for_shared_name(self) -> None:
        """Building the service with a key file named ``peernix-1`` logs one warning that says why and what to do."""
        path, _ = self.write_key("peernix-1")
        with capturedLogs() as events:
            build(self, quiet(secret_key_file=path))
        found = warnings(list(events))
        self.assertEqual(len(found), 1, [formatEvent(e) for e in events])
        text = formatEvent(found[0])
        self.assertIn("'peernix-1'", text)
        self.assertIn("one key per name", text)
        self.assertIn('"$(hostname)-peernix-1"', text)
        self.assertEqual(found[0]["key_name"], "peernix-1")

    def test_warns_for_injected_key(self) -> None:
        """A key passed to build_service directly is checked too."""
        with capturedLogs() as events:
            build(self, secret_key=SecretKey("peernix-1", SEED))
        self.assertEqual(len(warnings(list(events))), 1)

    def test_no_warning_for_unique_name(self) -> None:
        """A host-specific key name, or no key at all, logs no such warning."""
        path, _ = self.write_key("builder-peernix-1")
        with capturedLogs() as events:
            build(self, quiet(secret_key_file=path))
            build(self)
            warn_about_key_name(None)
        self.assertEqual(warnings(list(events)), [])

    def test_similar_names_do_not_warn(self) -> None:
        """Only the exact shared name warns: ``peernix-2`` or ``x-peernix-1`` are unique choices."""
        with capturedLogs() as events:
            for name in ("peernix-2", "x-peernix-1", "peernix-10"):
                warn_about_key_name(SecretKey(name, SEED))
        self.assertEqual(warnings(list(events)), [])

    def test_warning_has_no_secret(self) -> None:
        """The warning carries the public key at most, never the secret key or its seed."""
        path, key = self.write_key("peernix-1")
        with open(path) as f:
            secret_text = f.read().strip()
        secret_b64 = secret_text.partition(":")[2]
        with capturedLogs() as events:
            warn_about_key_name(key)
        (event,) = warnings(list(events))
        everything = formatEvent(event) + repr(sorted(event.items(), key=lambda kv: kv[0]))
        self.assertNotIn(secret_b64, everything)
        self.assertNotIn(secret_b64[:44], everything)
