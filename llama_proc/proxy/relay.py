"""Relaying requests to llama-server: upstream limits, headers, request bodies, errors.

Request bodies are checked before parsing (:func:`json_too_deep`), errors are written in
OpenAI's shape, and failures of a leased server are decoded for the client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from llama_proc.diagnosis import diagnose
from llama_proc.proxy.body_policy import BodyChecker, context_size

if TYPE_CHECKING:
    from llama_proc.proxy.models_config import ModelSpec
    from llama_proc.proxy.upstream import UpstreamResponse

__all__ = [
    "FORWARDED",
    "MAX_CACHED_URLS",
    "MAX_JSON_DEPTH",
    "MODEL_HEADER",
    "PASS_HEADERS",
    "RESTARTED_HEADER",
    "RETRY_PAUSE",
    "ROUTER_PATHS",
    "SERVER_HEADER",
    "THREAD_PARSE_BYTES",
    "UPSTREAM_ATTEMPTS",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_KEEPALIVE",
    "UPSTREAM_METRICS_TIMEOUT",
    "BadBodyError",
    "answer_too_large",
    "check_body",
    "error_response",
    "exit_cause",
    "http_error",
    "json_too_deep",
    "parse_body",
    "read_capped",
    "request_summary",
    "shutting_down_error",
    "sse_error",
    "stream_finished",
]

logger = logging.getLogger(__name__)

UPSTREAM_CONNECT_TIMEOUT: Final = 10.0
UPSTREAM_METRICS_TIMEOUT: Final = 3.0
UPSTREAM_KEEPALIVE: Final = 3.0
UPSTREAM_ATTEMPTS: Final = 2
"""Tries for a request whose upstream connection fails before any response byte."""
RETRY_PAUSE: Final = 0.1
MAX_CACHED_URLS: Final = 1024
MODEL_HEADER: Final = "X-Model-Id"
SERVER_HEADER: Final = "X-Llama-Proc-Server"
RESTARTED_HEADER: Final = "X-Llama-Proc-Restarted"
FORWARDED: Final = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/messages", "/v1/messages/count_tokens", "/v1/responses",
    "/v1/rerank", "/rerank", "/infill", "/tokenize", "/detokenize", "/apply-template",
)  # fmt: skip
"""The routes forwarded to the server of the body's ``model`` (llama-server's own paths)."""
ROUTER_PATHS: Final = (
    "/models",
    "/models/load",
    "/models/unload",
    "/models/sse",
    "/props",
    "/slots",
)
"""The router API's routes (:mod:`llama_proc.proxy.router_api`), as metrics label them."""

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of arrays/objects a request body may have (checked before parsing)."""
SUMMARY_FIELDS: Final = 24
"""Most top-level fields named when the operator log describes a request that crashed a server."""
THREAD_PARSE_BYTES: Final = 64 * 1024
"""Bodies larger than this are checked and parsed in a worker thread, off the event loop."""

PASS_HEADERS: Final = (("Content-Type", "content-type"), ("Content-Encoding", "content-encoding"))


def error_response(
    status: int,
    message: str,
    *,
    code: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    """An error event for a stream whose headers are already sent, as llama-server writes it."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_STREAM_ENDS: Final = (b"[DONE]\n\n", b'{"type":"message_stop"}\n\n')
_LAST_EVENTS: Final = (b"event: response.completed\n", b"event: response.failed\n")


def stream_finished(chunk: bytes) -> bool:
    """Whether a chunk of an event stream ends with the API's last event.

    OpenAI chat and completions end with ``data: [DONE]``, Anthropic messages with
    ``message_stop``, the Responses API with ``response.completed`` (or ``response.failed``).
    """
    if chunk.endswith(_STREAM_ENDS):
        return True
    if not chunk.endswith(b"\n\n"):
        return False
    return chunk[:-2].rpartition(b"\n\n")[2].startswith(_LAST_EVENTS)


_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_STRING: Final = re.compile(rb'"[^"]*"')
_NOT_BRACKET: Final = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPENERS: Final = frozenset(b"[{")


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than ``limit``, without parsing it.

    Escapes and strings are cut out with C-speed regexes, then only the brackets are walked,
    stopping at the first one past ``limit``: a hostile ``[[[[...`` costs microseconds and no
    recursion, where ``json.loads`` would recurse once per level.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", body)).translate(None, _NOT_BRACKET)
    depth = 0
    for char in brackets:
        if char in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class BadBodyError(Exception):
    """A request body that is not a JSON object within the limits (answered 400)."""


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; :class:`BadBodyError` when it is not one in limits."""
    if json_too_deep(body):
        msg = f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels."
        raise BadBodyError(msg)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        msg = "The request body is not valid JSON."
        raise BadBodyError(msg) from None
    if not isinstance(payload, dict):
        msg = "The request body must be a JSON object."
        raise BadBodyError(msg)
    return payload


def check_body(
    checker: BodyChecker,
    path: str,
    payload: dict[str, Any],
    spec: ModelSpec,
    flags: tuple[str, ...],
) -> web.Response | bytes | None:
    """Check a body against its model's limits before it is forwarded.

    Returns:
        A 400 answer, the body re-encoded without stripped fields, or None to forward it as
        it came.
    """
    context = context_size(spec.options, (*spec.extra_args, *flags))
    verdict = checker.check(path, payload, spec.request_body, context=context)
    if verdict.refusal is not None:
        refusal = verdict.refusal
        return error_response(400, refusal.message, code=refusal.code, param=refusal.param)
    if not verdict.strip:
        return None
    kept = {k: v for k, v in payload.items() if k not in verdict.strip}
    return json.dumps(kept).encode()


async def read_capped(upstream: UpstreamResponse, limit: int) -> bytes | None:
    """The whole body of a non-streamed answer, or None once it is longer than ``limit``."""
    declared = upstream.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    while piece := await upstream.readany():
        size += len(piece)
        if size > limit:
            return None
        parts.append(piece)
    return b"".join(parts)


def answer_too_large(model: str, limit: int, key: str) -> web.Response:
    """The 502 for an answer over ``limit`` (its connection is closed by the caller)."""
    message = (
        f"llama-server's answer for {model!r} is larger than {limit} bytes; it was not relayed "
        "(stream it, ask for less, or raise serve --max-response-bytes)."
    )
    logger.warning("%s [key %s]", message, key)
    return error_response(502, message, code="response_too_large", kind="server_error")


def request_summary(request: web.Request, body: bytes) -> str:
    """Who sent a request and what it held, for the operator's log (never for tenants).

    The API key is named by a fingerprint, the body by its size, digest and top-level fields.
    """
    auth = request.headers.get("Authorization", "").partition(" ")[2].strip()
    key = auth or request.headers.get("X-Api-Key", "")
    who = (
        "key sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:12]
        if key
        else "no key"
    )
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    fields = (
        ", ".join(
            f"{name[:40]!a} ({len(json.dumps(value))} bytes)"
            for name, value in list(payload.items())[:SUMMARY_FIELDS]
        )
        if isinstance(payload, dict)
        else "not a JSON object"
    )
    return (
        f"{request.method} {request.path} from {request.remote}, {who}, {len(body)}-byte body "
        f"sha256:{hashlib.sha256(body).hexdigest()[:16]}, fields: {fields}"
    )


def exit_cause(handle: object) -> str:
    """The decoded reason a leased server exited, from its log tail and exit status."""
    code = getattr(handle, "returncode", None)
    logs = getattr(handle, "logs", None)
    lines = logs() if callable(logs) else []
    return str(diagnose(lines, code)) if code is not None else ""


def shutting_down_error() -> web.Response:
    """The 503 for a request that arrives while the proxy shuts down."""
    return error_response(
        503, "The llama-proc proxy is shutting down.", code="shutting_down", kind="server_error"
    )


def http_error(exc: web.HTTPException, max_body_bytes: int) -> web.Response:
    """An aiohttp HTTP error (413, 404, 405...) in OpenAI's shape."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            413,
            f"Request body is larger than {max_body_bytes} bytes (raise --max-body-bytes).",
            code="request_too_large",
        )
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, f"Unknown route {exc.reason}.", code="not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(
            405, f"Method {exc.method} not allowed here.", code="method_not_allowed"
        )
    return error_response(exc.status, exc.reason or "HTTP error", code="http_error")
