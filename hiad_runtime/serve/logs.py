"""Repeated warnings and errors, rate-limited: one line per kind and window, then a count of those left out.

A flood of one error (asyncio's failed accept at the open-file limit, once per connection attempt,
each with its traceback) grew a service log to 4.1 GB in 15 minutes. Lines below WARNING pass.
"""

from __future__ import annotations

import logging
import threading
import time

WINDOW_S = 60.0
MAX_KINDS = 1000  # kinds remembered; past that the memory starts afresh


class RepeatFilter(logging.Filter):
    """Lets the first record of a kind (logger, level, first line of the message, exception type)
    through, then one per `window_s`, which says how many were left out meanwhile."""

    def __init__(self, window_s: float = WINDOW_S):
        super().__init__()
        self.window_s = window_s
        self.seen: dict[tuple, tuple[float, int]] = {}  # kind -> (when last let through, left out since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """True below WARNING; else only for the first of its kind per window, which counts those left out."""
        if record.levelno < logging.WARNING:
            return True
        first_line = str(record.msg).split("\n", 1)[0][:200]  # asyncio formats details (addresses) into later lines
        kind = (record.name, record.levelno, first_line, record.exc_info[0] if record.exc_info else None)
        now = time.monotonic()
        with self._lock:
            last, left_out = self.seen.get(kind, (-self.window_s, 0))
            if now - last < self.window_s:
                self.seen[kind] = (last, left_out + 1)
                return False
            if len(self.seen) >= MAX_KINDS:
                self.seen.clear()
            self.seen[kind] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} [{left_out} more like this in the last {now - last:.0f} s left out]"
        return True


def rate_limit(*loggers: str, window_s: float = WINDOW_S) -> RepeatFilter:
    """Put one RepeatFilter on each named logger (after logging is configured: dictConfig resets filters)."""
    repeat = RepeatFilter(window_s)
    for name in loggers:
        logging.getLogger(name).addFilter(repeat)
    return repeat
