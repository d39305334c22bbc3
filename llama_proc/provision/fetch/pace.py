"""Progress and pace of one transfer: the whole-transfer time budget and the progress bar."""

from __future__ import annotations

import sys
import time
from typing import Any, Final

from llama_proc.errors import DownloadError

TOTAL_TIME_FLOOR: Final = 300.0
"""Seconds any one transfer may take in all, whatever its size (plus the size's share below)."""

MIN_AVERAGE_RATE: Final = 50_000
"""Bytes per second a transfer must average over its whole life (beyond the floor): a stream
that stalls again and again, or trickles, fails instead of going on for hours."""


class _Pace:
    """The whole-transfer bound: the floor plus the size's share at the minimum average rate."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started = time.monotonic()
        self.total: int | None = None
        """The size, once a listing or the server said it."""

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self, received: int) -> float:
        """Seconds left of the budget, for the next wait (headers included)."""
        return self._budget(received, self.total) - self.elapsed

    def _budget(self, received: int, total: int | None) -> float:
        return TOTAL_TIME_FLOOR + max(total or 0, received) / MIN_AVERAGE_RATE

    def check(self, received: int, total: int | None) -> None:
        if total is not None:
            self.total = total
        total = self.total
        budget = self._budget(received, total)
        elapsed = self.elapsed
        if elapsed > budget:
            of = f"{total} bytes" if total is not None else "an unknown size"
            msg = (
                f"download of {self.url} is too slow: {received} of {of} in {elapsed:.1f} s "
                f"(the floor is {MIN_AVERAGE_RATE // 1000} kB/s on average); try again later "
                "or use a closer LLAMA_PROC_MIRROR"
            )
            raise DownloadError(msg)


def _progress_bar(total: int | None, initial: int, desc: str, *, enabled: bool | None) -> Any:
    from tqdm import tqdm  # noqa: PLC0415 - heavy; only a transfer needs it

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        # None lets tqdm hide itself when stderr is not a terminal.
        disable=None if enabled is None else not enabled,
        leave=False,
    )
