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
through the TOML path and its caps. ``load-on-startup = true`` is the model's ``preload`` (it
starts with the proxy); ``stop-timeout`` has no equivalent here (servers stop within the drain
timeout) and is named in one warning.
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ConfigError, ModelFileError
from llama_proc.models.hub import ModelRef
from llama_proc.proxy.configs.server_flags import (
    FALSE_WORDS,
    TRUE_WORDS,
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
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.configs.server_flags import ModelFlags
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["GLOBAL_SECTION", "load_preset_ini"]

logger = logging.getLogger(__name__)

GLOBAL_SECTION: Final = "*"
"""The section whose keys apply to every model."""
PRESET_ONLY_KEYS: Final = frozenset({"stop-timeout"})
STARTUP_KEY: Final = "load-on-startup"
"""Start the model with the proxy (the model's ``preload``)."""
_SECTION_RE: Final = re.compile(r"\s*\[(?P<name>[^\]]*)\]")
_KEY_LINE_RE: Final = re.compile(r"\s*(?P<key>[^=:\s;#][^=:]*?)\s*[=:]")


def load_preset_ini(
    path: Path,
    *,
    caps: FlagCaps | None = None,
    body_caps: BodyCaps | None = None,
    known: Mapping[str, ModelSpec] | None = None,
) -> ModelsConfig:
    """Read a llama.cpp ``--models-preset`` INI file.

    With ``known`` (the models of a ``--models-dir``), a section named like one of them sets
    that model's flags, and ``[*]`` applies to every one of them, as in llama.cpp's router.

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
    startup: dict[str, bool] = {}
    base = _section_flags(parser, GLOBAL_SECTION, path, lines, names, ignored, startup)
    models: dict[str, ModelSpec] = {}
    for section in parser.sections():
        if section == GLOBAL_SECTION:
            continue
        where = f"{path}:{lines.get((section, ''), 0)}"
        own = _section_flags(parser, section, path, lines, names, ignored, startup)
        merged = {**base, **own}  # a model's keys win over [*]
        flags = model_table(list(merged.values()), names)
        found = (known or {}).get(section)
        if flags.path is None and flags.model is None and found is not None:
            _take_files(flags, found)
        if flags.path is None and flags.model is None:
            # As in the router, a section named like a Hugging Face model is that model.
            flags.model = section if _is_hf_ref(section) else None
        if flags.model is None and flags.path is None:
            msg = (
                f"{where}: [{section}]: no model; add model = FILE.gguf or hf-repo = "
                "org/repo:QUANT, name the section org/repo:QUANT, or serve a --models-dir "
                "holding a model of that name"
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

        table = flags.table()
        if startup.get(section, startup.get(GLOBAL_SECTION, False)):
            table["preload"] = True
        try:
            built = build(table, where).models
        except ConfigError:
            raise _pin_to_key(list(merged.values()), flags, names, build) from None
        models.update(_as_found(built, found))
    for model_id, found in (known or {}).items():
        if model_id in models:
            continue
        # A folder's model without a section of its own takes the [*] flags.
        flags = model_table(list(base.values()), names)
        _take_files(flags, found)
        table = flags.table()
        if startup.get(GLOBAL_SECTION, False):
            table["preload"] = True
        built = models_from_mapping(
            {"models": {model_id: table}},
            base=path.parent,
            where=f"{path}: [*] for {found.source or model_id}",
            caps=caps,
            body_caps=body_caps,
        ).models
        models.update(_as_found(built, found))
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


def _take_files(flags: ModelFlags, found: ModelSpec) -> None:
    """A folder's model's files (its GGUF, its projector) for a preset entry that names none."""
    flags.path = str(found.path)
    if "mmproj" in found.options and "mmproj" not in flags.options:
        flags.options["mmproj"] = found.options["mmproj"]


def _as_found(built: Mapping[str, ModelSpec], found: ModelSpec | None) -> dict[str, ModelSpec]:
    """Keep a folder model's other names and where it came from."""
    if found is None:
        return dict(built)
    return {
        key: dataclasses.replace(
            spec, aliases=(*spec.aliases, *found.aliases), source=f"{spec.source} + {found.source}"
        )
        for key, spec in built.items()
    }


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
    startup: dict[str, bool],
) -> dict[str, FlagGroup]:
    """Option identity -> its words, for one section (empty for a missing ``[*]``).

    ``load-on-startup`` goes to ``startup`` (by section) instead.
    """
    if not parser.has_section(section):
        return {}
    groups: dict[str, FlagGroup] = {}
    for key, value in parser.items(section):
        where = f"{path}:{lines.get((section, key), 0)}: {key}"
        if key == STARTUP_KEY:
            word = value.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                msg = f"{where}: {value!r} is not true or false"
                raise ConfigError(msg)
            startup[section] = word in TRUE_WORDS
            continue
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
