"""Hugging Face models named in the proxy's config, fetched before their servers start.

A model whose config names a reference (``model = "org/repo:Q4_K_M"``) is downloaded on its
first request with :func:`~llama_proc.models.hub.fetch_model`, outside the server pool: a
download holds no server slot, evicts nothing, and no start or health timeout runs during it
(the server's start clock begins once the files are local). Requests for the same reference
share one download; a failed one is tried again by the next request. :meth:`ModelDownloads.snapshot`
(shown in ``GET /servers``) lists each download with its state and percent.

Downloads run in daemon threads, so a proxy that shuts down never waits for one: closing
abandons them at their next chunk, and huggingface_hub drops the partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast

from llama_proc.errors import DownloadError, LlamaProcError
from llama_proc.models.hub import ModelFiles, ModelRef, fetch_model

if TYPE_CHECKING:
    from collections.abc import Callable

    from llama_proc.config import Settings
    from llama_proc.proxy.models_config import ModelSpec

__all__ = ["DownloadInfo", "DownloadState", "ModelDownloads"]

logger = logging.getLogger(__name__)

DownloadState = Literal["downloading", "ready", "failed"]
_T = TypeVar("_T")
_PERCENT_DIGITS: Final = 1


class _AbandonedError(Exception):
    """Raised from a download's progress callback once the proxy closes."""


@dataclass(frozen=True)
class DownloadInfo:
    """One model download as ``GET /servers`` shows it."""

    ref: str
    """The reference, as the config wrote it (normalized)."""
    models: tuple[str, ...]
    """Ids of the models that use it."""
    state: DownloadState
    bytes_done: int
    bytes_total: int | None
    """None until the hub has told the size."""
    path: str | None
    """The local model file once ready."""
    error: str | None
    """Why the last attempt failed (``state == "failed"``)."""

    @property
    def percent(self) -> float | None:
        """Share downloaded, 0-100 (100 once ready; None while the size is unknown)."""
        if self.state == "ready":
            return 100.0
        if not self.bytes_total:
            return None
        return round(min(100.0, 100.0 * self.bytes_done / self.bytes_total), _PERCENT_DIGITS)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "ref": self.ref,
            "models": list(self.models),
            "state": self.state,
            "percent": self.percent,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "path": self.path,
            "error": self.error,
        }


@dataclass(eq=False)
class _Download:
    ref: ModelRef
    mmproj: bool
    models: dict[str, None] = field(default_factory=dict)  # an ordered set
    state: DownloadState = "downloading"
    done: int = 0
    total: int = 0
    files: ModelFiles | None = None
    error: str | None = None
    task: asyncio.Task[ModelFiles] | None = None

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total


class ModelDownloads:
    """The proxy's model downloads, one per (reference, projector wanted).

    Use from one event loop; :meth:`close` when the proxy stops.

    Args:
        settings: supplies ``offline`` and ``download_timeout`` (default: huggingface_hub's
            own environment: ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``).
    """

    def __init__(self, *, settings: Settings | None = None) -> None:
        self.settings = settings
        self._downloads: dict[tuple[ModelRef, bool], _Download] = {}
        self._resolved: dict[str, tuple[ModelFiles, ModelSpec]] = {}
        self._closing = threading.Event()

    async def resolve(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with local paths, downloading its reference first (once).

        A spec without a reference, or already fetched, comes back at once.

        Returns:
            ``spec`` with ``path`` set to the local model file (the first part of a split
            model) and, with ``mmproj``, the ``mmproj`` option set to the projector's file.

        Raises:
            ModelFileError: no such repository, revision or quantization.
            DownloadError: a gated repository without access, or the transfer failed.
            OfflineError: offline and the files are not in the Hugging Face cache.
            ProvisionError: not enough disk space.
        """
        ref = spec.ref
        if ref is None or spec.path is not None:
            return spec
        known = self._resolved.get(spec.id)
        if known is not None and known[0].model.exists():
            return known[1]
        entry = self._downloads.get((ref, spec.mmproj))
        if entry is None:
            entry = self._downloads[ref, spec.mmproj] = _Download(ref, spec.mmproj)
        entry.models[spec.id] = None
        files = entry.files
        if files is None or not files.model.exists():
            if entry.task is None:
                entry.task = asyncio.create_task(
                    self._fetch(entry), name=f"llama-proc-download-{ref}"
                )
            task = entry.task
            try:
                # Shielded: a client that gives up does not cancel the download for the others.
                files = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # this request itself was cancelled
                msg = f"the download of {ref} was abandoned: the proxy is shutting down"
                raise DownloadError(msg) from None
        options = dict(spec.options)
        if files.mmproj is not None:
            options["mmproj"] = files.mmproj
        resolved = dataclasses.replace(spec, path=files.model, options=MappingProxyType(options))
        self._resolved[spec.id] = (files, resolved)
        return resolved

    async def _fetch(self, entry: _Download) -> ModelFiles:
        entry.state, entry.error, entry.done, entry.total = "downloading", None, 0, 0
        logger.info("downloading %s for %s", entry.ref, ", ".join(entry.models))

        def on_progress(done: int, total: int) -> None:
            if self._closing.is_set():
                raise _AbandonedError
            entry.progress(done, total)

        def fetch() -> ModelFiles:
            return fetch_model(
                entry.ref,
                settings=self.settings,
                with_mmproj=entry.mmproj,
                progress=False,
                on_progress=on_progress,
            )

        try:
            files = await _in_daemon_thread(fetch, name=f"llama-proc-download-{entry.ref}")
        except Exception as err:
            entry.state = "failed"
            error = err if isinstance(err, LlamaProcError) else _unexpected(entry.ref, err)
            entry.error = str(error)
            logger.warning("downloading %s failed: %s", entry.ref, entry.error)
            if error is err:
                raise
            raise error from err
        finally:
            entry.task = None
        entry.state, entry.files = "ready", files
        entry.done = entry.total = max(entry.total, entry.done)
        logger.info("%s ready at %s", entry.ref, files.model)
        return files

    def snapshot(self) -> list[DownloadInfo]:
        """Every download this proxy started, in the order they began."""
        return [
            DownloadInfo(
                ref=str(entry.ref),
                models=tuple(entry.models),
                state=entry.state,
                bytes_done=entry.done,
                bytes_total=entry.total or None,
                path=str(entry.files.model) if entry.files is not None else None,
                error=entry.error,
            )
            for entry in self._downloads.values()
        ]

    async def close(self) -> None:
        """Abandon running downloads (their threads stop at the next chunk)."""
        self._closing.set()
        tasks = [e.task for e in self._downloads.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _unexpected(ref: ModelRef, err: Exception) -> DownloadError:
    lines = str(err).strip().splitlines()
    detail = lines[0] if lines else type(err).__name__
    msg = f"downloading {ref} failed: {detail}; the next request tries again"
    return DownloadError(msg)


async def _in_daemon_thread(fn: Callable[[], _T], *, name: str) -> _T:
    """Run ``fn`` in a daemon thread: unlike ``asyncio.to_thread``, loop shutdown never waits."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def finish(result: _T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast("_T", result))

    def work() -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting task
            error = err
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(finish, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future
