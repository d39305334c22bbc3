"""Keys have roles: inference keys use the API; only admin keys see and stop servers.

Keys come from key files (``--api-key-file``, ``--admin-key-file``) or the environment and
never appear in a repr, a log line or an error.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from proxy_fakes import FakeFactory
from proxy_harness import ProxyThread, running_proxy

from llama_proc import cli
from llama_proc._cli.serve import read_api_keys
from llama_proc.errors import ConfigError
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.options import ProxyOptions

if TYPE_CHECKING:
    from collections.abc import Iterator

MODELS = ModelsConfig({"a": ModelSpec(id="a", path=Path("/m/a.gguf"))})
INFERENCE = "sk-inference-4c1d9e"
ADMIN = "sk-admin-8b2f7a"
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def call(
    proxy: ProxyThread, method: str, path: str, key: str | None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proxy.base_url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        text, status = err.read(), err.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every log line of the test, searched for the keys at the end."""
    caplog.set_level(logging.DEBUG)
    yield
    assert INFERENCE not in caplog.text
    assert ADMIN not in caplog.text


def test_inference_keys_use_the_api_admin_keys_also_manage(logs: None) -> None:
    factory = FakeFactory()
    options = ProxyOptions(api_keys=(INFERENCE,), admin_keys=(ADMIN,))
    with running_proxy(MODELS, factory, options=options) as proxy:
        for key in (INFERENCE, ADMIN):
            status, body = call(proxy, "POST", "/v1/chat/completions", key, CHAT)
            assert status == 200, body
            for path in ("/v1/models", "/metrics"):
                assert call(proxy, "GET", path, key)[0] == 200, (key, path)
        # No key, a wrong key: 401 everywhere but /health.
        for bad_key in (None, "sk-wrong"):
            for method, path in (("GET", "/servers"), ("GET", "/v1/models")):
                status, body = call(proxy, method, path, bad_key)
                assert status == 401
                assert body["error"]["code"] == "invalid_api_key"
        assert call(proxy, "GET", "/health", None)[0] == 200
        # Inference keys cannot see servers (every tenant's flags) or stop them.
        status, body = call(proxy, "GET", "/servers", INFERENCE)
        assert status == 403
        assert body["error"]["code"] == "admin_key_required"
        assert "--admin-key-file" in body["error"]["message"]
        assert INFERENCE not in json.dumps(body)
        status, servers = call(proxy, "GET", "/servers", ADMIN)
        assert status == 200
        [info] = servers["data"]
        status, body = call(proxy, "DELETE", f"/servers/{info['key']}", INFERENCE)
        assert status == 403
        assert len(factory.live) == 1
        status, body = call(proxy, "DELETE", f"/servers/{info['key']}", ADMIN)
        assert status == 200, body
        assert factory.live == []
        # X-Api-Key works for both roles as well.
        req = urllib.request.Request(proxy.base_url + "/servers", headers={"X-Api-Key": ADMIN})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200


def test_admin_keys_alone_turn_authentication_on(logs: None) -> None:
    factory = FakeFactory()
    with running_proxy(MODELS, factory, options=ProxyOptions(admin_keys=(ADMIN,))) as proxy:
        assert call(proxy, "POST", "/v1/chat/completions", None, CHAT)[0] == 401
        assert call(proxy, "POST", "/v1/chat/completions", ADMIN, CHAT)[0] == 200
        assert call(proxy, "GET", "/servers", ADMIN)[0] == 200
        assert factory.starts == [("a", ())]


def test_without_keys_everything_is_open() -> None:
    with running_proxy(MODELS, FakeFactory()) as proxy:
        assert call(proxy, "GET", "/servers", None)[0] == 200


def test_option_reprs_hide_both_kinds_of_key() -> None:
    text = repr(ProxyOptions(api_keys=(INFERENCE,), admin_keys=(ADMIN,)))
    assert INFERENCE not in text
    assert ADMIN not in text


def test_key_files_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "admin.txt"
    path.write_text(f"# admins\n{ADMIN}\n\n")
    assert read_api_keys(path, "k2,", "--admin-key-file") == (ADMIN, "k2")
    with pytest.raises(ConfigError, match="--admin-key-file") as caught:
        read_api_keys(tmp_path / "absent", None, "--admin-key-file")
    assert ADMIN not in str(caught.value)


def test_serve_reads_the_admin_key_file_without_echoing_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LLAMA_PROC_PROXY_ADMIN_KEYS", INFERENCE)
    bad = tmp_path / "admin.txt"
    bad.write_bytes(ADMIN.encode() + b"\n\xff\n")
    # A key file that is not UTF-8: one line naming the flag and the file, no content.
    code = cli.main(["--log-level", "DEBUG", "serve", "--admin-key-file", str(bad)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "--admin-key-file" in err
    # A good key file, no models: serve fails after reading the keys, before any start.
    good = tmp_path / "good.txt"
    good.write_text(ADMIN + "\n")
    code = cli.main(["--log-level", "DEBUG", "serve", "--admin-key-file", str(good)])
    out2, err2 = capsys.readouterr()
    assert code == 1
    assert "--models-dir" in err2
    text = f"{out}\n{err}\n{out2}\n{err2}\n{caplog.text}"
    assert ADMIN not in text
    assert INFERENCE not in text


def test_one_key_cannot_hold_the_whole_proxy() -> None:
    """Requests whose bodies never finish arriving count against their key only."""
    import socket
    import time

    other = "sk-inference-second-77aa"
    options = ProxyOptions(api_keys=(INFERENCE, other), max_requests_per_key=2, body_timeout=30)
    with running_proxy(MODELS, FakeFactory(), options=options) as proxy:
        host, port = proxy.base_url.removeprefix("http://").rsplit(":", 1)
        held = []
        for _ in range(2):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {INFERENCE}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            held.append(sock)
        time.sleep(0.3)
        started = time.monotonic()
        status, body = call(proxy, "POST", "/v1/chat/completions", INFERENCE, CHAT)
        assert status == 429, body
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "requests in flight" in body["error"]["message"]
        assert time.monotonic() - started < 5
        # Another key is not held back by the first one's stalled bodies.
        assert call(proxy, "POST", "/v1/chat/completions", other, CHAT)[0] == 200
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while call(proxy, "POST", "/v1/chat/completions", INFERENCE, CHAT)[0] != 200:
            assert time.monotonic() < deadline, "the key's slots were never given back"
            time.sleep(0.1)


def test_the_per_key_share_follows_the_connection_limit() -> None:
    assert ProxyOptions().per_key_limit == 64
    assert ProxyOptions(max_connections=8).per_key_limit == 4
    assert ProxyOptions(max_requests_per_key=3).per_key_limit == 3
