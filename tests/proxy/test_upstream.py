"""The proxy's upstream client against a raw server that behaves like llama-server b11434.

The server keeps a connection alive after a JSON answer, closes it after every chunked event
stream, and records each connection and the exact bytes it sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llama_proc.proxy import upstream as upstream_mod
from llama_proc.proxy.upstream import UpstreamConnectionError, UpstreamConnections

CHUNKS = [b'data: {"a": 1}\n\n', b"data: " + b"x" * 5000 + b"\n\n", b"data: [DONE]\n\n"]
JSON = b'{"ok": true}'


class RawServer(asyncio.Protocol):
    connections: list[RawServer]

    def __init__(self, record: list[RawServer]) -> None:
        self.buffer = b""
        self.requests = 0
        self.lost = asyncio.get_running_loop().create_future()
        record.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self.requests += 1
        if b"stream" in body:
            out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nKeep-Alive: timeout=5\r\n"
            out += b"Transfer-Encoding: chunked\r\n\r\n"
            for chunk in CHUNKS:
                out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
            # Split the framing at awkward places to exercise the parser.
            out += b"0\r\n\r\n"
            if b"slow" in body:
                asyncio.get_running_loop().create_task(self._trickle(out))
                return
            self.transport.write(out)
            self.transport.close()  # like b11434 after every stream
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(JSON), JSON)
            )

    async def _trickle(self, out: bytes) -> None:
        for i in range(0, len(out), 7):
            self.transport.write(out[i : i + 7])
            await asyncio.sleep(0)
        self.transport.close()


async def _serve() -> tuple[asyncio.Server, list[RawServer], int]:
    record: list[RawServer] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: RawServer(record), "127.0.0.1", 0
    )
    return server, record, server.sockets[0].getsockname()[1]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("body", [b'{"stream": true}', b'{"stream": true, "slow": 1}'])
def test_stream_body_arrives_byte_exact_and_a_spare_is_ready(body: bytes) -> None:
    async def main() -> None:
        server, record, port = await _serve()
        conns = UpstreamConnections("127.0.0.1", port)
        for _ in range(3):
            resp = await conns.request("/v1/chat/completions", body, {}, stream=True)
            assert resp.status == 200
            assert resp.headers["content-type"] == "text/event-stream"
            assert await resp.read() == b"".join(CHUNKS)
            assert resp.at_eof
            resp.close()
            await asyncio.sleep(0.05)
            # A replacement socket was opened while the stream ran.
            assert conns.idle_count() == 1
        # The second and third streams used the socket opened ahead for them.
        assert [c.requests for c in record] == [1, 1, 1, 0]
        await conns.close()
        server.close()

    run(main())


def test_json_answers_reuse_one_kept_alive_connection() -> None:
    async def main() -> None:
        server, record, port = await _serve()
        conns = UpstreamConnections("127.0.0.1", port)
        for _ in range(5):
            resp = await conns.request("/v1/completions", b"{}", {"Content-Type": "x"})
            assert await resp.read() == JSON
            resp.release()
        assert conns.connects == 1
        assert [c.requests for c in record] == [5]
        await conns.close()
        server.close()

    run(main())


def test_stale_spare_is_discarded_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        server, record, port = await _serve()
        conns = UpstreamConnections("127.0.0.1", port)
        resp = await conns.request("/v1/chat/completions", b'{"stream": 1}', {}, stream=True)
        await resp.read()
        resp.close()
        await asyncio.sleep(0.05)
        assert conns.idle_count() == 1
        spare = record[1]
        # Past the idle limit the spare counts as stale: it is closed, and a new one used.
        monkeypatch.setattr(upstream_mod, "IDLE_LIMIT", 0.0)
        resp = await conns.request("/v1/completions", b"{}", {})
        assert await resp.read() == JSON
        resp.release()
        await asyncio.wait_for(spare.lost, 2)
        assert spare.requests == 0
        assert record[2].requests == 1
        await conns.close()
        server.close()

    run(main())


def test_socket_closed_by_the_server_is_not_reused() -> None:
    async def main() -> None:
        server, record, port = await _serve()
        conns = UpstreamConnections("127.0.0.1", port)
        resp = await conns.request("/v1/completions", b"{}", {})
        await resp.read()
        resp.release()
        record[0].transport.close()  # the server drops the idle connection
        await asyncio.sleep(0.05)
        resp = await conns.request("/v1/completions", b"{}", {})
        assert await resp.read() == JSON
        resp.release()
        assert [c.requests for c in record] == [1, 1]
        await conns.close()
        server.close()

    run(main())


def test_close_mid_body_drops_the_connection_and_refused_connect_is_an_error() -> None:
    async def main() -> None:
        server, record, port = await _serve()
        conns = UpstreamConnections("127.0.0.1", port, max_spares=0)
        resp = await conns.request("/v1/chat/completions", b'{"stream": "slow"}', {}, stream=True)
        await resp.readany()
        resp.close()
        await asyncio.wait_for(record[0].lost, 2)
        await conns.close()
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamConnectionError) as info:
            await UpstreamConnections("127.0.0.1", port).request("/x", b"", {})
        assert info.value.before_response

    run(main())


def test_header_values_with_line_breaks_are_left_out() -> None:
    conns = UpstreamConnections("127.0.0.1", 1)
    head = conns._head("/p", b"ab", {"Accept": "a\r\nX-Evil: 1", "Content-Type": "t"}, close=True)
    assert b"X-Evil" not in head
    assert head.endswith(b"Content-Type: t\r\nConnection: close\r\nContent-Length: 2\r\n\r\n")
