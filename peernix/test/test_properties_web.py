"""
Property tests of the HTTP face: routing of arbitrary request paths through
the real :class:`~peernix.web.app.WebApp` resource, ``Accept-Encoding``
negotiation and ``Range`` parsing.  Bounded (``max_examples``) so they run in
CI.
"""

# trial's assertion methods are not annotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import re
import string

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from peernix.nix.pathinfo import PathInfo
from peernix.test.test_web_app import Harness, nar_url
from peernix.web.encoding import RangeNotSatisfiable, choose_encoding, parse_range

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")

#: Pieces a hostile path is made of: separators, dot segments, percent
#: encodings (of dots, slashes, NUL, non-ASCII), raw NUL and non-ASCII bytes,
#: the suffixes the router looks at, and route prefixes.
_PIECES = [
    b"/", b"//", b".", b"..", b"%2e", b"%2E%2e", b"%2f", b"%2F", b"%00", b"\x00", b"%", b"%zz", b"%c3%a9",
    b"\xc3\xa9", b"\xff", b"\xfe\x80", b"?", b"#", b";", b"~", b"-", b".narinfo", b".nar", b".nar.zst",
    b".nar.xz", b".ls", b".drv", b"nar/", b"log/", b"nix-cache/", b"nix-cache-info", b"status.json",
    b"metrics", b"0c0ys3hg8kn9jbm6dl9g2rkq1l8ywyna", b"e" * 32, b"a" * 600,
]
# Bytes that end or split an HTTP/1.1 request line (twisted splits on ASCII
# whitespace): excluded where the request line must stay well-formed.
_LINE_BREAKERS = set(b" \t\r\n\x0b\x0c")


def _segments(known: list[bytes]) -> st.SearchStrategy[bytes]:
    piece = st.one_of(st.sampled_from(_PIECES + known), st.binary(max_size=12))
    return st.lists(piece, max_size=12).map(b"".join)


def statuses(output: bytes) -> list[int]:
    """:returns: the status codes of every response in ``output``."""
    return [int(m.group(1)) for m in _STATUS.finditer(output)]


class RoutingPropertyTests(SynchronousTestCase):
    """Whatever the path, the app answers with a status below 500 and keeps answering."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.info: PathInfo = self.h.store.add_file("hello", b"hello world\n" * 100)
        self.known = [
            self.info.hash_part.encode(),
            nar_url(self.info).encode(),
            nar_url(self.info, ".nar.zst").encode(),
            f"{self.info.hash_part}.narinfo".encode(),
        ]

    def still_answers(self) -> None:
        transport, _ = self.h.raw(b"GET /nix-cache/%s.narinfo HTTP/1.1\r\nHost: x\r\n\r\n" % self.info.hash_part.encode())
        self.assertEqual(statuses(transport.value()), [200])

    def send(self, method: bytes, target: bytes) -> list[int]:
        transport, _ = self.h.raw(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.flushLoggedErrors(), [], target)
        return statuses(transport.value())

    @settings(max_examples=200, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
        prefix=st.sampled_from([b"/", b"/nix-cache/", b"/nix-cache/nar/", b"/nix-cache/log/", b"//", b""]),
        rest=st.data(),
    )
    @example(method=b"GET", prefix=b"/nix-cache/", rest=None)
    @example(method=b"GET", prefix=b"/", rest=None)
    def test_well_formed_request_line(self, method: bytes, prefix: bytes, rest: st.DataObject | None) -> None:
        """A path of any bytes but whitespace gets exactly one answer, never 5xx."""
        if rest is not None:
            tail = rest.draw(_segments(self.known))
        else:
            # Under the cache a traversal; outside it a percent-encoded non-UTF-8 byte (Klein's side).
            tail = b"%2e%2e/%00.narinfo" if prefix == b"/nix-cache/" else b"%ee%ee"
        target = bytes(b for b in prefix + tail if b not in _LINE_BREAKERS)
        codes = self.send(method, target or b"/")
        self.assertEqual(len(codes), 1, target)
        self.assertLess(codes[0], 500, target)
        self.still_answers()

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, target: bytes) -> None:
        """Any bytes at all as the request target (even breaking the request line) never give a 5xx."""
        for code in self.send(b"GET", target):
            self.assertLess(code, 500, target)
        self.still_answers()

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=8).map(b"".join))
    def test_under_cache_prefix(self, tail: bytes) -> None:
        """Paths built from traversal and encoding pieces under /nix-cache/ are answered below 500, never reaching the store for a bad hash."""
        target = bytes(b for b in b"/nix-cache/" + tail if b not in _LINE_BREAKERS)
        before = list(self.h.store.lookups)
        codes = self.send(b"GET", target)
        self.assertEqual(len(codes), 1, target)
        self.assertLess(codes[0], 500, target)
        for hash_part in self.h.store.lookups[len(before):]:
            self.assertRegex(hash_part, r"\A[0-9a-df-np-sv-z]{32}\Z")
        self.still_answers()


_CODINGS = st.sampled_from(["zstd", "gzip", "x-gzip", "identity", "*", "br", "ZSTD", "Gzip", "deflate", ""])
_QVALUES = st.one_of(
    st.none(),
    st.sampled_from(["0", "0.0", "0.000", "1", "1.000", "0.5", "0.001", "0.1234", "2", "-1", "abc", "", "1.5"]),
)


def _element(coding: str, q: str | None) -> str:
    return coding if q is None else f"{coding};q={q}"


def _qvalue(text: str | None) -> float | None:
    """The reference model: RFC 9110 qvalue, ``None`` when malformed."""
    if text is None:
        return 1.0
    if not re.fullmatch(r"0(\.\d{0,3})?|1(\.0{0,3})?", text):
        return None
    return float(text)


class AcceptEncodingPropertyTests(SynchronousTestCase):
    """choose_encoding."""

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.none(), st.binary(max_size=200)))
    def test_arbitrary_bytes(self, header: bytes | None) -> None:
        """Any header value gives zstd, gzip or None, never an exception."""
        self.assertIn(choose_encoding(header), ("zstd", "gzip", None))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(_CODINGS, _QVALUES), max_size=6), st.sampled_from([",", ", ", " ,"]))
    def test_model(self, elements: list[tuple[str, str | None]], separator: str) -> None:
        """The choice always has a non-zero weight (its own, else through *), and is the highest weighted one."""
        header = separator.join(_element(c, q) for c, q in elements).encode()
        chosen = choose_encoding(header)
        weights: dict[str, float] = {}
        for coding, q in elements:
            weight = _qvalue(q)
            name = {"x-gzip": "gzip"}.get(coding.lower(), coding.lower())
            if weight is None or not name:
                continue
            weights[name] = min(weight, weights.get(name, weight))

        def effective(coding: str) -> float:
            return weights.get(coding, weights.get("*", 0.0))

        if chosen is None:
            best = max(effective("zstd"), effective("gzip"))
            identity = weights.get("identity")
            self.assertTrue(best == 0.0 or (identity is not None and identity > best), header)
        else:
            self.assertGreater(effective(chosen), 0.0, header)
            other = "gzip" if chosen == "zstd" else "zstd"
            self.assertGreaterEqual(effective(chosen), effective(other), header)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=100), st.sampled_from([b"zstd;q=0", b"ZSTD ; Q=0.000", b"zstd;q=0.0"]))
    def test_q_zero_honoured(self, prefix: bytes, refusal: bytes) -> None:
        """Whatever else the header says, a coding listed with q=0 is never chosen."""
        self.assertNotEqual(choose_encoding(prefix + b"," + refusal), "zstd")
        self.assertNotEqual(choose_encoding(refusal + b"," + prefix.replace(b"zstd", b"gzip")), "zstd")
        self.assertNotEqual(choose_encoding(prefix + b",gzip;q=0,x-gzip;q=1"), "gzip")

    def test_star_refused(self) -> None:
        """``*;q=0`` alone refuses every coding."""
        self.assertIsNone(choose_encoding(b"*;q=0"))
        self.assertIsNone(choose_encoding(b"identity;q=1, *;q=0"))


_RANGE_TEXT = st.lists(
    st.one_of(st.sampled_from(["bytes", "=", "-", ",", " ", "0", "1", "00", "Bytes"]), st.text(string.digits, max_size=20)),
    max_size=10,
).map(lambda parts: "".join(parts).encode())


class RangePropertyTests(SynchronousTestCase):
    """parse_range."""

    def check(self, header: bytes | None, size: int) -> None:
        try:
            result = parse_range(header, size)
        except RangeNotSatisfiable:
            return
        if result is not None:
            start, end = result
            self.assertTrue(0 <= start <= end < size, (header, size, result))

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.none(), st.binary(max_size=100)), st.integers(0, 10**12))
    def test_arbitrary_bytes(self, header: bytes | None, size: int) -> None:
        """Any header and size: only RangeNotSatisfiable is raised, and any range lies within the representation."""
        self.check(header, size)

    @settings(max_examples=200, deadline=None)
    @given(_RANGE_TEXT, st.integers(0, 1000))
    def test_range_like(self, header: bytes, size: int) -> None:
        """Headers built from range syntax hit every branch with the same guarantees."""
        self.check(header, size)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2000), st.integers(0, 2000), st.integers(1, 1000))
    def test_valid_ranges_exact(self, first: int, last: int, size: int) -> None:
        """A valid a-b range is honoured exactly as RFC 9110 says (clipped to the size, 416 past the end)."""
        header = b"bytes=%d-%d" % (first, last)
        if last < first:
            self.assertIsNone(parse_range(header, size))
        elif first >= size:
            self.assertRaises(RangeNotSatisfiable, parse_range, header, size)
        else:
            self.assertEqual(parse_range(header, size), (first, min(last, size - 1)))


class RegressionTests(SynchronousTestCase):
    """Inputs the properties above (or their authors) found."""

    def test_huge_numbers(self) -> None:
        """A range with thousands of digits raises only RangeNotSatisfiable, or is ignored."""
        for header in (b"bytes=" + b"1" * 5000 + b"-", b"bytes=-" + b"1" * 5000, b"bytes=0-" + b"9" * 5000):
            try:
                parse_range(header, 100)
            except RangeNotSatisfiable:
                pass


    def test_non_utf8_path_outside_cache(self) -> None:
        """A non-UTF-8 path outside /nix-cache/ is a 4xx without logging an unexpected error."""
        h = Harness(self)
        transport, _ = h.raw(b"GET /\x80 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(statuses(transport.value())[0], 400)
        self.assertEqual(self.flushLoggedErrors(), [])

