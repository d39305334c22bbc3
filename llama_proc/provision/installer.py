"""Making an install: stage, find the binaries, smoke-check, write ``install.json``, rename.

An install is made in a staging folder beside its final place, smoke-checked
(``llama-server --version``, :mod:`~llama_proc.provision.verify`), described by an
``install.json`` written inside it, and only then renamed into place
(:func:`~llama_proc.provision.locking.create_once`): ``install.json``'s presence means the
install is complete (:class:`~llama_proc.provision.install.Install` reads it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__
from llama_proc.errors import ProvisionError
from llama_proc.provision.archive import find_binaries
from llama_proc.provision.download import file_sha256
from llama_proc.provision.install import INSTALL_SCHEMA, Install, alternatives, complete_install
from llama_proc.provision.layout import INSTALL_JSON
from llama_proc.provision.locking import create_once
from llama_proc.provision.platform import host_os
from llama_proc.provision.verify import parse_version_output, smoke_check

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from llama_proc.config import Settings

__all__ = ["install_atomically"]

logger = logging.getLogger(__name__)

_OUTPUT_LIMIT: Final = 4000
"""Characters of ``--version`` output kept in install.json."""


def _tree_size(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).lstat().st_size
    return total


def _record(
    metadata: Mapping[str, Any],
    staging: Path,
    found: Mapping[str, Path],
    os_name: str,
    version_output: str | None,
) -> dict[str, Any]:
    missing = [k for k in ("variant_id", "build", "source") if not metadata.get(k)]
    if missing:
        msg = f"the install step returned no {', '.join(missing)} for install.json"
        raise ProvisionError(msg)
    record: dict[str, Any] = {"schema": INSTALL_SCHEMA}
    record.update(metadata)
    record["binaries"] = {
        name: {"path": path.relative_to(staging).as_posix(), "sha256": file_sha256(path)}
        for name, path in found.items()
    }
    record["os"] = os_name
    record["size"] = _tree_size(staging)
    record["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record["llama_proc_version"] = __version__
    if version_output is None:
        record["version"] = None
        record["smoke_check"] = f"skipped: {os_name} binaries cannot run on {host_os()}"
    else:
        record.update(parse_version_output(version_output))
        record["version_output"] = version_output.strip()[-_OUTPUT_LIMIT:]
        record["smoke_check"] = "ok"
    return record


def install_atomically(
    target: Path,
    populate: Callable[[Path], Mapping[str, Any]],
    *,
    settings: Settings,
    binaries: Sequence[str],
    os_name: str,
    force: bool = False,
) -> Install:
    """Create (or find) the install at ``target``, atomically and under its lock.

    Args:
        target: the install folder, usually from :func:`~llama_proc.provision.layout.install_dir`.
        populate: fills the staging folder it is given and returns the metadata for
            ``install.json`` (at least ``variant_id``, ``build`` and ``source``).
        settings: ``lock_timeout``.
        binaries: manifest binary names that must be present (``a|b`` = either).
        os_name: the binaries' OS; ``--version`` is only run when it is this host's.
        force: replace a complete install instead of returning it.

    Returns:
        The install now at ``target``.

    Raises:
        CacheLockTimeoutError: another process held the lock for ``settings.lock_timeout``.
        ProvisionError: populating, locating the binaries or the smoke check failed (nothing
            is left behind), or the cache folder is not writable.
    """
    target = Path(target)

    def make(staging: Path) -> None:
        metadata = populate(staging)
        found = find_binaries(staging, binaries, os_name)
        server = next(p for k, p in found.items() if "llama-server" in alternatives(k))
        output = smoke_check(server) if os_name == host_os() else None
        record = _record(metadata, staging, found, os_name, output)
        (staging / INSTALL_JSON).write_text(
            json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
        logger.info("installing %s (%s)", target, record.get("version") or record["source"])

    return create_once(
        target,
        make,
        ready=lambda: complete_install(target),
        timeout=settings.lock_timeout,
        force=force,
    )
