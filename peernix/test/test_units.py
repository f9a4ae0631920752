"""Tests of :mod:`peernix.units`."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from peernix.units import SizeError, format_size, parse_size


class ParseSizeTests(SynchronousTestCase):
    def test_plain_bytes(self) -> None:
        """A bare number is bytes."""
        self.assertEqual(parse_size("0"), 0)
        self.assertEqual(parse_size("4096"), 4096)
        self.assertEqual(parse_size(" 12 "), 12)

    def test_decimal_suffixes(self) -> None:
        """K, M, G, T are powers of 1000."""
        self.assertEqual(parse_size("4K"), 4000)
        self.assertEqual(parse_size("4k"), 4000)
        self.assertEqual(parse_size("5M"), 5_000_000)
        self.assertEqual(parse_size("2G"), 2_000_000_000)
        self.assertEqual(parse_size("1T"), 10**12)

    def test_binary_suffixes(self) -> None:
        """Ki, Mi, Gi, Ti are powers of 1024."""
        self.assertEqual(parse_size("4Ki"), 4096)
        self.assertEqual(parse_size("5Mi"), 5 * 2**20)
        self.assertEqual(parse_size("4Gi"), 4 * 2**30)
        self.assertEqual(parse_size("1Ti"), 2**40)

    def test_trailing_b(self) -> None:
        """A trailing B changes nothing."""
        self.assertEqual(parse_size("4GiB"), 4 * 2**30)
        self.assertEqual(parse_size("200MB"), 200_000_000)
        self.assertEqual(parse_size("10B"), 10)

    def test_fractions(self) -> None:
        """A fraction with a suffix is exact, rounded down to whole bytes."""
        self.assertEqual(parse_size("1.5Gi"), 3 * 2**29)
        self.assertEqual(parse_size("0.5K"), 500)
        self.assertEqual(parse_size("0.0001K"), 0)

    def test_big_values_exact(self) -> None:
        """Large values are computed without float rounding."""
        self.assertEqual(parse_size("123456789123456789Gi"), 123456789123456789 * 2**30)

    def test_rejected(self) -> None:
        """Anything else is a SizeError naming the syntax."""
        for text in ("", "G", "-1", "4X", "4 Gi B x", "1.5", "4g", "4m", "4ki", "1e9", "0x10", "4iB", "4.K"):
            with self.assertRaises(SizeError, msg=text) as caught:
                parse_size(text)
            self.assertIn("expected", str(caught.exception))

    def test_size_error_is_value_error(self) -> None:
        """Callers catching ValueError (the options table) see SizeError."""
        self.assertTrue(issubclass(SizeError, ValueError))


class FormatSizeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """format_size gives the largest exact binary unit, which parse_size reads back."""
        for size, text in ((4 * 2**30, "4Gi"), (1536 * 1024, "1536Ki"), (1000, "1000"), (0, "0"), (2**40, "1Ti")):
            self.assertEqual(format_size(size), text)
            self.assertEqual(parse_size(text), size)
