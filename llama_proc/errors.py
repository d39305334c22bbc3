"""Exceptions raised by llama-proc.

Every error has one root, :class:`LlamaProcError`, so callers can catch everything llama-proc
raises with one ``except``. Errors that are naturally caught as builtins also subclass them.

* LlamaProcError
  * ConfigError (also ValueError)            invalid Settings / env / config-settings value
  * ManifestError                            variants.toml malformed; names the key and line
    * NoMatchingVariantError                 no variant for this host / requested backend
  * ProvisionError
    * DownloadError                          HTTP/network failure (cause: requests exception)
    * ChecksumMismatchError                  sha256 differs; .url .expected .actual
    * AttestationError                       a served provenance attestation does not verify
    * ArchiveError                           corrupt archive or unsafe member path
    * ToolNotFoundError                      cmake / compiler / toolkit missing for a source build
    * BuildError                             CMake configure/build failed; .cmd .returncode .log_tail
    * CacheLockTimeoutError (also TimeoutError)  could not take the cache lock; .lock_path
    * OfflineError                           offline mode and nothing usable is cached
    * BinaryNotFoundError                    the resolution ladder found no llama-server
    * DeviceNotFoundError                    a GPU build lists no GPU on a host that has one
    * ComputeCheckError                      an install does not compute correctly on this host
  * ServerError
    * InvalidArgumentError (also ValueError) a server option or extra flag was refused
    * ModelFileError (also ValueError)       model file missing or not GGUF
    * ServerStartError                       process exited before becoming healthy
      * RpcWorkerError                       an RPC worker is unreachable, busy or another build
      * CpuFallbackError                     GPU layers asked for, but loaded on the CPU
    * ServerNotReadyError (also TimeoutError)  /health did not return 200 in time
    * ServerRequestError                     an HTTP call to a running server failed
      * ServerExitedError                    the server exited during the request; .returncode
      * ServerTimeoutError (also TimeoutError)  silent too long, or past the total deadline
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ArchiveError",
    "AttestationError",
    "BinaryNotFoundError",
    "BuildError",
    "CacheLockTimeoutError",
    "ChecksumMismatchError",
    "ComputeCheckError",
    "ConfigError",
    "CpuFallbackError",
    "DeviceNotFoundError",
    "DownloadError",
    "InvalidArgumentError",
    "LlamaProcError",
    "ManifestError",
    "ModelFileError",
    "NoMatchingVariantError",
    "OfflineError",
    "ProvisionError",
    "RpcWorkerError",
    "ServerError",
    "ServerExitedError",
    "ServerNotReadyError",
    "ServerRequestError",
    "ServerStartError",
    "ServerTimeoutError",
    "ToolNotFoundError",
]


def _indent_tail(lines: Sequence[str], limit: int = 40) -> str:
    tail = list(lines)[-limit:]
    return "\n".join(f"    {line}" for line in tail)


class LlamaProcError(Exception):
    """Base class for every error raised by llama-proc."""


class ConfigError(LlamaProcError, ValueError):
    """A setting, environment variable or config-settings value is invalid."""


class ManifestError(LlamaProcError):
    """``variants.toml`` is malformed or uses an unsupported schema."""


class NoMatchingVariantError(ManifestError):
    """No variant in the manifest fits this host or the requested backend."""


class ProvisionError(LlamaProcError):
    """Getting a llama-server binary onto this machine failed."""


class DownloadError(ProvisionError):
    """An HTTP download failed after all retries."""


class ChecksumMismatchError(ProvisionError):
    """Downloaded bytes do not match the expected sha256."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(url, expected, actual)

    def __str__(self) -> str:
        return (
            f"sha256 mismatch for {self.url}: expected {self.expected}, got {self.actual}. "
            "The downloaded bytes were deleted; the manifest or mirror may be outdated."
        )


class AttestationError(ProvisionError):
    """A build-provenance attestation is served for an archive and does not verify."""


class ArchiveError(ProvisionError):
    """An archive is corrupt or holds a member that would land outside its folder."""


class ToolNotFoundError(ProvisionError):
    """A tool needed for a source build (cmake, a compiler, a GPU toolkit) is missing."""


class BuildError(ProvisionError):
    """A CMake configure or build step failed."""

    def __init__(
        self,
        cmd: Sequence[str],
        returncode: int,
        log_tail: Sequence[str] = (),
        hint: str = "",
        log_path: str = "",
    ) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.log_tail = list(log_tail)
        self.hint = hint
        self.log_path = log_path
        super().__init__(self.cmd, returncode, self.log_tail, hint, log_path)

    def __str__(self) -> str:
        text = f"command failed with exit code {self.returncode}: {' '.join(self.cmd)}"
        if self.hint:
            text += f"\nlikely cause: {self.hint}"
        if self.log_path:
            text += f"\nfull log: {self.log_path}"
        if self.log_tail:
            text += "\nlast lines of the log:\n" + _indent_tail(self.log_tail)
        return text


class CacheLockTimeoutError(ProvisionError, TimeoutError):
    """Another process held the cache lock for too long."""

    def __init__(self, lock_path: str, timeout: float) -> None:
        self.lock_path, self.timeout = lock_path, timeout
        super().__init__(lock_path, timeout)

    def __str__(self) -> str:
        return (
            f"could not lock {self.lock_path} within {self.timeout:g}s: another llama-proc "
            "process is installing the same variant. Wait for it, or raise "
            "LLAMA_PROC_LOCK_TIMEOUT."
        )


class OfflineError(ProvisionError):
    """Offline mode is on and the requested binary is not in the cache."""


class BinaryNotFoundError(ProvisionError):
    """No step of the resolution ladder produced a llama-server binary."""


class DeviceNotFoundError(ProvisionError):
    """A GPU build of llama-server lists no device of its backend on a host that has that GPU.

    The install is refused (nothing is recorded); ``auto`` falls to the next backend.
    ``backend`` names the build's backend, ``cause`` the decoded reason's kind (a
    :data:`~llama_proc.diagnosis.CauseKind`, e.g. ``missing_library``).
    """

    def __init__(self, message: str, backend: str = "", cause: str = "") -> None:
        self.message, self.backend, self.cause = message, backend, cause
        super().__init__(message, backend, cause)

    def __str__(self) -> str:
        return self.message


class ComputeCheckError(ProvisionError):
    """An install crashed on, or computed wrong numbers for, the compute check's tiny model.

    Nothing was installed (or the cached install was marked broken). The message says what
    failed, what was already turned off and what to do next.
    """


class ServerError(LlamaProcError):
    """Running or talking to llama-server failed."""


class InvalidArgumentError(ServerError, ValueError):
    """A server option or extra command-line flag was refused before spawning."""


class ModelFileError(ServerError, ValueError):
    """The model file is missing, unreadable or not a GGUF file."""


class ServerStartError(ServerError):
    """llama-server exited before it became ready."""

    def __init__(
        self,
        message: str,
        returncode: int | None = None,
        cause: str = "",
        log_tail: Sequence[str] = (),
    ) -> None:
        self.message = message
        self.returncode = returncode
        self.cause = cause
        self.log_tail = list(log_tail)
        super().__init__(message, returncode, cause, self.log_tail)

    def __str__(self) -> str:
        text = self.message
        if self.returncode is not None:
            text += f" (exit code {self.returncode})"
        if self.cause:
            text += f": {self.cause}"
        if self.log_tail:
            text += "\nlast log lines:\n" + _indent_tail(self.log_tail, 20)
        return text


class ServerNotReadyError(ServerError, TimeoutError):
    """llama-server did not report ready in time (or stalled while loading)."""

    def __init__(
        self, url: str, timeout: float, reason: str = "", log_tail: Sequence[str] = ()
    ) -> None:
        self.url, self.timeout, self.reason = url, timeout, reason
        self.log_tail = list(log_tail)
        super().__init__(url, timeout, reason, self.log_tail)

    def __str__(self) -> str:
        text = f"llama-server at {self.url} was not ready after {self.timeout:g}s"
        if self.reason:
            text += f" ({self.reason})"
        if self.log_tail:
            text += "\nlast log lines:\n" + _indent_tail(self.log_tail, 20)
        return text


class ServerRequestError(ServerError):
    """An HTTP request to a running llama-server failed or returned an error."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        self.message, self.status, self.body = message, status, body
        super().__init__(message, status, body)

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.message} (HTTP {self.status})"


class ServerExitedError(ServerRequestError):
    """llama-server exited while a request was in flight (crash, kill, out-of-memory killer).

    Raised the same way by the sync and async clients (and the proxy says the same in-band):
    ``returncode`` (negative = the signal), ``cause`` (the decoded reason), ``log_tail``.
    """

    def __init__(
        self,
        message: str,
        returncode: int | None = None,
        cause: str = "",
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.returncode, self.cause, self.log_tail = returncode, cause, list(log_tail)
        self.args = (message, returncode, cause, self.log_tail)

    @property
    def summary(self) -> str:
        """One line: who exited, the signal and exit code, and why (no log lines)."""
        status = "exit status unknown"
        if self.returncode is not None:
            status = f"exit code {self.returncode}"
            if self.returncode < 0:
                status = f"signal {_signal_name(-self.returncode)}, {status}"
        text = f"{self.message} crashed: it exited during the request ({status})"
        return f"{text}: {self.cause}" if self.cause else text

    def __str__(self) -> str:
        if not self.log_tail:
            return self.summary
        return f"{self.summary}\nlast log lines:\n" + _indent_tail(self.log_tail, 20)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class RpcWorkerError(ServerStartError):
    """An RPC worker given to llama-server is unreachable, busy, or runs another build.

    Raised before llama-server is spawned; the message names the worker (``host:port``) and
    the cause names what was wrong (connection refused, no handshake answer, protocol version).
    """


class CpuFallbackError(ServerStartError):
    """GPU layers were asked for, but llama-server loaded the model on the CPU.

    Raised by ``LlamaServer.start()`` (the server is stopped) unless the caller chose to be
    warned instead (``cpu_fallback="warn"``); ``cause`` says why the GPU was not used.
    """


class ServerTimeoutError(ServerRequestError, TimeoutError):
    """A request to llama-server ran out of time; the message names the limit.

    Either the server sent nothing for the longest silence allowed (the clients' ``timeout``,
    ``request_timeout`` on a server) or the request passed its total deadline
    (``total_timeout``, ``request_total_timeout``).
    """
