"""The proxy against its own clients: idle and slow connections, bad headers, deep JSON, huge
bodies. Every attack goes to 127.0.0.1 only, in bounded loops that stop by themselves; while
it runs, a normal client still gets /health and a chat answer quickly, and nothing is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import openai
import pytest
from proxy_fakes import FakeFactory
from proxy_harness import ProxyThread, running_proxy, wait_until

from llama_proc import _childenv
from llama_proc._proc import free_port
from llama_proc.errors import ConfigError, ServerExitedError, ServerRequestError
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.relay import MAX_JSON_DEPTH, json_too_deep
from llama_proc.proxy.servers import LlamaServerFactory
from llama_proc.runtime import LlamaClient, ServerArgs, ServerProcess
from llama_proc.server import AsyncLlamaServer, LlamaServer

if TYPE_CHECKING:
    from collections.abc import Iterator

MODELS = ModelsConfig({"a": ModelSpec(id="a", path=Path("/m/a.gguf"))})
KEY = "hostile-test-key"
CHAT = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}).encode()
QUICK = 2.0
"""Seconds a normal client may wait for an answer while the proxy is under attack."""


def address(proxy: ProxyThread) -> tuple[str, int]:
    host, port = proxy.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(proxy: ProxyThread, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address(proxy), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def exchange(
    proxy: ProxyThread, raw: bytes, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes or the response is complete."""
    with connect(proxy, timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            sock.sendall(raw)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = _headers(head)
                if len(body) >= int(headers.get("content-length", "-1")) >= 0:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, f"no response to {raw[:60]!r}"
    status = int(head.split(b" ", 2)[1])
    return status, _headers(head), body


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def request(
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    key: str | None = KEY,
    extra: bytes = b"",
    length: int | None = None,
) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    size = len(body) if length is None else length
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n".encode()
        + auth
        + extra
        + b"\r\n"
        + body
    )


def assert_openai_error(
    status: int, headers: dict[str, str], body: bytes, expected: int
) -> dict[str, Any]:
    assert status == expected, body[:300]
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    assert error["code"]
    return dict(error)


def timed(proxy: ProxyThread, raw: bytes) -> tuple[float, int, bytes]:
    began = time.monotonic()
    status, _, body = exchange(proxy, raw)
    return time.monotonic() - began, status, body


@contextlib.contextmanager
def hostile_proxy(**options: Any) -> Iterator[tuple[ProxyThread, FakeFactory]]:
    factory = FakeFactory()
    opts = ProxyOptions(api_keys=(KEY,), **options)
    with running_proxy(MODELS, factory, max_servers=1, options=opts) as proxy:
        yield proxy, factory


def test_json_depth_is_checked_without_parsing() -> None:
    assert not json_too_deep(b'{"a": [[1, 2], {"b": "[[[[[[[[[[[["}]}', limit=3)
    assert json_too_deep(b"[" * 5, limit=4)
    assert not json_too_deep(b"[" * 4 + b"]" * 4, limit=4)
    # brackets in strings (with escaped quotes) do not count
    text = b'{"a": "\\"' + b"[" * 100 + b'"}'
    assert not json_too_deep(text, limit=2)
    assert json.loads(text)
    # a hostile depth is found at once, however long the body
    began = time.monotonic()
    assert json_too_deep(b"[" * 8_000_000)
    assert time.monotonic() - began < 1.0
    assert not json_too_deep(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)


def test_parse_time_errors_are_openai_shaped_and_start_nothing() -> None:
    with hostile_proxy(max_body_bytes=64 * 1024) as (proxy, factory):
        # Deep JSON: refused by the depth check (json.loads would raise RecursionError -> 500).
        deep = b'{"model": "a", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        status, headers, body = exchange(proxy, request("/v1/chat/completions", deep[:60_000]))
        error = assert_openai_error(status, headers, body, 400)
        assert "deeper than 64" in error["message"]
        # Large but shallow and valid: parsed (in a thread) and routed.
        wide = json.dumps(
            {"model": "nope", "messages": [{"role": "user", "content": "x" * 50_000}]}
        ).encode()
        status, headers, body = exchange(proxy, request("/v1/chat/completions", wide))
        assert assert_openai_error(status, headers, body, 404)["code"] == "model_not_found"
        # A declared body over the limit is refused before a byte of it is read.
        elapsed, status, body = timed(
            proxy, request("/v1/chat/completions", b"{}", length=1_000_000_000)
        )
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert elapsed < QUICK
        # Not JSON, not an object.
        for bad in (b"{nope", b"[1, 2]", b'"text"'):
            status, headers, body = exchange(proxy, request("/v1/chat/completions", bad))
            assert assert_openai_error(status, headers, body, 400)["code"] == "invalid_json"
        # aiohttp's own answers: unknown route, wrong method, unparsable HTTP, huge header.
        status, headers, body = exchange(proxy, request("/nowhere", method="GET"))
        assert_openai_error(status, headers, body, 404)
        status, headers, body = exchange(proxy, request("/v1/chat/completions", method="GET"))
        assert_openai_error(status, headers, body, 405)
        status, headers, body = exchange(proxy, b"\x16\x03\x01 garbage\r\n\r\n")
        assert_openai_error(status, headers, body, 400)
        huge = b"X-Pad: " + b"p" * 20_000 + b"\r\n"
        status, headers, body = exchange(proxy, request("/health", method="GET", extra=huge))
        assert assert_openai_error(status, headers, body, 400)["code"] == "headers_too_large"
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        status, headers, body = exchange(proxy, request("/health", method="GET", extra=many))
        assert_openai_error(status, headers, body, 400)
        assert factory.starts == []


def test_non_utf8_authorization_is_401() -> None:
    with hostile_proxy() as (proxy, factory):
        for header in (b"Authorization: Bearer \xff\xfe\r\n", b"X-Api-Key: k\xe9y\r\n"):
            raw = request("/v1/chat/completions", CHAT, key=None, extra=header)
            status, headers, body = exchange(proxy, raw)
            assert assert_openai_error(status, headers, body, 401)["code"] == "invalid_api_key"
        assert factory.starts == []


def test_idle_and_slow_connections_are_closed() -> None:
    with hostile_proxy(idle_timeout=0.5) as (proxy, _):
        idle = connect(proxy)
        slow = connect(proxy)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        began = time.monotonic()
        for sock in (idle, slow):
            # The server closes the connection: recv returns b"" (or a reset).
            with sock, contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""
        assert time.monotonic() - began < 3.0


def test_connection_bound_closes_idle_connections_for_new_clients() -> None:
    with hostile_proxy(max_connections=8) as (proxy, _):
        idle = [connect(proxy) for _ in range(20)]
        try:
            # 20 idle connections against a bound of 8: the oldest idle ones were closed, and
            # a new client is served at once.
            elapsed, status, body = timed(proxy, request("/health", method="GET"))
            assert status == 200, body
            assert elapsed < QUICK
            # The closes are made as the proxy accepts each connection; collect them for a
            # bounded while (a loaded machine accepts late), reading each socket once closed.
            closed: set[int] = set()
            deadline = time.monotonic() + 10.0
            while len(closed) < 12 and time.monotonic() < deadline:
                for index, sock in enumerate(idle):
                    if index in closed:
                        continue
                    sock.settimeout(0.05)
                    try:
                        if sock.recv(1) == b"":
                            closed.add(index)
                    except ConnectionResetError:
                        closed.add(index)
                    except TimeoutError:
                        pass
            assert len(closed) >= 12
        finally:
            for sock in idle:
                sock.close()


def test_a_normal_client_is_served_during_an_attack() -> None:
    stop = threading.Event()
    sockets: list[socket.socket] = []
    with hostile_proxy(idle_timeout=2.0, max_connections=32) as (proxy, factory):

        def slowloris() -> None:
            # Trickle header lines on many connections, never finishing a request head.
            conns = []
            for _ in range(16):
                with contextlib.suppress(OSError):
                    sock = connect(proxy)
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    conns.append(sock)
            sockets.extend(conns)
            deadline = time.monotonic() + 6
            while not stop.is_set() and time.monotonic() < deadline:
                for sock in conns:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")
                stop.wait(0.1)

        def idlers() -> None:
            for _ in range(64):
                if stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    sockets.append(connect(proxy))

        def garbage() -> None:
            deep = b"[" * 100_000
            attacks = [
                request("/v1/chat/completions", deep),
                request("/v1/chat/completions", CHAT, key=None, extra=b"X-Api-Key: \xff\r\n"),
                request("/v1/chat/completions", b"{}", length=10**12),
                b"\x00\x01\x02 nonsense\r\n\r\n",
                request("/health", method="GET", extra=b"X-Pad: " + b"p" * 50_000 + b"\r\n"),
                request("/servers", method="GET"),
            ]
            deadline = time.monotonic() + 6
            while not stop.is_set() and time.monotonic() < deadline:
                for raw in attacks:
                    with contextlib.suppress(OSError, AssertionError):
                        exchange(proxy, raw, timeout=2)

        threads = [threading.Thread(target=t, daemon=True) for t in (slowloris, idlers, garbage)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            assert factory.starts == []
            for _ in range(3):
                elapsed, status, body = timed(proxy, request("/health", method="GET"))
                assert status == 200, body
                assert elapsed < QUICK
                elapsed, status, body = timed(proxy, request("/v1/chat/completions", CHAT))
                assert status == 200, body
                assert json.loads(body)["choices"][0]["message"]["content"] == "hello from a"
                assert elapsed < QUICK
            # Only the normal client's chat started a server; the attacks started nothing.
            assert factory.starts == [("a", ())]
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            for sock in sockets:
                sock.close()
        assert wait_until(lambda: len(factory.starts) == 1, 1)


@pytest.mark.parametrize("size", [1_000, 200_000])
def test_bodies_in_and_out_of_a_thread_parse_alike(size: int) -> None:
    with hostile_proxy() as (proxy, factory):
        body = json.dumps(
            {"model": "a", "messages": [{"role": "user", "content": "y" * size}]}
        ).encode()
        status, _, reply = exchange(proxy, request("/v1/chat/completions", body))
        assert status == 200, reply
        assert factory.servers[0].log.bodies[-1]["messages"][0]["content"] == "y" * size


# -- llama.cpp's own configuration -----------------------------------------------------------
HI: Any = [{"role": "user", "content": "Hi"}]
PLANTED = "[*]\napi-key = planted-config-key\nalias = planted-alias\n"
"""A llama.cpp config.ini that would lock the server behind a key and rename its model."""


def plant_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planted config.ini under $HOME/.config and another under $XDG_CONFIG_HOME, plus
    llama.cpp variables that would change the server's behaviour."""
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    for folder in (home / ".config" / "llama.cpp", xdg / "llama.cpp"):
        folder.mkdir(parents=True)
        (folder / "config.ini").write_text(PLANTED)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("LLAMA_SERVER_SLOTS_DEBUG", "1")
    monkeypatch.setenv("LLAMA_ARG_ALIAS", "planted-env-alias")


def test_planted_llama_cpp_config_has_no_effect(
    llama_server_bin: Path, smol_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant_configs(tmp_path, monkeypatch)
    # Control: the real llama-server, given the caller's environment as it is, applies it.
    args = ServerArgs(model=smol_model, ctx_size=256, threads=1)
    port = free_port()
    argv = [str(llama_server_bin), *args.to_argv(), "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess(argv, port=port, env=dict(os.environ)) as proc:
        proc.wait_ready(120)
        with pytest.raises(ServerRequestError) as refused:
            LlamaClient(proc.url).chat(HI, max_tokens=1)
        assert refused.value.status == 401
        keyed = LlamaClient(proc.url, api_key="planted-config-key")
        assert "planted-alias" in [m["id"] for m in keyed.models()["data"]]
    # Through llama-proc: neither the files nor the variables reach the server.
    with LlamaServer(
        smol_model, binary=llama_server_bin, ctx_size=256, threads=1, start_timeout=120
    ) as srv:
        names = [m["id"] for m in srv.models()["data"]]
        assert "planted-alias" not in names
        assert "planted-env-alias" not in names
        assert srv.chat(HI, max_tokens=1)["choices"]  # no key needed: none was given


def test_a_system_wide_config_refuses_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "etc-llama.cpp-config.ini"
    monkeypatch.setattr(_childenv, "SYSTEM_CONFIG", planted)
    assert _childenv.child_environment({"PATH": "/bin"})["XDG_CONFIG_HOME"] == os.devnull
    planted.write_text(PLANTED)
    with pytest.raises(ConfigError, match="move it away"):
        _childenv.child_environment({"PATH": "/bin"})


# -- a server that dies during a request ------------------------------------------------------
LONG = {"max_tokens": 4000, "ignore_eos": True}
"""A generation long enough to be killed in the middle of."""


def assert_exited(err: ServerExitedError) -> None:
    assert err.returncode == -signal.SIGKILL
    assert "exited during the request (signal SIGKILL, exit code -9)" in str(err)
    assert "last log lines" in str(err)


def test_sync_client_reports_a_server_killed_mid_stream(
    llama_server_bin: Path, smol_model: Path
) -> None:
    with LlamaServer(
        smol_model, binary=llama_server_bin, ctx_size=4096, threads=1, start_timeout=120
    ) as srv:
        stream = srv.chat_stream(HI, **LONG)
        next(stream)
        assert srv.pid is not None
        os.kill(srv.pid, signal.SIGKILL)
        with pytest.raises(ServerExitedError) as info:
            for _ in stream:
                pass
        assert_exited(info.value)
        # and a request after the death says the same
        with pytest.raises(ServerExitedError) as info:
            srv.chat(HI, max_tokens=1)
        assert_exited(info.value)


def test_async_client_reports_a_server_killed_mid_stream(
    llama_server_bin: Path, smol_model: Path
) -> None:
    async def main() -> None:
        async with AsyncLlamaServer(
            smol_model, binary=llama_server_bin, ctx_size=4096, threads=1, start_timeout=120
        ) as srv:
            stream = srv.chat_stream(HI, **LONG)
            await anext(stream)
            assert srv.pid is not None
            os.kill(srv.pid, signal.SIGKILL)
            with pytest.raises(ServerExitedError) as info:
                async for _ in stream:
                    pass
            assert_exited(info.value)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_proxy_reports_a_server_killed_mid_stream(llama_server_bin: Path, smol_model: Path) -> None:
    models = ModelsConfig(
        {
            "smol": ModelSpec(
                id="smol",
                path=smol_model,
                options=MappingProxyType({"threads": 1, "ctx_size": 4096}),
            )
        }
    )
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=120)
    with running_proxy(models, factory, max_servers=1) as proxy:
        sdk = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="unused", max_retries=0)
        stream = sdk.chat.completions.create(
            model="smol", messages=HI, stream=True, max_tokens=4000, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        [server] = proxy.servers()
        os.kill(server["pid"], signal.SIGKILL)
        with pytest.raises(openai.APIError) as info:
            for _ in chunks:
                pass
        message = str(info.value)
        assert "llama-server for 'smol' crashed: it exited during the request" in message
        assert "(signal SIGKILL, exit code -9)" in message
