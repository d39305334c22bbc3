"""The proxy's models config: which model ids exist, their GGUF files and server options.

A TOML file (``llama-proc serve --config FILE`` or ``LLAMA_PROC_CONFIG``)::

    [defaults]                  # llama-server options for every model (ServerArgs fields)
    ctx_size = 4096
    threads = 4
    idle_ttl = 600              # seconds an idle server stays loaded (proxy option)

    [models.smollm2]
    path = "SmolLM2-135M-Instruct.Q4_1.gguf"   # relative paths: relative to this file
    ctx_size = 2048
    extra_args = ["--temp", "0.7"]             # passed verbatim (trusted: it is your file)
    aliases = ["smol"]

    [models.qwen]
    model = "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"   # a Hugging Face reference
    mmproj = true               # also fetch the repository's projector (vision models)

A model table names its GGUF with ``path`` or with ``model``: a Hugging Face reference as
users copy it (``org/repo[:QUANT][@REV]``, ``hf://org/repo/file.gguf``, a hub link; see
:class:`~llama_proc.models.hub.ModelRef`) or a path (a path that exists wins). A reference
is downloaded on the model's first request, into the shared Hugging Face cache
(:mod:`llama_proc.proxy.downloads`). Keys in a model table other than ``path``, ``model``,
``extra_args``, ``aliases``, ``idle_ttl``, ``request_flags``, ``request_body`` and
``mmproj = true`` are
:class:`~llama_proc.runtime.ServerArgs` fields. ``host`` and ``port`` are chosen by the pool
and refused here.

Per-request flags (``X-Llama-Flags``) are off unless a model's ``request_flags`` table (or the
one in ``[defaults]``, which a model's own replaces) lists them, with bounds for numbers (see
:class:`~llama_proc.proxy.flag_policy.FlagPolicy`)::

    [models.smollm2.request_flags]
    "--ctx-size" = { min = 512, max = 4096 }   # any spelling of the option
    "--temp" = true                            # allowed within default bounds

Request bodies are held to server-wide :class:`~llama_proc.proxy.body_policy.BodyCaps`
(``serve --max-n-probs``, ...); a model's ``request_body`` table (or the one in
``[defaults]``, which a model's own replaces) may lower them and allow more top-level fields
(see :mod:`llama_proc.proxy.body_policy`)::

    [models.smollm2.request_body]
    n_probs = { max = 5 }
    grammar = { max_bytes = 16384, max_depth = 16 }
    fields = ["my_extension"]

Given server-wide :class:`~llama_proc.proxy.flag_caps.FlagCaps` (``serve --max-threads``,
...), every model's options and ``extra_args``, and every ``request_flags`` max, are checked
against them when the config is read.

The other formats ``serve --config`` reads (llama.cpp presets, llama-swap YAML, a models
folder; :mod:`llama_proc.proxy.configs`) become the same tables and go through
:func:`models_from_mapping`.
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, InvalidArgumentError, ModelFileError
from llama_proc.models.hub import ModelRef
from llama_proc.proxy.body_policy import BodyCaps, BodyPolicy
from llama_proc.proxy.flag_checker import FlagChecker
from llama_proc.proxy.flag_policy import FlagPolicy
from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
from llama_proc.runtime.args import ServerArgs

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = [
    "CONFIG_ENV",
    "ModelSpec",
    "ModelsConfig",
    "load_models_config",
    "models_from_mapping",
    "split_defaults",
]

logger = logging.getLogger(__name__)

CONFIG_ENV: Final = "LLAMA_PROC_CONFIG"
"""Environment variable naming the models config file when ``--config`` is not given."""

_MODEL_KEYS: Final = frozenset(
    {"path", "model", "extra_args", "aliases", "idle_ttl", "request_flags", "request_body"}
)
_DEFAULT_KEYS: Final = frozenset({"extra_args", "idle_ttl", "request_flags", "request_body"})
_POOL_OWNED: Final = frozenset({"model", "host", "port"})
_ID_RE: Final = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")


def load_models_config(
    path: Path, *, caps: FlagCaps | None = None, body_caps: BodyCaps | None = None
) -> ModelsConfig:
    """Read a models config TOML file.

    Args:
        path: the file; relative model paths in it are taken relative to its folder.
        caps: server-wide caps every model's options and ``extra_args`` (and every
            ``request_flags`` max) must keep; None = not checked here.
        body_caps: server-wide request-body caps every ``request_body`` limit must keep;
            None = only the hard ceilings.

    Raises:
        ConfigError: the file is missing, not valid TOML, or an entry is invalid or beyond a
            cap (the message names the table and key).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        msg = f"cannot read models config {path}: {err.strerror or err}"
        raise ConfigError(msg) from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        msg = f"models config {path} is not valid TOML: {err}"
        raise ConfigError(msg) from err
    return models_from_mapping(
        data, base=path.parent, where=str(path), caps=caps, body_caps=body_caps
    )


def models_from_mapping(
    data: Mapping[str, Any],
    *,
    base: Path,
    where: str,
    caps: FlagCaps | None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    """Check a TOML-shaped ``{"defaults": ..., "models": {id: table}}`` and build its models.

    Args:
        data: the tables, as TOML gives them.
        base: the folder relative model paths are taken from.
        where: what error messages and each model's ``source`` name (the file, and line).
        caps: server-wide caps every model must keep; None = not checked here.
        body_caps: server-wide request-body caps; None = only the hard ceilings.

    Raises:
        ConfigError: an entry is invalid or beyond a cap (the message names table and key).
    """
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        msg = f"{where}: unknown top-level table(s) {', '.join(sorted(unknown))}; use [defaults] and [models.<id>]"
        raise ConfigError(msg)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        msg = f"{where}: [defaults] must be a table"
        raise ConfigError(msg)
    base_options, base_extra, base_ttl, base_flags, base_body = split_defaults(
        defaults, where=where, caps=caps, body_caps=body_caps
    )
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        msg = f"{where}: [models] must be a table of [models.<id>] tables"
        raise ConfigError(msg)
    models: dict[str, ModelSpec] = {}
    for model_id, table in tables.items():
        ctx = f"{where}: [models.{_quote(model_id)}]"
        if not _ID_RE.match(model_id):
            msg = f"{ctx}: a model id must be non-empty and contain no spaces or control characters"
            raise ConfigError(msg)
        if not isinstance(table, dict):
            msg = f"{ctx} must be a table with at least a path key"
            raise ConfigError(msg)
        model_path, ref = _model_source(table, base, ctx)
        options = dict(base_options)
        options.update({k: v for k, v in table.items() if k not in _MODEL_KEYS})
        mmproj = options.get("mmproj") is True
        if isinstance(options.get("mmproj"), bool):
            if mmproj and ref is None:
                msg = (
                    f"{ctx}: mmproj = true fetches a Hugging Face model's projector; give its path"
                )
                raise ConfigError(msg)
            del options["mmproj"]
        extra = (*base_extra, *_str_list(table.get("extra_args", []), f"{ctx}: extra_args"))
        _check_options(options, ctx, extra)
        aliases = _str_list(table.get("aliases", []), f"{ctx}: aliases")
        ttl = _ttl(table["idle_ttl"], ctx) if "idle_ttl" in table else base_ttl
        flags = (
            _policy(table["request_flags"], ctx, caps) if "request_flags" in table else base_flags
        )
        body = (
            _body_policy(table["request_body"], ctx, body_caps)
            if "request_body" in table
            else base_body
        )
        _check_caps(options, extra, ctx, caps)
        models[model_id] = ModelSpec(
            id=model_id,
            path=model_path,
            ref=ref,
            mmproj=mmproj,
            options=MappingProxyType(options),
            extra_args=extra,
            aliases=aliases,
            idle_ttl=ttl,
            source=f"config:{where}",
            request_flags=flags,
            request_body=body,
        )
    try:
        return ModelsConfig(models)
    except ConfigError as err:
        msg = f"{where}: {err}"
        raise ConfigError(msg) from None


def _model_source(
    table: Mapping[str, Any], base: Path, ctx: str
) -> tuple[Path | None, ModelRef | None]:
    """The GGUF a model table names: ``path = ...`` or ``model = <reference or path>``."""
    raw_path, raw_model = table.get("path"), table.get("model")
    if raw_model is None:
        if not isinstance(raw_path, str) or not raw_path.strip():
            msg = (
                f"{ctx}: path is required and must be the GGUF file's path as a string "
                '(or model = "org/repo:QUANT" for a Hugging Face model)'
            )
            raise ConfigError(msg)
        return _config_path(raw_path, base), None
    if raw_path is not None:
        msg = f"{ctx}: give path or model, not both"
        raise ConfigError(msg)
    if not isinstance(raw_model, str) or not raw_model.strip():
        msg = f'{ctx}: model must be a Hugging Face reference such as "org/repo:Q4_K_M", or a path'
        raise ConfigError(msg)
    relative = _config_path(raw_model, base)
    if relative.exists():
        return relative, None  # a path that exists wins, as in LlamaServer
    try:
        ref = ModelRef.parse(raw_model)
    except ModelFileError as err:
        msg = f"{ctx}: {err}"
        raise ConfigError(msg) from None
    return (relative, None) if ref is None else (None, ref)


def _config_path(text: str, base: Path) -> Path:
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() else base / path


def split_defaults(
    defaults: Mapping[str, Any],
    *,
    where: str,
    caps: FlagCaps | None,
    body_caps: BodyCaps | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], float | None, FlagPolicy, BodyPolicy]:
    """A ``[defaults]`` table checked: options, extra_args, idle_ttl, flag and body policies.

    Raises:
        ConfigError: an entry is invalid or beyond a cap.
    """
    ctx = f"{where}: [defaults]"
    if {"path", "model", "aliases"} & set(defaults):
        msg = f"{ctx}: path, model and aliases belong in a [models.<id>] table"
        raise ConfigError(msg)
    options = {k: v for k, v in defaults.items() if k not in _DEFAULT_KEYS}
    extra = _str_list(defaults.get("extra_args", []), f"{ctx}: extra_args")
    _check_options(options, ctx, extra)
    ttl = _ttl(defaults["idle_ttl"], ctx) if "idle_ttl" in defaults else None
    flags = _policy(defaults["request_flags"], ctx, caps) if "request_flags" in defaults else None
    body = (
        _body_policy(defaults["request_body"], ctx, body_caps)
        if "request_body" in defaults
        else BodyPolicy()
    )
    _check_caps(options, extra, ctx, caps)
    return options, extra, ttl, flags or FlagPolicy(), body


def _policy(value: object, ctx: str, caps: FlagCaps | None) -> FlagPolicy:
    if not isinstance(value, dict):
        msg = f"{ctx}: request_flags must be a table of flag = true or flag = {{ max = N }}"
        raise ConfigError(msg)
    try:
        return FlagPolicy.from_table(value, caps=caps)
    except InvalidArgumentError as err:
        msg = f"{ctx}: request_flags: {err}"
        raise ConfigError(msg) from None


def _body_policy(value: object, ctx: str, caps: BodyCaps | None) -> BodyPolicy:
    if not isinstance(value, dict):
        msg = f"{ctx}: request_body must be a table such as n_probs = {{ max = 5 }}"
        raise ConfigError(msg)
    try:
        return BodyPolicy.from_table(value, caps=caps)
    except InvalidArgumentError as err:
        msg = f"{ctx}: request_body: {err}"
        raise ConfigError(msg) from None


def _check_caps(
    options: Mapping[str, Any], extra: tuple[str, ...], ctx: str, caps: FlagCaps | None
) -> None:
    if caps is None:
        return
    try:
        FlagChecker(caps).check_config(options, extra)
    except InvalidArgumentError as err:
        msg = f"{ctx}: {err}"
        raise ConfigError(msg) from None


def _check_options(options: Mapping[str, Any], ctx: str, extra: tuple[str, ...] = ()) -> None:
    """Refuse bad options now rather than when a request first starts the model."""
    owned = sorted(set(options) & _POOL_OWNED)
    if owned:
        msg = f"{ctx}: {', '.join(owned)} cannot be set here; the proxy chooses them"
        raise ConfigError(msg)
    try:
        ServerArgs.from_options(**options, extra_args=extra)
    except InvalidArgumentError as err:
        msg = f"{ctx}: {err}"
        raise ConfigError(msg) from None


def _str_list(value: object, ctx: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        msg = f"{ctx} must be a list of strings"
        raise ConfigError(msg)
    return tuple(value)


def _ttl(value: object, ctx: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{ctx}: idle_ttl must be a number of seconds (0 = never unload)"
        raise ConfigError(msg)
    if value < 0 or not math.isfinite(value):
        msg = f"{ctx}: idle_ttl must be a finite number >= 0"
        raise ConfigError(msg)
    return float(value)


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'
