"""Request bodies are the operator's policy: bounded per model under server-wide caps, checked
by our own bounded scans before forwarding; unknown fields refused unless allowed; a
non-streamed answer is never buffered past a cap."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from proxy_fakes import FakeFactory, FakeUpstream, UpstreamBehaviour, serve_pool

from llama_proc._cli import serve
from llama_proc.errors import ConfigError, InvalidArgumentError
from llama_proc.proxy.body_policy import (
    BODY_CEILINGS,
    KNOWN_FIELDS,
    BodyCaps,
    BodyChecker,
    BodyPolicy,
    context_size,
)
from llama_proc.proxy.body_shapes import grammar_problem, schema_problem
from llama_proc.proxy.models_config import ModelsConfig, ModelSpec, load_models_config
from llama_proc.proxy.pool import ServerPool

MODELS = ModelsConfig({"a": ModelSpec(id="a", path=Path("/m/a.gguf"))})
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def nested_grammar(depth: int) -> str:
    return "root ::= " + "(" * depth + '"a"' + ")" * depth


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def image(size: int) -> dict[str, Any]:
    data = base64.b64encode(b"\0" * size).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "a", "messages": HI, **fields}


# Each body goes over exactly one default limit; the field named is the one refused.
OVER_LIMIT = [
    pytest.param(chat(logprobs=True, top_logprobs=49152), "top_logprobs", id="top_logprobs"),
    pytest.param(chat(n_probs=49152), "n_probs", id="n_probs"),
    pytest.param(chat(n_probs=21.5), "n_probs", id="n_probs-float"),
    pytest.param(chat(max_tokens=10**9), "max_tokens", id="max_tokens"),
    pytest.param(chat(max_completion_tokens=10**9), "max_completion_tokens", id="max_compl"),
    pytest.param(chat(n_predict=10**9), "n_predict", id="n_predict"),
    pytest.param(chat(n=64), "n", id="n"),
    pytest.param(chat(n_cmpl=64), "n_cmpl", id="n_cmpl"),
    pytest.param(chat(logit_bias={str(i): 1 for i in range(2000)}), "logit_bias", id="bias"),
    pytest.param(chat(logit_bias=[[i, 1.0] for i in range(2000)]), "logit_bias", id="bias-list"),
    pytest.param(chat(grammar=nested_grammar(20000)), "grammar", id="grammar-depth"),
    pytest.param(chat(grammar='root ::= "' + "a" * 70000 + '"'), "grammar", id="grammar-size"),
    pytest.param(chat(grammar='root ::= "a"{0,100000}'), "grammar", id="grammar-repeat"),
    pytest.param(chat(grammar={"not": "a string"}), "grammar", id="grammar-type"),
    pytest.param(chat(json_schema=nested_schema(40)), "json_schema", id="schema-depth"),
    pytest.param(
        chat(json_schema={"type": "string", "maxLength": 10**8}), "json_schema", id="schema-rep"
    ),
    pytest.param(
        chat(response_format={"type": "json_object", "schema": {"enum": ["x" * 70000]}}),
        "response_format",
        id="response-format-size",
    ),
    pytest.param(
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": nested_schema(40)}}]
        ),
        "tools",
        id="tool-schema-depth",
    ),
    pytest.param(
        {"model": "a", "messages": [{"role": "user", "content": [image(10)] * 9}]},
        "images",
        id="image-count",
    ),
    pytest.param(
        {"model": "a", "messages": [{"role": "user", "content": [image(9 * 1024 * 1024)]}]},
        "images",
        id="image-size",
    ),
    pytest.param(chat(frobnicate=1), "frobnicate", id="unknown-field"),
]


def test_grammar_scan_ignores_strings_classes_and_comments() -> None:
    grammar = 'root ::= "(((" [(((] # (((((\n x ::= ("a" | ("b")){1,3}'
    assert grammar_problem(grammar, max_bytes=1000, max_depth=2) is None
    assert grammar_problem(grammar, max_bytes=1000, max_depth=1) is not None
    assert "deeper than 64" in str(
        grammar_problem(nested_grammar(65), max_bytes=10**6, max_depth=64)
    )
    assert grammar_problem(nested_grammar(64), max_bytes=10**6, max_depth=64) is None
    # an escaped quote does not end a string; an unterminated one is left to llama-server
    assert grammar_problem('r ::= "\\"((" "', max_bytes=100, max_depth=0) is None
    assert grammar_problem('r ::= "a"{2000}', max_bytes=100, max_depth=0) is None
    assert "at most 2000" in str(grammar_problem('r ::= "a"{1,2001}', max_bytes=100, max_depth=0))


def test_grammar_scan_is_linear() -> None:
    # 4 MiB of hostile text (unterminated strings, parens, braces) scans in well under a second.
    # (before: an unterminated string of escaped quotes was rescanned from every quote)
    hostile = [
        '"\\' * 500000 + "(" * 1000000,
        "[\\" * 500000 + "{" * 1000000,
        "(" * 1000000 + "{" * 1000000 + "[" * 1000000,
        "{1" * 1000000,
    ]
    for text in hostile:
        began = time.perf_counter()
        grammar_problem(text, max_bytes=10**8, max_depth=64)
        assert time.perf_counter() - began < 1.0
    assert grammar_problem(hostile[2], max_bytes=10**8, max_depth=64) is not None


def test_schema_walk_stops_at_the_first_node_past_a_limit() -> None:
    assert schema_problem(nested_schema(32), max_bytes=10**6, max_depth=32) is None
    assert "deeper than 32" in str(schema_problem(nested_schema(33), max_bytes=10**6, max_depth=32))
    wide = {"enum": ["x" * 100] * 100000}
    began = time.perf_counter()
    assert "larger than 65536" in str(schema_problem(wide, max_bytes=65536, max_depth=32))
    assert time.perf_counter() - began < 0.1
    assert schema_problem({"type": "array", "minItems": True}, max_bytes=100, max_depth=4) is None


@pytest.mark.parametrize(("body", "param"), OVER_LIMIT)
def test_checker_names_the_field(body: dict[str, Any], param: str) -> None:
    verdict = BodyChecker().check(CHAT, body, BodyPolicy())
    assert verdict.refusal is not None
    assert verdict.refusal.param == param
    assert "\n" not in verdict.refusal.message


def test_checker_passes_ordinary_requests() -> None:
    checker = BodyChecker()
    policy = BodyPolicy()
    ordinary = [
        chat(max_tokens=256, temperature=0.2, stream=True, stream_options={"include_usage": True}),
        chat(logprobs=True, top_logprobs=5, n=2, seed=1, stop=["\n"], logit_bias={"15": -100}),
        chat(grammar=nested_grammar(64), n_probs=20),
        chat(response_format={"type": "json_schema", "json_schema": {"schema": nested_schema(8)}}),
        {"model": "a", "messages": [{"role": "user", "content": [image(1000)] * 8}]},
    ]
    for body in ordinary:
        assert checker.check(CHAT, body, policy).refusal is None, body
    assert checker.check("/v1/completions", {"prompt": "x", "logprobs": 5}, policy).refusal is None
    assert checker.check("/v1/embeddings", {"input": ["x"], "model": "a"}, policy).refusal is None
    refused = checker.check("/v1/embeddings", {"input": "x", "messages": []}, policy).refusal
    assert refused is not None
    assert refused.param == "messages"


def test_context_size_bounds_max_tokens() -> None:
    assert context_size({"ctx_size": 2048}, ()) == 2048
    assert context_size({"ctx_size": 2048}, ("-c", "512")) == 512
    assert context_size({}, ("--ctx-size=1024",)) == 1024
    assert context_size({"ctx_size": 0}, ()) is None
    checker = BodyChecker()
    verdict = checker.check(CHAT, chat(max_tokens=600), BodyPolicy(), context=512)
    assert verdict.refusal is not None
    assert "512 (the model's context size)" in verdict.refusal.message
    assert checker.check(CHAT, chat(max_tokens=512), BodyPolicy(), context=512).refusal is None


def test_policy_table_lowers_limits_and_allows_fields() -> None:
    policy = BodyPolicy.from_table(
        {
            "n_probs": {"max": 2},
            "grammar": {"max_bytes": 100, "max_depth": 3},
            "fields": ["my_extension"],
        }
    )
    checker = BodyChecker()
    assert checker.limits(policy).n_probs == 2
    assert checker.limits(policy).grammar_depth == 3
    assert checker.limits(policy).images == BodyCaps().images
    assert checker.check(CHAT, chat(n_probs=3), policy).refusal is not None
    # logprobs alone means 20 per token to llama-server: over a lower limit, it is refused
    implied = checker.check(CHAT, chat(logprobs=True), policy).refusal
    assert implied is not None
    assert implied.param == "top_logprobs"
    assert checker.check(CHAT, chat(logprobs=True, top_logprobs=2), policy).refusal is None
    assert checker.check(CHAT, chat(logprobs=True), BodyPolicy()).refusal is None
    assert checker.check(CHAT, chat(my_extension=1), policy).refusal is None
    strip = BodyPolicy.from_table({"unknown_fields": "strip"})
    assert checker.check(CHAT, chat(x=1, y=2), strip).strip == ("x", "y")
    allow = BodyPolicy.from_table({"unknown_fields": "allow"})
    assert checker.check(CHAT, chat(x=1), allow) == checker.check(CHAT, chat(), allow)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        pytest.param({"n_probs": {"max": 50}}, "above the server-wide cap of 20", id="over-cap"),
        pytest.param({"n_probs": 5}, "must be a table", id="bare-number"),
        pytest.param({"n_probs": {"min": 1}}, "unknown key 'min'", id="min"),
        pytest.param({"grammar": {"max_depth": -1}}, "whole number >= 0", id="negative"),
        pytest.param({"grammar": {"max_depth": True}}, "whole number >= 0", id="bool"),
        pytest.param({"prompt": {"max": 1}}, "unknown key 'prompt'", id="unknown-key"),
        pytest.param({"unknown_fields": "ignore"}, "refuse, strip, allow", id="mode"),
        pytest.param({"fields": "x"}, "list of top-level field names", id="fields"),
    ],
)
def test_policy_table_is_validated(table: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        BodyPolicy.from_table(table, caps=BodyCaps())


def test_caps_keep_their_ceilings() -> None:
    with pytest.raises(InvalidArgumentError, match="grammar_depth=100000 is above the hard"):
        BodyCaps(grammar_depth=100000)
    assert BodyCaps(grammar_depth=BODY_CEILINGS["grammar_depth"]).grammar_depth == 256


def test_config_reads_request_body_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[defaults.request_body]\nn_probs = { max = 3 }\n"
        '[models.a]\npath = "a.gguf"\n'
        '[models.b]\npath = "b.gguf"\n[models.b.request_body]\nfields = ["x"]\n'
    )
    models = load_models_config(cfg, body_caps=BodyCaps())
    a, b = models.resolve("a"), models.resolve("b")
    assert a is not None
    assert b is not None
    assert a.request_body.limits == (("n_probs", 3),)
    assert b.request_body.limits == ()  # a model's own table replaces the defaults' one
    assert b.request_body.fields == frozenset({"x"})
    cfg.write_text('[models.a]\npath = "a.gguf"\n[models.a.request_body]\nn = { max = 10 }\n')
    with pytest.raises(ConfigError, match=r"\[models.a\]: request_body: n.max 10 is above"):
        load_models_config(cfg, body_caps=BodyCaps(n=4))


def test_serve_flags_set_the_caps(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="llama-proc")
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-n-probs", "5", "--max-grammar-depth", "16"])
    caps = serve.body_caps(args)
    assert (caps.n_probs, caps.grammar_depth, caps.n) == (5, 16, BodyCaps().n)
    args = parser.parse_args(["serve", "--max-grammar-depth", "100000"])
    with pytest.raises(ConfigError, match=r"--max-grammar-depth: .*hard ceiling of 256"):
        serve.body_caps(args)
    cfg = tmp_path / "m.toml"
    cfg.write_text('[models.a]\npath = "a.gguf"\n[models.a.request_body]\nn_probs = {max = 9}\n')
    args = parser.parse_args(["serve", "--config", str(cfg), "--max-n-probs", "5"])
    with pytest.raises(ConfigError, match=r"n_probs\.max 9 is above the server-wide cap of 5"):
        args.handler(args)


def test_known_fields_cover_the_openai_sdk() -> None:
    chat_fields = KNOWN_FIELDS[CHAT]
    sdk = {"messages", "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens"}
    sdk |= {"max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop"}
    sdk |= {"stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs"}
    sdk |= {"top_p", "user", "parallel_tool_calls", "metadata", "store", "reasoning_effort"}
    assert sdk <= chat_fields


# -- through the proxy, with a fake upstream ---------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize(("body", "param"), OVER_LIMIT)
def test_proxy_refuses_before_forwarding(body: dict[str, Any], param: str) -> None:
    async def go() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=1)
        async with serve_pool(MODELS, pool) as session:
            data = io.BytesIO(json.dumps(body).encode())
            headers = {"Content-Type": "application/json"}
            async with session.post(CHAT, data=data, headers=headers) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
            assert error["param"] == param
            assert error["type"] == "invalid_request_error"
            assert error["code"] in ("request_body_limit", "unknown_field")
            assert param in error["message"]
            # Never forwarded: nothing was even started.
            assert factory.starts == []
            async with session.post(CHAT, json=chat(max_tokens=4)) as resp:
                assert resp.status == 200

    run(go())


def test_proxy_strips_unknown_fields_where_the_operator_says() -> None:
    policy = BodyPolicy.from_table({"unknown_fields": "strip", "fields": ["keep_me"]})
    models = ModelsConfig({"a": ModelSpec(id="a", path=Path("/m/a.gguf"), request_body=policy)})

    async def go() -> None:
        factory = FakeFactory()
        pool = ServerPool(factory, max_servers=1)
        async with (
            serve_pool(models, pool) as session,
            session.post(CHAT, json=chat(drop_me=1, keep_me=2)) as resp,
        ):
            assert resp.status == 200
        [server] = factory.servers
        [forwarded] = server.log.bodies
        assert "drop_me" not in forwarded
        assert forwarded["keep_me"] == 2

    run(go())


class HugeAnswer(FakeUpstream):
    """Answers a non-streamed request with a JSON body far larger than the proxy relays."""

    answer_bytes = 8 * 1024 * 1024
    sent = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.log.started += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(b'{"pad": "')
            while self.sent < self.answer_bytes:
                await resp.write(b"x" * 65536)
                self.sent += 65536
                await asyncio.sleep(0)
            await resp.write(b'"}')
            await resp.write_eof()
            self.log.finished += 1
        except (asyncio.CancelledError, ConnectionError):
            self.log.cancelled += 1
            raise
        return resp


class HugeFactory(FakeFactory):
    def __init__(self) -> None:
        super().__init__()
        self.huge: list[HugeAnswer] = []

    async def __call__(self, spec: ModelSpec, flags: tuple[str, ...]) -> FakeUpstream:
        self.starts.append((spec.id, flags))
        server = HugeAnswer(spec.id, self.behaviour)
        await server.start()
        self.huge.append(server)
        return server


def test_proxy_does_not_buffer_an_unbounded_answer() -> None:
    async def go() -> None:
        factory = HugeFactory()
        pool = ServerPool(factory, max_servers=1)
        async with serve_pool(MODELS, pool, max_response_bytes=1024 * 1024) as session:
            async with session.post(CHAT, json=chat()) as resp:
                assert resp.status == 502
                text = await resp.text()
            error = json.loads(text)["error"]
            assert error["code"] == "response_too_large"
            assert "1048576 bytes" in error["message"]
            assert "\n" not in error["message"]
            [server] = factory.huge
            # The proxy stopped reading and closed the connection: the server never got to
            # send the rest of its answer.
            for _ in range(100):
                if server.log.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert server.log.cancelled == 1
            assert server.log.finished == 0
            assert server.sent < server.answer_bytes

    run(go())


def test_the_request_a_server_died_on_is_named_for_the_operator_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = "tenant-secret-key"
    caplog.set_level(logging.WARNING, logger="llama_proc")

    async def go() -> str:
        factory = FakeFactory(UpstreamBehaviour(tokens=5, crash_after=2))
        pool = ServerPool(factory, max_servers=1)
        body = chat(stream=True, max_tokens=5)
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            serve_pool(MODELS, pool, api_keys=(key,)) as session,
            session.post(CHAT, json=body, headers=headers) as resp,
        ):
            return await resp.text()

    tenant_sees = run(go())
    assert "crashed" in tenant_sees
    assert "sha256" not in tenant_sees
    [logged] = [r.getMessage() for r in caplog.records if "the request it died on" in r.message]
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    assert f"POST {CHAT} from 127.0.0.1, key sha256:{fingerprint}" in logged
    assert "'messages' (" in logged
    assert key not in logged
    assert "\n" not in logged
