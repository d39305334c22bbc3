"""Which models ``serve`` offers: a config in any format, a preset, a models folder.

The format follows the path: a folder is a models folder (:mod:`.models_dir`), ``.ini`` a
llama.cpp preset (:mod:`.preset_ini`), ``.yaml``/``.yml`` a llama-swap config
(:mod:`.llama_swap`), anything else llama-proc's own TOML
(:mod:`llama_proc.proxy.models_config`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.errors import ConfigError
from llama_proc.proxy.configs.llama_swap import load_llama_swap
from llama_proc.proxy.configs.models_dir import scan_models_dir
from llama_proc.proxy.configs.preset_ini import load_preset_ini
from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
from llama_proc.proxy.models_config import CONFIG_ENV, load_models_config

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llama_proc.proxy.body_policy import BodyCaps
    from llama_proc.proxy.flag_caps import FlagCaps

__all__ = ["ConfigFormat", "config_format", "load_config", "load_models"]

ConfigFormat = Literal["toml", "ini", "llama-swap", "dir"]
_SUFFIXES: Final[Mapping[str, ConfigFormat]] = {
    ".ini": "ini",
    ".yaml": "llama-swap",
    ".yml": "llama-swap",
}


def config_format(path: Path) -> ConfigFormat:
    """The format ``path`` holds: by its suffix, or ``dir`` for a folder (TOML otherwise)."""
    if path.is_dir():
        return "dir"
    return _SUFFIXES.get(path.suffix.lower(), "toml")


def load_config(
    path: Path, *, caps: FlagCaps | None = None, body_caps: BodyCaps | None = None
) -> ModelsConfig:
    """Read a models config in whichever format ``path`` holds (:func:`config_format`).

    Raises:
        ConfigError: the file is missing or invalid, or a model is beyond a cap.
    """
    fmt = config_format(path)
    if fmt == "dir":
        return scan_models_dir(path, caps=caps, body_caps=body_caps)
    if fmt == "ini":
        return load_preset_ini(path, caps=caps, body_caps=body_caps)
    if fmt == "llama-swap":
        return load_llama_swap(path, caps=caps, body_caps=body_caps)
    return load_models_config(path, caps=caps, body_caps=body_caps)


def load_models(
    config: Path | None = None,
    models_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    preset: Path | None = None,
    caps: FlagCaps | None = None,
    body_caps: BodyCaps | None = None,
) -> ModelsConfig:
    """Build the served model set from a config, a preset and/or a models folder.

    Args:
        config: the config, in any format; when None, ``LLAMA_PROC_CONFIG`` from ``env`` is
            used if set.
        models_dir: a folder to scan; its defaults come from a TOML config's ``[defaults]``.
        env: environment to read; ``os.environ`` when None.
        preset: a llama.cpp ``--models-preset`` INI file.
        caps: server-wide caps every model must keep; None = not checked here.
        body_caps: server-wide request-body caps; None = only the hard ceilings.

    Raises:
        ConfigError: no source was given, one is invalid, or no model was found. Ids from
            the config win over the preset's, and both over the folder's.
    """
    source_env = os.environ if env is None else env
    if config is None and source_env.get(CONFIG_ENV, "").strip():
        config = Path(source_env[CONFIG_ENV].strip()).expanduser()
    if config is None and models_dir is None and preset is None:
        msg = (
            f"no models: pass --config FILE (or set {CONFIG_ENV}), --models-preset FILE.ini "
            "or --models-dir DIR"
        )
        raise ConfigError(msg)
    models: dict[str, ModelSpec] = {}
    defaults: Mapping[str, Any] = {}
    if config is not None and config_format(config) == "toml":
        defaults = _read_defaults(config)
    scanned: Mapping[str, ModelSpec] = {}
    if models_dir is not None:
        scanned = scan_models_dir(
            models_dir, defaults=defaults, caps=caps, body_caps=body_caps
        ).models
    for source in (config, preset):
        if source is None:
            continue
        if config_format(source) == "ini":
            # As llama.cpp's router reads them together: a preset section may name a folder's
            # model, and [*] applies to the folder's models.
            found = load_preset_ini(source, caps=caps, body_caps=body_caps, known=scanned)
        else:
            found = load_config(source, caps=caps, body_caps=body_caps)
        for spec in found:
            models.setdefault(spec.id, spec)
    for spec in scanned.values():
        models.setdefault(spec.id, spec)
    if not models:
        msg = "no models configured: the config, preset and models directory list none"
        raise ConfigError(msg)
    try:
        return ModelsConfig(models)
    except ConfigError as err:
        msg = f"the config, preset and models directory together: {err}"
        raise ConfigError(msg) from None


def _read_defaults(config: Path) -> Mapping[str, Any]:
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    defaults = data.get("defaults", {})
    return defaults if isinstance(defaults, dict) else {}
