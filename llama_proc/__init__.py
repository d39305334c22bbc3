"""llama-proc: get a verified llama.cpp ``llama-server`` for this host and run it well.

Quick use::

    from llama_proc import LlamaServer

    with LlamaServer("model.gguf") as server:
        print(server.chat([{"role": "user", "content": "Hello"}]))

Names are loaded on first use, so ``import llama_proc`` is cheap and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc import _logging  # noqa: F401 - installs the package logger's NullHandler
from llama_proc._lazy import lazy_exports
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
        ServerExitedError,
        ServerNotReadyError,
        ServerRequestError,
        ServerStartError,
        ServerTimeoutError,
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
    "ServerExitedError",
    "ServerNotReadyError",
    "ServerProcess",
    "ServerRequestError",
    "ServerStartError",
    "ServerTimeoutError",
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

_WHERE: Final = {
    **dict.fromkeys(
        (
            "HostInfo", "Install", "Manifest", "Variant", "build_variant", "detect_host",
            "ensure_server", "fetch_smoke_model", "load_manifest", "select_variant",
        ),
        "llama_proc.provision",
    ),
    **dict.fromkeys(
        ("LlamaClient", "ServerArgs", "ServerProcess", "validate_extra_args"), "llama_proc.runtime"
    ),
    **dict.fromkeys(("AsyncLlamaServer", "LlamaServer"), "llama_proc.server"),
    "Settings": "llama_proc.config",
    **{name: "llama_proc.errors" for name in __all__ if name.endswith("Error")},
}  # fmt: skip

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
