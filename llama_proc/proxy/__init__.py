"""``llama-proc serve``: an OpenAI-compatible proxy over a pool of llama-servers.

The pool (:class:`ServerPool`) keys servers on (model, normalized flags), starts them on
demand, evicts the least recently used one when ``max_servers`` is reached (never mid-request),
unloads idle ones and restarts crashed ones. The aiohttp app (:func:`create_app`) routes
OpenAI requests to the right server and streams responses through.

Names are loaded on first use: importing this package does not import aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc._lazy import lazy_exports

if TYPE_CHECKING:
    from llama_proc.proxy.app import create_app
    from llama_proc.proxy.configs import load_models, scan_models_dir
    from llama_proc.proxy.flag_caps import FlagCaps
    from llama_proc.proxy.flag_checker import FlagChecker, normalize_flags, split_flags_header
    from llama_proc.proxy.flag_policy import FlagPolicy
    from llama_proc.proxy.gate import run_proxy
    from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec
    from llama_proc.proxy.models_config import load_models_config
    from llama_proc.proxy.options import ProxyOptions
    from llama_proc.proxy.pool import ServerInfo, ServerPool, server_key
    from llama_proc.proxy.servers import (
        LlamaServerFactory,
        PoolBusyError,
        PoolClosedError,
        ServerFactory,
        ServerHandle,
    )

__all__ = [
    "FlagCaps",
    "FlagChecker",
    "FlagPolicy",
    "LlamaServerFactory",
    "ModelSpec",
    "ModelsConfig",
    "PoolBusyError",
    "PoolClosedError",
    "ProxyOptions",
    "ServerFactory",
    "ServerHandle",
    "ServerInfo",
    "ServerPool",
    "create_app",
    "load_models",
    "load_models_config",
    "normalize_flags",
    "run_proxy",
    "scan_models_dir",
    "server_key",
    "split_flags_header",
]

_MODULES: Final = {
    "app": ("create_app",),
    "flag_caps": ("FlagCaps",),
    "flag_checker": ("FlagChecker", "normalize_flags", "split_flags_header"),
    "flag_policy": ("FlagPolicy",),
    "gate": ("run_proxy",),
    "configs": ("load_models", "scan_models_dir"),
    "model_spec": ("ModelSpec", "ModelsConfig"),
    "models_config": ("load_models_config",),
    "options": ("ProxyOptions",),
    "pool": ("ServerInfo", "ServerPool", "server_key"),
    "servers": (
        "LlamaServerFactory", "PoolBusyError", "PoolClosedError", "ServerFactory", "ServerHandle",
    ),
}  # fmt: skip
_WHERE: Final = {name: module for module, names in _MODULES.items() for name in names}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
