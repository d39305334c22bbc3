"""llama-proc: get a verified llama.cpp ``llama-server`` for this host and run it well.

Quick use::

    from llama_proc import LlamaServer

    with LlamaServer("model.gguf") as server:
        print(server.chat([{"role": "user", "content": "Hello"}]))

Names are loaded on first use, so ``import llama_proc`` is cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__

if TYPE_CHECKING:
    from llama_proc.config import Settings
    from llama_proc.errors import (
        ArchiveError,
        BinaryNotFoundError,
        BuildError,
        CacheLockTimeoutError,
        ChecksumMismatchError,
        ConfigError,
        DownloadError,
        InvalidArgumentError,
        LlamaProcError,
        ManifestError,
        ModelFileError,
        NoMatchingVariantError,
        OfflineError,
        ProvisionError,
        ServerError,
        ServerNotReadyError,
        ServerRequestError,
        ServerStartError,
        ToolNotFoundError,
    )
    from llama_proc.provision import (
        HostInfo,
        Install,
        Manifest,
        Variant,
        build_variant,
        detect_host,
        ensure_server,
        fetch_smoke_model,
        load_manifest,
        select_variant,
    )
    from llama_proc.runtime import LlamaClient, ServerArgs, ServerProcess, validate_extra_args
    from llama_proc.server import AsyncLlamaServer, LlamaServer

__all__ = [
    "ArchiveError",
    "AsyncLlamaServer",
    "BinaryNotFoundError",
    "BuildError",
    "CacheLockTimeoutError",
    "ChecksumMismatchError",
    "ConfigError",
    "DownloadError",
    "HostInfo",
    "Install",
    "InvalidArgumentError",
    "LlamaClient",
    "LlamaProcError",
    "LlamaServer",
    "Manifest",
    "ManifestError",
    "ModelFileError",
    "NoMatchingVariantError",
    "OfflineError",
    "ProvisionError",
    "ServerArgs",
    "ServerError",
    "ServerNotReadyError",
    "ServerProcess",
    "ServerRequestError",
    "ServerStartError",
    "Settings",
    "ToolNotFoundError",
    "Variant",
    "__version__",
    "build_variant",
    "detect_host",
    "ensure_server",
    "fetch_smoke_model",
    "load_manifest",
    "select_variant",
    "validate_extra_args",
]

_PROVISION: Final = frozenset(
    {
        "HostInfo", "Install", "Manifest", "Variant", "build_variant", "detect_host",
        "ensure_server", "fetch_smoke_model", "load_manifest", "select_variant",
    }
)  # fmt: skip
_RUNTIME: Final = frozenset({"LlamaClient", "ServerArgs", "ServerProcess", "validate_extra_args"})
_SERVER: Final = frozenset({"AsyncLlamaServer", "LlamaServer"})


def _module_for(name: str) -> str | None:
    if name in _PROVISION:
        return "llama_proc.provision"
    if name in _RUNTIME:
        return "llama_proc.runtime"
    if name in _SERVER:
        return "llama_proc.server"
    if name == "Settings":
        return "llama_proc.config"
    if name in __all__ and name.endswith("Error"):
        return "llama_proc.errors"
    return None


def __getattr__(name: str) -> Any:
    module = _module_for(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
