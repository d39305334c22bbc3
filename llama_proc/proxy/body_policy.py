"""Request bodies: what one request may ask of a llama-server, under server-wide caps.

The proxy checks every forwarded body before the pool sees it (:class:`BodyChecker`), so a
refused request never reaches a server: a field over its limit is answered 400 in OpenAI's
shape, naming the field and the limit. The checks are our own and bounded: a GBNF ``grammar``
is measured (bytes, parenthesis nesting, repetition counts) and a JSON schema
(``json_schema``, ``response_format``, ``tools``) walked, in bounded time
(:mod:`llama_proc.proxy.body_shapes`). llama-server (b11434) caps ``n_probs`` only at the
vocabulary size and parses grammars recursively, so both are refused here rather than left
to it.

What is bounded (the names in a model's ``request_body`` table; the serve flag that sets the
server-wide cap; its default):

=============  ===========================================  ==========================  ======
key            request fields                               cap (serve)                 def.
=============  ===========================================  ==========================  ======
n_probs        ``n_probs``, ``top_logprobs``, ``logprobs``  ``--max-n-probs``           20
max_tokens     ``max_tokens``, ``max_completion_tokens``,   ``--max-predict``           131072
               ``n_predict``, ``max_output_tokens`` (and
               the model's context)
n              ``n``, ``n_cmpl``                            ``--max-choices``           4
logit_bias     entries in ``logit_bias``                    ``--max-logit-bias``        1024
images         media parts (image, audio, video)            ``--max-images``            8
image_bytes    decoded bytes of one media part              ``--max-image-bytes``       8 MiB
grammar_bytes  ``grammar`` (GBNF) length in bytes           ``--max-grammar-bytes``     64 KiB
grammar_depth  ``grammar`` parenthesis nesting              ``--max-grammar-depth``     64
schema_bytes   JSON schemas, bytes of keys and values       ``--max-schema-bytes``      64 KiB
schema_depth   JSON schemas, nesting of objects/arrays      ``--max-schema-depth``      32
inputs         items in ``input``, ``documents``,           ``--max-inputs``            2048
               ``input_extra``, ``prompt`` lists
=============  ===========================================  ==========================  ======

Repetition counts (``x{n,m}`` in a grammar; ``minItems``, ``maxLength``... in a schema) are
at most :data:`~llama_proc.proxy.body_shapes.MAX_REPEAT`: llama.cpp copies the repeated
element that many times. The caps themselves are at most :data:`BODY_CEILINGS`: llama-server
b11434 crashed with SIGSEGV on a grammar whose groups nest 20,000 levels deep (a 40 KB
string), and on a chain of 100,000 rules (1.7 MB).

A model's table may lower any limit (never raise it above the cap) and says which top-level
fields besides llama-server's documented ones are passed on::

    [models.smol.request_body]
    n_probs = { max = 5 }
    max_tokens = { max = 512 }
    grammar = { max_bytes = 16384, max_depth = 16 }
    json_schema = { max_bytes = 16384, max_depth = 16 }
    images = { max = 2, max_bytes = 1048576 }
    fields = ["my_extension"]        # more top-level fields passed on
    unknown_fields = "refuse"        # or "strip" (dropped silently) or "allow"

Unknown top-level fields are refused (400 naming the field) by default: the documented fields
of each endpoint (:data:`KNOWN_FIELDS`) are passed, and anything else only where the operator
says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from llama_proc.errors import InvalidArgumentError
from llama_proc.proxy.body_shapes import grammar_problem, schema_problem
from llama_proc.proxy.serve_flags import BODY_CAP_FLAGS

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "BODY_CEILINGS",
    "CAP_FLAGS",
    "KNOWN_FIELDS",
    "BodyCaps",
    "BodyCheck",
    "BodyChecker",
    "BodyPolicy",
    "Refusal",
    "context_size",
]

IMPLIED_TOP_LOGPROBS: Final = 20
"""What llama-server b11434 sends per token for ``logprobs: true`` without ``top_logprobs``."""
DEFAULT_MAX_PREDICT: Final = 131072
"""Default cap on tokens to generate; a model's known context size lowers it."""
UnknownFields = Literal["refuse", "strip", "allow"]
UNKNOWN_MODES: Final[tuple[UnknownFields, ...]] = ("refuse", "strip", "allow")

_KIB: Final = 1024
_MIB: Final = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class BodyCaps:
    """Server-wide limits on request bodies: the defaults, and the most a model may allow.

    Attributes:
        n_probs: most token probabilities per generated token (``n_probs``, ``top_logprobs``,
            ``logprobs``).
        max_tokens: most tokens one request may ask to generate (``max_tokens``,
            ``max_completion_tokens``, ``n_predict``); the model's context size, where the
            proxy knows it, lowers this.
        n: most completions per request (``n``, ``n_cmpl``).
        logit_bias: most entries in ``logit_bias``.
        images: most media parts (images, audio, video) in one request.
        image_bytes: largest decoded media part, in bytes.
        grammar_bytes: longest ``grammar``, in UTF-8 bytes.
        grammar_depth: deepest parenthesis nesting in a ``grammar``.
        schema_bytes: largest JSON schema (keys and values, in bytes).
        schema_depth: deepest nesting of objects and arrays in a JSON schema.
        inputs: most items in one list of inputs (embedding ``input``, rerank
            ``documents``, infill ``input_extra``, a batch of completion ``prompt``).
    """

    n_probs: int = 20
    max_tokens: int = DEFAULT_MAX_PREDICT
    n: int = 4
    logit_bias: int = 1024
    images: int = 8
    image_bytes: int = 8 * _MIB
    grammar_bytes: int = 64 * _KIB
    grammar_depth: int = 64
    schema_bytes: int = 64 * _KIB
    schema_depth: int = 32
    inputs: int = 2048

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ceiling = BODY_CEILINGS[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"{f.name}={value!r} must be a whole number >= 0"
                raise InvalidArgumentError(msg)
            if value > ceiling:
                msg = f"{f.name}={value} is above the hard ceiling of {ceiling}"
                raise InvalidArgumentError(msg)

    def replace(self, **limits: int) -> BodyCaps:
        """A copy with some limits changed (checked against the ceilings)."""
        return dataclasses.replace(self, **limits)


BODY_CEILINGS: Final[Mapping[str, int]] = {
    "n_probs": 1024,
    "max_tokens": 1 << 24,
    "n": 64,
    "logit_bias": 1 << 20,
    "images": 256,
    "image_bytes": 1 << 30,
    # Measured on b11434 (SmolLM2, /completion): groups nested 20,000 deep (40 KB) and a chain
    # of 100,000 rules (1.7 MB) each crashed llama-server with SIGSEGV; 15,000 and 20,000
    # (338 KB) did not.
    "grammar_bytes": 256 * _KIB,
    "grammar_depth": 256,
    "schema_bytes": 4 * _MIB,
    "schema_depth": 64,
    "inputs": 1 << 16,
}
"""The most any cap may be set to, whatever the operator asks."""

CAP_FLAGS: Final[Mapping[str, str]] = {name: flag for name, (flag, _) in BODY_CAP_FLAGS.items()}
"""The serve flag setting each cap."""

# The config table: field group -> {bound key -> limit}.
_TABLE_KEYS: Final[Mapping[str, Mapping[str, str]]] = {
    "n_probs": {"max": "n_probs"},
    "max_tokens": {"max": "max_tokens"},
    "n": {"max": "n"},
    "logit_bias": {"max": "logit_bias"},
    "images": {"max": "images", "max_bytes": "image_bytes"},
    "grammar": {"max_bytes": "grammar_bytes", "max_depth": "grammar_depth"},
    "json_schema": {"max_bytes": "schema_bytes", "max_depth": "schema_depth"},
    "inputs": {"max": "inputs"},
}
_FIELD_KEYS: Final = frozenset({"fields", "unknown_fields"})

# -- the fields llama-server documents, per endpoint -------------------------------------------

_SAMPLING: Final = frozenset(
    {
        # llama-server's completion schema (server-schema.cpp, b11434) and its README
        "verbose", "timings_per_token", "stream", "stream_options", "cache_prompt",
        "return_tokens", "return_progress", "sse_ping_interval", "n_predict",
        "max_completion_tokens", "max_tokens", "n_indent", "n_keep", "n_discard", "n_cmpl", "n",
        "n_cache_reuse", "t_max_prompt_ms", "t_max_predict_ms", "response_fields", "top_k",
        "top_p", "min_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "typical_p",
        "temperature", "dynatemp_range", "dynatemp_exponent", "repeat_last_n", "repeat_penalty",
        "frequency_penalty", "presence_penalty", "dry_multiplier", "dry_base",
        "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "mirostat",
        "mirostat_tau", "mirostat_eta", "adaptive_target", "adaptive_decay", "seed", "n_probs",
        "logprobs", "min_keep", "post_sampling_probs", "lora", "json_schema", "grammar",
        "grammar_lazy", "reasoning_format", "parse_tool_calls", "reasoning_control",
        "reasoning_budget_tokens", "reasoning_budget_message", "logit_bias", "ignore_eos",
        "stop", "samplers", "id_slot", "model", "echo",
        # OpenAI's documented request fields that llama-server accepts or ignores
        "user", "metadata", "store", "service_tier", "best_of", "suffix",
    }
)  # fmt: skip
_CHAT: Final = frozenset(
    {
        "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "top_logprobs", "chat_template_kwargs", "add_generation_prompt",
        "continue_final_message", "reasoning_effort", "thinking_budget_tokens", "modalities",
        "audio", "prediction", "functions", "function_call", "web_search_options",
    }
)  # fmt: skip
_COMPLETION: Final = frozenset({"prompt", "input_prefix", "input_suffix", "input_extra"})
_EMBEDDING: Final = frozenset(
    {"input", "content", "model", "encoding_format", "dimensions", "user", "embd_normalize"}
)
# Anthropic's Messages API and OpenAI's Responses API, as llama-server converts them to chat.
_MESSAGES: Final = frozenset(
    {
        "messages", "system", "max_tokens", "stop_sequences", "tools", "tool_choice",
        "thinking", "metadata", "service_tier", "chat_template_kwargs",
    }
)  # fmt: skip
_COUNT_TOKENS: Final = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking"}
)
_RESPONSES: Final = frozenset(
    {
        "input", "instructions", "max_output_tokens", "previous_response_id", "tools",
        "tool_choice", "parallel_tool_calls", "reasoning", "text", "truncation", "include",
        "top_logprobs", "chat_template_kwargs",
    }
)  # fmt: skip
_RERANK: Final = frozenset({"model", "query", "documents", "top_n", "return_text"})
KNOWN_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "/v1/chat/completions": _SAMPLING | _CHAT,
    "/v1/completions": _SAMPLING | _COMPLETION,
    "/v1/embeddings": _EMBEDDING,
    "/v1/messages": _SAMPLING | _MESSAGES,
    "/v1/messages/count_tokens": _COUNT_TOKENS,
    "/v1/responses": _SAMPLING | _RESPONSES,
    "/v1/rerank": _RERANK,
    "/rerank": _RERANK,
    "/infill": _SAMPLING | _COMPLETION,
    "/tokenize": frozenset({"model", "content", "add_special", "parse_special", "with_pieces"}),
    "/detokenize": frozenset({"model", "tokens"}),
    "/apply-template": _SAMPLING | _CHAT,
}
"""Top-level fields passed on by default, per forwarded route."""

_N_PROBS: Final = ("n_probs", "top_logprobs", "logprobs")
_MAX_TOKENS: Final = ("max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens")
_INPUT_LISTS: Final = ("input", "documents", "input_extra", "prompt")
_CHOICES: Final = ("n", "n_cmpl")
_SCHEMAS: Final = ("json_schema", "response_format", "tools", "functions")
_MEDIA_PARTS: Final = {
    "image_url": "image_url",
    "input_audio": "input_audio",
    "input_video": "input_video",
    "video_url": "video_url",
    "image": "source",  # Anthropic: {"type": "base64", "data": ...} or {"type": "url", "url": ...}
    "input_image": "image_url",  # OpenAI Responses
}
_MESSAGE_ROUTES: Final = frozenset(
    {"/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/apply-template"}
)
_CTX_FLAGS: Final = frozenset({"-c", "--ctx-size"})


class Refusal(NamedTuple):
    """Why a body is refused: the field (OpenAI's ``param``), a one-line message, a code."""

    param: str
    message: str
    code: str = "request_body_limit"


@dataclass(frozen=True)
class BodyPolicy:
    """One model's ``request_body`` table: lower limits and which unknown fields pass.

    Attributes:
        limits: (limit name, value) pairs replacing the server-wide caps for this model.
        fields: top-level fields passed on besides the documented ones.
        unknown_fields: what happens to other fields: ``refuse`` (400), ``strip`` (dropped
            before forwarding) or ``allow`` (passed on).
    """

    limits: tuple[tuple[str, int], ...] = ()
    fields: frozenset[str] = field(default_factory=frozenset)
    unknown_fields: UnknownFields = "refuse"

    @classmethod
    def from_table(cls, table: Mapping[str, object], *, caps: BodyCaps | None = None) -> BodyPolicy:
        """Read a ``request_body`` table (see the module docstring).

        Args:
            table: the TOML table.
            caps: when given, a limit above a server-wide cap is refused.

        Raises:
            InvalidArgumentError: an unknown key, a bound that is not a whole number >= 0,
                one above its cap, or bad ``fields`` / ``unknown_fields``.
        """
        limits: dict[str, int] = {}
        for key, value in table.items():
            if key in _FIELD_KEYS:
                continue
            bounds = _TABLE_KEYS.get(key)
            if bounds is None:
                known = ", ".join([*_TABLE_KEYS, *sorted(_FIELD_KEYS)])
                msg = f"unknown key {key!r}; use {known}"
                raise InvalidArgumentError(msg)
            if not isinstance(value, dict):
                shape = " or ".join(f"{{ {b} = N }}" for b in bounds)
                msg = f"{key} must be a table like {shape}"
                raise InvalidArgumentError(msg)
            for bound, number in value.items():
                name = bounds.get(bound)
                if name is None:
                    msg = f"{key}: unknown key {bound!r}; use {', '.join(bounds)}"
                    raise InvalidArgumentError(msg)
                limits[name] = _limit(f"{key}.{bound}", number, name, caps)
        fields = table.get("fields", [])
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            msg = "fields must be a list of top-level field names"
            raise InvalidArgumentError(msg)
        mode = table.get("unknown_fields", "refuse")
        if mode not in UNKNOWN_MODES:
            msg = f"unknown_fields must be one of {', '.join(UNKNOWN_MODES)}, not {mode!r}"
            raise InvalidArgumentError(msg)
        unknown: UnknownFields = mode
        return cls(tuple(sorted(limits.items())), frozenset(fields), unknown)


def _limit(where: str, value: object, name: str, caps: BodyCaps | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = f"{where} must be a whole number >= 0, not {value!r}"
        raise InvalidArgumentError(msg)
    cap = BODY_CEILINGS[name] if caps is None else getattr(caps, name)
    if value > cap:
        msg = f"{where} {value} is above the server-wide cap of {cap} (serve {CAP_FLAGS[name]})"
        raise InvalidArgumentError(msg)
    return value


def context_size(options: Mapping[str, object], flags: Sequence[str]) -> int | None:
    """The context size a model's server runs with, where its options or flags set it.

    Args:
        options: the model's ServerArgs options (``ctx_size``).
        flags: its trusted ``extra_args`` followed by the request's normalized flags (the last
            ``-c``/``--ctx-size`` wins).

    Returns:
        The size in tokens; None when unset or 0 (the model file decides).
    """
    value = options.get("ctx_size")
    ctx = value if isinstance(value, int) and not isinstance(value, bool) else None
    for i, token in enumerate(flags):
        name, eq, inline = token.partition("=")
        if name in _CTX_FLAGS:
            text = inline if eq else (flags[i + 1] if i + 1 < len(flags) else "")
            if text.isascii() and text.isdigit():
                ctx = int(text)
    return ctx or None


def _number_over(value: object, limit: int) -> bool:
    """Whether a JSON number is above ``limit`` (``true``/``false`` are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > limit


# -- checking a request ----------------------------------------------------------------------


class BodyCheck(NamedTuple):
    """The outcome of a check: a refusal, or the top-level fields to drop before forwarding."""

    refusal: Refusal | None = None
    strip: tuple[str, ...] = ()


_PASS: Final = BodyCheck()


class BodyChecker:
    """Checks request bodies against each model's policy under the server-wide caps.

    Args:
        caps: the server-wide caps; None = :class:`BodyCaps` defaults.
    """

    def __init__(self, caps: BodyCaps | None = None) -> None:
        self.caps = caps if caps is not None else BodyCaps()
        self._limits: dict[BodyPolicy, BodyCaps] = {}

    def limits(self, policy: BodyPolicy) -> BodyCaps:
        """The effective limits for a model's policy (its table over the caps)."""
        limits = self._limits.get(policy)
        if limits is None:
            limits = self._limits[policy] = self.caps.replace(**dict(policy.limits))
        return limits

    def check(
        self,
        path: str,
        payload: Mapping[str, Any],
        policy: BodyPolicy,
        *,
        context: int | None = None,
    ) -> BodyCheck:
        """Check one request body for a forwarded route.

        Args:
            path: the route (``/v1/chat/completions``...).
            payload: the parsed JSON body.
            policy: the model's ``request_body`` policy.
            context: the model's context size in tokens, when known (bounds ``max_tokens``).

        Returns:
            A refusal naming the field and the limit, or the unknown fields to strip.
        """
        limits = self.limits(policy)
        strip: list[str] = []
        if policy.unknown_fields != "allow":
            known = KNOWN_FIELDS.get(path, frozenset())
            for name in payload:
                if name in known or name in policy.fields:
                    continue
                if policy.unknown_fields == "strip":
                    strip.append(name)
                    continue
                shown = name[:64].encode("ascii", "backslashreplace").decode()
                msg = (
                    f"Unknown field {shown!r} for {path}: this proxy passes only the fields "
                    "llama-server documents (the operator may allow more in the model's "
                    "request_body table)."
                )
                return BodyCheck(Refusal(shown, msg, "unknown_field"))
        refusal = _check_numbers(payload, limits, context) or _check_shapes(payload, limits)
        if refusal is None and path in _MESSAGE_ROUTES:
            refusal = _check_media(_chat_media(payload.get("messages")), limits)
        elif refusal is None and path == "/v1/responses":
            refusal = _check_media(_chat_media(payload.get("input")), limits)
        elif refusal is None:
            refusal = _check_media(
                _prompt_media(payload.get("prompt", payload.get("input"))), limits
            )
        if refusal is not None:
            return BodyCheck(refusal)
        return BodyCheck(strip=tuple(strip)) if strip else _PASS


def _over(name: str, value: object, limit: int, what: str = "") -> Refusal:
    shown = value if isinstance(value, int) else repr(value)[:40]
    return Refusal(name, f"{name} {shown} is above this server's limit of {limit}{what}.")


def _check_numbers(
    payload: Mapping[str, Any], limits: BodyCaps, context: int | None
) -> Refusal | None:
    for name in _N_PROBS:
        value = payload.get(name)
        if _number_over(value, limits.n_probs):
            return _over(name, value, limits.n_probs)
    implied = payload.get("logprobs") is True and payload.get("top_logprobs") is None
    if implied and limits.n_probs < IMPLIED_TOP_LOGPROBS:
        return Refusal(
            "top_logprobs",
            f"logprobs without top_logprobs asks for {IMPLIED_TOP_LOGPROBS} per token; this "
            f"server's limit is {limits.n_probs}: set top_logprobs.",
        )
    predict = limits.max_tokens if context is None else min(limits.max_tokens, context)
    for name in _MAX_TOKENS:
        value = payload.get(name)
        if _number_over(value, predict):
            where = "" if predict == limits.max_tokens else " (the model's context size)"
            return _over(name, value, predict, where)
    for name in _CHOICES:
        value = payload.get(name)
        if _number_over(value, limits.n):
            return _over(name, value, limits.n)
    for name in _INPUT_LISTS:
        value = payload.get(name)
        # A list of numbers is one tokenized input, not a batch.
        if not isinstance(value, list) or len(value) <= limits.inputs:
            continue
        if not isinstance(value[0], int | float):
            return _over(name, len(value), limits.inputs, " items")
    bias = payload.get("logit_bias")
    if isinstance(bias, dict | list) and len(bias) > limits.logit_bias:
        return _over("logit_bias", len(bias), limits.logit_bias, " entries")
    return None


def _check_shapes(payload: Mapping[str, Any], limits: BodyCaps) -> Refusal | None:
    grammar = payload.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            return Refusal("grammar", "grammar must be a GBNF string.")
        problem = grammar_problem(
            grammar, max_bytes=limits.grammar_bytes, max_depth=limits.grammar_depth
        )
        if problem is not None:
            return Refusal("grammar", f"grammar {problem}.")
    for name in _SCHEMAS:
        value = payload.get(name)
        if value is None:
            continue
        problem = schema_problem(
            value, max_bytes=limits.schema_bytes, max_depth=limits.schema_depth
        )
        if problem is not None:
            return Refusal(name, f"{name} {problem}.")
    return None


def _chat_media(messages: object) -> Iterable[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            key = _MEDIA_PARTS.get(part.get("type", ""))
            if key is None:
                continue
            inner = part.get(key)
            url = inner.get("url", inner.get("data", "")) if isinstance(inner, dict) else inner
            yield url if isinstance(url, str) else ""


def _prompt_media(prompt: object) -> Iterable[str]:
    """Media in a completion prompt: ``{"prompt_string": ..., "multimodal_data": [b64...]}``."""
    items = prompt if isinstance(prompt, list) else [prompt]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("multimodal_data"), list):
            for data in item["multimodal_data"]:
                yield data if isinstance(data, str) else ""


def _check_media(urls: Iterable[str], limits: BodyCaps) -> Refusal | None:
    for count, url in enumerate(urls, start=1):
        if count > limits.images:
            return _over("images", count, limits.images, " media parts")
        encoded = len(url) - url.find(",") - 1 if url.startswith("data:") else len(url)
        decoded = encoded * 3 // 4
        if decoded > limits.image_bytes:
            return Refusal(
                "images",
                f"images: a media part of about {decoded} bytes is above this server's limit of "
                f"{limits.image_bytes} bytes per part.",
            )
    return None
