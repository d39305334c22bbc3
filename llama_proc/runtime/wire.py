"""llama-server's wire formats: server-sent event lines, Prometheus metrics text, request bodies.

Pure functions, shared by the sync and async clients.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import (
    ServerRequestError,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


_ERROR_BODY_LIMIT: Final = 2000
_STREAM_HEADERS: Final = {"Connection": "close"}
"""llama-server closes the connection after every streamed response without saying so;
asking for ``Connection: close`` makes it say so, so no client pool reuses a dead socket."""

Message = dict[str, Any]

_DONE: Final = object()


def parse_sse_line(line: bytes | str) -> Any:
    """Decode one server-sent-events line.

    Returns:
        The JSON payload of a ``data:`` line, ``None`` for lines to skip (blank, comments,
        other fields), or a sentinel for ``data: [DONE]`` (check with :func:`is_done`).

    Raises:
        ServerRequestError: the line is an error event or not valid JSON.
    """
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as err:
        msg = f"malformed stream event from llama-server: {data[:200]!r}"
        raise ServerRequestError(msg) from err
    if isinstance(payload, dict) and "error" in payload:
        error = payload["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        status = error.get("code") if isinstance(error, dict) else None
        msg = f"llama-server reported an error mid-stream: {message}"
        raise ServerRequestError(
            msg,
            status if isinstance(status, int) else None,
            json.dumps(payload)[:_ERROR_BODY_LIMIT],
        )
    return payload


def is_done(event: object) -> bool:
    """Whether :func:`parse_sse_line` returned the end-of-stream marker."""
    return event is _DONE


def parse_metrics(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition (``/metrics``) into ``{name: value}``.

    Series with labels keep them in the key (``name{label="x"}``); comments are skipped.
    llama-server's metrics are named ``llamacpp:<name>``.
    """
    metrics: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            name, _, rest = line.rpartition("}")
            name += "}"
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            metrics[name.strip()] = float(fields[0])
        except ValueError:
            metrics[name.strip()] = math.nan
    return metrics


def _error_message(body: str) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return body.strip()[:200]


def _chat_body(
    messages: Sequence[Message], params: Mapping[str, Any], *, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": list(messages), **params}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _completion_body(prompt: Any, params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, **params}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _vectors(response: Mapping[str, Any]) -> list[list[float]]:
    data = sorted(response.get("data", []), key=lambda d: d.get("index", 0))
    return [list(d["embedding"]) for d in data]
