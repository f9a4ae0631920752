"""
Giving memory freed after a burst of streaming back to the system.

Streaming NARs allocates chunk buffers of a few hundred KiB in several
threads.  glibc's allocator keeps what they freed in its per-thread arenas,
so after a burst of concurrent downloads the process stays as large as at
the burst's peak (measured: +5 MB per four 500 MB streams, growing with
every burst shape).  ``malloc_trim(0)`` returns those free pages.
:class:`IdleTrimmer` calls it shortly after the last stream ends, so an idle
daemon is back to its working set while busy ones pay nothing.

Where there is no glibc (musl, macOS) trimming does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds of no streaming before freed memory is given back.
TRIM_DELAY = 1.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """
    Give the allocator's free memory back to the system (glibc
    ``malloc_trim(0)``; ctypes releases the GIL meanwhile).

    :returns: whether anything was released; ``False`` too without glibc.
    """
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


class IdleTrimmer:
    """
    Calls ``trim`` once ``delay`` seconds after the last of the streams
    reported with :meth:`started`/:meth:`ended` ended, unless another one
    started meanwhile.  Reactor thread only.
    """

    def __init__(self, clock: IReactorTime, trim: Callable[[], object] = release_free_memory,
                 delay: float = TRIM_DELAY) -> None:
        self._clock = clock
        self._trim = trim
        self._delay = delay
        self._active = 0
        self._call: IDelayedCall | None = None
        #: How many times ``trim`` ran.
        self.trims = 0

    @property
    def active(self) -> int:
        """Streams started and not ended."""
        return self._active

    def started(self) -> None:
        """A stream began: no trimming while it runs."""
        self._active += 1
        self._cancel()

    def ended(self) -> None:
        """A stream ended (whichever way); the last one schedules a trim."""
        self._active = max(0, self._active - 1)
        if self._active == 0:
            self._cancel()
            self._call = self._clock.callLater(self._delay, self._run)

    def stop(self) -> None:
        """Cancel a scheduled trim (service shutdown)."""
        self._cancel()

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _run(self) -> None:
        self._call = None
        self.trims += 1
        self._trim()
