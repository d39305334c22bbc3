"""HTTP clients for llama-server's API: :class:`LlamaClient` (requests) and :class:`AsyncLlamaClient` (aiohttp).

Both speak the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``) and llama-server's own (``/tokenize``, ``/detokenize``,
``/metrics``, ``/slots``, ``/props``, ``/health``). The ``openai`` SDK works against
``client.openai_base_url`` (the server URL + ``/v1``) just as well; these clients exist so the
common calls need no extra dependency and so errors arrive as
:class:`~llama_proc.errors.ServerRequestError`.

Streaming: llama-server sends server-sent events, one ``data: {json}`` line per chunk, then
``data: [DONE]``. With ``stream_options.include_usage`` (set by default here) the last chunk
has empty ``choices`` and carries ``usage`` and ``timings``. An error in mid-stream arrives as
``data: {"error": ...}`` and is raised. Chunks are yielded as they arrive: the HTTP body is read
chunk by chunk, never buffered to a fixed size. llama-server closes the connection after each
stream, so streams are sent with ``Connection: close``.

Time limits, the same in both clients: ``timeout`` is the longest silence (no byte from the
server for that long: a read timeout, so a long generation that keeps producing tokens is never
cut), and ``total_timeout`` (None by default) bounds a whole request, streamed body included.
Either raises :class:`~llama_proc.errors.ServerTimeoutError` naming the limit that ran out.

``requests`` and ``aiohttp`` are imported when a client is first used, not at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import TYPE_CHECKING, Any, Final, Self

from llama_proc.errors import (
    ServerExitedError,
    ServerRequestError,
    ServerStartError,
    ServerTimeoutError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

    import aiohttp
    import requests

__all__ = [
    "REQUEST_TIMEOUT",
    "AsyncLlamaClient",
    "AsyncLlamaEndpoints",
    "LlamaClient",
    "LlamaEndpoints",
    "parse_metrics",
    "parse_sse_line",
]

REQUEST_TIMEOUT: Final = 600.0
"""Default longest silence, in seconds, before a request fails (a prompt can take long to
process on CPU before the first byte; a stream that keeps producing tokens is never cut)."""
TOTAL_SLACK: Final = 0.05
"""A timed-out read this close to the total deadline counts as the total deadline's doing."""
CONNECT_TIMEOUT: Final = 10.0
"""Seconds to establish a connection."""
KEEPALIVE_TIMEOUT: Final = 3.0
"""Seconds an idle pooled connection is reused; below llama-server's own 5 s limit."""
EXIT_GRACE: Final = 0.5
"""Seconds a request that failed without an HTTP answer waits for the server's exit status."""
EXIT_POLL: Final = 0.02
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


def _exited(
    err: ServerRequestError, check: Callable[[ServerRequestError], None] | None
) -> ServerExitedError | None:
    """Let the server's owner look at a failure without an HTTP answer (both clients).

    An owner that finds the process gone raises :class:`ServerStartError` (exit code, cause,
    log tail); a request in flight saw the server *exit*, so that becomes one
    :class:`ServerExitedError`, whichever client and whichever way the connection broke.
    """
    if check is None:
        return None
    try:
        check(err)
    except ServerStartError as dead:
        return ServerExitedError("llama-server", dead.returncode, dead.cause, dead.log_tail)
    return None


class _Limits:
    """The two time limits of one request: the longest silence and the whole request."""

    def __init__(self, what: str, silence: float | None, total: float | None) -> None:
        self.what = what
        self.silence = silence
        self.total = total
        self.started = time.monotonic()

    def left(self) -> float | None:
        if self.total is None:
            return None
        return max(self.total - (time.monotonic() - self.started), 0.0)

    def read_timeout(self) -> float | None:
        """The next read's timeout: the silence limit, cut to what is left of the total."""
        left = self.left()
        if left is None:
            return self.silence
        return left if self.silence is None else min(self.silence, left)

    def overdue(self) -> bool:
        left = self.left()
        return left is not None and left <= TOTAL_SLACK

    def error(self) -> ServerTimeoutError:
        """The error for a timed-out read or an overdue request, naming the limit."""
        what = self.what
        elapsed = time.monotonic() - self.started
        if self.overdue() or self.silence is None:
            msg = (
                f"{what}: not finished within its total timeout of {self.total:g} s "
                f"(total_timeout; request_total_timeout on a server); raise it, or leave it "
                "unset to bound only silences"
            )
        else:
            msg = (
                f"{what}: llama-server sent nothing for {self.silence:g} s, the longest "
                f"silence allowed (timeout; request_timeout on a server), {elapsed:.1f} s into "
                "the request; the server may be wedged or overloaded, or the prompt needs a "
                "longer timeout"
            )
        return ServerTimeoutError(msg)


def _read_timed_out(err: BaseException) -> bool:
    """Whether a requests/urllib3 error (at any depth) is a read that timed out."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        name = type(item).__name__
        if isinstance(item, TimeoutError) or name in ("ReadTimeout", "ReadTimeoutError"):
            return True
        todo.extend([item.__cause__, item.__context__, *item.args])
    return False


def _set_read_timeout(response: requests.Response, seconds: float | None) -> None:
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def _worth_checking(err: ServerRequestError, check: object) -> bool:
    return err.status is None and check is not None and not isinstance(err, ServerExitedError)


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


class LlamaEndpoints:
    """llama-server's HTTP API for blocking code, written once.

    :class:`LlamaClient` and :class:`~llama_proc.server.LlamaServer` both inherit these
    methods; each supplies the client that carries the requests (:meth:`_api`).
    """

    def _api(self) -> LlamaClient:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        """``GET /health`` (no API key needed); raises while the model is loading (503)."""
        result: dict[str, Any] = self._api()._json("GET", "/health")
        return result

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        result: dict[str, Any] = self._api()._json("GET", "/v1/models")
        return result

    def chat(self, messages: Sequence[Message], **params: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``; ``params`` are OpenAI fields (max_tokens, temperature...)."""
        result: dict[str, Any] = self._api()._json(
            "POST", "/v1/chat/completions", _chat_body(messages, params, stream=False)
        )
        return result

    def chat_stream(self, messages: Sequence[Message], **params: Any) -> Iterator[dict[str, Any]]:
        """Stream a chat completion: one dict per chunk; the last one carries ``usage``."""
        return self._api()._stream(
            "/v1/chat/completions", _chat_body(messages, params, stream=True)
        )

    def complete(self, prompt: str | Sequence[int], **params: Any) -> dict[str, Any]:
        """``POST /v1/completions``."""
        result: dict[str, Any] = self._api()._json(
            "POST", "/v1/completions", _completion_body(prompt, params, stream=False)
        )
        return result

    def complete_stream(
        self, prompt: str | Sequence[int], **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Stream a text completion chunk by chunk."""
        return self._api()._stream("/v1/completions", _completion_body(prompt, params, stream=True))

    def embeddings(self, input: str | Sequence[str], **params: Any) -> dict[str, Any]:
        """``POST /v1/embeddings`` (the server must run with ``embeddings=True``)."""
        result: dict[str, Any] = self._api()._json(
            "POST", "/v1/embeddings", {"input": input, **params}
        )
        return result

    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Embedding vectors for ``texts``, in order."""
        return _vectors(self.embeddings(texts))

    def tokenize(self, content: str, *, add_special: bool = False) -> list[int]:
        """``POST /tokenize``: token ids for ``content``."""
        result = self._api()._json(
            "POST", "/tokenize", {"content": content, "add_special": add_special}
        )
        return [int(t) for t in result["tokens"]]

    def detokenize(self, tokens: Iterable[int]) -> str:
        """``POST /detokenize``: text for token ids."""
        result = self._api()._json("POST", "/detokenize", {"tokens": list(tokens)})
        return str(result["content"])

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed (the server must run with ``metrics=True``)."""
        return parse_metrics(self._api()._text("GET", "/metrics"))

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``: per-slot state."""
        result: list[dict[str, Any]] = self._api()._json("GET", "/slots")
        return result

    def props(self) -> dict[str, Any]:
        """``GET /props``: server properties (model path, context size, chat template...)."""
        result: dict[str, Any] = self._api()._json("GET", "/props")
        return result


class AsyncLlamaEndpoints:
    """llama-server's HTTP API for asyncio, written once (the twin of :class:`LlamaEndpoints`).

    :class:`AsyncLlamaClient` and :class:`~llama_proc.server.AsyncLlamaServer` both inherit
    these methods; each supplies the client that carries the requests (:meth:`_api`).
    """

    def _api(self) -> AsyncLlamaClient:
        raise NotImplementedError

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        result: dict[str, Any] = await self._api()._json("GET", "/health")
        return result

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        result: dict[str, Any] = await self._api()._json("GET", "/v1/models")
        return result

    async def chat(self, messages: Sequence[Message], **params: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/chat/completions", _chat_body(messages, params, stream=False)
        )
        return result

    def chat_stream(
        self, messages: Sequence[Message], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a chat completion (``async for chunk in client.chat_stream(...)``)."""
        return self._api()._stream(
            "/v1/chat/completions", _chat_body(messages, params, stream=True)
        )

    async def complete(self, prompt: str | Sequence[int], **params: Any) -> dict[str, Any]:
        """``POST /v1/completions``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/completions", _completion_body(prompt, params, stream=False)
        )
        return result

    def complete_stream(
        self, prompt: str | Sequence[int], **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a text completion."""
        return self._api()._stream("/v1/completions", _completion_body(prompt, params, stream=True))

    async def embeddings(self, input: str | Sequence[str], **params: Any) -> dict[str, Any]:
        """``POST /v1/embeddings``."""
        result: dict[str, Any] = await self._api()._json(
            "POST", "/v1/embeddings", {"input": input, **params}
        )
        return result

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Embedding vectors for ``texts``, in order."""
        return _vectors(await self.embeddings(texts))

    async def tokenize(self, content: str, *, add_special: bool = False) -> list[int]:
        """``POST /tokenize``."""
        result = await self._api()._json(
            "POST", "/tokenize", {"content": content, "add_special": add_special}
        )
        return [int(t) for t in result["tokens"]]

    async def detokenize(self, tokens: Iterable[int]) -> str:
        """``POST /detokenize``."""
        result = await self._api()._json("POST", "/detokenize", {"tokens": list(tokens)})
        return str(result["content"])

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed."""
        return parse_metrics(await self._api()._text("GET", "/metrics"))

    async def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``."""
        result: list[dict[str, Any]] = await self._api()._json("GET", "/slots")
        return result

    async def props(self) -> dict[str, Any]:
        """``GET /props``."""
        result: dict[str, Any] = await self._api()._json("GET", "/props")
        return result


class LlamaClient(LlamaEndpoints):
    """Blocking client for one llama-server.

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8080`` (no ``/v1``).
        api_key: sent as ``Authorization: Bearer`` when the server requires a key.
        timeout: the longest silence, in seconds (no byte for that long fails the request);
            None = wait forever.
        total_timeout: the most seconds one request may take in all, streamed body included;
            None (the default) = no limit beyond ``timeout``.
        session: a ``requests.Session`` to use (default: a new one, closed by :meth:`close`).
        on_connection_error: called with every error that has no HTTP status (unreachable,
            timed out, broken stream) before it is raised; it may raise a better error instead
            (a server's owner checks whether its process crashed).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
        total_timeout: float | None = None,
        session: requests.Session | None = None,
        on_connection_error: Callable[[ServerRequestError], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.on_connection_error = on_connection_error
        self._session = session
        self._owns_session = session is None

    def _api(self) -> LlamaClient:
        return self

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for the ``openai`` SDK: the server URL + ``/v1``."""
        return f"{self.base_url}/v1"

    @property
    def session(self) -> requests.Session:
        """The underlying ``requests.Session`` (created on first use)."""
        if self._session is None:
            import requests  # noqa: PLC0415 - heavy; loaded on first use (cheap package import)

            self._session = requests.Session()
            self._session.trust_env = False  # a local server: never route it through a proxy
        return self._session

    def _headers(self) -> dict[str, str]:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        limits: _Limits | None = None,
    ) -> requests.Response:
        """Send a request and return the response after checking its status.

        Raises:
            ServerTimeoutError: the server was silent for ``timeout`` s, or the request took
                ``total_timeout`` s.
            ServerRequestError: the server is unreachable or answered >= 400.
        """
        import requests  # noqa: PLC0415 - heavy; loaded on first use (cheap package import)

        url = f"{self.base_url}{path}"
        limits = limits or self._limits(method, path)
        connect = CONNECT_TIMEOUT
        if (left := limits.left()) is not None:
            connect = min(connect, left)
        try:
            response = self.session.request(
                method,
                url,
                json=json_body,
                headers={**self._headers(), **(headers or {})},
                stream=stream,
                timeout=(connect, limits.read_timeout()),
            )
        except requests.ConnectTimeout as err:
            msg = f"{method} {url} failed: could not connect within {connect:g} s"
            raise ServerRequestError(msg) from err
        except requests.RequestException as err:
            if _read_timed_out(err):
                raise limits.error() from err
            msg = f"{method} {url} failed: {err}"
            raise ServerRequestError(msg) from err
        if response.status_code >= 400:
            body = response.text
            response.close()
            msg = f"{method} {path} failed: {_error_message(body)}"
            raise ServerRequestError(msg, response.status_code, body[:_ERROR_BODY_LIMIT])
        return response

    def _limits(self, method: str, path: str) -> _Limits:
        return _Limits(f"{method} {path}", self.timeout, self.total_timeout)

    def _failed(self, err: ServerRequestError) -> None:
        # A killed server's socket closes a moment before its exit status can be read.
        if not _worth_checking(err, self.on_connection_error):
            return
        deadline = time.monotonic() + EXIT_GRACE
        while (exited := _exited(err, self.on_connection_error)) is None:
            if time.monotonic() >= deadline:
                return
            time.sleep(EXIT_POLL)
        raise exited from err

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.request(method, path, json_body=body)
            try:
                return response.json()
            except ValueError as err:
                msg = f"{method} {path} returned invalid JSON"
                raise ServerRequestError(msg, response.status_code, response.text[:200]) from err
        except ServerRequestError as err:
            self._failed(err)
            raise

    def _text(self, method: str, path: str) -> str:
        try:
            return self.request(method, path).text
        except ServerRequestError as err:
            self._failed(err)
            raise

    def _stream(self, path: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        import requests  # noqa: PLC0415 - heavy; loaded on first use (cheap package import)

        limits = self._limits("POST", path)
        try:
            response = self.request(
                "POST", path, json_body=body, stream=True, headers=_STREAM_HEADERS, limits=limits
            )
            with response:
                try:
                    # chunk_size=None: hand over each HTTP chunk as it arrives (no fixed buffer).
                    for line in response.iter_lines(chunk_size=None):
                        event = parse_sse_line(line)
                        if is_done(event):
                            return
                        if limits.overdue():
                            raise limits.error()
                        if event is not None:
                            yield event
                        if limits.total is not None:
                            # No read may wait past the total deadline.
                            _set_read_timeout(response, limits.read_timeout())
                except requests.RequestException as err:
                    if _read_timed_out(err):
                        raise limits.error() from err
                    msg = f"POST {path}: the stream broke: {err}"
                    raise ServerRequestError(msg) from err
        except ServerRequestError as err:
            self._failed(err)
            raise

    def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._session is not None and self._owns_session:
            self._session.close()
            self._session = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLlamaClient(AsyncLlamaEndpoints):
    """asyncio client for one llama-server (aiohttp); the same calls as :class:`LlamaClient`.

    Args:
        base_url: the server root (no ``/v1``).
        api_key: sent as ``Authorization: Bearer`` when set.
        timeout: the longest silence, in seconds, as for :class:`LlamaClient`.
        total_timeout: the most seconds one request may take in all, as for
            :class:`LlamaClient`.
        on_connection_error: as for :class:`LlamaClient`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
        total_timeout: float | None = None,
        on_connection_error: Callable[[ServerRequestError], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.on_connection_error = on_connection_error
        self._session: aiohttp.ClientSession | None = None

    def _api(self) -> AsyncLlamaClient:
        return self

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for the ``openai`` SDK: the server URL + ``/v1``."""
        return f"{self.base_url}/v1"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

            self._session = aiohttp.ClientSession(
                # llama-server (cpp-httplib) closes idle keep-alive connections after 5 s;
                # aiohttp would reuse them for 15 s and fail with "Can not write request body".
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_TIMEOUT),
                # sock_read: the longest silence (reset by every byte), like the sync client's
                # read timeout; total: the optional deadline for the whole request.
                timeout=aiohttp.ClientTimeout(
                    total=self.total_timeout, connect=CONNECT_TIMEOUT, sock_read=self.timeout
                ),
                headers={} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"},
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        limits: _Limits | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request; the caller must release the response.

        Raises:
            ServerTimeoutError: the server was silent for ``timeout`` s, or the request took
                ``total_timeout`` s.
            ServerRequestError: the server is unreachable or answered >= 400.
        """
        import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

        url = f"{self.base_url}{path}"
        limits = limits or self._limits(method, path)
        try:
            response = await self._get_session().request(
                method, url, json=json_body, headers=headers
            )
        except aiohttp.ConnectionTimeoutError as err:
            msg = f"{method} {url} failed: could not connect within {CONNECT_TIMEOUT:g} s"
            raise ServerRequestError(msg) from err
        except TimeoutError as err:  # sock_read (silence) or total
            raise limits.error() from err
        except aiohttp.ClientError as err:
            msg = f"{method} {url} failed: {err!r}"
            raise ServerRequestError(msg) from err
        if response.status >= 400:
            body = await response.text()
            response.release()
            msg = f"{method} {path} failed: {_error_message(body)}"
            raise ServerRequestError(msg, response.status, body[:_ERROR_BODY_LIMIT])
        return response

    def _limits(self, method: str, path: str) -> _Limits:
        return _Limits(f"{method} {path}", self.timeout, self.total_timeout)

    async def _failed(self, err: ServerRequestError) -> None:
        # A killed server's socket closes a moment before its exit status can be read.
        if not _worth_checking(err, self.on_connection_error):
            return
        deadline = time.monotonic() + EXIT_GRACE
        while (exited := _exited(err, self.on_connection_error)) is None:
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(EXIT_POLL)
        raise exited from err

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self.request(method, path, json_body=body)
            async with response:
                try:
                    return await response.json(content_type=None)
                except ValueError as err:
                    msg = f"{method} {path} returned invalid JSON"
                    raise ServerRequestError(msg, response.status) from err
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def _text(self, method: str, path: str) -> str:
        try:
            response = await self.request(method, path)
            async with response:
                return await response.text()
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def _stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        import aiohttp  # noqa: PLC0415 - heavy optional dependency, loaded on first use

        limits = self._limits("POST", path)
        try:
            response = await self.request(
                "POST", path, json_body=body, headers=_STREAM_HEADERS, limits=limits
            )
            async with response:
                pending = b""
                try:
                    # iter_any(): whatever bytes arrived, no line-length limit of readline().
                    async for data in response.content.iter_any():
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            event = parse_sse_line(line)
                            if is_done(event):
                                return
                            if event is not None:
                                yield event
                except TimeoutError as err:  # sock_read (silence) or total
                    raise limits.error() from err
                except aiohttp.ClientError as err:
                    msg = f"POST {path}: the stream broke: {err!r}"
                    raise ServerRequestError(msg) from err
        except ServerRequestError as err:
            await self._failed(err)
            raise

    async def close(self) -> None:
        """Close the HTTP session."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
