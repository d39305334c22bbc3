"""llama.cpp router-mode presets (``llama-server --models-preset FILE.ini``) as a models config.

::

    [*]                      ; every model
    ctx-size = 4096
    jinja = true

    [smol]                   ; the section name is the model id
    model = SmolLM2-135M-Instruct.Q4_1.gguf     ; relative to this file
    c = 2048                 ; long or short flag names, or LLAMA_ARG_CTX_SIZE
    temp = 0.7

    [qwen]
    hf-repo = Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M

A model section's keys win over ``[*]``. Each section becomes the table a TOML
``[models.<id>]`` holds (:func:`~llama_proc.proxy.configs.server_flags.model_table`), then goes
through the TOML path and its caps. ``load-on-startup`` and ``stop-timeout`` have no
equivalent here (servers start on first request and stop within the drain timeout): they are
named in one warning.
"""

from __future__ import annotations

import configparser
import logging
import re
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, ModelFileError
from llama_proc.models.hub import ModelRef
from llama_proc.proxy.configs.server_flags import (
    FlagGroup,
    flag_for_key,
    model_table,
    switch_tokens,
)
from llama_proc.proxy.configs.text import read_config_text
from llama_proc.proxy.flag_names import FlagNames
from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
from llama_proc.proxy.models_config import models_from_mapping

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.configs.server_flags import ModelFlags
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["GLOBAL_SECTION", "load_preset_ini"]

logger = logging.getLogger(__name__)

GLOBAL_SECTION: Final = "*"
"""The section whose keys apply to every model."""
PRESET_ONLY_KEYS: Final = frozenset({"load-on-startup", "stop-timeout"})
_SECTION_RE: Final = re.compile(r"\s*\[(?P<name>[^\]]*)\]")
_KEY_LINE_RE: Final = re.compile(r"\s*(?P<key>[^=:\s;#][^=:]*?)\s*[=:]")


def load_preset_ini(
    path: Path, *, caps: FlagCaps | None = None, body_caps: BodyCaps | None = None
) -> ModelsConfig:
    """Read a llama.cpp ``--models-preset`` INI file.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key or model is invalid or beyond
            a cap; the message starts with ``file:line:`` and names the key.
    """
    text = read_config_text(path, "models preset")
    parser = configparser.RawConfigParser(
        interpolation=None, strict=True, default_section="\x00none", delimiters=("=", ":")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # LLAMA_ARG_* keep case
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as err:
        raise ConfigError(_parse_error(path, err, text)) from None
    lines = _key_lines(text)
    names = FlagNames()
    ignored: list[str] = []
    base = _section_flags(parser, GLOBAL_SECTION, path, lines, names, ignored)
    models: dict[str, ModelSpec] = {}
    for section in parser.sections():
        if section == GLOBAL_SECTION:
            continue
        where = f"{path}:{lines.get((section, ''), 0)}"
        own = _section_flags(parser, section, path, lines, names, ignored)
        merged = {**base, **own}  # a model's keys win over [*]
        flags = model_table(list(merged.values()), names)
        if flags.path is None and flags.model is None:
            # As in the router, a section named like a Hugging Face model is that model.
            flags.model = section if _is_hf_ref(section) else None
        if flags.model is None and flags.path is None:
            msg = (
                f"{where}: [{section}]: no model; add model = FILE.gguf or hf-repo = "
                "org/repo:QUANT, or name the section org/repo:QUANT"
            )
            raise ConfigError(msg)
        ignored += [f"[{section}] {flag}" for flag in flags.dropped]

        def build(table: dict[str, Any], where: str, section: str = section) -> ModelsConfig:
            return models_from_mapping(
                {"models": {section: table}},
                base=path.parent,
                where=where,
                caps=caps,
                body_caps=body_caps,
            )

        try:
            models.update(build(flags.table(), where).models)
        except ConfigError:
            raise _pin_to_key(list(merged.values()), flags, names, build) from None
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


def _pin_to_key(
    groups: list[FlagGroup],
    flags: ModelFlags,
    names: FlagNames,
    build: Callable[[dict[str, Any], str], ModelsConfig],
) -> ConfigError:
    """The error a model's keys cause, named by the first key with which they fail.

    Keys are added one at a time, in the order the model gets them; the first prefix that
    fails (a value above a cap, a bad value) is reported at its last key's line.
    """
    for n in range(1, len(groups) + 1):
        prefix = model_table(groups[:n], names)
        prefix.path, prefix.model = flags.path, flags.model
        try:
            build(prefix.table(), groups[n - 1].where)
        except ConfigError as err:
            return err
    return ConfigError(f"{groups[-1].where}: the model's keys together are refused")


def _is_hf_ref(name: str) -> bool:
    try:
        return "/" in name and ModelRef.parse(name) is not None
    except ModelFileError:
        return False


def _section_flags(
    parser: configparser.RawConfigParser,
    section: str,
    path: Path,
    lines: dict[tuple[str, str], int],
    names: FlagNames,
    ignored: list[str],
) -> dict[str, FlagGroup]:
    """Option identity -> its words, for one section (empty for a missing ``[*]``)."""
    if not parser.has_section(section):
        return {}
    groups: dict[str, FlagGroup] = {}
    for key, value in parser.items(section):
        where = f"{path}:{lines.get((section, key), 0)}: {key}"
        if key in PRESET_ONLY_KEYS:
            ignored.append(f"[{section}] {key}")
            continue
        try:
            flag = flag_for_key(key, names)
            tokens = switch_tokens(flag, value, names)
        except ConfigError as err:
            msg = f"{where}: {err}"
            raise ConfigError(msg) from None
        groups[names.key(flag)] = FlagGroup(where, tokens)
    return groups


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """(section, key) -> the line it is on; (section, "") -> the section header's line."""
    lines: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line[:1].isspace() and not line.strip().startswith("["):
            continue  # a continuation of the previous value
        header = _SECTION_RE.match(line)
        if header is not None:
            section = header.group("name")
            lines.setdefault((section, ""), number)
            continue
        key = _KEY_LINE_RE.match(line)
        if key is not None:
            lines.setdefault((section, key.group("key")), number)
    return lines


def _parse_error(path: Path, err: configparser.Error, text: str) -> str:
    if isinstance(err, configparser.MissingSectionHeaderError):
        return (
            f"{path}:{err.lineno}: {err.line.strip()!r}: a key before any section; put it "
            "under [*] (every model) or [<model id>]"
        )
    if isinstance(err, configparser.DuplicateOptionError):
        return f"{path}:{err.lineno}: {err.option}: given twice in [{err.section}]; keep one"
    if isinstance(err, configparser.DuplicateSectionError):
        return f"{path}:{err.lineno}: [{err.section}]: a second section of that name; merge them"
    if isinstance(err, configparser.ParsingError):
        lineno = err.errors[0][0]
        line = text.splitlines()[lineno - 1].strip() if lineno <= len(text.splitlines()) else ""
        return f"{path}:{lineno}: {line!r}: not a key = value line; write key = value"
    return f"{path}: not a valid INI file: {err.message}"
