"""The models config formats ``serve --config`` reads besides its own TOML.

llama.cpp router presets (:func:`load_preset_ini`), models folders (:func:`scan_models_dir`)
and llama-swap YAML (:func:`load_llama_swap`) each become the tables a TOML config holds and
go through :func:`~llama_proc.proxy.models_config.models_from_mapping`: one set of records
(:class:`~llama_proc.proxy.model_spec.ModelSpec`), one set of checks and caps.
"""

from __future__ import annotations

from llama_proc.proxy.configs.llama_swap import load_llama_swap
from llama_proc.proxy.configs.load import config_format, load_config, load_models
from llama_proc.proxy.configs.models_dir import scan_models_dir
from llama_proc.proxy.configs.preset_ini import load_preset_ini

__all__ = [
    "config_format",
    "load_config",
    "load_llama_swap",
    "load_models",
    "load_preset_ini",
    "scan_models_dir",
]
