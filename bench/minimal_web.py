"""
The "Python ceiling" reference: a minimal ``twisted.web`` server answering
every GET with the same fixed 600-byte body.

Run as ``python -m bench.minimal_web PORT``; listens on 127.0.0.1 only.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IReactorTCP
from twisted.web import resource, server

#: The fixed answer: about the size of a real narinfo.
BODY = (b"StorePath: /nix/store/00000000000000000000000000000000-minimal\n" * 10)[:599] + b"\n"


class Fixed(resource.Resource):
    """Answers every path with :data:`BODY` (text/x-nix-narinfo)."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        """:returns: :data:`BODY`."""
        request.setHeader(b"content-type", b"text/x-nix-narinfo")  # type: ignore[no-untyped-call]
        return BODY


async def _serve(reactor: IReactorTCP, port: int) -> None:
    # twisted.web's constructors are not annotated.
    site = server.Site(Fixed())  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")  # type: ignore[no-untyped-call]
    await endpoint.listen(site)  # type: ignore[no-untyped-call]
    await defer.Deferred()  # serve until killed


def main(reactor: IReactorTCP, port: str) -> defer.Deferred[None]:
    """Serve on 127.0.0.1:``port`` until killed."""
    return defer.ensureDeferred(_serve(reactor, int(port)))


if __name__ == "__main__":
    task.react(main, sys.argv[1:2])
