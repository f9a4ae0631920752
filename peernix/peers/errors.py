"""Errors of the peer side (fan-out and NAR relay)."""

from __future__ import annotations


class NarUnavailable(Exception):
    """No peer could start sending the NAR; nothing was written to the client."""


class NarVerificationFailed(Exception):
    """A peer's NAR did not match the expected NarHash/NarSize or NAR grammar."""
