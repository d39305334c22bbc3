"""Cheap readiness probes for llama-server's ``/health`` route.

llama-server opens its HTTP socket before it loads the model; until the model is ready every
route answers 503 ``{"error": {"message": "Loading model", ...}}``, then ``/health`` answers
200 ``{"status": "ok"}``. ``/health`` needs no API key. The probe here is one raw HTTP/1.1
request on a fresh socket (no connection pool, no library import): at a 10 ms poll interval
the probe's own cost matters more than its elegance.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "HEALTH_PATH",
    "client_host",
    "format_url",
    "probe_health",
    "wait_until_healthy",
]

HEALTH_PATH: Final = "/health"
PROBE_TIMEOUT: Final = 2.0
"""Seconds to connect and to read the status line of one probe."""
POLL_INTERVAL: Final = 0.01
"""Seconds between probes while waiting for readiness."""
_MAX_STATUS_LINE: Final = 1024


def client_host(host: str) -> str:
    """The address a local client should connect to for a server bound to ``host``.

    Wildcard binds (``0.0.0.0``, ``::``) are reached through loopback.
    """
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 - recognising the wildcard, not binding it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def format_url(host: str, port: int, scheme: str = "http") -> str:
    """``http://host:port`` with IPv6 literals bracketed."""
    host = client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def probe_health(
    host: str, port: int, path: str = HEALTH_PATH, timeout: float = PROBE_TIMEOUT
) -> int | None:
    """GET ``path`` once; return the HTTP status, or None if nothing answered.

    None covers connection refused (not listening yet), resets and timeouts.
    """
    address = client_host(host)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {address}:{port}\r\nConnection: close\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode("ascii")
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(request)
            data = b""
            while b"\r\n" not in data and len(data) < _MAX_STATUS_LINE:
                chunk = sock.recv(_MAX_STATUS_LINE)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    parts = data.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    with contextlib.suppress(ValueError):
        return int(parts[1])
    return None


def wait_until_healthy(
    host: str,
    port: int,
    *,
    deadline: float | None,
    is_alive: Callable[[], bool],
    path: str = HEALTH_PATH,
    interval: float = POLL_INTERVAL,
) -> bool:
    """Poll ``path`` until it answers 200; stop early when ``is_alive()`` turns False.

    Args:
        host: server address.
        port: server port.
        deadline: ``time.monotonic()`` value to give up at; None = no limit.
        is_alive: checked before every probe (e.g. ``lambda: proc.poll() is None``).
        path: the route to probe.
        interval: seconds between probes.

    Returns:
        True once healthy; False when the process died or the deadline passed.
    """
    while is_alive():
        if probe_health(host, port, path) == 200:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return False
