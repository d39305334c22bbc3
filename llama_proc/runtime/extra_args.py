"""Flags passed through ``extra_args``: which ServerArgs owns and which an untrusted caller may set.

Each owned flag's value is checked; the allowlist for untrusted callers names each flag with the
shape of its value, and anything else is refused with the flag named.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Final

from llama_proc.errors import InvalidArgumentError
from llama_proc.runtime.flags import normalize_flag
from llama_proc.runtime.rpc.protocol import parse_endpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from llama_proc.runtime.flags import BinaryFlags


def _no_control(name: str, value: object) -> None:
    text = str(value)
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        msg = f"{name}={value!r} is empty or contains control characters"
        raise InvalidArgumentError(msg)


def _template(name: str, value: object) -> None:
    """A Jinja template string may span lines; other control characters are refused."""
    _no_control(name, str(value).replace("\n", " ").replace("\r", " ").replace("\t", " "))


def _api_key(name: str, value: object) -> None:
    text = str(value)
    # Never quote the key in a message: errors end up in logs and on screens.
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        msg = f"{name} is empty or contains control characters"
        raise InvalidArgumentError(msg)
    # llama-server splits LLAMA_API_KEY as a CSV row: "a,b" would accept "a" and "b" alone.
    if "," in text or '"' in text or text != text.strip():
        msg = (
            f"{name} may not contain commas, double quotes or surrounding spaces "
            "(llama-server would split it into several weaker keys)"
        )
        raise InvalidArgumentError(msg)


def _int_range(low: int, high: int | None = None) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            msg = f"{name} must be an integer, not {value!r}"
            raise InvalidArgumentError(msg)
        if value < low or (high is not None and value > high):
            limit = f"at least {low}" if high is None else f"between {low} and {high}"
            msg = f"{name}={value} must be {limit}"
            raise InvalidArgumentError(msg)

    return check


def _count(name: str, value: object) -> None:
    """Counts where llama.cpp uses -1 for "auto"."""
    _int_range(-1)(name, value)
    if value == 0:
        msg = f"{name}=0 is invalid; use a positive number or -1 for auto"
        raise InvalidArgumentError(msg)


def _host(name: str, value: object) -> None:
    _no_control(name, value)
    text = str(value)
    if "," in text or " " in text or text.endswith(".sock"):
        msg = (
            f"{name}={value!r}: give one TCP address (e.g. 127.0.0.1); several addresses "
            "and UNIX sockets are not supported by the runtime"
        )
        raise InvalidArgumentError(msg)


def _ngl(name: str, value: object) -> None:
    if isinstance(value, str) and value.lower() in ("auto", "all"):
        return
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    _int_range(-1)(name, value)


def _onoff(name: str, value: object) -> None:
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _ON_OFF_AUTO):
        return
    msg = f"{name}={value!r} must be 'on', 'off', 'auto' or a bool"
    raise InvalidArgumentError(msg)


def _rpc(name: str, value: object) -> None:
    for endpoint in value:  # type: ignore[attr-defined]
        _no_control(name, endpoint)
        parse_endpoint(str(endpoint))


def _floats(name: str, value: object) -> None:
    for item in value:  # type: ignore[attr-defined]
        if isinstance(item, bool) or not isinstance(item, int | float) or item < 0:
            msg = f"{name} must hold non-negative numbers, not {item!r}"
            raise InvalidArgumentError(msg)


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        msg = f"{name} must be True, False or None, not {value!r}"
        raise InvalidArgumentError(msg)


_ON_OFF_AUTO: Final = ("on", "off", "auto")

_CHECKS: Final[dict[str, Callable[[str, object], None]]] = {
    "model": _no_control,
    "alias": _no_control,
    "host": _host,
    "port": _int_range(0, 65535),
    "ctx_size": _int_range(0),
    "n_predict": _int_range(-2),
    "n_gpu_layers": _ngl,
    "threads": _count,
    "threads_batch": _count,
    "threads_http": _count,
    "parallel": _count,
    "flash_attn": _onoff,
    "batch_size": _int_range(1),
    "ubatch_size": _int_range(1),
    "cache_type_k": _no_control,
    "cache_type_v": _no_control,
    "cont_batching": _bool,
    "embeddings": _bool,
    "reranking": _bool,
    "pooling": _no_control,
    "metrics": _bool,
    "slots": _bool,
    "props": _bool,
    "jinja": _bool,
    "chat_template": _template,
    "chat_template_file": _no_control,
    "reasoning_format": _no_control,
    "mmproj": _no_control,
    "device": _no_control,
    "split_mode": _no_control,
    "tensor_split": _floats,
    "main_gpu": _int_range(0),
    "rpc": _rpc,
    "seed": _int_range(-1),
    "timeout": _int_range(1),
    "webui": _bool,
    "api_key": _api_key,
}

OWNED_FLAGS: Final = frozenset(
    {"--host", "--port", "-m", "--model", "--api-key", "--api-key-file", "--reuse-port"}
)
"""Flags the runtime sets itself; extra args may not override them."""


def check_extra_args(args: Iterable[str]) -> None:
    """Check trusted extra args: no control characters, none of :data:`OWNED_FLAGS`.

    Raises:
        InvalidArgumentError: a token is empty, holds a control character, or overrides
            host, port, model or API key (use the matching parameter instead).
    """
    for token in args:
        if not isinstance(token, str):
            msg = f"extra argument {token!r} is not a string"
            raise InvalidArgumentError(msg)
        _check_token(token)
        name = normalize_flag(token.split("=", 1)[0])
        if name in OWNED_FLAGS:
            msg = (
                f"extra argument {token!r} overrides what the runtime owns; use the host=, "
                "port=, model or api_key= parameters instead"
            )
            raise InvalidArgumentError(msg)


def _check_token(token: str) -> None:
    if token == "":
        msg = "empty string in extra arguments"
        raise InvalidArgumentError(msg)
    bad = next((c for c in token if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        msg = f"extra argument {token!r} contains the control character {bad!r}"
        raise InvalidArgumentError(msg)


# The allowlist for untrusted flags. Each entry: every spelling llama.cpp has used, and the
# value pattern (None = a switch that takes no value). Anything that names a file, a URL, a
# network address, a key, a log destination or a download is deliberately absent.
_INT: Final = r"-?\d{1,9}"

_UINT: Final = r"\d{1,9}"

_FLOAT: Final = r"-?\d{1,9}(?:\.\d{1,9})?(?:[eE][-+]?\d{1,3})?"

_CACHE_TYPES: Final = r"f32|f16|bf16|q8_0|q4_0|q4_1|iq4_nl|q5_0|q5_1"

_ALLOWED: Final[tuple[tuple[tuple[str, ...], str | None], ...]] = (
    (("-c", "--ctx-size"), _UINT),
    (("-n", "--predict", "--n-predict"), _INT),
    (("-b", "--batch-size"), _UINT),
    (("-ub", "--ubatch-size"), _UINT),
    (("-t", "--threads"), _INT),
    (("-tb", "--threads-batch"), _INT),
    (("-np", "--parallel"), _INT),
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), rf"{_INT}|auto|all"),
    (("-fa", "--flash-attn"), r"on|off|auto"),
    (("-ctk", "--cache-type-k"), _CACHE_TYPES),
    (("-ctv", "--cache-type-v"), _CACHE_TYPES),
    (("--keep",), _INT),
    (("-s", "--seed"), _INT),
    (("--temp", "--temperature"), _FLOAT),
    (("--top-k",), _UINT),
    (("--top-p",), _FLOAT),
    (("--min-p",), _FLOAT),
    (("--repeat-penalty",), _FLOAT),
    (("--repeat-last-n",), _INT),
    (("--presence-penalty",), _FLOAT),
    (("--frequency-penalty",), _FLOAT),
    (("--rope-scaling",), r"none|linear|yarn"),
    (("--rope-scale",), _FLOAT),
    (("--rope-freq-base",), _FLOAT),
    (("--rope-freq-scale",), _FLOAT),
    (("--yarn-orig-ctx",), _UINT),
    (("-sm", "--split-mode"), r"none|layer|row|tensor"),
    (("-ts", "--tensor-split"), r"\d{1,6}(?:\.\d{1,6})?(?:[,/]\d{1,6}(?:\.\d{1,6})?){0,63}"),
    (("-mg", "--main-gpu"), _UINT),
    (("-dev", "--device"), r"[A-Za-z][A-Za-z0-9_]{0,31}(?:,[A-Za-z][A-Za-z0-9_]{0,31}){0,15}"),
    (("--pooling",), r"none|mean|cls|last|rank"),
    (("--embd-normalize",), _INT),
    (("--cache-reuse",), _UINT),
    (("-cram", "--cache-ram"), _INT),
    (("--slot-prompt-similarity", "-sps"), _FLOAT),
    (("-fit", "--fit"), r"on|off"),
    (("-fitc", "--fit-ctx"), _UINT),
    (("-lm", "--load-mode"), r"auto|none|mmap|mlock|mmap\+mlock|dio"),
    (("--chat-template",), r"[a-z][a-z0-9._-]{0,63}"),
    (("--reasoning-format",), r"none|deepseek|deepseek-legacy|auto"),
    (("-rea", "--reasoning"), r"on|off|auto"),
    (("--reasoning-budget",), _INT),
    (("-to", "--timeout"), _UINT),
    (("--threads-http",), _INT),
    (("--jinja",), None),
    (("--no-jinja",), None),
    (("-cb", "--cont-batching"), None),
    (("-nocb", "--no-cont-batching"), None),
    (("-kvo", "--kv-offload"), None),
    (("-nkvo", "--no-kv-offload"), None),
    (("-kvu", "--kv-unified"), None),
    (("-no-kvu", "--no-kv-unified"), None),
    (("--cache-prompt",), None),
    (("--no-cache-prompt",), None),
    (("--context-shift",), None),
    (("--no-context-shift",), None),
    (("--swa-full",), None),
    (("--warmup",), None),
    (("--no-warmup",), None),
    (("--embedding", "--embeddings"), None),
    (("--rerank", "--reranking"), None),
    (("--metrics",), None),
    (("--slots",), None),
    (("--no-slots",), None),
    (("--mlock",), None),
    (("--no-mmap",), None),
    (("--repack", "-nr", "--no-repack"), None),
    (("--op-offload", "--no-op-offload"), None),
    (("--no-host",), None),
    (("--check-tensors",), None),
)


@functools.cache
def _allowlist() -> dict[str, re.Pattern[str] | None]:
    # Compiled on first use: importing the package should not pay for ~70 regexes.
    return {
        spelling: (None if pattern is None else re.compile(pattern, re.ASCII))
        for spellings, pattern in _ALLOWED
        for spelling in spellings
    }


def allowed_untrusted_flags() -> frozenset[str]:
    """Every flag spelling :func:`validate_extra_args` accepts."""
    return frozenset(_allowlist())


def untrusted_flag_groups() -> tuple[tuple[tuple[str, ...], bool], ...]:
    """The allowlist's options: each one's spellings and whether it takes a value.

    The spellings are all those llama.cpp has used for the option.
    """
    return tuple((spellings, pattern is not None) for spellings, pattern in _ALLOWED)


def validate_extra_args(
    args: Iterable[str], *, supported: BinaryFlags | None = None
) -> tuple[str, ...]:
    """Check flags from an untrusted source against the allowlist; return them unchanged.

    Only tuning options are allowed (context size, batch sizes, threads, slots, GPU layers,
    flash attention, cache types, sampling defaults, chat template *names*, endpoint
    switches), each with a value of the expected shape. Refused: every flag that changes where
    the server listens (``--host``, ``--port``, ``--reuse-port``, ``--path``, ``--api-prefix``),
    what it reads or writes (``--model``, ``--lora``, ``--mmproj``, ``--log-file``,
    ``--slot-save-path``, ``--chat-template-file``, grammar/schema files, ``--media-path``),
    what it downloads (``-hf``, ``--model-url``, ``--*-default`` presets), whom it talks to
    (``--rpc``, CORS, tools, MCP), and the API key flags. ``--flag=value`` forms (llama.cpp
    does not split them, so they would smuggle a value past the check), positional words,
    empty tokens and control characters are refused too.

    Args:
        args: the flags, already split into words.
        supported: when given, each flag must also be one this binary accepts.

    Returns:
        The same flags as a tuple.

    Raises:
        InvalidArgumentError: the first refused token, with the reason.
    """
    tokens = list(args)
    allowlist = _allowlist()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not isinstance(token, str):
            msg = f"flag {token!r} is not a string"
            raise InvalidArgumentError(msg)
        _check_token(token)
        if not token.startswith("-") or len(token) < 2:
            msg = f"unexpected word {token!r}: llama-server takes no positional arguments"
            raise InvalidArgumentError(msg)
        if "=" in token:
            msg = f"{token!r}: the --flag=value form is not accepted; pass the flag and its value as two words"
            raise InvalidArgumentError(msg)
        name = normalize_flag(token)
        if name not in allowlist:
            msg = (
                f"flag {token!r} is not allowed here: only tuning options may be set this way "
                "(not addresses, files, downloads, keys or remote workers)"
            )
            raise InvalidArgumentError(msg)
        if supported is not None and name not in supported:
            where = f" ({supported.source})" if supported.source else ""
            msg = f"flag {token!r} is not accepted by this llama-server build{where}"
            raise InvalidArgumentError(msg)
        pattern = allowlist[name]
        if pattern is None:
            i += 1
            continue
        if i + 1 >= len(tokens):
            msg = f"flag {token!r} needs a value"
            raise InvalidArgumentError(msg)
        value = tokens[i + 1]
        if not isinstance(value, str):
            msg = f"value {value!r} for {token!r} is not a string"
            raise InvalidArgumentError(msg)
        _check_token(value)
        if not pattern.fullmatch(value):
            msg = f"value {value!r} for {token!r} is not valid (expected {pattern.pattern})"
            raise InvalidArgumentError(msg)
        i += 2
    return tuple(tokens)
