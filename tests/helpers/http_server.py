"""A loopback file server for download tests, with a hit log and fault injection.

``FileServer`` runs ``http.server.ThreadingHTTPServer`` on ``127.0.0.1:0`` in a daemon thread
(HTTP/1.1, keep-alive). Register a body per path with :meth:`FileServer.add` and choose faults
per route; every request is recorded (method, path, headers, status, body bytes sent).

Usage in a test module::

    from http_server import FileServer

    @pytest.fixture
    def server():
        with FileServer() as srv:
            yield srv

    def test_x(server):
        server.add("/f.bin", b"data", statuses=[503], drop_after=2)
        ...
        assert server.hits("/f.bin") == 3

Faults (all per route, all optional):

* ``statuses=[500, 503]``: answer the next requests with these codes, then normally.
* ``drop_after=N`` (``drop_times=K``): send all headers (full Content-Length) and N body bytes,
  then close the connection; the first K body responses do this.
* ``wrong_bytes=True``: flip one byte in the middle of the body (same length).
* ``delay=s``: sleep before each chunk of ``chunk_size`` bytes; ``header_delay=s``: sleep before
  the status line; ``header_trickle=s``: send the status line and headers one byte every ``s``
  seconds (every read gets a byte in time; the headers never end in time).
* ``ranges=False``: ignore ``Range`` and always answer 200 with the whole body.
* ``redirect="/other"``: answer 302 to that location (relative or absolute).
* ``retry_after="1"``: send this ``Retry-After`` with injected 429/503 answers.
* ``no_length=True``: send no ``Content-Length``; the body ends when the connection closes.

Also here: :class:`HangingServer` (accepts TCP connections and never answers) and
:func:`routed_session` (a ``requests`` session that sends the requests for other origins, such
as ``https://api.github.com`` or a remote-looking mirror, to a loopback :class:`FileServer`).

A range starting at or past the end gets 416 with ``Content-Range: bytes */<size>``.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import requests
from requests.adapters import HTTPAdapter

__all__ = ["FileServer", "HangingServer", "Hit", "Route", "routed_session"]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DEFAULT_CHUNK = 64 * 1024


@dataclass
class Route:
    """What one path serves and which faults it injects."""

    body: bytes | Path
    content_type: str = "application/octet-stream"
    statuses: list[int] = field(default_factory=list)
    drop_after: int | None = None
    drop_times: int = 1
    wrong_bytes: bool = False
    delay: float = 0.0
    header_delay: float = 0.0
    header_trickle: float = 0.0
    chunk_size: int = _DEFAULT_CHUNK
    ranges: bool = True
    redirect: str | None = None
    retry_after: str | None = None
    no_length: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.body.stat().st_size if isinstance(self.body, Path) else len(self.body)


@dataclass
class Hit:
    """One request the server saw."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    bytes_sent: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    """Set once the handler has finished with this request (``bytes_sent`` is final)."""

    def header(self, name: str) -> str | None:
        """A request header, case-insensitively."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


class LoopbackServer:
    """An HTTP server on ``127.0.0.1:<free port>``, served by a daemon thread; a context manager.

    Subclasses set up their state, then call ``super().__init__`` with their handler class.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileServer(LoopbackServer):
    """Thread-served loopback HTTP server; a context manager. See the module docstring."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._log: list[Hit] = []
        self._lock = threading.Lock()
        super().__init__(_make_handler(self))

    def reset(self) -> None:
        """Forget every route and the request log (reuse one server across tests)."""
        with self._lock:
            self._routes.clear()
            self._log.clear()

    # -- routes ------------------------------------------------------------------------------
    def add(self, path: str, body: bytes | Path, **faults: Any) -> Route:
        """Serve ``body`` at ``path`` (exact match, query ignored); returns the mutable route."""
        route = Route(body=body, **faults)
        with self._lock:
            self._routes[_norm(path)] = route
        return route

    def add_json(self, path: str, obj: Any, **faults: Any) -> Route:
        faults.setdefault("content_type", "application/json")
        return self.add(path, json.dumps(obj).encode(), **faults)

    def route(self, path: str) -> Route:
        return self._routes[_norm(path)]

    def url_for(self, path: str) -> str:
        return self.url + path

    # -- what happened -----------------------------------------------------------------------
    @property
    def log(self) -> list[Hit]:
        with self._lock:
            return list(self._log)

    def requests_for(self, path: str, *, settle: float = 2.0) -> list[Hit]:
        """Requests for ``path``, after waiting up to ``settle`` s for their handlers to finish.

        The client can see the last byte before the handler thread has counted it.
        """
        wanted = _norm(path)
        found = [h for h in self.log if h.path == wanted]
        deadline = time.monotonic() + settle
        for hit in found:
            hit.done.wait(max(deadline - time.monotonic(), 0))
        return found

    def hits(self, path: str | None = None) -> int:
        """Requests seen for ``path`` (all paths when None); does not wait for handlers."""
        return len(self.log) if path is None else len(self.requests_for(path, settle=0))

    def bytes_sent(self, path: str) -> int:
        return sum(h.bytes_sent for h in self.requests_for(path))

    # -- internals used by the handler -------------------------------------------------------
    def _record(self, hit: Hit) -> Route | None:
        with self._lock:
            self._log.append(hit)
            return self._routes.get(hit.path)

    def _next_fault_status(self, route: Route) -> int | None:
        with self._lock:
            return route.statuses.pop(0) if route.statuses else None

    def _take_drop(self, route: Route) -> int | None:
        with self._lock:
            if route.drop_after is None or route.drop_times <= 0:
                return None
            route.drop_times -= 1
            return route.drop_after


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or drop keep-alive connections are part of the tests.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _norm(path: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(path).path)


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean

        trickle = 0.0

        def flush_headers(self) -> None:
            buffered: list[bytes] = getattr(self, "_headers_buffer", [])
            if not self.trickle or not buffered:
                super().flush_headers()
                return
            data = b"".join(buffered)
            buffered.clear()
            for index in range(len(data)):
                self.wfile.write(data[index : index + 1])
                time.sleep(self.trickle)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _simple(self, hit: Hit, status: int, body: bytes = b"", **headers: str) -> None:
            hit.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)
                hit.bytes_sent += len(body)

        def _serve(self, *, head: bool) -> None:
            hit = Hit(self.command, _norm(self.path), dict(self.headers.items()))
            route = server._record(hit)
            try:
                self._respond(hit, route, head=head)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.close_connection = True
            finally:
                hit.done.set()

        def _respond(self, hit: Hit, route: Route | None, *, head: bool) -> None:
            if route is None:
                self._simple(hit, 404, b"not found")
                return
            if route.header_delay:
                time.sleep(route.header_delay)
            self.trickle = route.header_trickle
            fault = server._next_fault_status(route)
            if fault is not None:
                extra = {"Retry_After": route.retry_after} if route.retry_after else {}
                self._simple(hit, fault, f"injected {fault}".encode(), **extra)
                return
            if route.redirect is not None:
                self._simple(hit, 302, Location=route.redirect)
                return
            size = route.size
            start, end = 0, size - 1
            status = 200
            requested = self.headers.get("Range")
            if requested and route.ranges:
                match = _RANGE_RE.match(requested.strip())
                if match and (match.group(1) or match.group(2)):
                    if match.group(1):
                        start = int(match.group(1))
                        if match.group(2):
                            end = min(int(match.group(2)), size - 1)
                    else:  # suffix range: the last N bytes
                        start = max(size - int(match.group(2)), 0)
                    if start >= size or start > end:
                        self._simple(hit, 416, Content_Range=f"bytes */{size}")
                        return
                    status = 206
            length = end - start + 1 if size else 0
            hit.status = status
            self.send_response(status)
            self.send_header("Content-Type", route.content_type)
            if route.no_length:
                # No length: the body is everything until the server closes the connection.
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes" if route.ranges else "none")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            for key, value in route.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if head or not length:
                return
            drop = server._take_drop(route)
            limit = length if drop is None else min(drop, length)
            self._send_body(hit, route, start, limit)
            if drop is not None:
                # Headers promised `length` bytes; closing early is what a broken link looks like.
                self.close_connection = True

        def _send_body(self, hit: Hit, route: Route, start: int, count: int) -> None:
            plain = not (route.wrong_bytes or route.delay)
            if isinstance(route.body, Path) and plain:
                with route.body.open("rb") as fh:
                    sent = self.connection.sendfile(fh, start, count)
                hit.bytes_sent += sent
                return
            data = route.body.read_bytes() if isinstance(route.body, Path) else route.body
            if route.wrong_bytes and data:
                corrupt = bytearray(data)
                corrupt[len(corrupt) // 2] ^= 0xFF
                data = bytes(corrupt)
            view = memoryview(data)[start : start + count]
            for offset in range(0, len(view), route.chunk_size):
                if route.delay:
                    time.sleep(route.delay)
                piece = view[offset : offset + route.chunk_size]
                self.wfile.write(piece)
                hit.bytes_sent += len(piece)

    return Handler


class HangingServer:
    """A TCP server on ``127.0.0.1:0`` that accepts connections and never sends a byte.

    What a wedged proxy or an overloaded mirror looks like: the connection succeeds, the request
    is sent, and no answer ever comes. ``connections`` counts the accepted connections.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._held)

    def wait_connections(self, count: int, timeout: float = 2.0) -> int:
        """``connections`` once it reaches ``count`` (or ``timeout`` s pass): accepting lags."""
        deadline = time.monotonic() + timeout
        while len(self._held) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self._held)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)  # kept open and never read or answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ToServer(HTTPAdapter):
    """Sends every request to ``target`` (scheme, host and port), keeping path and query."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self._target = urllib.parse.urlsplit(target)

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        parts = urllib.parse.urlsplit(request.url or "")
        request.url = urllib.parse.urlunsplit(
            (self._target.scheme, self._target.netloc, parts.path, parts.query, "")
        )
        return super().send(request, **kwargs)


def routed_session(server: FileServer, *origins: str) -> requests.Session:
    """A session whose requests to ``origins`` (e.g. ``https://api.github.com``) reach ``server``.

    The code under test sees the URLs it asked for (a remote host, https); the bytes come from
    the loopback server, which records the requests under their paths as usual.
    """
    session = requests.Session()
    for origin in origins:
        session.mount(origin.rstrip("/") + "/", _ToServer(server.url))
    return session
