"""llama-server options as a typed value, and the allowlist for flags from untrusted callers.

:class:`ServerArgs` maps fields to flags through a table in the field metadata (never an ``if``
chain): each field names its spellings, newest first where builds differ, and
:meth:`ServerArgs.to_argv` picks the first spelling the installed binary accepts (see
:mod:`llama_proc.runtime.flags`). ``None`` means "do not pass it; let llama-server decide".

The API key is not a flag: it travels in the child's environment (``LLAMA_API_KEY``), because a
process's argv is readable by every user on the machine.

:func:`validate_extra_args` is for flags that come from somewhere the program does not trust
(an HTTP header, a config file written by someone else). It is an allowlist of tuning options
with typed values. Everything else is refused, in particular whatever changes where the server
listens, which files it reads or writes, what it downloads or which other machines it talks to.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.errors import InvalidArgumentError
from llama_proc.runtime.flags import normalize_flag
from llama_proc.runtime.rpc.protocol import parse_endpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from llama_proc.runtime.flags import BinaryFlags

__all__ = [
    "DEFAULT_HOST",
    "OWNED_FLAGS",
    "ServerArgs",
    "allowed_untrusted_flags",
    "check_extra_args",
    "untrusted_flag_groups",
    "validate_extra_args",
]

DEFAULT_HOST: Final = "127.0.0.1"

_Kind = Literal["value", "list", "bool", "switch", "onoff"]


def _flag(*flags: str, kind: _Kind = "value", neg: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"flags": flags, "kind": kind, "neg": neg}


@dataclass(frozen=True, kw_only=True)
class ServerArgs:
    """Options for one llama-server process.

    Every field defaults to None (or empty): llama-server's own default applies. Booleans
    with a negative form (``jinja=False`` -> ``--no-jinja``) pass it; switches without one
    (``metrics``) pass nothing for False. ``extra_args`` are appended verbatim after the
    typed options; they come from the program itself and are trusted, except that they may
    not override what the runtime owns (host, port, model, API key). Flags from untrusted
    sources go through :func:`validate_extra_args` first.
    """

    model: str | Path | None = field(default=None, metadata=_flag("--model", "-m"))
    """Path of the GGUF model file."""
    alias: str | None = field(default=None, metadata=_flag("--alias", "-a"))
    """Model name the API reports and accepts (default: the model path)."""
    host: str = field(default=DEFAULT_HOST, metadata=_flag("--host"))
    """Address to listen on. Loopback by default; anything else exposes the server."""
    port: int | None = field(default=None, metadata=_flag("--port"))
    """TCP port; None = the runtime picks a free one; 0 = llama-server picks and logs it."""
    ctx_size: int | None = field(default=None, metadata=_flag("--ctx-size", "-c"))
    """Context size in tokens (0 = from the model)."""
    n_predict: int | None = field(default=None, metadata=_flag("--n-predict", "--predict", "-n"))
    """Default maximum tokens to generate (-1 = unlimited)."""
    n_gpu_layers: int | str | None = field(
        default=None, metadata=_flag("--n-gpu-layers", "--gpu-layers", "-ngl")
    )
    """Layers to offload to the GPU: a number, "auto" or "all"."""
    threads: int | None = field(default=None, metadata=_flag("--threads", "-t"))
    """CPU threads for generation (-1 = auto)."""
    threads_batch: int | None = field(default=None, metadata=_flag("--threads-batch", "-tb"))
    """CPU threads for prompt processing."""
    threads_http: int | None = field(default=None, metadata=_flag("--threads-http"))
    """Threads serving HTTP requests."""
    parallel: int | None = field(default=None, metadata=_flag("--parallel", "-np"))
    """Number of slots (concurrent sequences); -1 = auto."""
    flash_attn: bool | str | None = field(
        default=None, metadata=_flag("--flash-attn", "-fa", kind="onoff")
    )
    """Flash attention: "on", "off", "auto" (True/False mean on/off)."""
    batch_size: int | None = field(default=None, metadata=_flag("--batch-size", "-b"))
    """Logical maximum batch size."""
    ubatch_size: int | None = field(default=None, metadata=_flag("--ubatch-size", "-ub"))
    """Physical maximum batch size."""
    cache_type_k: str | None = field(default=None, metadata=_flag("--cache-type-k", "-ctk"))
    """KV cache type for K (f16, q8_0, q4_0, ...)."""
    cache_type_v: str | None = field(default=None, metadata=_flag("--cache-type-v", "-ctv"))
    """KV cache type for V."""
    cont_batching: bool | None = field(
        default=None,
        metadata=_flag("--cont-batching", "-cb", kind="bool", neg=("--no-cont-batching", "-nocb")),
    )
    """Continuous batching."""
    embeddings: bool | None = field(
        default=None, metadata=_flag("--embeddings", "--embedding", kind="switch")
    )
    """Serve /v1/embeddings (for embedding models)."""
    reranking: bool | None = field(
        default=None, metadata=_flag("--reranking", "--rerank", kind="switch")
    )
    """Serve the reranking endpoint."""
    pooling: str | None = field(default=None, metadata=_flag("--pooling"))
    """Embedding pooling: none, mean, cls, last or rank."""
    metrics: bool | None = field(default=None, metadata=_flag("--metrics", kind="switch"))
    """Serve Prometheus metrics at /metrics."""
    slots: bool | None = field(
        default=None, metadata=_flag("--slots", kind="bool", neg=("--no-slots",))
    )
    """Serve slot monitoring at /slots."""
    props: bool | None = field(default=None, metadata=_flag("--props", kind="switch"))
    """Allow changing global properties through POST /props."""
    jinja: bool | None = field(
        default=None, metadata=_flag("--jinja", kind="bool", neg=("--no-jinja",))
    )
    """Use the Jinja chat template engine."""
    chat_template: str | None = field(default=None, metadata=_flag("--chat-template"))
    """A built-in template name (chatml, llama3, ...) or a Jinja template string."""
    chat_template_file: str | Path | None = field(
        default=None, metadata=_flag("--chat-template-file")
    )
    """File holding a Jinja chat template."""
    reasoning_format: str | None = field(default=None, metadata=_flag("--reasoning-format"))
    """How thinking output is returned: none, deepseek, deepseek-legacy, auto."""
    mmproj: str | Path | None = field(default=None, metadata=_flag("--mmproj", "-mm"))
    """Multimodal projector file."""
    device: str | None = field(default=None, metadata=_flag("--device", "-dev"))
    """Comma-separated devices to offload to (``none`` = CPU only)."""
    split_mode: str | None = field(default=None, metadata=_flag("--split-mode", "-sm"))
    """How to split over GPUs: none, layer, row."""
    tensor_split: tuple[float, ...] = field(
        default=(), metadata=_flag("--tensor-split", "-ts", kind="list")
    )
    """Proportion of the model per GPU."""
    main_gpu: int | None = field(default=None, metadata=_flag("--main-gpu", "-mg"))
    """GPU for the model with split_mode none."""
    rpc: tuple[str, ...] = field(default=(), metadata=_flag("--rpc", kind="list"))
    """``host:port`` of llama.cpp RPC workers to spread the model over."""
    seed: int | None = field(default=None, metadata=_flag("--seed", "-s"))
    """Default RNG seed."""
    timeout: int | None = field(default=None, metadata=_flag("--timeout", "-to"))
    """Server read/write timeout in seconds."""
    webui: bool | None = field(
        default=None,
        metadata=_flag("--webui", "--ui", kind="bool", neg=("--no-webui", "--no-ui")),
    )
    """Serve the built-in web UI."""
    api_key: str | None = field(default=None, repr=False, metadata={"env": "LLAMA_API_KEY"})
    """Key clients must send (Bearer or X-Api-Key). Passed in the environment, never argv."""
    extra_args: tuple[str, ...] = ()
    """Further flags, appended verbatim (trusted; see :func:`validate_extra_args`)."""

    def __post_init__(self) -> None:
        for name in ("rpc", "tensor_split", "extra_args"):
            value = getattr(self, name)
            if isinstance(value, str):
                msg = f"{name} must be a list of strings, not one string: {value!r}"
                raise InvalidArgumentError(msg)
            object.__setattr__(self, name, tuple(value))
        for f in dataclasses.fields(self):
            check = _CHECKS.get(f.name)
            value = getattr(self, f.name)
            if check is not None and value is not None:
                check(f.name, value)
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model).expanduser())
        if isinstance(self.flash_attn, str):
            object.__setattr__(self, "flash_attn", self.flash_attn.lower())
        if isinstance(self.n_gpu_layers, str) and self.n_gpu_layers.lstrip("-").isdigit():
            object.__setattr__(self, "n_gpu_layers", int(self.n_gpu_layers))
        check_extra_args(self.extra_args)

    @classmethod
    def from_options(cls, **options: Any) -> ServerArgs:
        """Build from keyword options, turning unknown names into a clear error.

        Raises:
            InvalidArgumentError: an unknown option name or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            msg = (
                f"unknown llama-server option(s): {', '.join(unknown)}; use ServerArgs field "
                "names (ctx_size, n_gpu_layers, threads, ...) or extra_args for other flags"
            )
            raise InvalidArgumentError(msg)
        return cls(**options)

    def replace(self, **changes: Any) -> ServerArgs:
        """Return a copy with some options changed (validated again).

        Raises:
            InvalidArgumentError: an unknown option name or an invalid value.
        """
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(changes)
        return type(self).from_options(**merged)

    def to_argv(self, flags: BinaryFlags | None = None) -> list[str]:
        """The command-line flags for these options (without the binary itself).

        Args:
            flags: what the installed binary accepts (:func:`~llama_proc.runtime.flags.probe_flags`);
                each option then uses a spelling this build knows. None = newest spellings.

        Raises:
            InvalidArgumentError: an option is set that this binary does not accept under any
                known spelling.
        """
        argv: list[str] = []
        for f in dataclasses.fields(self):
            spec = f.metadata.get("flags")
            value = getattr(self, f.name)
            if not spec or value is None or value == ():
                continue
            argv += _emit(f.name, value, f.metadata, flags)
        argv += self.extra_args
        return argv

    def to_env(self) -> dict[str, str]:
        """Environment variables the child needs for options that must stay off argv."""
        return {} if self.api_key is None else {"LLAMA_API_KEY": self.api_key}


def _emit(
    name: str, value: object, meta: Mapping[str, Any], flags: BinaryFlags | None
) -> list[str]:
    kind: _Kind = meta["kind"]
    if kind in ("bool", "switch"):
        if value:
            return [_pick(name, value, meta["flags"], flags)]
        if meta["neg"]:
            return [_pick(name, value, meta["neg"], flags)]
        return []
    flag = _pick(name, value, meta["flags"], flags)
    if kind == "onoff":
        mode = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        if flags is not None and not flags.takes_value(flag):
            # Builds before the on|off|auto change had a bare switch that meant "on"; their
            # default was off, which is what "off" and "auto" both get there.
            return [flag] if mode == "on" else []
        return [flag, str(mode)]
    if kind == "list":
        return [flag, ",".join(str(v) for v in value)]  # type: ignore[attr-defined]
    return [flag, str(value)]


def _pick(name: str, value: object, candidates: Sequence[str], flags: BinaryFlags | None) -> str:
    if flags is None:
        return candidates[0]
    found = flags.first_known(candidates)
    if found is None:
        where = f" ({flags.source})" if flags.source else ""
        msg = (
            f"this llama-server{where} accepts none of {', '.join(candidates)}, needed for "
            f"{name}={value!r}: the option was renamed or removed in this llama.cpp build; "
            "leave it unset or pass the build's own spelling in extra_args"
        )
        raise InvalidArgumentError(msg)
    return found


# -- value checks for the typed fields ------------------------------------------------------


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


# -- extra args ------------------------------------------------------------------------------

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
