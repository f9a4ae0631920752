"""Errors of the peer side (fan-out and NAR relay)."""

from __future__ import annotations


class NarUnavailable(Exception):
    """No peer could start sending the NAR; nothing was written to the client."""


class NarVerificationFailed(Exception):
    """A peer's NAR did not match the expected NarHash/NarSize (or was not valid zstd)."""


class NarRelayInterrupted(Exception):
    """
    A peer stopped sending a NAR part-way (connection lost, silence timeout)
    after bytes had already gone to the client.
    """


class NarClientGone(NarRelayInterrupted):
    """
    The client stopped a relayed NAR part-way (its connection closed): a
    normal event, nobody's fault (Nix resumes or retries), logged as one
    info line.
    """


class PeerError(Exception):
    """
    A request to a peer failed.  ``kind`` is the failure kind recorded in the
    peer registry: ``"timeout"``, ``"connection"``, ``"http"`` or
    ``"untrusted"``.
    """

    kind = "connection"


class PeerTimeout(PeerError):
    """The peer did not answer (headers or body) in time."""

    kind = "timeout"


class PeerConnectionError(PeerError):
    """The connection to the peer failed or was lost."""

    kind = "connection"


class PeerHTTPError(PeerError):
    """The peer answered with an unexpected HTTP status."""

    kind = "http"

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"unexpected HTTP status {code}")
        self.code = code


class PeerProtocolError(PeerError):
    """The peer's answer was malformed or too large."""

    kind = "untrusted"
