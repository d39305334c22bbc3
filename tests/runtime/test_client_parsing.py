"""Pure parsing used by the clients: server-sent events and Prometheus metrics."""

from __future__ import annotations

import math

import pytest

from llama_proc.errors import ServerRequestError
from llama_proc.runtime.wire import is_done, parse_metrics, parse_sse_line


def test_sse_lines() -> None:
    assert parse_sse_line(b'data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a":2}\r') == {"a": 2}
    assert is_done(parse_sse_line(b"data: [DONE]"))
    assert parse_sse_line(b"") is None
    assert parse_sse_line(b": ping") is None
    assert parse_sse_line(b"event: message") is None


def test_sse_error_event_raises() -> None:
    with pytest.raises(ServerRequestError, match="mid-stream: context full") as info:
        parse_sse_line(b'data: {"error": {"code": 400, "message": "context full"}}')
    assert info.value.status == 400
    with pytest.raises(ServerRequestError, match="malformed"):
        parse_sse_line(b"data: {not json")


def test_metrics() -> None:
    text = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 50
llamacpp:prompt_seconds_total 3.16576
llamacpp:requests_processing 0
http_requests{code="200", route="/x y"} 7 1700000000
weird NaN
broken
"""
    metrics = parse_metrics(text)
    assert metrics["llamacpp:prompt_tokens_total"] == 50
    assert metrics["llamacpp:prompt_seconds_total"] == pytest.approx(3.16576)
    assert metrics['http_requests{code="200", route="/x y"}'] == 7
    assert math.isnan(metrics["weird"])
    assert "broken" not in metrics
