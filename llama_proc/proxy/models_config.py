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
    keep_loaded = true          # never evicted nor unloaded for idleness (proxy option)
    preload = true              # loaded when the proxy starts (proxy option)

    [models.qwen]
    model = "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"   # a Hugging Face reference
    mmproj = true               # also fetch the repository's projector (vision models)

A model table names its GGUF with ``path`` or with ``model``: a Hugging Face reference as
users copy it (``org/repo[:QUANT][@REV]``, ``hf://org/repo/file.gguf``, a hub link; see
:class:`~llama_proc.models.hub.ModelRef`) or a path (a path that exists wins). A reference
is downloaded on the model's first request, into the shared Hugging Face cache
(:mod:`llama_proc.proxy.downloads`). Keys in a model table other than ``path``, ``model``,
``extra_args``, ``aliases``, ``idle_ttl``, ``request_flags``, ``request_body``,
``keep_loaded``, ``preload`` and ``mmproj = true`` are
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

Given server-wide :class:`~llama_proc.proxy.flag_policy.FlagCaps` (``serve --max-threads``,
...), every model's options and ``extra_args``, and every ``request_flags`` max, are checked
against them when the config is read.

A models directory (``--models-dir DIR``) adds every ``*.gguf`` under it, named by its path
relative to the directory without the suffix (``sub/Model.Q4_K_M``); the first shard of a split
model (``-00001-of-00003``) stands for the whole model and ``mmproj*`` projector files are
skipped. Ids from the config file win over scanned ones.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, InvalidArgumentError, ModelFileError
from llama_proc.models.hub import ModelRef
from llama_proc.proxy.body_policy import BodyCaps, BodyPolicy
from llama_proc.proxy.flag_policy import FlagCaps, FlagChecker, FlagPolicy
from llama_proc.runtime.args import ServerArgs

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

__all__ = [
    "CONFIG_ENV",
    "ModelSpec",
    "ModelsConfig",
    "load_models",
    "load_models_config",
    "scan_models_dir",
]

logger = logging.getLogger(__name__)

CONFIG_ENV: Final = "LLAMA_PROC_CONFIG"
"""Environment variable naming the models config file when ``--config`` is not given."""

_MODEL_KEYS: Final = frozenset(
    {"path", "model", "extra_args", "aliases", "idle_ttl", "request_flags", "request_body"}
    | {"keep_loaded", "preload"}
)
_DEFAULT_KEYS: Final = frozenset({"extra_args", "idle_ttl", "request_flags", "request_body"})
_POOL_OWNED: Final = frozenset({"model", "host", "port"})
_SHARD_RE: Final = re.compile(r"-(\d{5})-of-(\d{5})$")
_ID_RE: Final = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model the proxy can serve.

    Attributes:
        id: the name clients put in ``model``.
        path: the GGUF file (first shard for split models); None for a reference not fetched
            yet.
        ref: the Hugging Face reference the config names (``model = "org/repo:QUANT"``).
        mmproj: also fetch the referenced repository's multimodal projector.
        options: :class:`~llama_proc.runtime.ServerArgs` keyword arguments.
        extra_args: trusted extra llama-server flags from the config, placed before per-request
            flags.
        aliases: other names that resolve to this model.
        idle_ttl: seconds an idle server stays up; None = the pool default, 0 = never unload.
        source: where the entry came from (for ``/v1/models`` and error messages).
        request_flags: which ``X-Llama-Flags`` clients may send for this model (none by
            default).
        request_body: this model's limits on request bodies, under the server-wide caps.
    """

    id: str
    path: Path | None = None
    ref: ModelRef | None = None
    mmproj: bool = False
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    extra_args: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    idle_ttl: float | None = None
    source: str = ""
    request_flags: FlagPolicy = field(default_factory=FlagPolicy)
    request_body: BodyPolicy = field(default_factory=BodyPolicy)
    keep_loaded: bool = False
    """Pinned: never evicted to make room nor unloaded for idleness."""
    preload: bool = False
    """Started when the proxy starts, before any request asks for it."""

    def __post_init__(self) -> None:
        if self.path is None and self.ref is None:
            msg = f"model {self.id!r} needs a path or a Hugging Face reference"
            raise ConfigError(msg)


@dataclass(frozen=True)
class ModelsConfig:
    """The set of models the proxy serves, by id, with alias lookup."""

    models: Mapping[str, ModelSpec]
    _names: Mapping[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names: dict[str, str] = {model_id: model_id for model_id in self.models}
        for spec in self.models.values():
            for alias in spec.aliases:
                if names.setdefault(alias, spec.id) != spec.id:
                    msg = (
                        f"model alias {alias!r} of {spec.id!r} is already used by "
                        f"{names[alias]!r}; give it a different name"
                    )
                    raise ConfigError(msg)
        object.__setattr__(self, "_names", MappingProxyType(names))

    def resolve(self, name: str) -> ModelSpec | None:
        """The model called ``name`` (an id or an alias), or None."""
        model_id = self._names.get(name)
        return None if model_id is None else self.models[model_id]

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())


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
    return _models_from_mapping(
        data, base=path.parent, where=str(path), caps=caps, body_caps=body_caps
    )


def scan_models_dir(
    directory: Path,
    *,
    defaults: Mapping[str, Any] | None = None,
    caps: FlagCaps | None = None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    """Offer every GGUF file under ``directory`` as a model.

    Args:
        directory: folder to scan recursively (hidden folders and files are skipped).
        defaults: a ``[defaults]``-style table applied to every scanned model.
        caps: server-wide caps the defaults must keep; None = not checked here.
        body_caps: server-wide request-body caps; None = only the hard ceilings.

    Raises:
        ConfigError: the folder does not exist, or the defaults are invalid or beyond a cap.
    """
    if not directory.is_dir():
        msg = f"models directory {directory} does not exist or is not a folder"
        raise ConfigError(msg)
    base = _split_defaults(defaults or {}, where=str(directory), caps=caps, body_caps=body_caps)
    base_options, base_extra, base_ttl, base_flags, base_body = base
    models: dict[str, ModelSpec] = {}
    for gguf in sorted(_iter_gguf(directory)):
        rel = gguf.relative_to(directory).with_suffix("").as_posix()
        shard = _SHARD_RE.search(rel)
        if shard is not None:
            if int(shard.group(1)) != 1:
                continue
            rel = rel[: shard.start()]
        models[rel] = ModelSpec(
            id=rel,
            path=gguf,
            options=MappingProxyType(dict(base_options)),
            extra_args=base_extra,
            idle_ttl=base_ttl,
            source=f"dir:{directory}",
            request_flags=base_flags,
            request_body=base_body,
        )
    if not models:
        logger.warning("no .gguf files found under %s", directory)
    return ModelsConfig(models)


def load_models(
    config: Path | None = None,
    models_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    caps: FlagCaps | None = None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    """Build the served model set from a config file and/or a models directory.

    Args:
        config: the TOML file; when None, ``LLAMA_PROC_CONFIG`` from ``env`` is used if set.
        models_dir: a folder to scan; its ``[defaults]`` come from the config file.
        env: environment to read; ``os.environ`` when None.
        caps: server-wide caps every model must keep; None = not checked here.
        body_caps: server-wide request-body caps; None = only the hard ceilings.

    Raises:
        ConfigError: neither source was given, one is invalid, or no model was found.
    """
    source_env = os.environ if env is None else env
    if config is None and source_env.get(CONFIG_ENV, "").strip():
        config = Path(source_env[CONFIG_ENV].strip()).expanduser()
    if config is None and models_dir is None:
        msg = f"no models: pass --config FILE (or set {CONFIG_ENV}) or --models-dir DIR"
        raise ConfigError(msg)
    models: dict[str, ModelSpec] = {}
    defaults: Mapping[str, Any] = {}
    if config is not None:
        configured = load_models_config(config, caps=caps, body_caps=body_caps)
        defaults = _read_defaults(config)
        models.update(configured.models)
    if models_dir is not None:
        for spec in scan_models_dir(models_dir, defaults=defaults, caps=caps, body_caps=body_caps):
            models.setdefault(spec.id, spec)
    if not models:
        msg = "no models configured: the config file and models directory list none"
        raise ConfigError(msg)
    return ModelsConfig(models)


def _read_defaults(config: Path) -> Mapping[str, Any]:
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    defaults = data.get("defaults", {})
    return defaults if isinstance(defaults, dict) else {}


def _iter_gguf(directory: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.lower().endswith(".gguf"):
                continue
            if name.lower().startswith("mmproj"):
                continue
            yield Path(root) / name


def _models_from_mapping(
    data: Mapping[str, Any],
    *,
    base: Path,
    where: str,
    caps: FlagCaps | None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        msg = f"{where}: unknown top-level table(s) {', '.join(sorted(unknown))}; use [defaults] and [models.<id>]"
        raise ConfigError(msg)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        msg = f"{where}: [defaults] must be a table"
        raise ConfigError(msg)
    base_options, base_extra, base_ttl, base_flags, base_body = _split_defaults(
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
            keep_loaded=_flag(table, "keep_loaded", ctx),
            preload=_flag(table, "preload", ctx),
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


def _split_defaults(
    defaults: Mapping[str, Any],
    *,
    where: str,
    caps: FlagCaps | None,
    body_caps: BodyCaps | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], float | None, FlagPolicy, BodyPolicy]:
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


def _flag(table: Mapping[str, Any], key: str, ctx: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        msg = f"{ctx}: {key} must be true or false"
        raise ConfigError(msg)
    return value
