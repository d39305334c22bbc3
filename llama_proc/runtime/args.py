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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.errors import InvalidArgumentError
from llama_proc.runtime.extra_args import (
    _CHECKS,
    OWNED_FLAGS,
    allowed_untrusted_flags,
    check_extra_args,
    untrusted_flag_groups,
    validate_extra_args,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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


# -- extra args ------------------------------------------------------------------------------
