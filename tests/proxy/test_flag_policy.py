"""Per-request flags are the operator's policy: off by default, allowlisted and bounded per
model, under server-wide caps, one spelling per option, checked before the pool is touched."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from proxy_fakes import FakeFactory, serve_pool
from proxy_harness import pid_alive, running_proxy

from llama_proc.config import Settings
from llama_proc.errors import ConfigError, InvalidArgumentError
from llama_proc.proxy.app import create_app
from llama_proc.proxy.flag_caps import FlagCaps
from llama_proc.proxy.flag_checker import FlagChecker, normalize_flags
from llama_proc.proxy.flag_names import FlagNames
from llama_proc.proxy.flag_policy import FlagPolicy
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.pool import ServerPool
from llama_proc.proxy.servers import LlamaServerFactory
from llama_proc.runtime.extra_args import _ALLOWED
from llama_proc.runtime.flags import BinaryFlags, clear_flags_cache, parse_help, probe_flags

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

    import aiohttp

T = TypeVar("T")

CAPS = FlagCaps(
    max_threads=8, max_threads_http=8, max_parallel=8, max_batch=4096, max_context_tokens=32768
)
POLICY = FlagPolicy.from_table(
    {
        "-c": True,
        "--temp": True,
        "-ngl": True,
        "-t": True,
        "-np": True,
        "--threads-http": True,
        "-fa": True,
        "--jinja": True,
        "-b": {"min": 64, "max": 1024},
    },
    caps=CAPS,
)
OPEN = ModelSpec(id="open", path=Path("/m/open.gguf"), request_flags=POLICY)
CLOSED = ModelSpec(id="closed", path=Path("/m/closed.gguf"))
CHECKER = FlagChecker(CAPS)

HOSTILE = [
    pytest.param("-c 999999999", "between", id="huge-context"),
    pytest.param("-t 3000", "between", id="threads"),
    pytest.param("-np 10000", "between", id="slots"),
    pytest.param("--threads-http 2000", "between", id="http-threads"),
    pytest.param("--frobnicate 1", "not allowed", id="unknown-flag"),
    pytest.param("--host 0.0.0.0", "not allowed", id="owned-flag"),
    pytest.param("-ub 64", "not allowed for model", id="not-in-policy"),
    pytest.param("--temp 0.5 --temperature 0.7", "same option", id="temp-spellings"),
    pytest.param("-ngl 1 --n-gpu-layers 2", "same option", id="ngl-spellings"),
    pytest.param("-c 512 --ctx-size=1024", "same option", id="equals-form"),
    pytest.param("-c 512 -c 512", "same option", id="repeat"),
    pytest.param("-c \uff15\uff11\uff12", "ASCII", id="fullwidth-digits"),
    pytest.param("-c \u0665\u0661\u0662", "ASCII", id="arabic-indic-digits"),
    pytest.param("-c 1e9", "whole number", id="exponent"),
    pytest.param("-c 0x10", "whole number", id="hex"),
    pytest.param("-c +512", "whole number", id="plus-sign"),
    pytest.param("-c -512", "whole number", id="sign-on-unsigned"),
    pytest.param("-c 0000000000000512", "whole number", id="too-long"),
    pytest.param("--temp 1e-3", "decimal number", id="float-exponent"),
    pytest.param("--temp nan", "decimal number", id="float-nan"),
    pytest.param("-t -1", "between", id="below-default-bound"),
    pytest.param("-b 2048", "between 64 and 1024", id="operator-bound"),
    pytest.param("-ngl everything", "not valid", id="bad-word"),
]


def test_flags_are_off_unless_the_config_allows_them() -> None:
    with pytest.raises(InvalidArgumentError, match="not enabled for model 'closed'"):
        CHECKER.check_request("-c 512", CLOSED)
    assert CHECKER.check_request("", CLOSED) == ()


@pytest.mark.parametrize(("header", "match"), HOSTILE)
def test_hostile_flags_are_refused(header: str, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        CHECKER.check_request(header, OPEN)
    assert "\n" not in str(info.value)


def test_allowed_flags_are_normalized() -> None:
    flags = CHECKER.check_request("--temperature 0.5 --ctx-size=0512 -ngl all -t 2 --jinja", OPEN)
    assert flags == ("-c", "512", "-ngl", "all", "--jinja", "--temp", "0.5", "-t", "2")
    assert CHECKER.check_request("-ngl 99 -fa on", OPEN) == ("-fa", "on", "-ngl", "99")


def test_quoted_and_plain_headers_give_the_same_flags() -> None:
    plain = CHECKER.check_request("-c 512 --temp 0.5", OPEN)
    assert CHECKER.check_request("-c '512' --temp \"0.5\"", OPEN) == plain
    assert CHECKER.check_request("\t-c  512\t--temp 0.5 ", OPEN) == plain


def test_an_accepted_header_is_remembered_per_model() -> None:
    checker = FlagChecker(CAPS)
    assert checker.check_request("-c 512", OPEN) == ("-c", "512")
    assert checker.check_request("-c 512", OPEN) == ("-c", "512")
    with pytest.raises(InvalidArgumentError, match="not enabled"):
        checker.check_request("-c 512", CLOSED)
    tight = dataclasses.replace(OPEN, request_flags=FlagPolicy.from_table({"-c": {"max": 256}}))
    with pytest.raises(InvalidArgumentError, match="between 128 and 256"):
        checker.check_request("-c 512", tight)


def test_context_times_slots_is_capped_across_config_and_request() -> None:
    policy = FlagPolicy.from_table({"-c": {"max": 32768}, "-np": True}, caps=CAPS)
    spec = ModelSpec(id="m", path=Path("/m.gguf"), request_flags=policy)
    assert CHECKER.check_request("-c 8192 -np 4", spec)
    with pytest.raises(InvalidArgumentError, match=r"context size x parallel slots"):
        CHECKER.check_request("-c 16384 -np 4", spec)
    # The model's own config counts too: its 8 slots times the requested context.
    eight = ModelSpec(
        id="m8",
        path=Path("/m.gguf"),
        options=MappingProxyType({"parallel": 8}),
        request_flags=policy,
    )
    with pytest.raises(InvalidArgumentError, match="32768"):
        CHECKER.check_request("-c 8192", eight)
    slots = ModelSpec(
        id="mx", path=Path("/m.gguf"), extra_args=("--parallel", "8"), request_flags=policy
    )
    with pytest.raises(InvalidArgumentError, match="32768"):
        CHECKER.check_request("-c 8192", slots)


def test_a_request_cannot_exceed_a_hard_cap_lowered_below_the_policy() -> None:
    tight = FlagChecker(FlagCaps(max_threads=2))
    policy = FlagPolicy.from_table({"-t": True})
    spec = ModelSpec(id="m", path=Path("/m.gguf"), request_flags=policy)
    assert tight.check_request("-t 2", spec) == ("-t", "2")
    with pytest.raises(InvalidArgumentError, match="--max-threads"):
        tight.check_request("-t 3", spec)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        pytest.param({"--model": True}, "cannot be allowed", id="file-flag"),
        pytest.param({"--frobnicate": True}, "cannot be allowed", id="unknown"),
        pytest.param({"-c": {"max": 10**9}}, "above the server-wide cap", id="over-cap"),
        pytest.param({"-t": {"max": 64}}, "--max-threads", id="over-thread-cap"),
        pytest.param({"--jinja": {"max": 1}}, "takes no number", id="bounds-on-switch"),
        pytest.param({"-c": {"min": 10, "max": 5}}, "min 10 is above max 5", id="min-max"),
        pytest.param({"-c": {"max": 1.5}}, "whole number", id="float-bound"),
        pytest.param({"-c": {"max": True}}, "whole number", id="bool-bound"),
        pytest.param({"-c": {"most": 1}}, "unknown key", id="bad-key"),
        pytest.param({"-c": "yes"}, "true or a table", id="bad-value"),
        pytest.param({"-c": True, "--ctx-size": True}, "same option", id="two-spellings"),
        pytest.param({"-c": {"min": -1}}, "cannot be negative", id="negative-unsigned"),
    ],
)
def test_policy_tables_are_checked(table: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        FlagPolicy.from_table(table, caps=CAPS)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "extra", "match"),
    [
        pytest.param({"threads": 3000}, (), "--max-threads", id="threads-option"),
        pytest.param({}, ("-t", "3000"), "--max-threads", id="threads-extra"),
        pytest.param({}, ("--threads-batch=3000",), "--max-threads", id="threads-batch-equals"),
        pytest.param({}, ("--threads-http", "2000"), "--max-threads-http", id="http"),
        pytest.param({"parallel": 10000}, (), "--max-parallel", id="parallel"),
        pytest.param({}, ("-ub", "100000"), "--max-batch", id="ubatch"),
        pytest.param({"ctx_size": 999999999}, (), "--max-context-tokens", id="ctx"),
        pytest.param({"ctx_size": 8192, "parallel": 8}, (), "--max-context-tokens", id="product"),
        pytest.param({}, ("-np", "\uff18"), "whole number", id="non-ascii"),
    ],
)
def test_config_level_flags_obey_the_caps(
    options: dict[str, Any], extra: tuple[str, ...], match: str
) -> None:
    spec = ModelSpec(
        id="m", path=Path("/m.gguf"), options=MappingProxyType(options), extra_args=extra
    )
    with pytest.raises(InvalidArgumentError, match=match):
        CHECKER.check_model(spec)


def test_default_caps_follow_the_cpu_count() -> None:
    caps = FlagCaps()
    assert 1 <= caps.max_threads <= 4096
    assert caps.max_threads_http >= 1
    assert caps.max_parallel >= 1
    assert caps.max_batch >= 512
    assert caps.max_context_tokens >= 4096
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        FlagCaps(max_parallel=0)


# -- spellings come from the installed binary's --help -------------------------------------

HELP = """\
-t,    --threads N                      number of CPU threads to use during generation
-c,    --ctx-size N                     size of the prompt context (default: 0)
--temp, --temperature, --heat N         temperature (default: 0.80)
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM
-kvo,  --kv-offload, -nkvo, --no-kv-offload
                                        whether to enable KV cache offloading (default: enabled)
--jinja, --no-jinja                     whether to use jinja template engine for chat
--host HOST                             IP addresses to listen on
--port PORT                             port to listen (default: 8080)
"""


def test_binary_help_groups_spellings() -> None:
    flags = parse_help(HELP, "fake")
    assert flags.spellings("--temperature") == ("--temp", "--temperature", "--heat")
    assert flags.spellings("-nkvo") == ("-kvo", "--kv-offload", "-nkvo", "--no-kv-offload")
    assert flags.spellings("--ctx_size") == ("-c", "--ctx-size")
    assert flags.spellings("--nope") == ()
    names = FlagNames(flags)
    # A spelling only this build prints is the same option as the ones the table knows.
    assert names.same("--heat", "--temp")
    assert names.same("-nkvo", "--kv-offload")
    assert not names.same("-c", "-t")
    with pytest.raises(InvalidArgumentError, match="same option"):
        normalize_flags(["--heat", "1", "--temp", "2"], names)


def test_flags_this_binary_does_not_accept_are_refused() -> None:
    checker = FlagChecker(CAPS, parse_help(HELP, "old-build"))
    # -fa is in the allowlist and the policy, but this build has no such option.
    with pytest.raises(InvalidArgumentError, match="not accepted by this llama-server build"):
        checker.check_request("-fa on", OPEN)
    assert checker.check_request("--ctx-size 256", OPEN) == ("-c", "256")


def test_spellings_survive_the_on_disk_cache(tmp_path: Path) -> None:
    script = tmp_path / "llama-server"
    (tmp_path / "help.txt").write_text(HELP)
    script.write_text(f'#!/bin/sh\ncat "{tmp_path / "help.txt"}"\n')
    script.chmod(0o755)
    settings = Settings.from_env(env={}, cache_dir=tmp_path / "cache")
    clear_flags_cache()
    first = probe_flags(script, settings=settings)
    clear_flags_cache()
    second = probe_flags(script, settings=settings)
    assert first is not None
    assert second is not None
    assert (
        second.spellings("--heat")
        == first.spellings("--heat")
        == ("--temp", "--temperature", "--heat")
    )


def test_every_numeric_allowlisted_flag_has_default_bounds() -> None:
    names = FlagNames()
    for spellings, pattern in _ALLOWED:
        if pattern is None or "\\d" not in pattern:
            continue
        if spellings[0] in ("-ts",):  # a list of proportions, checked by its pattern
            continue
        assert names.default_bounds(spellings[0]) is not None, spellings


# -- through the proxy: a bad request starts, stops and evicts nothing ----------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


class BinaryAwareFactory(FakeFactory):
    """A fake factory that can say what its (pretend) binary accepts."""

    def __init__(self, help_text: str) -> None:
        super().__init__()
        self.help_text = help_text

    def binary_flags(self) -> BinaryFlags:
        return parse_help(self.help_text, "fake-build")


@contextlib.asynccontextmanager
async def serving(
    factory: FakeFactory, models: ModelsConfig, **options: Any
) -> AsyncIterator[tuple[aiohttp.ClientSession, ServerPool]]:
    pool = ServerPool(factory, max_servers=1, queue_timeout=5)
    async with serve_pool(models, pool, **options) as session:
        yield session, pool


FAKE_MODELS = ModelsConfig({"open": OPEN, "closed": CLOSED})


@pytest.mark.parametrize(
    ("model", "header"),
    [
        pytest.param("open", "-c 999999999", id="context"),
        pytest.param("open", "-t 3000", id="threads"),
        pytest.param("open", "-np 10000", id="slots"),
        pytest.param("open", "--threads-http 2000", id="http-threads"),
        pytest.param("open", "--frobnicate 1", id="unknown"),
        pytest.param("open", "--temp 1 --temperature 1", id="duplicate"),
        pytest.param("open", "-c \uff15\uff11\uff12", id="non-ascii"),
        pytest.param("open", "-fa on", id="binary-lacks-it"),
        pytest.param("closed", "-c 512", id="policy-off"),
    ],
)
def test_a_refused_request_touches_no_server(model: str, header: str) -> None:
    async def main() -> None:
        factory = BinaryAwareFactory(HELP)
        async with serving(factory, FAKE_MODELS, flag_caps=CAPS) as (session, pool):
            body = {"model": "open", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post("/v1/chat/completions", json=body) as r:
                assert r.status == 200
            before = [(i.key, i.state, i.pid, i.starts) for i in pool.snapshot()]
            async with session.post(
                "/v1/chat/completions",
                json={**body, "model": model},
                headers={"X-Llama-Flags": header.encode().decode("latin-1")},
            ) as r:
                assert r.status == 400
                error = (await r.json())["error"]
            assert error["code"] == "invalid_flags"
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "X-Llama-Flags"
            assert error["message"]
            assert factory.starts == [("open", ())]
            assert [(i.key, i.state, i.pid, i.starts) for i in pool.snapshot()] == before
            assert pool.stats["evictions_lru"] == 0
            assert pool.stats["start_failures"] == 0

    run(main())


def test_a_failed_start_for_request_flags_does_not_linger() -> None:
    async def main() -> None:
        factory = BinaryAwareFactory(HELP)
        async with serving(factory, FAKE_MODELS, flag_caps=CAPS) as (session, pool):
            body = {"model": "open", "messages": [{"role": "user", "content": "hi"}]}
            factory.fail = 1
            async with session.post(
                "/v1/chat/completions", json=body, headers={"X-Llama-Flags": "-c 512"}
            ) as r:
                assert r.status == 503
            async with session.get("/servers") as r:
                assert (await r.json())["data"] == []
            assert pool.stats["start_failures"] == 1

    run(main())


def test_a_model_config_beyond_the_caps_is_refused_when_the_app_is_built() -> None:
    greedy = ModelSpec(id="g", path=Path("/g.gguf"), options=MappingProxyType({"threads": 64}))
    pool = ServerPool(FakeFactory())
    with pytest.raises(ConfigError, match=r"model 'g'.*--max-threads"):
        create_app(ModelsConfig({"g": greedy}), pool, ProxyOptions(flag_caps=CAPS))


# -- the real llama-server ------------------------------------------------------------------


def post(url: str, body: dict[str, Any], flags: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if flags is not None:
        headers["X-Llama-Flags"] = flags
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            reply: dict[str, Any] = json.loads(resp.read())
            return resp.status, reply
    except urllib.error.HTTPError as err:
        error: dict[str, Any] = json.loads(err.read())
        return err.code, error


def test_real_server_serves_allowed_flags_and_refuses_the_rest(
    smol_model: Path, llama_server_bin: Path
) -> None:
    policy = FlagPolicy.from_table(
        {"-c": {"min": 128, "max": 1024}, "--temp": True, "-np": {"max": 2}, "--mlock": True}
    )
    spec = ModelSpec(
        id="smol",
        path=smol_model,
        options=MappingProxyType({"threads": 1, "parallel": 1, "ctx_size": 512}),
        request_flags=policy,
    )
    factory = LlamaServerFactory(binary=llama_server_bin, start_timeout=120)
    body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    with running_proxy(ModelsConfig({"smol": spec}), factory, max_servers=1) as proxy:
        url = proxy.base_url + "/v1/chat/completions"
        assert post(url, body)[0] == 200
        [warm] = proxy.servers()
        for header in (
            "-c 999999999",
            "-t 3000",
            "-np 10000",
            "--threads-http 2000",
            "--frobnicate 1",
            "--temp 0.5 --temperature 0.5",
            "-c \uff15\uff11\uff12".encode().decode("latin-1"),
            "--mlock",  # allowed by the policy, unknown to this build: refused up front
        ):
            status, reply = post(url, body, header)
            assert status == 400, (header, reply)
            assert reply["error"]["code"] == "invalid_flags"
            # The warm server is untouched: same process, no new request, nothing else.
            # (Its measured memory moves on its own; that is no change of the server.)
            moving = {"idle_seconds": None, "memory_measured": None, "memory_claims": None}
            now = [{**info, **moving} for info in proxy.servers()]
            assert now == [{**warm, **moving}], header
        assert pid_alive(warm["pid"])

        status, reply = post(url, body, "--ctx-size=256 --temperature 0.2")
        assert status == 200, reply
        [flagged] = [s for s in proxy.servers() if s["flags"]]
        assert flagged["flags"] == ["-c", "256", "--temp", "0.2"]
        with urllib.request.urlopen(flagged["url"] + "/props", timeout=10) as resp:
            props = json.loads(resp.read())
        assert props["default_generation_settings"]["n_ctx"] <= 256
