"""Tests for :mod:`peernix.web.encoding`: Accept-Encoding and Range negotiation."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from peernix.web.encoding import RangeNotSatisfiable, choose_encoding, parse_accept_encoding, parse_range


class ChooseEncodingTests(SynchronousTestCase):
    """choose_encoding follows RFC 9110 §12.5.3 and the Nix constraints of nix-protocol.md §1.1."""

    def test_absent_header_is_identity(self) -> None:
        """No Accept-Encoding (Nix < 2.14) means no Content-Encoding."""
        self.assertIsNone(choose_encoding(None))

    def test_empty_header_is_identity(self) -> None:
        """An empty Accept-Encoding accepts only identity."""
        self.assertIsNone(choose_encoding(b""))
        self.assertIsNone(choose_encoding(b" , "))

    def test_nix_2_14_header_prefers_zstd(self) -> None:
        """The list Nix 2.14–2.33 sends gets zstd."""
        self.assertEqual(choose_encoding(b"zstd, br, gzip, deflate, bzip2, xz"), "zstd")

    def test_gzip_only(self) -> None:
        """A client listing only gzip gets gzip."""
        self.assertEqual(choose_encoding(b"gzip"), "gzip")
        self.assertEqual(choose_encoding(b"deflate, gzip"), "gzip")

    def test_unsupported_only(self) -> None:
        """Codings we cannot produce are never chosen."""
        self.assertIsNone(choose_encoding(b"br, deflate, xz"))

    def test_tokens_are_case_insensitive(self) -> None:
        """Coding names match regardless of case, and x-gzip means gzip."""
        self.assertEqual(choose_encoding(b"GZip"), "gzip")
        self.assertEqual(choose_encoding(b"ZSTD;Q=0.5"), "zstd")
        self.assertEqual(choose_encoding(b"x-gzip"), "gzip")

    def test_q_values_rank(self) -> None:
        """The highest weight wins; ties go to zstd."""
        self.assertEqual(choose_encoding(b"gzip;q=1.0, zstd;q=0.5"), "gzip")
        self.assertEqual(choose_encoding(b"gzip;q=0.5, zstd;q=0.5"), "zstd")
        self.assertEqual(choose_encoding(b"gzip ; q=0.8 , zstd;q=0.9"), "zstd")

    def test_q_zero_refuses(self) -> None:
        """A coding with q=0 is never chosen, even when '*' would allow it."""
        self.assertEqual(choose_encoding(b"zstd;q=0, gzip"), "gzip")
        self.assertIsNone(choose_encoding(b"zstd;q=0, gzip;q=0"))
        self.assertEqual(choose_encoding(b"zstd;q=0, *"), "gzip")
        self.assertIsNone(choose_encoding(b"zstd;q=0.000"))

    def test_star(self) -> None:
        """'*' covers codings not listed explicitly."""
        self.assertEqual(choose_encoding(b"*"), "zstd")
        self.assertEqual(choose_encoding(b"*;q=0.5, gzip"), "gzip")
        self.assertIsNone(choose_encoding(b"*;q=0"))

    def test_identity_refused_still_identity(self) -> None:
        """When nothing we produce is acceptable, even 'identity;q=0' gets an uncompressed answer."""
        self.assertIsNone(choose_encoding(b"identity;q=0"))
        self.assertIsNone(choose_encoding(b"br, identity;q=0"))
        self.assertEqual(choose_encoding(b"gzip, identity;q=0"), "gzip")

    def test_identity_preferred(self) -> None:
        """identity weighted strictly higher than every candidate wins; a tie does not."""
        self.assertIsNone(choose_encoding(b"identity, gzip;q=0.5"))
        self.assertEqual(choose_encoding(b"identity;q=0.5, gzip;q=0.5"), "gzip")

    def test_malformed_weights_dropped(self) -> None:
        """An element with an invalid q-value is ignored, never guessed."""
        for header in (b"gzip;q=abc", b"gzip;q=1.5", b"gzip;q=", b"gzip;q=0.1234", b"gzip;q=\xb2"):
            self.assertIsNone(choose_encoding(header), header)
        self.assertEqual(choose_encoding(b"gzip;q=2, zstd"), "zstd")

    def test_never_identity_token(self) -> None:
        """The answer is never the string 'identity' (Nix 2.14–2.30 fails on it)."""
        for header in (b"identity", b"identity;q=1, *;q=0", b"*"):
            self.assertNotEqual(choose_encoding(header), "identity")

    def test_parse_keeps_lowest_duplicate(self) -> None:
        """A coding listed twice keeps its lowest weight, so a refusal sticks."""
        self.assertEqual(parse_accept_encoding(b"gzip;q=0, gzip"), {"gzip": 0.0})


class ParseRangeTests(SynchronousTestCase):
    """parse_range honours one bytes range and ignores what RFC 9110 lets it ignore."""

    def test_absent(self) -> None:
        """No Range header means the whole representation."""
        self.assertIsNone(parse_range(None, 100))

    def test_closed_range(self) -> None:
        """bytes=a-b gives (a, b), clamped to the size."""
        self.assertEqual(parse_range(b"bytes=0-9", 100), (0, 9))
        self.assertEqual(parse_range(b"bytes=10-10", 100), (10, 10))
        self.assertEqual(parse_range(b"bytes=90-1000", 100), (90, 99))
        self.assertEqual(parse_range(b"Bytes = 1-2", 100), (1, 2))

    def test_open_range(self) -> None:
        """bytes=a- runs to the end."""
        self.assertEqual(parse_range(b"bytes=5-", 100), (5, 99))
        self.assertEqual(parse_range(b"bytes=99-", 100), (99, 99))

    def test_suffix_range(self) -> None:
        """bytes=-n is the last n bytes, or everything when n exceeds the size."""
        self.assertEqual(parse_range(b"bytes=-3", 100), (97, 99))
        self.assertEqual(parse_range(b"bytes=-500", 100), (0, 99))

    def test_unsatisfiable(self) -> None:
        """A range starting at or past the end, or -0, is unsatisfiable."""
        for header in (b"bytes=100-", b"bytes=100-200", b"bytes=-0", b"bytes=1000-"):
            self.assertRaises(RangeNotSatisfiable, parse_range, header, 100)

    def test_ignored(self) -> None:
        """Other units, several ranges, and syntax errors are ignored (whole representation)."""
        for header in (
            b"items=0-1",
            b"bytes=0-1,5-6",
            b"bytes=9-1",
            b"bytes=a-b",
            b"bytes=-",
            b"bytes=0-\xb2",
            b"bytes",
            b"bytes=1-2-3",
        ):
            self.assertIsNone(parse_range(header, 100), header)

    def test_empty_list_elements(self) -> None:
        """Empty list elements around one range do not make it a multi-range."""
        self.assertEqual(parse_range(b"bytes=, 0-4 ,", 100), (0, 4))
