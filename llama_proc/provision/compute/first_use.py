"""Installs made before the compute check existed are checked once, on their first use.

:func:`check_on_first_use` serves the tiny model with a cached install that has no compute
record, under the install's lock (so concurrent processes check it once), and writes the result
into its ``install.json`` (atomically: a temporary file beside it, then a rename). A failed
record makes :meth:`~llama_proc.provision.cache.record.Install.problems` report the install as
broken, so the resolver passes it over and provisioning installs it again, this time through
the ladder.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ProvisionError
from llama_proc.provision.cache.layout import INSTALL_JSON
from llama_proc.provision.cache.locking import cache_lock, lock_path
from llama_proc.provision.cache.record import COMPUTE_KEY, Install
from llama_proc.provision.compute import check

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["check_on_first_use"]

logger = logging.getLogger(__name__)

_TEMP_SUFFIX: Final = ".compute.tmp"


def _write_record(path: Path, record: dict[str, Any]) -> None:
    target = path / INSTALL_JSON
    data = json.loads(target.read_text(encoding="utf-8"))
    data[COMPUTE_KEY] = record
    temp = path / f"{INSTALL_JSON}{_TEMP_SUFFIX}"
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    temp.replace(target)


def check_on_first_use(install: Install, lock_timeout: float) -> Install:
    """Check ``install`` if it has no compute record yet; the install as it is now recorded.

    Raises:
        CacheLockTimeoutError: another process held the install's lock too long.
        ProvisionError: ``install.json`` could not be rewritten (a read-only cache).
    """
    with cache_lock(lock_path(install.path), lock_timeout):
        fresh = Install.from_dir(install.path)
        if fresh.compute is not None:  # another process checked it while this one waited
            return fresh
        logger.info("checking once that %s computes (installed before the check existed)", fresh.id)
        report = check.run_compute_check(fresh.server_binary)
        record = report.to_json()
        off = fresh.metadata.get("cpu_off")
        record["features_off"] = list(off) if isinstance(off, list) else []
        record["attempts"] = [report.reason]
        record["first_use"] = True
        try:
            _write_record(install.path, record)
        except (OSError, ValueError) as err:
            msg = f"cannot record the compute check in {install.path / INSTALL_JSON}: {err}"
            raise ProvisionError(msg) from err
        if not report.ok:
            logger.warning("%s does not compute on this host: %s", fresh.id, report.reason)
        return Install.from_dir(install.path)
