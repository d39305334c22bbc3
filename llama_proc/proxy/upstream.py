"""The proxy's connections to its llama-servers: a lean HTTP/1.1 client with warm sockets.

llama-server (cpp-httplib, b11434) keeps a connection open after a plain JSON answer, but
closes it after every event stream (while advertising keep-alive), and drops a connection
that stays idle for 5 s. So, per server (:class:`UpstreamConnections`):

* a connection that carried a JSON answer with keep-alive is reused (most recent first) and
  retired after :data:`IDLE_LIMIT` seconds idle, before the server drops it;
* a stream is sent with ``Connection: close`` on any idle connection, and a replacement is
  opened in the background at once (up to :data:`MAX_SPARES` per server), so the next
  request finds a connected socket instead of paying for the connect;
* a socket that the server closed, or that is older than :data:`IDLE_LIMIT` unused, is
  discarded when it is taken; a request on a reused socket that fails before any response
  byte (the server closed it just as it was sent) is sent once more on a new one.

The request goes out in one write and the response is parsed here (status, headers,
``Content-Length`` or chunked body) without aiohttp's client machinery, which costs more
per request than the rest of the proxy. Bodies are passed on as received, undecoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final, cast

from llama_proc.errors import ServerRequestError

__all__ = [
    "IDLE_LIMIT",
    "MAX_SPARES",
    "UpstreamConnectionError",
    "UpstreamConnections",
    "UpstreamResponse",
]

IDLE_LIMIT: Final = 3.0
"""Seconds a socket may sit unused before it is discarded (llama-server drops it at 5 s)."""
MAX_SPARES: Final = 4
"""Most sockets opened ahead of time per server (for streams, which use a socket up)."""
MAX_IDLE: Final = 32
"""Most idle sockets kept per server (kept-alive ones and spares together)."""
CONNECT_TIMEOUT: Final = 10.0
MAX_HEAD_BYTES: Final = 64 * 1024
"""Longest response head (status line and headers) accepted from a server."""
READ_HIGH_WATER: Final = 1024 * 1024
"""Buffered response bytes at which reading from the server pauses until the proxy catches up."""
WRITE_JOIN_BYTES: Final = 64 * 1024
"""Bodies shorter than this go out in the same write as the request head."""
_FORBIDDEN: Final = frozenset("\r\n\0")


class UpstreamConnectionError(ServerRequestError):
    """The connection to a llama-server failed or broke.

    Attributes:
        before_response: True when nothing of the response had arrived (a retry is safe).
    """

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class _Connection(asyncio.Protocol):
    """One TCP connection to a server; bytes received wait in a buffer for the response."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = loop.time()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is no asyncio.Transport subclass, so no isinstance).
        self.transport = cast("asyncio.Transport", transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def usable(self, now: float) -> bool:
        """Whether this idle socket may carry a request now (open and not stale)."""
        return (
            not self.closed
            and not self.buffer
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < IDLE_LIMIT
        )

    async def more(self) -> bool:
        """Wait for bytes beyond those buffered; False when the server closed the connection."""
        if self.closed:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        have = len(self.buffer)
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        return len(self.buffer) > have

    def take(self, limit: int = -1) -> bytes:
        """Up to ``limit`` buffered bytes (all when negative), removed from the buffer."""
        buffer = self.buffer
        if limit < 0 or limit >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:limit])
            del buffer[:limit]
        return data

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """A server's answer: status and headers read, the body read with :meth:`readany`.

    Call :meth:`release` after reading the whole body (the socket may be reused), or
    :meth:`close` to drop the connection (which makes llama-server stop generating).
    """

    def __init__(
        self, pool: UpstreamConnections, conn: _Connection, status: int, headers: dict[str, str]
    ) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status
        self.headers = headers
        """Response headers, names in lower case."""
        self._keep_alive = "close" not in headers.get("connection", "").lower()
        self._length = -1  # bytes left in a Content-Length body or the current chunk
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._until_close = False
        self.at_eof = False
        if not self._chunked:
            length = headers.get("content-length")
            if length is not None and length.strip().isdigit():
                self._length = int(length)
                self.at_eof = self._length == 0
            elif status in (204, 304) or 100 <= status < 200:
                self.at_eof = True
            else:
                self._until_close = True
                self._keep_alive = False

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := await self.readany():
            parts.append(piece)
        return b"".join(parts)

    async def readany(self) -> bytes:
        """The next body bytes as they arrive (chunk framing removed); b"" at the end.

        Raises:
            UpstreamConnectionError: the server closed the connection mid-body.
        """
        if self.at_eof:
            return b""
        conn = self._conn
        if self._chunked:
            return await self._read_chunked()
        if not conn.buffer and not await conn.more():
            if self._until_close:
                self.at_eof = True
                return b""
            raise self._broken()
        if self._until_close:
            return conn.take()
        data = conn.take(self._length)
        self._length -= len(data)
        if self._length == 0:
            self._finish()
        return data

    async def _read_chunked(self) -> bytes:
        conn = self._conn
        buffer = conn.buffer
        parts: list[bytes] = []
        while True:
            if self._length > 0:
                if not buffer:
                    if parts:
                        break
                    if not await conn.more():
                        raise self._broken()
                data = conn.take(self._length)
                self._length -= len(data)
                parts.append(data)
                continue
            # Between chunks: the CRLF closing the last chunk (if any), then a size line.
            end = buffer.find(b"\r\n", 0 if self._length < 0 else 2)
            if end < 0:
                if parts:
                    break
                if len(buffer) > MAX_HEAD_BYTES or not await conn.more():
                    raise self._broken()
                continue
            start = 0 if self._length < 0 else 2
            if self._length == 0 and bytes(buffer[:2]) != b"\r\n":
                msg = "a chunk did not end with CRLF"
                raise self._broken(msg)
            size_text = bytes(buffer[start:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                msg = "a chunk size is not hexadecimal"
                raise self._broken(msg) from None
            del buffer[: end + 2]
            if size == 0:
                await self._skip_trailers()
                self._finish()
                break
            self._length = size
        return b"".join(parts)

    async def _skip_trailers(self) -> None:
        conn = self._conn
        while True:
            end = conn.buffer.find(b"\r\n")
            if end == 0:
                del conn.buffer[:2]
                return
            if end > 0:
                del conn.buffer[: end + 2]
                continue
            if len(conn.buffer) > MAX_HEAD_BYTES or not await conn.more():
                raise self._broken()

    def _broken(self, why: str = "the server closed the connection mid-response") -> Exception:
        self.close()
        return UpstreamConnectionError(why, before_response=False)

    def _finish(self) -> None:
        self.at_eof = True
        self._length = -1

    def release(self) -> None:
        """Give the connection back for reuse when the body was read and the server allows."""
        conn, self._conn = self._conn, _CLOSED
        if conn is _CLOSED:
            return
        if self.at_eof and self._keep_alive and not conn.buffer and not conn.closed:
            self._pool._put(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Drop the connection (idempotent): an unfinished request is cancelled upstream."""
        conn, self._conn = self._conn, _CLOSED
        conn.abort()


class UpstreamConnections:
    """Kept-alive and pre-opened connections to one server (see the module docstring).

    Args:
        host: the server's address.
        port: its port.
        max_spares: sockets opened ahead of time for streams (0 = open on demand only).
        max_idle: idle sockets kept at most.
    """

    def __init__(
        self, host: str, port: int, *, max_spares: int = MAX_SPARES, max_idle: int = MAX_IDLE
    ) -> None:
        self.host = host
        self.port = port
        self.max_spares = max_spares
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._opening = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._host_header = f"Host: {host}:{port}\r\n".encode("ascii")
        self.connects = 0
        """Connections opened so far (for tests and the bench)."""

    async def request(
        self, path: str, body: bytes, headers: dict[str, str], *, stream: bool = False
    ) -> UpstreamResponse:
        """Send ``POST path`` and return once the response head has arrived.

        Args:
            path: the request path.
            body: the request body.
            headers: extra request headers (a value with CR, LF or NUL is left out).
            stream: the answer is an event stream (after which llama-server closes the
                connection): sent with ``Connection: close``, and a spare socket is opened.

        Raises:
            UpstreamConnectionError: the connection failed before the response head.
        """
        head = self._head(path, body, headers, close=stream)
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            conn = self._take(loop.time())
            if stream:
                self._replenish()
            if conn is not None:
                try:
                    return await self._send(conn, head, body)
                except UpstreamConnectionError as err:
                    if not err.before_response:
                        raise
                    # A reused socket the server closed just as the request went out.
            return await self._send(await self._connect(), head, body)
        finally:
            self._in_flight -= 1

    def _head(self, path: str, body: bytes, headers: dict[str, str], *, close: bool) -> bytes:
        lines = [f"POST {path} HTTP/1.1\r\n".encode("ascii", "replace"), self._host_header]
        for name, value in headers.items():
            if _FORBIDDEN.isdisjoint(value):
                with contextlib.suppress(UnicodeEncodeError):
                    lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        return b"".join(lines)

    def _take(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.abort()
        return None

    def _put(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    def _replenish(self) -> None:
        """Open sockets in the background until the spares cover the requests in flight."""
        wanted = min(self.max_spares, self._in_flight)
        while not self._closed and len(self._idle) + self._opening < wanted:
            self._opening += 1
            task = asyncio.get_running_loop().create_task(self._open_spare())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_spare(self) -> None:
        try:
            conn = await self._connect()
        except UpstreamConnectionError:
            return
        finally:
            self._opening -= 1
        # A spare is "fresh" until it carries a request: its age counts from the connect.
        if self._closed or len(self._idle) >= self.max_idle:
            conn.abort()
        else:
            self._idle.insert(0, conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port
                )
        except (OSError, TimeoutError) as err:
            msg = f"cannot connect to {self.host}:{self.port}: {err or type(err).__name__}"
            raise UpstreamConnectionError(msg, before_response=True) from None
        self.connects += 1
        return conn

    async def _send(self, conn: _Connection, head: bytes, body: bytes) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None  # noqa: S101 - connected
        try:
            if len(body) < WRITE_JOIN_BYTES:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            end = await _head_end(conn)
        except BaseException:
            conn.abort()
            raise
        head_bytes = conn.take(end + 4)
        status, headers = _parse_head(head_bytes)
        if status < 0:
            conn.abort()
            msg = "the server's response is not HTTP/1.x"
            raise UpstreamConnectionError(msg, before_response=False)
        return UpstreamResponse(self, conn, status, headers)

    def idle_count(self) -> int:
        """Idle sockets held now (for tests)."""
        return len(self._idle)

    async def close(self) -> None:
        """Close every idle socket and stop opening new ones."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _head_end(conn: _Connection) -> int:
    """Where the response head ends in ``conn.buffer`` (the index of its blank line)."""
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        if end >= 0:
            return end
        if len(conn.buffer) > MAX_HEAD_BYTES:
            msg = f"the response head is longer than {MAX_HEAD_BYTES} bytes"
            raise UpstreamConnectionError(msg, before_response=False)
        if not await conn.more():
            msg = "the server closed the connection before answering"
            raise UpstreamConnectionError(msg, before_response=not conn.buffer)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names) from a response head; status -1 if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return -1, {}
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if parts[0] == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
        headers["connection"] = "close"
    return int(parts[1]), headers


_CLOSED: Final = _Connection.__new__(_Connection)
_CLOSED.closed = True
_CLOSED.transport = None
_CLOSED.buffer = bytearray()
