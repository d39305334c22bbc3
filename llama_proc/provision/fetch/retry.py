"""Retry policy for HTTP transfers.

Which failures are retried, how many times in a row, and how long to wait between tries.
"""

from __future__ import annotations

from typing import Final

ATTEMPTS: Final = 5
"""Consecutive failed requests (no new bytes) before giving up."""


DNS_ATTEMPTS: Final = 2
"""Tries for a host name that does not resolve: it rarely starts resolving within seconds, and
an offline host would otherwise wait out the whole backoff before falling back."""


NO_ANSWER_ATTEMPTS: Final = 2
"""Tries for a server that does not connect or does not answer in time: a wedged server
rarely recovers within seconds, and each try costs a whole deadline."""


HOST_NOT_FOUND: Final = "host name not found"


MAX_REQUESTS: Final = 30
"""Hard cap on requests for one download, even when each one makes progress."""


BACKOFF_BASE: Final = 0.5


BACKOFF_MAX: Final = 10.0


RETRY_AFTER_MAX: Final = 30.0
"""A server's ``Retry-After`` is honoured up to this many seconds."""


def _attempts_for(reason: str) -> int:
    return DNS_ATTEMPTS if reason == HOST_NOT_FOUND else ATTEMPTS


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _backoff(failures: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), RETRY_AFTER_MAX)
    return float(min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _RetryableError(Exception):
    """One request failed in a way worth retrying (up to ``attempts`` times in a row)."""

    def __init__(
        self, reason: str, retry_after: float | None = None, attempts: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.attempts = _attempts_for(reason) if attempts is None else attempts


class _RestartError(Exception):
    """The part was discarded; start again from byte 0 at once."""
