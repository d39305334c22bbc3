"""The lines a llama-server printed: a bounded, thread-safe buffer with the time of its last output.

Read by the readiness and stall checks, the crash report and ``LlamaServer.logs()``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from typing import Final

LOG_CAPACITY: Final = 2000
"""Lines of server output kept in memory."""

_LISTENING: Final = re.compile(
    r"listening on (?:https?://)?\[?(?P<host>[^\s\]]*?)\]?:(?P<port>\d+)"
)


class LogBuffer:
    """Thread-safe ring buffer of output lines, with the time of the last output."""

    def __init__(self, capacity: int = LOG_CAPACITY) -> None:
        self._lines: deque[str] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.last_activity = time.monotonic()
        """``time.monotonic()`` of the latest output (bytes, not only whole lines)."""
        self.total = 0
        """Lines appended since creation (including those pushed out of the buffer)."""
        self.listening: tuple[str, int] | None = None
        """(host, port) from the first "listening on" line, if any."""
        self.listening_seen = threading.Event()
        """Set with :attr:`listening`: lets a waiter probe at once instead of at its next tick."""

    def touch(self) -> None:
        """Record output activity that has not completed a line yet."""
        self.last_activity = time.monotonic()

    def append(self, line: str) -> None:
        """Add one line."""
        if self.listening is None:
            match = _LISTENING.search(line)
            if match:
                self.listening = (match.group("host"), int(match.group("port")))
                self.listening_seen.set()
        with self._lock:
            self._lines.append(line)
            self.total += 1
        self.last_activity = time.monotonic()

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines (all kept lines when None)."""
        with self._lock:
            lines = list(self._lines)
        return lines if n is None else lines[-n:] if n > 0 else []
