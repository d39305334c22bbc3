"""Request bodies of llama-server's other APIs (Anthropic, Responses, rerank, infill, tokenize...):
the fields that cost a server memory or time are held to the same caps as chat's."""

from __future__ import annotations

from typing import Any

import pytest

from llama_proc.proxy.body_policy import KNOWN_FIELDS, BodyCaps, BodyChecker, BodyPolicy
from llama_proc.proxy.relay import FORWARDED, stream_finished

POLICY = BodyPolicy()
MSGS = [{"role": "user", "content": "hi"}]
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
RESPONSES_IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AA=="}

# A body each client library or llama-server's docs send, per route: passed as it is.
ORDINARY: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "model": "m", "max_tokens": 16, "messages": MSGS, "system": "be brief",
        "stream": True, "stop_sequences": ["x"], "temperature": 0, "top_k": 1,
        "metadata": {"user_id": "u"},
    },
    "/v1/messages/count_tokens": {"model": "m", "messages": MSGS, "system": "s", "tools": []},
    "/v1/responses": {
        "model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 16,
        "stream": False, "temperature": 0,
    },
    "/v1/embeddings": {"model": "m", "input": ["a", "b"], "encoding_format": "float"},
    "/v1/rerank": {"model": "m", "query": "q", "documents": ["a", "b"], "top_n": 1},
    "/rerank": {"model": "m", "query": "q", "documents": ["a", "b"], "return_text": True},
    "/infill": {
        "model": "m", "input_prefix": "def f(", "input_suffix": ")", "n_predict": 8,
        "input_extra": [{"filename": "a.py", "text": "x = 1"}],
    },
    "/tokenize": {"model": "m", "content": "hi", "add_special": True, "with_pieces": True},
    "/detokenize": {"model": "m", "tokens": [1, 2, 3]},
    "/apply-template": {"model": "m", "messages": MSGS, "add_generation_prompt": True},
    "/v1/completions": {"model": "m", "prompt": "p", "max_tokens": 8},
}  # fmt: skip

# A hostile body per route, and the field it must be refused for.
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/messages", {"model": "m", "messages": MSGS, "max_tokens": 10**9}, "max_tokens"),
    ("/v1/messages", {"model": "m", "messages": MSGS, "max_tokens": 1, "x": 1}, "x"),
    ("/v1/messages", {"model": "m", "messages": MSGS, "max_tokens": 1, "n_probs": 10**6}, "n_probs"),
    ("/v1/messages/count_tokens", {"model": "m", "messages": MSGS, "evil": 1}, "evil"),
    ("/v1/messages", {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [IMAGE] * 9}]}, "images"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [RESPONSES_IMAGE] * 9}]}, "images"),
    ("/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 10**9}, "max_output_tokens"),
    ("/v1/responses", {"model": "m", "input": "hi", "top_logprobs": 10**6}, "top_logprobs"),
    ("/v1/embeddings", {"model": "m", "input": ["x"] * 100_000}, "input"),
    ("/v1/rerank", {"model": "m", "query": "q", "documents": ["d"] * 100_000}, "documents"),
    ("/rerank", {"model": "m", "query": "q", "documents": ["d"] * 100_000}, "documents"),
    ("/infill", {"model": "m", "input_prefix": "a", "n_predict": 10**9}, "n_predict"),
    ("/infill", {"model": "m", "input_prefix": "a", "n_probs": 10**6}, "n_probs"),
    ("/infill", {"model": "m", "input_extra": [{"text": "x"}] * 100_000}, "input_extra"),
    ("/infill", {"model": "m", "input_prefix": "a", "grammar": "(" * 10_000}, "grammar"),
    ("/tokenize", {"model": "m", "content": "hi", "evil": 1}, "evil"),
    ("/detokenize", {"model": "m", "tokens": [1], "evil": 1}, "evil"),
    ("/apply-template", {"model": "m", "messages": MSGS, "evil": 1}, "evil"),
    ("/v1/completions", {"model": "m", "prompt": ["p"] * 100_000}, "prompt"),
]  # fmt: skip


@pytest.mark.parametrize("path", sorted(ORDINARY))
def test_every_forwarded_api_passes_an_ordinary_body(path: str) -> None:
    assert path in FORWARDED
    assert path in KNOWN_FIELDS
    verdict = BodyChecker().check(path, ORDINARY[path], POLICY, context=4096)
    assert verdict.refusal is None, verdict.refusal
    assert verdict.strip == ()


@pytest.mark.parametrize(("path", "body", "field"), HOSTILE)
def test_hostile_bodies_are_refused_naming_the_field(
    path: str, body: dict[str, Any], field: str
) -> None:
    verdict = BodyChecker().check(path, body, POLICY, context=4096)
    assert verdict.refusal is not None
    assert verdict.refusal.param == field, verdict.refusal


def test_the_inputs_cap_is_a_server_wide_limit_a_model_may_lower() -> None:
    assert BodyCaps().inputs >= 2048  # OpenAI's own limit on embedding inputs
    body = {"model": "m", "input": ["x"] * 11}
    assert BodyChecker(BodyCaps(inputs=11)).check("/v1/embeddings", body, POLICY).refusal is None
    refused = BodyChecker(BodyCaps(inputs=10)).check("/v1/embeddings", body, POLICY).refusal
    assert refused is not None
    assert "10" in refused.message
    lowered = BodyPolicy.from_table({"inputs": {"max": 4}})
    assert BodyChecker().check("/v1/embeddings", body, lowered).refusal is not None


def test_a_tokenized_prompt_is_one_input_not_a_batch() -> None:
    body = {"model": "m", "prompt": list(range(5000)), "max_tokens": 1}
    assert BodyChecker().check("/v1/completions", body, POLICY).refusal is None


# The last bytes of each kind of stream, as llama-server b11434 writes them.
STREAM_ENDS = {
    "openai": b'data: {"choices":[]}\n\ndata: [DONE]\n\n',
    "anthropic": b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    "responses": b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n',
}


@pytest.mark.parametrize("kind", sorted(STREAM_ENDS))
def test_the_end_of_each_api_stream_is_recognised(kind: str) -> None:
    # A client that hangs up after the last event got its whole answer (not a 499).
    assert stream_finished(STREAM_ENDS[kind])
    assert not stream_finished(STREAM_ENDS[kind][:-2])
    assert not stream_finished(b'event: content_block_delta\ndata: {"type":"x"}\n\n')
