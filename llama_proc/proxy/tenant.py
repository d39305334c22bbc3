"""What a tenant is told when its model cannot be served, built from the error's type.

llama-proc's errors are written for the operator: they name the binary, the model's path on
the host, the server's pid and the tail of its log. A tenant learns which model failed and
the kind of failure, and that the operator's log has the rest; the proxy logs the full error.
"""

from __future__ import annotations

from typing import Final

from llama_proc._text import printable
from llama_proc.errors import (
    ChecksumMismatchError,
    DownloadError,
    InvalidArgumentError,
    LlamaProcError,
    ModelFileError,
    OfflineError,
    ProvisionError,
    ServerNotReadyError,
    ServerStartError,
)

__all__ = ["tenant_reason"]

_REASONS: Final[tuple[tuple[type[LlamaProcError], str], ...]] = (
    (ModelFileError, "no such model file, repository, revision or quantization, or not GGUF"),
    (InvalidArgumentError, "the server's settings were refused"),
    (ServerNotReadyError, "it did not become ready in time"),
    (ServerStartError, "it exited before it was ready"),
    (OfflineError, "offline, and the model is not cached"),
    (ChecksumMismatchError, "the downloaded bytes did not match the hub's listing"),
    (DownloadError, "the hub or the network failed"),
    (ProvisionError, "the host could not provide it"),
)
"""Most specific first: the first class the error is an instance of gives the reason."""
DETAILS: Final = "the operator's log has the details"


def tenant_reason(err: LlamaProcError, *, shown: tuple[type[LlamaProcError], ...] = ()) -> str:
    """A short description of ``err`` that holds no host path, pid or log line.

    Args:
        err: what the pool or the download raised.
        shown: error types whose own message is about the tenant's request, not the host,
            and is passed on (a hub reference that names no such quantization lists the ones
            there are).

    Returns:
        For example ``"it exited before it was ready (exit code 1); the operator's log has
        the details"``.
    """
    if isinstance(err, shown):
        return printable(str(err))
    reason = next((text for kind, text in _REASONS if isinstance(err, kind)), "it failed")
    code = getattr(err, "returncode", None)
    if isinstance(code, int):
        reason += f" (exit code {code})"
    return f"{reason}; {DETAILS}"
