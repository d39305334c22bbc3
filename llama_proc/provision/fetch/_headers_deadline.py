"""One deadline for a request's connection, status line and headers together.

``requests`` and urllib3 bound each socket read, never a sequence of them, so a server that
sends one header byte every few seconds is never timed out. Sessions made by
:func:`llama_proc.provision.fetch.download.make_session` mount :func:`watched_adapter`, whose
connection pools note the connection that each request takes; :func:`headers_deadline` arms
a timer that shuts that connection's socket down when the deadline passes, which ends the
blocked read at once. A session from elsewhere (without the adapter) keeps only the per-read
timeouts.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from functools import cache
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

    from requests.adapters import HTTPAdapter

__all__ = ["HeadersWatch", "headers_deadline", "watched_adapter"]

RECHECK_INTERVAL: Final = 0.05
"""Seconds between looks at a connection still connecting when the deadline passed."""

_local = threading.local()


class HeadersWatch:
    """The deadline for one request's headers; ``fired`` once it cut the connection."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._conn: Any = None
        self._done = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        self._arm(self.seconds)

    def attach(self, conn: object) -> None:
        """The connection the request now uses (a redirect takes another)."""
        with self._lock:
            self._conn = conn

    def finish(self) -> None:
        """The headers arrived (or the request failed): the deadline no longer applies."""
        with self._lock:
            self._done = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _arm(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True
        with self._lock:
            if self._done:
                return
            self._timer = timer
        timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            sock = getattr(self._conn, "sock", None)
        if sock is None:
            # Still connecting (the connect timeout bounds that): cut it once it has a socket.
            self._arm(RECHECK_INTERVAL)
            return
        # socket.socket's own shutdown, not SSLSocket's (which unwraps the TLS state under
        # the reading thread's feet): the blocked read sees end-of-file and fails.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


@contextlib.contextmanager
def headers_deadline(seconds: float) -> Iterator[HeadersWatch]:
    """Cut the request made inside the block if its headers take more than ``seconds``.

    Covers the requests this thread makes through a :func:`watched_adapter` (redirects
    included). After the block, ``watch.fired`` says whether the deadline cut it.
    """
    watch = HeadersWatch(seconds)
    previous = getattr(_local, "watch", None)
    _local.watch = watch
    watch.start()
    try:
        yield watch
    finally:
        watch.finish()
        _local.watch = previous


@cache
def _pool_classes() -> dict[str, type[Any]]:
    from urllib3.connectionpool import (  # noqa: PLC0415 - heavy; a cache hit never needs it
        HTTPConnectionPool,
        HTTPSConnectionPool,
    )

    def watched(base: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
        class Pool(base):  # type: ignore[valid-type,misc]
            def _get_conn(self, timeout: float | None = None) -> Any:
                conn = super()._get_conn(timeout)
                watch: HeadersWatch | None = getattr(_local, "watch", None)
                if watch is not None:
                    watch.attach(conn)
                return conn

        Pool.__name__ = Pool.__qualname__ = f"Watched{base.__name__}"
        return Pool

    return {"http": watched(HTTPConnectionPool), "https": watched(HTTPSConnectionPool)}


def watched_adapter() -> HTTPAdapter:
    """A ``requests`` adapter whose connections :func:`headers_deadline` can cut."""
    from requests.adapters import HTTPAdapter  # noqa: PLC0415 - heavy; see above
    from urllib3 import PoolManager, ProxyManager  # noqa: PLC0415 - comes with requests

    pools = _pool_classes()

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
            manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
            if type(manager) is ProxyManager:  # SOCKS managers bring pools of their own
                manager.pool_classes_by_scheme = pools
            return manager

    return Adapter()
