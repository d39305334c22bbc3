"""ServeOptions: one field per ``serve`` flag, defaults in one place, checked once."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from llama_proc._cli import serve
from llama_proc.errors import ConfigError
from llama_proc.proxy.options import ProxyOptions, body_caps_of, pool_limits_of, proxy_options_of
from llama_proc.proxy.serve_flags import BODY_CAP_FLAGS, add_serve_flags
from llama_proc.proxy.serve_options import ServeOptions


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve")
    add_serve_flags(parser)
    return parser.parse_args(argv)


def test_no_flags_give_the_fields_own_defaults() -> None:
    assert ServeOptions.from_args(parse([])) == ServeOptions()


def test_every_field_has_a_flag_and_the_flag_lands_in_it() -> None:
    fields = [f for f in dataclasses.fields(ServeOptions) if "flag" in f.metadata]
    assert len(fields) >= 20
    for f in fields:
        kind = str(f.type).split(" |")[0]
        flag = f.metadata["flag"]
        argv: list[str]
        want: object
        if kind == "bool":
            argv, want = [flag], True
        elif f.name == "event_loop":
            argv, want = [flag, "asyncio"], "asyncio"
        elif f.name == "memory_budget":
            argv, want = [flag, "2G"], "2G"
        elif f.name == "host":
            argv, want = [flag, "::1"], "::1"
        else:
            argv = [flag, "2048"]
            want = {"int": 2048, "float": 2048.0, "str": "2048"}.get(kind, argv[1])
        got = getattr(ServeOptions.from_args(parse(argv)), f.name)
        assert got == want or str(got) == str(want), flag


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_servers", 0, "--max-servers must be at least 1"),
        ("max_queue", 0, "--max-queue must be at least 1"),
        ("idle_ttl", -1.0, "--idle-ttl must be >= 0"),
        ("stall_timeout", 0.0, "--stall-timeout must be a positive number"),
        ("max_body_bytes", 10, "--max-body-bytes must be at least 1024"),
        ("port", 70000, "--port 70000 is not a port number"),
        ("host", "0.0.0.0", "refusing to bind 0.0.0.0"),
        ("event_loop", "tokio", "--event-loop 'tokio'"),
    ],
)
def test_library_callers_get_the_same_checks_as_the_command_line(
    field: str, value: object, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        ServeOptions(**{field: value})  # type: ignore[arg-type]


def test_body_caps_name_their_flag_and_reach_the_proxy_options() -> None:
    options = ServeOptions.from_args(parse(["--max-n-probs", "3", "--drain-timeout", "0"]))
    proxy = proxy_options_of(options, ("k",), ())
    assert proxy.body_caps.n_probs == 3
    assert proxy.drain_timeout == 0
    assert proxy.api_keys == ("k",)
    assert proxy_options_of(ServeOptions()).drain_timeout == ProxyOptions().drain_timeout
    with pytest.raises(ConfigError, match="--max-schema-depth: "):
        body_caps_of(ServeOptions(body_caps_given={"schema_depth": 10**6}))
    with pytest.raises(ConfigError, match="unknown request-body cap"):
        ServeOptions(body_caps_given={"bogus": 1})
    assert set(BODY_CAP_FLAGS) == {f.name for f in dataclasses.fields(body_caps_of(ServeOptions()))}


def test_pool_limits_are_what_the_pool_takes() -> None:
    from llama_proc.proxy.pool import ServerPool

    limits = pool_limits_of(ServeOptions(max_servers=3, memory_budget="1G", idle_ttl=0))
    pool = ServerPool(lambda *a, **k: None, **limits)  # type: ignore[arg-type]
    assert (pool.max_servers, pool.memory_budget, pool.idle_ttl) == (3, 1 << 30, 0.0)
    with pytest.raises(ConfigError, match="--memory-budget 'lots'"):
        pool_limits_of(ServeOptions(memory_budget="lots"))


def test_serve_help_lists_each_option_once() -> None:
    parser = argparse.ArgumentParser(prog="llama-proc")
    serve.register(parser.add_subparsers(dest="command"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["serve"].format_help()
    for f in dataclasses.fields(ServeOptions):
        if "flag" in f.metadata:
            assert text.count("\n  " + f.metadata["flag"] + " ") == 1, f.metadata["flag"]
