"""The install cache: layout, atomic installs under a file lock, listing, removal, pruning.

Layout under ``settings.cache_dir``::

    servers/<build>/<variant_id>[+<flavor>]/     one complete install (install.json inside)
    servers/<build>/<variant_id>[+<flavor>].lock the lock that guards it (beside, not inside)
    servers/<build>/.<name>.incoming-<random>/   staging of an install in progress
    downloads/<asset>[.part|.lock]               prebuilt archives while they are fetched

An install is made in a staging folder on the same filesystem, smoke-checked
(``llama-server --version``), described by an ``install.json`` written inside it, and only then
renamed into place: the rename is the commit point, and ``install.json``'s presence means the
install is complete. A process killed at any moment leaves either no install folder or a
complete one, plus staging leftovers that the next locker removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._childenv import child_environment
from llama_proc.errors import BinaryNotFoundError, ProvisionError
from llama_proc.provision.locking import LOCK_SUFFIX, cache_lock, try_lock
from llama_proc.provision.locking import lock_path as _lock_path
from llama_proc.provision.platform import host_os

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from llama_proc.config import Settings

__all__ = [
    "INSTALL_JSON",
    "Install",
    "cache_lock",
    "downloads_dir",
    "install_atomically",
    "install_dir",
    "list_installs",
    "parse_version_output",
    "prune",
    "remove",
    "servers_dir",
    "smoke_check",
]

logger = logging.getLogger(__name__)

INSTALL_JSON: Final = "install.json"
INSTALL_SCHEMA: Final = 1
SERVERS_DIR: Final = "servers"
DOWNLOADS_DIR: Final = "downloads"
PART_SUFFIX: Final = ".part"
STAGING_MARK: Final = ".incoming-"
OLD_MARK: Final = ".old-"
SMOKE_TIMEOUT: Final = 60.0
"""Seconds ``llama-server --version`` may take (first runs on slow disks load many libraries)."""
_OUTPUT_LIMIT: Final = 4000
"""Characters of ``--version`` output kept in install.json."""
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_VERSION_LINE_RE: Final = re.compile(r"^\s*version:\s*(.+?)\s*$", re.MULTILINE)
_BUILD_NUMBER_RE: Final = re.compile(
    r"^(?:(\d+)\s*\((\w+)\)|.*\(build\s+(\d+),\s*commit\s+(\w+)\))"
)
_ALIASES: Final = {"rpc-server": "ggml-rpc-server|rpc-server"}
"""Names callers may use for binaries that upstream renamed."""
_SIGILL: Final = 4


def _suffix(os_name: str) -> str:
    return ".exe" if os_name == "windows" else ""


@dataclass(frozen=True)
class Install:
    """A complete llama-server install: a folder with binaries and an ``install.json``."""

    path: Path
    variant_id: str
    build: str
    source: str
    """``prebuilt``, ``built``, ``bundled`` or ``explicit``."""
    binaries: Mapping[str, Path] = field(hash=False)
    """Manifest binary name (``ggml-rpc-server|rpc-server``) -> absolute path."""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Everything ``install.json`` says (empty for an explicit binary)."""

    @property
    def server_binary(self) -> Path:
        """The ``llama-server`` executable."""
        return self.binary("llama-server")

    @property
    def id(self) -> str:
        """``<build>/<folder>``: how ``llama-proc cache rm`` names a cache install."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def version(self) -> str | None:
        """The ``version:`` line ``--version`` printed at install time."""
        value = self.metadata.get("version")
        return value if isinstance(value, str) else None

    def binary(self, name: str) -> Path:
        """The executable called ``name``; ``rpc-server`` also finds ``ggml-rpc-server``.

        Raises:
            BinaryNotFoundError: the install does not provide it.
        """
        if name in self.binaries:
            return self.binaries[name]
        wanted = _alternatives(_ALIASES.get(name, name))
        for key, path in self.binaries.items():
            if set(_alternatives(key)) & set(wanted):
                return path
        # Explicit binaries have no manifest list: look beside llama-server.
        server = self.binaries.get("llama-server")
        suffix = ".exe" if server is not None and server.suffix.lower() == ".exe" else ""
        for alt in wanted:
            for folder in (self.path, self.path / "bin"):
                candidate = folder / f"{alt}{suffix}"
                if candidate.is_file():
                    return candidate
        have = ", ".join(sorted(self.binaries)) or "nothing"
        hint = " (fetch the rpc variant: llama-proc fetch --variant rpc)" if "rpc" in name else ""
        msg = f"{name} is not part of the install at {self.path} (it has {have}){hint}"
        raise BinaryNotFoundError(msg)

    def missing_files(self) -> list[str]:
        """Binaries recorded in ``install.json`` that are no longer on disk."""
        return [name for name, path in self.binaries.items() if not path.is_file()]

    @classmethod
    def from_dir(cls, path: Path) -> Install:
        """Read the install at ``path``.

        Raises:
            ProvisionError: ``install.json`` is missing, unreadable or malformed.
        """
        path = Path(path)
        record = path / INSTALL_JSON
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = f"{path} is not a complete llama-server install (no {INSTALL_JSON})"
            raise ProvisionError(msg) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"cannot read {record}: {err}; remove the install (llama-proc cache rm) and retry"
            raise ProvisionError(msg) from err
        if not isinstance(data, dict):
            msg = f"{record} is not a JSON object; remove the install and retry"
            raise ProvisionError(msg)
        binaries_raw = data.get("binaries")
        try:
            binaries = {
                str(name): path / (entry["path"] if isinstance(entry, dict) else str(entry))
                for name, entry in (binaries_raw or {}).items()
            }
            variant_id, build, source = (str(data[k]) for k in ("variant_id", "build", "source"))
        except (KeyError, TypeError, AttributeError) as err:
            msg = f"{record} lacks {err}; remove the install and retry"
            raise ProvisionError(msg) from err
        if not any("llama-server" in _alternatives(k) for k in binaries):
            msg = f"{record} names no llama-server binary; remove the install and retry"
            raise ProvisionError(msg)
        return cls(path, variant_id, build, source, binaries, data)


def _alternatives(name: str) -> list[str]:
    return [n for n in name.split("|") if n]


# ----------------------------------------------------------------------------- layout
def servers_dir(settings: Settings) -> Path:
    """``cache_dir/servers``: where installs live."""
    return settings.cache_dir / SERVERS_DIR


def downloads_dir(settings: Settings) -> Path:
    """``cache_dir/downloads``: prebuilt archives while they are fetched."""
    return settings.cache_dir / DOWNLOADS_DIR


def _check_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value) or value in (".", ".."):
        msg = f"{kind} {value!r} cannot be part of a cache path; use letters, digits, '.', '_', '-'"
        raise ProvisionError(msg)
    return value


def install_dir(settings: Settings, build: str, variant_id: str, flavor: str = "") -> Path:
    """``cache_dir/servers/<build>/<variant_id>[+<flavor>]``.

    Raises:
        ProvisionError: a part holds characters that do not belong in a folder name.
    """
    name = _check_name("variant id", variant_id)
    if flavor:
        name += "+" + _check_name("flavor", flavor)
    return servers_dir(settings) / _check_name("build", build) / name


def _leftovers(target: Path) -> list[Path]:
    """Staging and moved-aside folders of ``target`` left by crashed processes."""
    prefixes = (f".{target.name}{STAGING_MARK}", f".{target.name}{OLD_MARK}")
    try:
        return [p for p in target.parent.iterdir() if p.name.startswith(prefixes)]
    except OSError:
        return []


def _rmtree(path: Path) -> None:
    import shutil

    def retry(_func: Any, failed: str, _exc: Any) -> None:
        # Read-only files (Windows) block deletion; make them writable and try once more.
        with contextlib.suppress(OSError):
            os.chmod(failed, 0o700)  # noqa: PTH101
            if Path(failed).is_dir():
                os.rmdir(failed)  # noqa: PTH106
            else:
                os.unlink(failed)  # noqa: PTH108

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:  # pragma: no cover - onexc is 3.12+; onerror is deprecated there
            shutil.rmtree(path, onerror=retry)


# ----------------------------------------------------------------------------- smoke check
def parse_version_output(text: str) -> dict[str, Any]:
    """Pull the ``version:`` line (and build number / commit) out of ``--version`` output.

    Formats: ``version: 10216 (876a432)`` and ``version: 0.6.0-dev (build 11434, commit abc)``.
    """
    match = _VERSION_LINE_RE.search(text)
    if match is None:
        return {"version": None, "build_number": None, "commit": None}
    line = match.group(1)
    parts = _BUILD_NUMBER_RE.match(line)
    number = commit = None
    if parts:
        number = int(parts.group(1) or parts.group(3))
        commit = parts.group(2) or parts.group(4)
    return {"version": f"version: {line}", "build_number": number, "commit": commit}


def smoke_check(binary: Path, *, timeout: float = SMOKE_TIMEOUT) -> str:
    """Run ``binary --version`` and return its output (llama-server prints it to stderr).

    Raises:
        ProvisionError: it did not start, failed, crashed or hung.
    """
    import subprocess

    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=binary.parent,
            env=child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        msg = f"{binary} --version did not finish within {timeout:g}s; the binary looks broken"
        raise ProvisionError(msg) from None
    except OSError as err:
        msg = f"{binary} cannot run on this host: {err.strerror or err}"
        raise ProvisionError(msg) from err
    output = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:]) or "no output"
        if proc.returncode in (-_SIGILL, 128 + _SIGILL) or "illegal instruction" in output.lower():
            why = "illegal instruction: it was built for CPU features this CPU lacks"
        elif "error while loading shared libraries" in output or "Library not loaded" in output:
            why = "a shared library it needs is missing"
        else:
            why = f"exit code {proc.returncode}"
        msg = f"{binary} --version failed ({why}): {tail}"
        raise ProvisionError(msg)
    return output


# ----------------------------------------------------------------------------- installing


def _tree_size(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).lstat().st_size
    return total


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _record(
    metadata: Mapping[str, Any],
    staging: Path,
    found: Mapping[str, Path],
    os_name: str,
    version_output: str | None,
) -> dict[str, Any]:
    from llama_proc._version import __version__
    from llama_proc.provision.download import file_sha256

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
    record["created"] = _now()
    record["llama_proc_version"] = __version__
    if version_output is None:
        record["version"] = None
        record["smoke_check"] = f"skipped: {os_name} binaries cannot run on {host_os()}"
    else:
        record.update(parse_version_output(version_output))
        record["version_output"] = version_output.strip()[-_OUTPUT_LIMIT:]
        record["smoke_check"] = "ok"
    return record


def _commit(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an existing ``target`` aside first.

    Renaming a folder onto an existing one fails on Windows (and on POSIX unless it is
    empty), so the old install is renamed to a hidden sibling, the new one takes its name, and
    only then is the old one deleted.
    """
    import tempfile

    aside: Path | None = None
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", dir=target.parent))
        aside.rmdir()
        target.rename(aside)
    try:
        staging.rename(target)
    except OSError:
        if aside is not None:
            with contextlib.suppress(OSError):
                aside.rename(target)
        raise
    if aside is not None:
        _rmtree(aside)


def _complete(target: Path) -> Install | None:
    if not (target / INSTALL_JSON).is_file():
        return None
    try:
        install = Install.from_dir(target)
    except ProvisionError as err:
        logger.warning("%s; reinstalling", err)
        return None
    missing = install.missing_files()
    if missing:
        logger.warning("install %s lost %s; reinstalling", target, ", ".join(missing))
        return None
    return install


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
        target: the install folder, usually from :func:`install_dir`.
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
    import tempfile

    from llama_proc.provision.archive import find_binaries

    target = Path(target)
    with cache_lock(_lock_path(target), settings.lock_timeout):
        # Only the lock holder stages, so whatever staging exists now was left by a crash.
        for stale in _leftovers(target):
            logger.info("removing %s left by an interrupted install", stale)
            _rmtree(stale)
        if not force:
            existing = _complete(target)
            if existing is not None:
                logger.debug("%s is already installed (found after taking the lock)", target)
                return existing
        try:
            staging = Path(
                tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent)
            )
        except OSError as err:
            msg = f"cannot create a staging folder in {target.parent}: {err.strerror or err}"
            raise ProvisionError(msg) from err
        try:
            metadata = populate(staging)
            found = find_binaries(staging, binaries, os_name)
            server = next(p for k, p in found.items() if "llama-server" in _alternatives(k))
            output = smoke_check(server) if os_name == host_os() else None
            record = _record(metadata, staging, found, os_name, output)
            (staging / INSTALL_JSON).write_text(
                json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
            )
            _commit(staging, target)
        except OSError as err:
            _rmtree(staging)
            msg = f"installing into {target} failed: {err}"
            raise ProvisionError(msg) from err
        except BaseException:
            _rmtree(staging)
            raise
        logger.info("installed %s (%s)", target, record.get("version") or record["source"])
        return Install.from_dir(target)


# ----------------------------------------------------------------------------- listing
def list_installs(
    settings: Settings, *, build: str | None = None, variant_id: str | None = None
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
    return sorted(out, key=lambda i: (-_build_number(i.build), i.path.name))


def _build_number(build: str) -> int:
    digits = build.removeprefix("b")
    return int(digits) if digits.isdigit() else -1


def _resolve_id(settings: Settings, ident: str) -> Path:
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


def remove(settings: Settings, ident: str | Install) -> Path:
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
    with cache_lock(_lock_path(target), settings.lock_timeout):
        if not target.exists():
            msg = f"no install {target.parent.name}/{target.name} in the cache"
            raise ProvisionError(msg)
        aside = target.parent / f".{target.name}{OLD_MARK}removed"
        try:
            # Renamed first so that a half-deleted folder never sits under the install's name.
            _rmtree(aside)
            target.rename(aside)
            _rmtree(aside)
            for stale in _leftovers(target):
                _rmtree(stale)
            # Nothing is left to guard; see _prune_target on why this happens only while held.
            _lock_path(target).unlink(missing_ok=True)
        except OSError as err:
            msg = f"cannot remove {target}: {err.strerror or err}"
            raise ProvisionError(msg) from err
    _remove_if_empty(target.parent)
    return target


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# ----------------------------------------------------------------------------- pruning
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
    * partial and leftover downloads, and lock files whose install no longer exists.

    Anything whose lock is held right now (an install in progress) is left alone.

    Args:
        settings: ``cache_dir``, ``build``.
        keep_builds: more builds to keep.
        dry_run: only report what would be removed.

    Returns:
        The paths removed (or that would be).
    """
    from llama_proc.errors import ManifestError
    from llama_proc.provision.manifest import load_manifest

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
    build_dirs = sorted(p for p in _iterdir(root) if p.is_dir())
    for build_dir in build_dirs:
        entries = _iterdir(build_dir)
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
    for path in removed:
        logger.info("%s %s", "would remove" if dry_run else "removed", path)
    return removed


def _iterdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _prune_target(target: Path, *, drop: bool, running: set[Path], dry: bool) -> list[Path]:
    lock = _lock_path(target)
    held = try_lock(lock)
    if held is None:
        logger.info("leaving %s alone: it is being installed", target)
        return []
    out: list[Path] = []
    with held:
        out.extend(_leftovers(target))
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


def _delete(path: Path) -> bool:
    """Delete a file or folder for pruning; a failure is logged, not raised."""
    try:
        _rmtree(path)
    except OSError as err:
        logger.warning("could not remove %s: %s", path, err.strerror or err)
        return False
    return True


def _prune_downloads(settings: Settings, *, dry_run: bool) -> list[Path]:
    folder = downloads_dir(settings)
    names = {
        p.name.removesuffix(PART_SUFFIX).removesuffix(LOCK_SUFFIX)
        for p in _iterdir(folder)
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
