"""llama-swap configs (``config.yaml``) as a models config.

::

    macros:
      server: /opt/llama/llama-server --port ${PORT}
    models:
      smol:
        cmd: ${server} -m /models/SmolLM2-135M-Instruct.Q4_1.gguf -c 2048 --temp 0.7
        aliases: [smollm]
        ttl: 300

Each ``cmd`` is split with :mod:`shlex` (never run through a shell); the program and the
``--host``/``--port`` flags are dropped (the pool starts the server and picks its port) and
the rest becomes the table a TOML ``[models.<id>]`` holds
(:func:`~llama_proc.proxy.configs.server_flags.model_table`), checked by the TOML path and its caps.
``aliases`` and ``ttl`` map to the model's aliases and ``idle_ttl``, a ``persistent`` group
keeps its members loaded (``idle_ttl = 0``), and ``proxy`` is accepted in its default
``http://127.0.0.1:${PORT}`` shape only. Keys with no equivalent (``unlisted``,
``concurrencyLimit``, ``filters``, ``peers``, group ``swap``/``exclusive``, ...) are named in
one warning. Files are read with ``yaml.safe_load`` semantics, bounded in size, and an
anchor/alias expansion beyond :data:`MAX_NODES` is refused.
"""

from __future__ import annotations

import logging
import ntpath
import re
import shlex
from typing import TYPE_CHECKING, Any, Final

import yaml

from llama_proc.errors import ConfigError
from llama_proc.proxy.configs.server_flags import FlagGroup, model_table
from llama_proc.proxy.configs.text import read_config_text
from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
from llama_proc.proxy.models_config import models_from_mapping

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["MAX_NODES", "load_llama_swap"]

logger = logging.getLogger(__name__)

MAX_NODES: Final = 100_000
"""Most YAML nodes a config may expand to, aliases counted each time they are used."""
MAX_EXPANDED: Final = 65536
"""Longest ``cmd`` or macro once macros are expanded, in characters."""
PORT_MACRO: Final = "${PORT}"
_MACRO_RE: Final = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_DEFAULT_PROXY_RE: Final = re.compile(r"http://(?:127\.0\.0\.1|localhost):\$\{PORT\}/?")
_HEALTH_ENDPOINTS: Final = frozenset({"/health", "none", ""})
_MODEL_KEYS: Final = frozenset({"cmd", "aliases", "ttl", "proxy", "checkEndpoint", "macros"})
_TOP_KEYS: Final = frozenset({"models", "macros", "groups"})
_GROUP_KEYS: Final = frozenset({"members", "persistent"})


def load_llama_swap(
    path: Path, *, caps: FlagCaps | None = None, body_caps: BodyCaps | None = None
) -> ModelsConfig:
    """Read a llama-swap YAML config.

    Raises:
        ConfigError: the file cannot be read or parsed, is too big or expands too far, or a
            key or model is invalid or beyond a cap; the message starts with ``file:line:``
            and names the key.
    """
    data, lines = _load_yaml(path)

    def at(*keys: str) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{path}:{lines[keys[:n]]}"
        return f"{path}:1"

    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        msg = f"{at()}: models: missing; a llama-swap config maps model ids under models:"
        raise ConfigError(msg)
    ignored = [str(k) for k in data if k not in _TOP_KEYS]
    macros = _macros(data.get("macros", {}), {}, at("macros"))
    tables: dict[str, dict[str, Any]] = {}
    for model_id, entry in data["models"].items():
        where = at("models", str(model_id))
        if not isinstance(model_id, str) or not isinstance(entry, dict):
            msg = f"{where}: models.{model_id}: must be a model id mapping to cmd: and more"
            raise ConfigError(msg)
        ignored += [f"models.{model_id}.{k}" for k in entry if k not in _MODEL_KEYS]
        own = _macros(entry.get("macros", {}), macros, at("models", model_id, "macros"))
        own["MODEL_ID"] = model_id
        tables[model_id] = _model_entry(model_id, entry, own, at, ignored)
    persistent = _groups(data.get("groups", {}), tables, at, ignored)
    models: dict[str, ModelSpec] = {}
    for model_id, table in tables.items():
        if model_id in persistent:
            table.setdefault("idle_ttl", 0)
        models.update(
            models_from_mapping(
                {"models": {model_id: table}},
                base=path.parent,
                # What is left to refuse here comes from the cmd line's flags.
                where=f"{at('models', model_id, 'cmd')}: models.{model_id}.cmd",
                caps=caps,
                body_caps=body_caps,
            ).models
        )
    if ignored:
        logger.warning(
            "%s: ignoring what llama-proc sets itself or has no equivalent for: %s",
            path,
            ", ".join(ignored),
        )
    try:
        return ModelsConfig(models)
    except ConfigError as err:
        msg = f"{path}: {err}"
        raise ConfigError(msg) from None


def _model_entry(
    model_id: str, entry: Mapping[str, Any], macros: Mapping[str, str], at: Any, ignored: list[str]
) -> dict[str, Any]:
    key = f"models.{model_id}"
    cmd = entry.get("cmd")
    where = f"{at('models', model_id, 'cmd')}: {key}.cmd"
    if not isinstance(cmd, str) or not cmd.strip():
        msg = f"{where}: missing; give the llama-server command line"
        raise ConfigError(msg)
    tokens = _command(_expand(cmd, macros, where), where)
    flags = model_table([FlagGroup(where, tokens)])
    if flags.path is None and flags.model is None:
        msg = f"{where}: names no model; add -m FILE.gguf or -hf org/repo:QUANT"
        raise ConfigError(msg)
    table = flags.table()
    if "proxy" in entry:
        proxy_where = f"{at('models', model_id, 'proxy')}: {key}.proxy"
        proxy = _expand(str(entry["proxy"]), macros, proxy_where)
        if not _DEFAULT_PROXY_RE.fullmatch(proxy):
            msg = (
                f"{proxy_where}: {proxy!r}: llama-proc starts the server itself; remove proxy "
                "or leave it http://127.0.0.1:${PORT}"
            )
            raise ConfigError(msg)
    endpoint = entry.get("checkEndpoint")
    if endpoint is not None and str(endpoint) not in _HEALTH_ENDPOINTS:
        ignored.append(f"{key}.checkEndpoint")  # readiness is always llama-server's /health
    if "aliases" in entry:
        aliases = entry["aliases"]
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            msg = f"{at('models', model_id, 'aliases')}: {key}.aliases: must be a list of names"
            raise ConfigError(msg)
        table["aliases"] = list(aliases)
    if "ttl" in entry:
        ttl = entry["ttl"]
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
            msg = f"{at('models', model_id, 'ttl')}: {key}.ttl: must be seconds >= 0 (0 = never)"
            raise ConfigError(msg)
        table["idle_ttl"] = ttl
    return table


def _command(cmd: str, where: str) -> tuple[str, ...]:
    """The flags of a llama-server command line: the program dropped, ``--port ${PORT}`` kept."""
    # llama-swap drops comment lines and joins backslash-continued ones before splitting.
    lines = [ln for ln in cmd.splitlines() if not ln.lstrip().startswith("#")]
    try:
        words = shlex.split("\n".join(lines).replace("\\\n", " "), posix=True)
    except ValueError as err:
        msg = f"{where}: not valid shell-style quoting ({err}); fix the quotes"
        raise ConfigError(msg) from None
    program = ntpath.basename(words[0])  # either separator if words else ""
    if program.startswith("llama-server"):
        words = words[1:]
    elif program == "llama" and words[1:2] == ["serve"]:
        words = words[2:]
    else:
        msg = (
            f"{where}: runs {program or 'nothing'!r}, not llama-server; llama-proc starts "
            "llama-server itself, so cmd must be a llama-server command line"
        )
        raise ConfigError(msg)
    for i, word in enumerate(words):
        if PORT_MACRO in word and not (word == PORT_MACRO and words[i - 1] == "--port"):
            msg = f"{where}: {word!r}: ${{PORT}} only goes after --port; llama-proc picks the port"
            raise ConfigError(msg)
    return tuple(words)


def _macros(value: object, inherited: Mapping[str, str], where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        msg = f"{where}: macros: must map names to values"
        raise ConfigError(msg)
    macros = dict(inherited)
    for name, raw in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            msg = f"{where}: macros.{name}: a macro name is letters, digits, _ . -"
            raise ConfigError(msg)
        if isinstance(raw, dict | list) or raw is None:
            msg = f"{where}: macros.{name}: must be a string or a number"
            raise ConfigError(msg)
        # A macro may use the macros defined before it, never itself or later ones.
        macros[name] = _expand(str(raw), macros, f"{where}: macros.{name}")
    return macros


def _expand(text: str, macros: Mapping[str, str], where: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "PORT":
            return PORT_MACRO
        if name not in macros:
            msg = f"{where}: ${{{name}}} is not a macro; define it under macros:"
            raise ConfigError(msg)
        return macros[name]

    out = _MACRO_RE.sub(sub, text)
    if len(out) > MAX_EXPANDED:
        msg = f"{where}: over {MAX_EXPANDED} characters once macros are expanded"
        raise ConfigError(msg)
    return out


def _groups(value: object, tables: Mapping[str, Any], at: Any, ignored: list[str]) -> set[str]:
    """The models in persistent groups; unsupported group keys go to ``ignored``."""
    if not isinstance(value, dict):
        msg = f"{at('groups')}: groups: must map group names to members: and options"
        raise ConfigError(msg)
    persistent: set[str] = set()
    for name, group in value.items():
        where = f"{at('groups', str(name), 'members')}: groups.{name}.members"
        members = group.get("members") if isinstance(group, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            msg = f"{where}: must be a list of model ids"
            raise ConfigError(msg)
        for member in members:
            if member not in tables:
                msg = f"{where}: {member!r} is not a model in models:; add it or remove it"
                raise ConfigError(msg)
        ignored += [f"groups.{name}.{k}" for k in group if k not in _GROUP_KEYS]
        if group.get("persistent") is True:
            persistent.update(members)
    return persistent


def _load_yaml(path: Path) -> tuple[object, dict[tuple[str, ...], int]]:
    """The document (safe types only) and the line of each mapping key, by key path."""
    text = read_config_text(path, "llama-swap config")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            msg = f"{path}:1: models: the file is empty; a llama-swap config maps models:"
            raise ConfigError(msg)
        _bound(node, path)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        msg = f"{path}:{line}: not valid YAML: {err.problem or err.context}; fix the syntax"
        raise ConfigError(msg) from None
    except (yaml.YAMLError, RecursionError) as err:
        msg = f"{path}: not valid YAML ({type(err).__name__}); fix the syntax or nesting"
        raise ConfigError(msg) from None
    finally:
        loader.dispose()
    return data, _lines(node, path)


def _bound(root: yaml.Node, path: Path) -> None:
    """Refuse alias expansion bombs: count nodes as the loaded structure will hold them."""
    seen = 0
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            line = node.start_mark.line + 1
            msg = (
                f"{path}:{line}: the document expands to over {MAX_NODES} values (anchors "
                "and aliases counted each time used); a real config is far smaller"
            )
            raise ConfigError(msg)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += (key, value)
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def _lines(root: yaml.Node, path: Path) -> dict[tuple[str, ...], int]:
    """Key path -> line, for the keys under models, macros and groups (three levels)."""
    lines: dict[tuple[str, ...], int] = {(): 1}
    todo: list[tuple[tuple[str, ...], yaml.Node]] = [((), root)]
    while todo:
        prefix, node = todo.pop()
        if not isinstance(node, yaml.MappingNode) or len(prefix) >= 3:
            continue
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                here = (*prefix, str(key.value))
                if here in lines:
                    # safe_load keeps the last silently: a second model of one id would hide.
                    msg = (
                        f"{path}:{key.start_mark.line + 1}: {'.'.join(here)}: given twice (also "
                        f"line {lines[here]}); keep one"
                    )
                    raise ConfigError(msg)
                lines[here] = key.start_mark.line + 1
                todo.append((here, value))
    return lines
