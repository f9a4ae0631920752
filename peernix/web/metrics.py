"""
Prometheus metrics of the web layer and the ``/metrics`` resource.

Every :class:`Metrics` owns its own ``CollectorRegistry`` (never the
process-global one), so tests and several services in one process do not
collide.  Rendering is synchronous: ``prometheus_client.twisted`` imports the
global reactor and renders in a thread, which we avoid.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

#: Buckets of :attr:`Metrics.nar_stream_seconds`: from a tiny NAR on the LAN
#: to a multi-GB one on a slow link.
NAR_STREAM_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, float("inf"))


class Metrics:
    """
    The web layer's metrics, registered on :attr:`registry`.

    Other components may register their own collectors on the same
    :attr:`registry`.  Counting methods are cheap enough for the narinfo hot
    path: labelled children are looked up once and kept in a dict.

    :ivar registry: the ``CollectorRegistry`` every collector here lives in.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """
        :param registry: the registry to use; a fresh one when ``None``.
        """
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "peernix_http_requests_total",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_response_bytes = Counter(
            "peernix_http_response_bytes_total",
            "Response body bytes written, by route.",
            ["route"],
            registry=self.registry,
        )
        self.nar_stream_seconds = Histogram(
            "peernix_nar_stream_seconds",
            "Time to stream one NAR response to its end.",
            buckets=NAR_STREAM_BUCKETS,
            registry=self.registry,
        )
        self.store_lookups = Counter(
            "peernix_store_lookups_total",
            "Local store lookups by hash part, by result (hit or miss).",
            ["result"],
            registry=self.registry,
        )
        self.narinfo_served = Counter(
            "peernix_narinfo_served_total",
            "narinfo answers with status 200, by source (local store or a peer).",
            ["source"],
            registry=self.registry,
        )
        # Children of the hot-path counters, made once: labels() takes a lock
        # and builds a tuple on every call.
        self._lookup_children = {True: self.store_lookups.labels("hit"), False: self.store_lookups.labels("miss")}
        self._narinfo_children = {"local": self.narinfo_served.labels("local"), "peer": self.narinfo_served.labels("peer")}
        # (route, status) -> [request counter child, bytes counter child].
        # prometheus_client's labels() takes a lock and builds a tuple on
        # every call; this dict makes a count one lookup and two adds.
        self._children: dict[tuple[str, int], tuple[Counter, Counter]] = {}
        # Plain-int mirror of http_requests for the status page, which must
        # not depend on prometheus_client internals to read values.
        self._counts: dict[tuple[str, int], int] = {}

    def count_request(self, route: str, status: int, body_bytes: int) -> None:
        """
        Count one answered request.

        :param route: a short fixed route name (``"narinfo"``, ``"nar"``, ...),
            never request data, so label cardinality stays bounded.
        :param status: the HTTP status code sent.
        :param body_bytes: response body bytes written.
        """
        key = (route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.http_requests.labels(route, str(status)), self.http_response_bytes.labels(route))
            self._children[key] = children
        children[0].inc()
        if body_bytes:
            children[1].inc(body_bytes)
        self._counts[key] = self._counts.get(key, 0) + 1

    def request_counts(self) -> dict[tuple[str, int], int]:
        """:returns: a copy of the request counts by ``(route, status)``."""
        return dict(self._counts)

    def count_store_lookup(self, hit: bool) -> None:
        """Count one local store lookup, ``hit`` or miss."""
        self._lookup_children[hit].inc()

    def count_narinfo(self, source: str) -> None:
        """Count one narinfo served from ``source`` (``"local"`` or ``"peer"``)."""
        child = self._narinfo_children.get(source)
        if child is None:
            child = self._narinfo_children[source] = self.narinfo_served.labels(source)
        child.inc()


class MetricsResource(Resource):
    """
    Renders a registry in the Prometheus text format, synchronously on the
    reactor thread (collection is cheap: a few dozen series).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        """:param registry: the registry to expose."""
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        """:returns: the exposition of every collector in the registry."""
        request.responseHeaders.setRawHeaders(b"Content-Type", [CONTENT_TYPE_LATEST.encode("ascii")])
        body: bytes = generate_latest(self._registry)
        return body
