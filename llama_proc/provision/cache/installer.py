"""Making an install: stage, find the binaries, smoke-check, write ``install.json``, rename.

An install is made in a staging folder beside its final place, smoke-checked
(``llama-server --version``, :mod:`~llama_proc.provision.cache.verify`), proven to compute (a tiny
generated model served and compared with a reference, :mod:`~llama_proc.provision.compute`,
repaired down the CPU-feature ladder when the caller can), described by an
``install.json`` written inside it, and only then renamed into place
(:func:`~llama_proc.provision.cache.locking.create_once`): ``install.json``'s presence means the
install is complete (:class:`~llama_proc.provision.cache.record.Install` reads it).

:func:`install_once` also says whether this call made the install or found it complete, so a
process that waited on the lock while another one installed can say so instead of "installed".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._version import __version__
from llama_proc.errors import ProvisionError
from llama_proc.provision.cache.file_record import FileRecord, alternatives, scan_tree
from llama_proc.provision.cache.layout import INSTALL_JSON
from llama_proc.provision.cache.locking import create_once
from llama_proc.provision.cache.record import (
    COMPUTE_KEY,
    FILES_KEY,
    INSTALL_SCHEMA,
    Install,
    check_install,
    complete_install,
)
from llama_proc.provision.cache.verify import (
    DeviceRequirement,
    check_devices,
    parse_version_output,
    smoke_check,
)
from llama_proc.provision.fetch.binaries import find_binaries
from llama_proc.provision.fetch.download import file_sha256
from llama_proc.provision.host.host_info import host_os

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from llama_proc.provision.compute.plan import ComputePlan
    from llama_proc.provision.views import BuildView

__all__ = ["Installed", "install_atomically", "install_once"]

logger = logging.getLogger(__name__)

_OUTPUT_LIMIT: Final = 4000
"""Characters of ``--version`` output kept in install.json."""


@dataclass(frozen=True)
class Installed:
    """An install, and whether this call made it."""

    install: Install
    made: bool
    """False: it was complete already, typically finished by another process while this one
    waited for the lock ("already installed by another process")."""


def _file_records(staging: Path) -> dict[str, FileRecord]:
    """Every file of the finished staging folder: what a cache hit later compares against.

    Taken last, after the smoke check, so nothing the installer does moves an mtime after it.
    """
    records: dict[str, FileRecord] = {}
    for rel, st in scan_tree(staging).items():
        path = staging / rel
        if stat.S_ISLNK(st.st_mode):
            records[rel] = FileRecord(st.st_size, st.st_mtime_ns, link=str(path.readlink()))
        else:
            digest = file_sha256(path)
            records[rel] = FileRecord(
                st.st_size, st.st_mtime_ns, sha256=digest, ctime_ns=st.st_ctime_ns, ino=st.st_ino
            )
    return records


def _log_repair(target: Path) -> None:
    """Say why an existing install at ``target`` is being replaced (it was found broken)."""
    _install, problems = check_install(target)
    if problems:
        why = "; ".join(map(str, problems))
        logger.warning("re-installing %s, the cached install is broken: %s", target, why)


def _record(
    metadata: Mapping[str, Any],
    staging: Path,
    found: Mapping[str, Path],
    os_name: str,
    version_output: str | None,
    skipped: str,
    checked: str = "ok",
) -> dict[str, Any]:
    missing = [k for k in ("variant_id", "build", "source") if not metadata.get(k)]
    if missing:
        msg = f"the install step returned no {', '.join(missing)} for install.json"
        raise ProvisionError(msg)
    record: dict[str, Any] = {"schema": INSTALL_SCHEMA}
    record.update(metadata)
    files = _file_records(staging)
    binaries: dict[str, dict[str, Any]] = {}
    for name, path in found.items():
        rel = path.relative_to(staging).as_posix()
        digest = files[rel].sha256 if rel in files else None
        binaries[name] = {"path": rel, "sha256": digest or file_sha256(path)}
    record["binaries"] = binaries
    record[FILES_KEY] = {rel: entry.to_json() for rel, entry in files.items()}
    record["os"] = os_name
    record["size"] = sum(entry.size for entry in files.values())
    record["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record["llama_proc_version"] = __version__
    if version_output is None:
        record["version"] = None
        record["smoke_check"] = f"skipped: {skipped}"
    else:
        record.update(parse_version_output(version_output))
        record["version_output"] = version_output.strip()[-_OUTPUT_LIMIT:]
        record["smoke_check"] = checked
    return record


_NO_DRIVER: Final = "libcuda.so.1"
_ALL_LAYERS: Final = 999
"""``-ngl`` for the compute check of a GPU build on a host with its GPU: every layer."""


def _compute_record(
    staging: Path,
    compute: ComputePlan | None,
    *,
    server: Callable[[], Path],
    checked: str,
    gpu: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prove the staged install computes: (the record for ``install.json``, metadata updates)."""
    from llama_proc.provision.compute.plan import ComputePlan, prove_computes  # noqa: PLC0415

    if checked != "ok":  # --version only passed against a driver stub: no GPU to compute on
        return {"ok": None, "reason": f"skipped: {checked}"}, {}
    plan = compute or ComputePlan()
    if gpu:
        plan = dataclasses.replace(plan, gpu_layers=_ALL_LAYERS)
    return prove_computes(staging, plan, server)


def _version_check(server: Path, metadata: Mapping[str, Any]) -> tuple[str, str]:
    """``--version`` of a new install: (its output, what ``install.json`` says of the check).

    A CUDA build made where there is no NVIDIA driver (for other machines) cannot load
    ``libcuda.so.1``; when its toolkit has a driver stub, the check runs against the stub, which
    still proves that every other library resolves and the binary starts.
    """
    try:
        return smoke_check(server), "ok"
    except ProvisionError as err:
        runtime = metadata.get("cuda_runtime")
        stub = runtime.get("driver_stub") if isinstance(runtime, dict) else None
        if not isinstance(stub, str) or _NO_DRIVER not in str(err):
            raise
    logger.info("no NVIDIA driver here: checking %s against the libcuda stub in %s", server, stub)
    output = smoke_check(server, library_path=stub)
    return output, (
        f"ok against the libcuda stub in {stub}: this host has no NVIDIA driver, so the CUDA "
        "backend could not start here"
    )


def install_atomically(
    target: Path,
    populate: Callable[[Path], Mapping[str, Any]],
    *,
    settings: BuildView,
    binaries: Sequence[str],
    os_name: str,
    force: bool = False,
    require_device: DeviceRequirement | None = None,
    compute: ComputePlan | None = None,
) -> Install:
    """Create (or find) the install at ``target``, atomically and under its lock.

    :func:`install_once` without the "made here" answer; see it for the arguments.

    Raises:
        CacheLockTimeoutError: another process held the lock for ``settings.lock_timeout``.
        ProvisionError: populating, locating the binaries or the smoke check failed (nothing
            is left behind), or the cache folder is not writable.
    """
    return install_once(
        target,
        populate,
        settings=settings,
        binaries=binaries,
        os_name=os_name,
        force=force,
        require_device=require_device,
        compute=compute,
    ).install


def install_once(
    target: Path,
    populate: Callable[[Path], Mapping[str, Any]],
    *,
    settings: BuildView,
    binaries: Sequence[str],
    os_name: str,
    force: bool = False,
    run_here: bool = True,
    require_device: DeviceRequirement | None = None,
    compute: ComputePlan | None = None,
) -> Installed:
    """Create (or find) the install at ``target``, atomically and under its lock.

    Args:
        target: the install folder, usually from :func:`~llama_proc.provision.cache.layout.install_dir`.
        populate: fills the staging folder it is given and returns the metadata for
            ``install.json`` (at least ``variant_id``, ``build`` and ``source``).
        settings: ``lock_timeout``.
        binaries: manifest binary names that must be present (``a|b`` = either).
        os_name: the binaries' OS; ``--version`` is only run when it is this host's.
        force: replace a complete install instead of returning it.
        run_here: smoke-check the binaries when they are this host's OS; False never runs
            them (an install meant for another machine).
        require_device: after the smoke check, ``llama-server --list-devices`` must list a
            GPU of this backend (:func:`~llama_proc.provision.cache.verify.device_requirement`);
            the devices are recorded in ``install.json``.
        compute: how to prove the install computes and how to repair it
            (:class:`~llama_proc.provision.compute.plan.ComputePlan`); None checks without
            repairs. Skipped when ``settings.compute_check`` is off or nothing runs here.

    Returns:
        The install now at ``target``, and whether this call made it.

    Raises:
        CacheLockTimeoutError: another process held the lock for ``settings.lock_timeout``.
        ProvisionError: populating, locating the binaries or the smoke check failed (nothing
            is left behind), or the cache folder is not writable.
        DeviceNotFoundError: ``require_device`` is set and the build lists no such GPU
            (nothing is left behind).
        ComputeCheckError: the install does not compute correctly here and could not be
            repaired (nothing is left behind).
    """
    target = Path(target)
    made: list[bool] = []

    def make(staging: Path) -> None:
        made.append(True)
        if not force:
            _log_repair(target)
        metadata = dict(populate(staging))

        def staged_server() -> Path:
            found = find_binaries(staging, binaries, os_name)
            return next(p for k, p in found.items() if "llama-server" in alternatives(k))

        server = staged_server()
        runnable = os_name == host_os()
        output, checked = _version_check(server, metadata) if runnable and run_here else (None, "")
        # A GPU build that cannot see the GPU still passes --version, then serves on the CPU.
        devices = None
        if output is not None and require_device is not None:
            devices = check_devices(server, require_device)
        computed: dict[str, Any] | None = None
        if output is not None and settings.compute_check:
            # --version says nothing about whether it can multiply matrices on this CPU.
            computed, updates = _compute_record(
                staging, compute, server=staged_server, checked=checked, gpu=devices is not None
            )
            metadata.update(updates)
            if updates:  # repaired: the binaries changed, so their checks run again
                output, checked = _version_check(staged_server(), metadata)
        found = find_binaries(staging, binaries, os_name)
        skipped = (
            f"{os_name} binaries cannot run on {host_os()}"
            if not runnable
            else "not run here (installed for another machine)"
        )
        record = _record(metadata, staging, found, os_name, output, skipped, checked)
        if devices is not None:
            record["devices"] = [d.to_dict() for d in devices]
        if computed is not None:
            record[COMPUTE_KEY] = computed
        (staging / INSTALL_JSON).write_text(
            json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
        logger.info("installing %s (%s)", target, record.get("version") or record["source"])

    if not force:
        # Checked here as well as in create_once, so that only a process that really found
        # the install finished while it waited for the lock says another process made it.
        done = complete_install(target)
        if done is not None:
            return Installed(done, made=False)
    install = create_once(
        target,
        make,
        ready=lambda: complete_install(target),
        timeout=settings.lock_timeout,
        force=force,
    )
    if not made:
        logger.info("%s: already installed by another process", target)
    return Installed(install, made=bool(made))
