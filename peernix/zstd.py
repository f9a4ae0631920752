"""
The zstd decompressor with bounded output: Python 3.14's
``compression.zstd``, or its backport on older Pythons.

``ZstdDecompressor().decompress(data, max_length=N)`` never returns more than
``N`` bytes and keeps the rest of its input for the next call, which is what
lets the NAR relay expand an untrusted peer's stream in bounded steps.
"""

from __future__ import annotations

try:
    from compression.zstd import ZstdDecompressor, ZstdError  # type: ignore[import-not-found]
except ImportError:  # Python < 3.14
    from backports.zstd import ZstdDecompressor, ZstdError

__all__ = ["ZstdDecompressor", "ZstdError"]
