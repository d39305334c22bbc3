"""What the cache holds, and taking things out of it: listing, verifying, removal, pruning.

Removal and pruning take the same per-install lock as installing
(:mod:`~llama_proc.provision.cache.locking`), so an install in progress is never deleted under the
process making it. Verifying (``llama-proc cache verify``) re-hashes every file of every install
against its ``install.json``; it only reads.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from llama_proc.errors import ManifestError, ProvisionError
from llama_proc.provision.cache.layout import (
    INSTALL_JSON,
    WORK_DIRS,
    build_number,
    downloads_dir,
    list_dir,
    servers_dir,
)
from llama_proc.provision.cache.locking import (
    LOCK_SUFFIX,
    OLD_MARK,
    STAGING_MARK,
    cache_lock,
    leftovers,
    lock_path,
    remove_tree,
    try_lock,
)
from llama_proc.provision.cache.record import Install

if TYPE_CHECKING:
    from collections.abc import Iterable

    from llama_proc.config import Settings
    from llama_proc.provision.views import CacheView

__all__ = ["list_installs", "prune", "remove"]

logger = logging.getLogger(__name__)


def list_installs(
    settings: CacheView, *, build: str | None = None, variant_id: str | None = None
) -> list[Install]:
    """Complete installs in the cache, newest build first.

    Args:
        settings: ``cache_dir``.
        build: only this build.
        variant_id: only this variant (any flavor).
    """
    root = servers_dir(settings)
    out: list[Install] = []
    try:
        build_dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    for build_dir in build_dirs:
        if build is not None and build_dir.name != build:
            continue
        try:
            entries = sorted(build_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not (entry / INSTALL_JSON).is_file():
                continue
            try:
                install = Install.from_dir(entry)
            except ProvisionError as err:
                logger.warning("skipping %s", err)
                continue
            if variant_id is None or install.variant_id == variant_id:
                out.append(install)
    return sorted(out, key=lambda i: (-build_number(i.build), i.path.name))


def _resolve_id(settings: CacheView, ident: str) -> Path:
    root = servers_dir(settings)
    candidate = Path(ident)
    if candidate.is_absolute():
        target = candidate
    else:
        target = root / ident
        if not target.exists() and "/" not in ident:
            # A bare variant id: accept it when exactly one build has it.
            matches = [i.path for i in list_installs(settings) if i.path.name == ident]
            if len(matches) == 1:
                target = matches[0]
            elif len(matches) > 1:
                names = ", ".join(f"{p.parent.name}/{p.name}" for p in matches)
                msg = f"{ident!r} is ambiguous: {names}; give <build>/<variant>"
                raise ProvisionError(msg)
    try:
        rel = target.resolve().relative_to(root.resolve())
    except ValueError:
        msg = f"{ident!r} is not an install in the cache {root}"
        raise ProvisionError(msg) from None
    if len(rel.parts) != 2 or rel.parts[1].startswith("."):
        msg = (
            f"{ident!r} is not an install id; use <build>/<variant> as `llama-proc cache ls` shows"
        )
        raise ProvisionError(msg)
    return root / rel


def remove(settings: CacheView, ident: str | Install) -> Path:
    """Delete one install from the cache, under its lock.

    Args:
        settings: ``cache_dir``, ``lock_timeout``.
        ident: an :class:`Install`, ``<build>/<folder>`` (as ``cache ls`` prints), a bare folder
            name that only one build has, or the install's absolute path.

    Returns:
        The removed folder.

    Raises:
        ProvisionError: no such install.
        CacheLockTimeoutError: it is being installed right now.
    """
    target = _resolve_id(settings, str(ident.path) if isinstance(ident, Install) else ident)
    with cache_lock(lock_path(target), settings.lock_timeout):
        if not target.exists():
            msg = f"no install {target.parent.name}/{target.name} in the cache"
            raise ProvisionError(msg)
        aside = target.parent / f".{target.name}{OLD_MARK}removed"
        try:
            # Renamed first so that a half-deleted folder never sits under the install's name.
            remove_tree(aside)
            target.rename(aside)
            remove_tree(aside)
            for stale in leftovers(target):
                remove_tree(stale)
            # Nothing is left to guard; see _prune_target on why this happens only while held.
            lock_path(target).unlink(missing_ok=True)
        except OSError as err:
            msg = f"cannot remove {target}: {err.strerror or err}"
            raise ProvisionError(msg) from err
    _remove_if_empty(target.parent)
    return target


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _running_executables() -> set[Path]:
    """Executables of running processes (Linux ``/proc``; empty elsewhere)."""
    found: set[Path] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    with contextlib.suppress(OSError):
        for entry in proc.iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    found.add((entry / "exe").readlink())
    return found


def _in_use(install: Path, running: Iterable[Path]) -> bool:
    root = install.resolve()
    return any(exe == root or root in exe.parents for exe in running)


def prune(
    settings: Settings,
    *,
    keep_builds: Iterable[str] = (),
    dry_run: bool = False,
) -> list[Path]:
    """Remove what the cache no longer needs.

    * installs of builds other than the manifest's pinned one, ``settings.build`` and
      ``keep_builds``, unless a running process executes a binary from them (Linux);
    * staging and moved-aside folders left by interrupted installs;
    * partial and leftover downloads, and lock files whose install no longer exists;
    * build folders, unpacked source trees and CUDA toolkits that no kept install came from
      (those of the kept installs stay, so rebuilding them stays incremental).

    Anything whose lock is held right now (an install in progress) is left alone.

    Args:
        settings: ``cache_dir``, ``build``.
        keep_builds: more builds to keep.
        dry_run: only report what would be removed.

    Returns:
        The paths removed (or that would be).
    """
    # The manifest (tomllib) and the download module are for pruning only: list_installs runs
    # on every cache hit and keeps this module light.
    from llama_proc.provision.manifest import load_manifest  # noqa: PLC0415  off the hit path

    keep = set(keep_builds)
    if settings.build:
        keep.add(settings.build)
    try:
        keep.add(load_manifest().build)
    except ManifestError as err:
        logger.warning("%s; pruning keeps only the builds given", err)
    running = _running_executables()
    removed: list[Path] = []
    root = servers_dir(settings)
    build_dirs = sorted(p for p in list_dir(root) if p.is_dir())
    for build_dir in build_dirs:
        entries = list_dir(build_dir)
        targets = {p for p in entries if p.is_dir() and not p.name.startswith(".")}
        for entry in entries:
            if entry.name.startswith(".") and (
                STAGING_MARK in entry.name or OLD_MARK in entry.name
            ):
                mark = STAGING_MARK if STAGING_MARK in entry.name else OLD_MARK
                targets.add(build_dir / entry.name[1:].split(mark)[0])
            elif entry.name.endswith(LOCK_SUFFIX) and not entry.name.startswith("."):
                targets.add(build_dir / entry.name.removesuffix(LOCK_SUFFIX))
        for target in sorted(targets):
            removed.extend(
                _prune_target(target, drop=build_dir.name not in keep, running=running, dry=dry_run)
            )
        if not dry_run:
            _remove_if_empty(build_dir)
    removed.extend(_prune_downloads(settings, dry_run=dry_run))
    kept = [i for i in list_installs(settings) if i.build in keep]
    removed.extend(_prune_work(settings, _work_in_use(settings, kept), dry_run=dry_run))
    for path in removed:
        logger.info("%s %s", "would remove" if dry_run else "removed", path)
    return removed


def _prune_target(target: Path, *, drop: bool, running: set[Path], dry: bool) -> list[Path]:
    lock = lock_path(target)
    held = try_lock(lock)
    if held is None:
        logger.info("leaving %s alone: it is being installed", target)
        return []
    out: list[Path] = []
    with held:
        out.extend(leftovers(target))
        if target.exists() and drop:
            if _in_use(target, running):
                logger.info("keeping %s: a running process uses it", target)
            else:
                out.append(target)
        if not dry:
            out = [path for path in out if _delete(path)]
        # Deleting a lock file while another process waits on it would split the waiters
        # across two files; only orphans (no install left to guard) go, and only while held.
        orphan = not target.exists() or target in out
        if orphan and (dry or _delete(lock)):
            out.append(lock)
    return out


def _work_in_use(settings: CacheView, installs: Iterable[Install]) -> set[Path]:
    """The work folders that kept installs came from, so a rebuild of them stays incremental.

    That is ``build/<key>``, ``sources/<tree>`` and ``toolkits/<kit>``, read from each
    install's record.
    """
    roots = {settings.cache_dir / name for name in WORK_DIRS}
    used: set[Path] = set()
    for install in installs:
        meta = install.metadata
        runtime = meta.get("cuda_runtime")
        named = [
            meta.get("build_dir"),
            meta.get("source_path"),
            runtime.get("toolkit_root") if isinstance(runtime, dict) else None,
        ]
        for text in named:
            if not isinstance(text, str) or not text:
                continue
            path = Path(text)
            for root in roots:
                if path.is_relative_to(root) and path != root:
                    used.add(root / path.relative_to(root).parts[0])
    return used


def _prune_work(settings: CacheView, in_use: set[Path], *, dry_run: bool) -> list[Path]:
    """Remove the build folders, source trees and toolkits no kept install came from.

    Each goes under its own lock (a build or an unpack in progress holds it, and is left
    alone); its lock file goes with it.
    """
    out: list[Path] = []
    for name in WORK_DIRS:
        root = settings.cache_dir / name
        for folder in sorted(p for p in list_dir(root) if p.is_dir() and p not in in_use):
            lock = lock_path(folder)
            held = try_lock(lock)
            if held is None:
                logger.info("leaving %s alone: it is in use", folder)
                continue
            with held:
                found = [folder]
                if not dry_run:
                    found = [path for path in found if _delete(path)]
                if found and (dry_run or _delete(lock)):
                    found.append(lock)
            out.extend(found)
        if not dry_run:
            _remove_if_empty(root)
    return out


def _delete(path: Path) -> bool:
    """Delete a file or folder for pruning; a failure is logged, not raised."""
    try:
        remove_tree(path)
    except OSError as err:
        logger.warning("could not remove %s: %s", path, err.strerror or err)
        return False
    return True


def _prune_downloads(settings: CacheView, *, dry_run: bool) -> list[Path]:
    from llama_proc.provision.fetch.part import PART_SUFFIX  # noqa: PLC0415  off the hit path

    folder = downloads_dir(settings)
    names = {
        p.name.removesuffix(PART_SUFFIX).removesuffix(LOCK_SUFFIX)
        for p in list_dir(folder)
        if not p.name.startswith(".")
    }
    out: list[Path] = []
    for name in sorted(names):
        lock = folder / f"{name}{LOCK_SUFFIX}"
        held = try_lock(lock)
        if held is None:
            continue
        with held:
            found = [p for p in (folder / name, folder / f"{name}{PART_SUFFIX}") if p.exists()]
            found.append(lock)
            if not dry_run:
                found = [path for path in found if _delete(path)]
            out.extend(found)
    if not dry_run:
        _remove_if_empty(folder)
    return out
