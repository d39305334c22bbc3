"""The time limits of one client request, shared by the sync and async clients.

The longest silence, the whole request's deadline, and telling a dead server from a slow one,
so both clients name the limit that ran out the same way.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Final

from llama_proc.errors import (
    ServerExitedError,
    ServerRequestError,
    ServerStartError,
    ServerTimeoutError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import requests

TOTAL_SLACK: Final = 0.05
"""A timed-out read this close to the total deadline counts as the total deadline's doing."""
REQUEST_TIMEOUT: Final = 600.0
"""Default longest silence, in seconds, before a request fails (a prompt can take long to
process on CPU before the first byte; a stream that keeps producing tokens is never cut)."""

CONNECT_TIMEOUT: Final = 10.0
"""Seconds to establish a connection."""

KEEPALIVE_TIMEOUT: Final = 3.0
"""Seconds an idle pooled connection is reused; below llama-server's own 5 s limit."""

EXIT_GRACE: Final = 0.5
"""Seconds a request that failed without an HTTP answer waits for the server's exit status."""

EXIT_POLL: Final = 0.02


def _exited(
    err: ServerRequestError, check: Callable[[ServerRequestError], None] | None
) -> ServerExitedError | None:
    """Let the server's owner look at a failure without an HTTP answer (both clients).

    An owner that finds the process gone raises :class:`ServerStartError` (exit code, cause,
    log tail); a request in flight saw the server *exit*, so that becomes one
    :class:`ServerExitedError`, whichever client and whichever way the connection broke.
    """
    if check is None:
        return None
    try:
        check(err)
    except ServerStartError as dead:
        return ServerExitedError("llama-server", dead.returncode, dead.cause, dead.log_tail)
    return None


class _Limits:
    """The two time limits of one request: the longest silence and the whole request."""

    def __init__(self, what: str, silence: float | None, total: float | None) -> None:
        self.what = what
        self.silence = silence
        self.total = total
        self.started = time.monotonic()

    def left(self) -> float | None:
        if self.total is None:
            return None
        return max(self.total - (time.monotonic() - self.started), 0.0)

    def read_timeout(self) -> float | None:
        """The next read's timeout: the silence limit, cut to what is left of the total."""
        left = self.left()
        if left is None:
            return self.silence
        return left if self.silence is None else min(self.silence, left)

    def overdue(self) -> bool:
        left = self.left()
        return left is not None and left <= TOTAL_SLACK

    def error(self) -> ServerTimeoutError:
        """The error for a timed-out read or an overdue request, naming the limit."""
        what = self.what
        elapsed = time.monotonic() - self.started
        if self.overdue() or self.silence is None:
            msg = (
                f"{what}: not finished within its total timeout of {self.total:g} s "
                f"(total_timeout; request_total_timeout on a server); raise it, or leave it "
                "unset to bound only silences"
            )
        else:
            msg = (
                f"{what}: llama-server sent nothing for {self.silence:g} s, the longest "
                f"silence allowed (timeout; request_timeout on a server), {elapsed:.1f} s into "
                "the request; the server may be wedged or overloaded, or the prompt needs a "
                "longer timeout"
            )
        return ServerTimeoutError(msg)


def _read_timed_out(err: BaseException) -> bool:
    """Whether a requests/urllib3 error (at any depth) is a read that timed out."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        name = type(item).__name__
        if isinstance(item, TimeoutError) or name in ("ReadTimeout", "ReadTimeoutError"):
            return True
        todo.extend([item.__cause__, item.__context__, *item.args])
    return False


def _set_read_timeout(response: requests.Response, seconds: float | None) -> None:
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def _worth_checking(err: ServerRequestError, check: object) -> bool:
    return err.status is None and check is not None and not isinstance(err, ServerExitedError)
