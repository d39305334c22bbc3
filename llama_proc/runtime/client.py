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

import time
from typing import TYPE_CHECKING, Any, Self

from llama_proc.errors import (
    ServerRequestError,
)
from llama_proc.runtime.async_client import AsyncLlamaClient, AsyncLlamaEndpoints
from llama_proc.runtime.request_limits import (
    CONNECT_TIMEOUT,
    EXIT_GRACE,
    EXIT_POLL,
    REQUEST_TIMEOUT,
    _exited,
    _Limits,
    _read_timed_out,
    _set_read_timeout,
    _worth_checking,
)
from llama_proc.runtime.wire import (
    _ERROR_BODY_LIMIT,
    _STREAM_HEADERS,
    Message,
    _chat_body,
    _completion_body,
    _error_message,
    _vectors,
    is_done,
    parse_metrics,
    parse_sse_line,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from types import TracebackType

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
