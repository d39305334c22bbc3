"""Runtime: run llama-server well once you have one (no provisioning in here).

* :class:`ServerArgs` -- typed options, mapped to flags the installed binary accepts.
* :func:`validate_extra_args` -- the allowlist for flags from untrusted sources.
* :func:`check_gguf` -- refuse a missing or non-GGUF model before spawning.
* :class:`ServerProcess` -- spawn, wait for ``/health``, keep logs, stop; dies with its owner.
* :class:`LlamaClient` / :class:`AsyncLlamaClient` -- the HTTP API.

Names are loaded on first use so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from llama_proc._lazy import lazy_exports

if TYPE_CHECKING:
    from llama_proc.diagnosis import Cause, diagnose
    from llama_proc.models.gguf_header import GgufHeader, check_gguf
    from llama_proc.runtime.args import ServerArgs
    from llama_proc.runtime.async_client import AsyncLlamaClient
    from llama_proc.runtime.client import LlamaClient
    from llama_proc.runtime.extra_args import validate_extra_args
    from llama_proc.runtime.flags import BinaryFlags, probe_flags
    from llama_proc.runtime.health import probe_health
    from llama_proc.runtime.process import ServerProcess, child_environment
    from llama_proc.runtime.wire import parse_metrics

__all__ = [
    "AsyncLlamaClient",
    "BinaryFlags",
    "Cause",
    "GgufHeader",
    "LlamaClient",
    "ServerArgs",
    "ServerProcess",
    "check_gguf",
    "child_environment",
    "diagnose",
    "parse_metrics",
    "probe_flags",
    "probe_health",
    "validate_extra_args",
]

_WHERE: Final = {
    "AsyncLlamaClient": "async_client",
    "BinaryFlags": "flags",
    "Cause": "llama_proc.diagnosis",
    "GgufHeader": "llama_proc.models.gguf_header",
    "LlamaClient": "client",
    "ServerArgs": "args",
    "ServerProcess": "process",
    "check_gguf": "llama_proc.models.gguf_header",
    "child_environment": "process",
    "diagnose": "llama_proc.diagnosis",
    "parse_metrics": "wire",
    "probe_flags": "flags",
    "probe_health": "health",
    "validate_extra_args": "extra_args",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals(), __all__)
