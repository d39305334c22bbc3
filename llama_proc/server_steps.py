"""The steps start() takes around spawning llama-server.

Fetch the model, resolve the binary, choose the log level, check where the model went. A base
of :class:`~llama_proc.server.LlamaServer`; ``fetch_model()`` is also public on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.devices import Placement, asks_for_gpu, cpu_fallback
from llama_proc.errors import (
    BinaryNotFoundError,
    CpuFallbackError,
    LlamaProcError,
    ServerStartError,
)
from llama_proc.models.hub import fetch_model
from llama_proc.models.model_ref import ModelFiles, ModelRef
from llama_proc.runtime.process import (
    LOG_TAIL,
    ServerProcess,
)

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from llama_proc.config import Settings
    from llama_proc.runtime.args import ServerArgs
    from llama_proc.runtime.flags import BinaryFlags

logger = logging.getLogger(__name__)

LOG_VERBOSITY: Final = 4
"""llama-server's log level "trace": the first that names the devices and weight buffers a
model loads into (:attr:`LlamaServer.devices`, the CPU-fallback check). It adds about 30 lines
per request to the log kept in memory, so it is only asked for when GPU layers were asked for
(the case the check exists for); a CPU-only server keeps llama-server's default level."""

_VERBOSITY_FLAGS: Final = ("--log-verbosity", "--verbosity", "-lv")

_CALLER_LOG_FLAGS: Final = (*_VERBOSITY_FLAGS, "-v", "--verbose", "--log-verbose", "--log-disable")
"""Flags in ``extra_args`` that mean the caller chose the log level."""

CpuFallback = Literal["error", "warn"]
"""What :class:`LlamaServer` does when GPU layers asked for were loaded on the CPU."""


class _DownloadAbandonedError(Exception):
    """Raised from the download's progress callback once stop() or abort_start() was called."""


def _option(args: ServerArgs, name: str) -> Any:
    """A typed option, else its last value in ``extra_args`` (``-ngl 99``, ``--device=none``)."""
    value = getattr(args, name)
    if value is not None:
        return value
    spellings = next(f.metadata["flags"] for f in dataclasses.fields(args) if f.name == name)
    extra = list(args.extra_args)
    for i in range(len(extra) - 1, -1, -1):
        flag, eq, inline = extra[i].partition("=")
        if flag in spellings:
            return inline if eq else (extra[i + 1] if i + 1 < len(extra) else None)
    return None


class _StartSteps:
    """Part of :class:`~llama_proc.server.LlamaServer`; the attributes below are set by its ``__init__``."""

    model_ref: ModelRef | None
    args: ServerArgs
    settings: Settings | None
    binary: Path | None
    flags: BinaryFlags | None
    placement: Placement | None
    cpu_fallback: CpuFallback
    stop_grace: float
    on_download_progress: Callable[[int, int], None] | None
    _files: ModelFiles | None
    _with_mmproj: bool
    _lock: threading.RLock
    _abort: threading.Event

    def fetch_model(self) -> ModelFiles:
        """The model's local files, downloading a Hugging Face reference first.

        :meth:`start` calls it; call it yourself to download ahead of time. A reference is
        fetched once per server object (into the shared Hugging Face cache); then
        ``args.model`` (and ``args.mmproj`` with ``mmproj=True``) hold the local paths.
        ``stop()`` or :meth:`abort_start` from another thread abandons the download at its
        next chunk (a later call downloads it again).

        Returns:
            The model file (the first part of a split model), every part, and the projector.

        Raises:
            ModelFileError: no such repository, revision, file or quantization.
            DownloadError: a gated or private repository without access, or the transfer
                failed.
            OfflineError: offline and the files are not in the Hugging Face cache.
            ProvisionError: not enough disk space for the download.
            ServerStartError: the download was abandoned by ``stop()``/``abort_start()``.
        """
        with self._lock:
            self._abort.clear()
            return self._fetch_locked()

    def _fetch_locked(self) -> ModelFiles:
        ref = self.model_ref
        if ref is None:
            assert self.args.model is not None  # noqa: S101 - checked in __init__
            return ModelFiles(model=Path(self.args.model))
        if self._files is not None:
            return self._files
        from llama_proc.config import Settings  # noqa: PLC0415 - see _resolve_binary

        settings = self.settings if self.settings is not None else Settings.from_env()
        try:
            files = fetch_model(
                ref,
                settings=settings,
                with_mmproj=self._with_mmproj,
                on_progress=self._download_progress,
            )
        except LlamaProcError as err:
            if not self._abort.is_set():
                raise
            msg = f"start of {ref} abandoned during its download; start again to fetch it"
            raise ServerStartError(msg) from err
        if self._with_mmproj and files.mmproj is None:
            logger.warning("%s has no mmproj projector file; starting without one", ref)
        changes: dict[str, Path] = {"model": files.model}
        if files.mmproj is not None:
            changes["mmproj"] = files.mmproj
        self.args = self.args.replace(**changes)
        self._files = files
        return files

    def _download_progress(self, done: int, total: int) -> None:
        if self._abort.is_set():
            # Raised inside huggingface_hub's transfer loop: the download stops here, and
            # huggingface_hub deletes its partial file.
            raise _DownloadAbandonedError
        if self.on_download_progress is not None:
            self.on_download_progress(done, total)

    def _verbosity_args(self) -> list[str]:
        """``--log-verbosity 4`` for GPU layers, where the binary knows it and no level was chosen."""
        if self.flags is None:
            return []
        if not asks_for_gpu(_option(self.args, "n_gpu_layers"), _option(self.args, "device")):
            return []
        chosen = any(a.split("=", 1)[0] in _CALLER_LOG_FLAGS for a in self.args.extra_args)
        flag = None if chosen else self.flags.first_known(_VERBOSITY_FLAGS)
        return [] if flag is None else [flag, str(LOG_VERBOSITY)]

    def _check_placement(self, proc: ServerProcess) -> None:
        """Record where the model went; refuse (or warn about) GPU layers loaded on the CPU."""
        self.placement = proc.placement()
        layers = _option(self.args, "n_gpu_layers")
        if not asks_for_gpu(layers, _option(self.args, "device")):
            return
        cause = cpu_fallback(proc.logs())
        if cause is None:
            return
        what = (
            f"n_gpu_layers={layers} asked for the GPU, but llama-server (pid "
            f"{proc.pid}) loaded the model on the CPU (cpu_fallback='warn' accepts that)"
        )
        if self.cpu_fallback == "warn":
            logger.warning("%s: %s", what, cause)
            return
        proc.stop(self.stop_grace)
        raise CpuFallbackError(what, None, str(cause), proc.logs(LOG_TAIL))

    def _resolve_binary(self) -> Path:
        if self.binary is not None:
            if not self.binary.is_file():
                msg = f"llama-server binary {self.binary} does not exist"
                raise BinaryNotFoundError(msg)
            if os.name == "posix" and not os.access(self.binary, os.X_OK):
                msg = f"llama-server binary {self.binary} is not executable (chmod +x it)"
                raise BinaryNotFoundError(msg)
            return self.binary
        # Provisioning (and config, which reads platformdirs) costs tens of ms to import and
        # is not needed at all when a binary is given.
        from llama_proc.config import Settings  # noqa: PLC0415 - see above
        from llama_proc.provision import ensure_server  # noqa: PLC0415 - see above

        install = ensure_server(self.settings if self.settings is not None else Settings.from_env())
        self.binary = install.server_binary
        return self.binary
