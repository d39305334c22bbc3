"""llama-server command-line flags as a models-config model table.

Presets (INI keys) and llama-swap ``cmd`` lines name a model's options as llama-server flags;
:func:`model_table` turns them into the table a TOML ``[models.<id>]`` holds (``path`` or
``model``, ServerArgs options, ``extra_args``), so every format then goes through the TOML
path: the same validation, the same caps.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError
from llama_proc.proxy.configs.llama_arg_env import LLAMA_ARG_FLAGS
from llama_proc.proxy.flag_names import FlagNames, is_flag
from llama_proc.runtime.args import ServerArgs
from llama_proc.runtime.flags import normalize_flag

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["ENV_PREFIX", "FlagGroup", "ModelFlags", "flag_for_key", "model_table"]

ENV_PREFIX: Final = "LLAMA_ARG_"
"""llama-server reads each flag from an environment variable of this prefix too."""
MODEL_FLAGS: Final = frozenset({"-m", "--model"})
HF_REPO_FLAGS: Final = frozenset({"-hf", "-hfr", "--hf-repo"})
HF_FILE_FLAGS: Final = frozenset({"-hff", "--hf-file"})
PROXY_OWNED: Final = frozenset({"--host", "--port"})
"""Flags the pool sets for each server it starts; a config's own are dropped."""
_KEY_RE: Final = re.compile(r"-{0,2}[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TRUE_WORDS: Final = frozenset({"true", "1", "on", "yes", "enabled"})
FALSE_WORDS: Final = frozenset({"false", "0", "off", "no", "disabled"})


@dataclass(frozen=True)
class FlagGroup:
    """Flags from one place in a file: ``where`` prefixes any error about them."""

    where: str
    tokens: tuple[str, ...]


@dataclass
class ModelFlags:
    """What a model's flags say, split the way a TOML model table holds it."""

    path: str | None = None
    model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Flags left out because the pool sets them (``--port``, ``--host``)."""

    def table(self) -> dict[str, Any]:
        """The ``[models.<id>]`` table these flags are."""
        table: dict[str, Any] = dict(self.options)
        if self.path is not None:
            table["path"] = self.path
        if self.model is not None:
            table["model"] = self.model
        if self.extra_args:
            table["extra_args"] = list(self.extra_args)
        return table


@functools.cache
def _fields() -> Mapping[str, tuple[dataclasses.Field[Any], bool]]:
    """Flag spelling -> (ServerArgs field, whether the spelling is the negation)."""
    table: dict[str, tuple[dataclasses.Field[Any], bool]] = {}
    for f in dataclasses.fields(ServerArgs):
        for spelling in f.metadata.get("flags", ()):
            table[spelling] = (f, False)
        for spelling in f.metadata.get("neg", ()):
            table[spelling] = (f, True)
    return table


def _takes_value(flag: str, names: FlagNames) -> bool | None:
    """True/False for a flag this package knows; None for one it does not."""
    known = _fields().get(flag)
    if known is not None:
        return known[0].metadata["kind"] not in ("bool", "switch") and not known[1]
    return names.takes_value(flag) if names.known(flag) else None


def flag_for_key(key: str, names: FlagNames | None = None) -> str:
    """The flag an INI key names: ``ctx-size``, ``c``, ``--ctx-size`` or ``LLAMA_ARG_CTX_SIZE``.

    Raises:
        ConfigError: the key is not shaped like a flag name, or is an unknown ``LLAMA_ARG_``
            variable.
    """
    names = names if names is not None else FlagNames()
    if key.startswith(ENV_PREFIX):
        rest = key.removeprefix(ENV_PREFIX)
        flag = LLAMA_ARG_FLAGS.get(rest)
        if flag is not None:
            return flag
        flag = "--" + rest.lower().replace("_", "-")
        if not rest or not names.known(flag):
            msg = f"{key} is not a llama-server variable llama-proc knows; write the flag's name"
            raise ConfigError(msg)
        return flag
    if not _KEY_RE.fullmatch(key):
        msg = "not a llama-server flag name; write it as ctx-size, c or --ctx-size"
        raise ConfigError(msg)
    if key.startswith("-"):
        return normalize_flag(key)
    if len(key) == 1:
        return "-" + key
    for flag in ("--" + key, "-" + key):
        if names.known(flag):
            return normalize_flag(flag)
    return normalize_flag("--" + key)


def switch_tokens(flag: str, value: str, names: FlagNames | None = None) -> tuple[str, ...]:
    """The words an INI ``key = value`` stands for on a command line.

    A switch takes ``true``/``false`` (also ``on``/``off``, ``1``/``0``): true gives the flag,
    false its negation where it has one, or nothing.

    Raises:
        ConfigError: a switch given a value that is not true or false, or a valued flag given
            none.
    """
    names = names if names is not None else FlagNames()
    takes = _takes_value(flag, names)
    word = value.strip().lower()
    if takes is None:
        takes = word not in TRUE_WORDS | FALSE_WORDS
    if takes:
        if not value.strip():
            msg = f"{flag} needs a value; write {flag} = VALUE"
            raise ConfigError(msg)
        return (flag, value.strip())
    if word in TRUE_WORDS:
        return (flag,)
    if word in FALSE_WORDS:
        return _negation(flag, names)
    msg = f"{flag} is a switch: give true or false, not {value.strip()!r}"
    raise ConfigError(msg)


def _negation(flag: str, names: FlagNames) -> tuple[str, ...]:
    known = _fields().get(flag)
    if known is not None:
        neg = tuple(known[0].metadata.get("neg", ()))
        if known[1]:
            return (known[0].metadata["flags"][0],)
        return neg[:1]
    if flag.startswith("--no-"):
        return ("--" + flag[5:],) if names.known("--" + flag[5:]) else ()
    return ("--no-" + flag[2:],) if names.known("--no-" + flag[2:]) else ()


def model_table(groups: Sequence[FlagGroup], names: FlagNames | None = None) -> ModelFlags:
    """Split llama-server flags into a model's source, typed options and extra flags.

    A flag a :class:`~llama_proc.runtime.ServerArgs` field has becomes that option (so
    ``-c 2048`` and ``ctx_size = 2048`` are the same model); ``-m``/``--model`` is the path,
    ``-hf`` (with ``-hff``) the Hugging Face reference; ``--host`` and ``--port`` are dropped
    (the pool chooses them); anything else stays a flag in ``extra_args``, in order.

    Raises:
        ConfigError: a positional word, a flag without its value, a value of the wrong type,
            or a model named twice; the message starts with the group's ``where``.
    """
    names = names if names is not None else FlagNames()
    out = ModelFlags()
    hf_repo: str | None = None
    hf_file: str | None = None
    for group in groups:
        tokens = list(group.tokens)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if not is_flag(token):
                msg = f"{group.where}: unexpected word {token!r}; llama-server takes only flags"
                raise ConfigError(msg)
            flag, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
            flag = normalize_flag(flag)
            takes = _takes_value(flag, names)
            if takes is None:
                takes = bool(eq) or (i + 1 < len(tokens) and not is_flag(tokens[i + 1]))
            value: str | None = None
            if eq:
                value, i = inline, i + 1
            elif takes and (i + 1 >= len(tokens) or is_flag(tokens[i + 1])):
                if flag not in _fields() or _fields()[flag][0].metadata["kind"] != "onoff":
                    msg = f"{group.where}: {flag} needs a value; add it after the flag"
                    raise ConfigError(msg)
                i += 1  # a bare -fa, as builds before on|off|auto took it: on
            elif takes:
                value, i = tokens[i + 1], i + 2
            else:
                i += 1
            if flag in PROXY_OWNED:
                out.dropped.append(flag)
            elif flag in MODEL_FLAGS | HF_REPO_FLAGS | HF_FILE_FLAGS:
                if flag in MODEL_FLAGS:
                    out.path = _once(out.path, value, flag, group.where)
                elif flag in HF_REPO_FLAGS:
                    hf_repo = _once(hf_repo, value, flag, group.where)
                else:
                    hf_file = _once(hf_file, value, flag, group.where)
            elif flag in _fields():
                field_, negated = _fields()[flag]
                out.options[field_.name] = _option(
                    field_, negated=negated, value=value, flag=flag, where=group.where
                )
            else:
                out.extra_args += [flag] if value is None else [flag, value]
    if hf_repo is not None:
        repo, _, quant = hf_repo.partition(":")
        out.model = f"hf://{repo}/{hf_file}" if hf_file else hf_repo
        if hf_file and quant:
            msg = f"{groups[-1].where}: give -hf with a :QUANT tag or -hff, not both"
            raise ConfigError(msg)
    elif hf_file is not None:
        msg = f"{groups[-1].where}: -hff names a file of the -hf repository; add -hf org/repo"
        raise ConfigError(msg)
    if out.path is not None and out.model is not None:
        msg = f"{groups[-1].where}: give -m (a file) or -hf (a Hugging Face model), not both"
        raise ConfigError(msg)
    return out


def _once(old: str | None, value: str | None, flag: str, where: str) -> str:
    if old is not None:
        msg = f"{where}: {flag} is given twice; name the model once"
        raise ConfigError(msg)
    if not value:
        msg = f"{where}: {flag} needs a value; add it after the flag"
        raise ConfigError(msg)
    return value


def _option(
    f: dataclasses.Field[Any], *, negated: bool, value: str | None, flag: str, where: str
) -> Any:
    kind = f.metadata["kind"]
    if kind in ("bool", "switch"):
        return not negated
    text = "" if value is None else value
    if kind == "onoff":
        return text or "on"
    if kind == "list":
        items = tuple(v.strip() for v in text.split(",") if v.strip())
        if f.name == "tensor_split":
            try:
                return tuple(float(v) for v in items)
            except ValueError:
                msg = f"{where}: {flag} {text!r}: give numbers separated by commas"
                raise ConfigError(msg) from None
        return items
    types = str(f.type).replace(" ", "").split("|")
    if "int" in types and re.fullmatch(r"-?[0-9]{1,12}", text):
        return int(text)
    if "int" in types and "str" not in types:
        msg = f"{where}: {flag} {text!r}: not a whole number; write it in digits"
        raise ConfigError(msg)
    return text
