"""File locks that guard the cache, and the one protocol every cache writer follows.

A lock file sits *beside* what it guards (``<target>.lock``), never inside it, so replacing the
guarded folder never removes the lock another process is waiting on.

Everything the cache makes (an install, an unpacked source tree, a downloaded index file, the
smoke model) is made by :func:`create_once`: check, lock, check again, clear what crashed
writers left, stage beside the target, rename. The rename is the commit point, so a process
killed at any moment leaves either nothing under the target's name or a complete target, plus
staging leftovers (``.<name>.incoming-*``, ``.<name>.old-*``) that the next lock holder removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from llama_proc.errors import CacheLockTimeoutError, LlamaProcError, ProvisionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "LOCK_SUFFIX",
    "OLD_MARK",
    "STAGING_MARK",
    "cache_lock",
    "commit",
    "create_once",
    "leftovers",
    "lock_path",
    "remove_tree",
    "try_lock",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_SUFFIX: Final = ".lock"
STAGING_MARK: Final = ".incoming-"
"""``.<name>.incoming-<random>``: a target being staged (only ever by the lock holder)."""
OLD_MARK: Final = ".old-"
"""``.<name>.old-<random>``: a replaced target moved aside until the new one is in place."""

_RANDOM_BYTES: Final = 4
_NAME_ATTEMPTS: Final = 16
Staging = Literal["dir", "file", "none"]
"""How :func:`create_once` stages: a fresh folder, a file path, or not at all (the maker stages
on its own, e.g. a download into its resumable ``.part``)."""


def lock_path(target: Path) -> Path:
    """The lock file that guards ``target``: ``<target>.lock`` in the same folder."""
    return target.parent / f"{target.name}{LOCK_SUFFIX}"


def _filelock() -> Any:
    # filelock pulls in asyncio (tens of ms); a cache hit takes no lock and must not pay that.
    import filelock  # noqa: PLC0415  kept off the cache-hit path (`llama-proc which`)

    return filelock


@contextlib.contextmanager
def cache_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the file lock at ``path`` (created with its folder).

    Args:
        path: the lock file.
        timeout: seconds to wait; 0 tries once.

    Raises:
        CacheLockTimeoutError: another process held it for ``timeout`` seconds.
        ProvisionError: the lock file cannot be created.
    """
    filelock = _filelock()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path), timeout=timeout)
        lock.acquire()
    except filelock.Timeout as err:
        raise CacheLockTimeoutError(str(path), timeout) from err
    except OSError as err:
        msg = f"cannot create the lock {path}: {err.strerror or err}; check LLAMA_PROC_CACHE_DIR"
        raise ProvisionError(msg) from err
    try:
        yield
    finally:
        lock.release()


def try_lock(path: Path) -> contextlib.AbstractContextManager[None] | None:
    """The lock at ``path`` if it is free right now, else None (for pruning)."""
    filelock = _filelock()
    lock = filelock.FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except (filelock.Timeout, OSError):
        return None

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        try:
            yield
        finally:
            lock.release()

    return held()


def leftovers(target: Path) -> list[Path]:
    """Staging and moved-aside copies of ``target`` left by crashed processes."""
    prefixes = (f".{target.name}{STAGING_MARK}", f".{target.name}{OLD_MARK}")
    try:
        return [p for p in target.parent.iterdir() if p.name.startswith(prefixes)]
    except OSError:
        return []


def remove_tree(path: Path) -> None:
    """Delete a file, a symlink or a folder tree; a missing path is fine.

    Raises:
        OSError: something could not be deleted even after making it writable.
    """

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
        # shutil imports bz2 and lzma; this module is imported on the cache-hit path.
        import shutil  # noqa: PLC0415  kept off the cache-hit path

        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=retry)
        else:  # pragma: no cover - onexc is 3.12+; onerror is deprecated there
            shutil.rmtree(path, onerror=retry)


def commit(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an existing ``target`` folder aside first.

    Renaming a folder onto an existing one fails on Windows (and on POSIX unless it is empty),
    so an old folder is renamed to a hidden sibling, the new one takes its name, and only then
    is the old one deleted. A file replaces a file in one atomic step.
    """
    aside: Path | None = None
    if target.is_dir() and not target.is_symlink():
        aside = _unique(target, OLD_MARK, lambda path: None)
        target.rename(aside)
    try:
        staging.replace(target)
    except OSError:
        if aside is not None:
            with contextlib.suppress(OSError):
                aside.rename(target)
        raise
    if aside is not None:
        remove_tree(aside)


def _unique(target: Path, mark: str, create: Callable[[Path], None]) -> Path:
    """A new ``.<name><mark><random>`` sibling of ``target``, made by ``create``."""
    for _ in range(_NAME_ATTEMPTS):
        path = target.parent / f".{target.name}{mark}{os.urandom(_RANDOM_BYTES).hex()}"
        if path.exists() or path.is_symlink():
            continue
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    msg = f"cannot find a free name beside {target}; remove its leftovers (llama-proc cache prune)"
    raise ProvisionError(msg)


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _new_staging(target: Path, staging: Staging) -> Path:
    # Same folder as the target, so the commit is a rename on one filesystem.
    try:
        if staging == "dir":
            return _unique(target, STAGING_MARK, lambda path: path.mkdir(mode=0o700))
        return _unique(target, STAGING_MARK, _create_file)
    except ProvisionError:
        raise
    except OSError as err:
        msg = f"cannot create a staging path in {target.parent}: {err.strerror or err}"
        raise ProvisionError(msg) from err


def create_once(
    target: Path,
    make: Callable[[Path], object],
    *,
    ready: Callable[[], T | None],
    timeout: float,
    force: bool = False,
    staging: Staging = "dir",
) -> T:
    """Make ``target`` once, safely against other processes and crashes.

    1. ``ready()`` without the lock: a finished target costs no lock at all.
    2. Take ``<target>.lock`` and ask ``ready()`` again: another process may have finished
       while this one waited.
    3. Remove staging leftovers of ``target`` (only the lock holder stages, so any that exist
       were left by a crash).
    4. ``make(path)`` fills a fresh staging path beside ``target`` (an empty folder, or an
       empty file it may overwrite); with ``staging="none"`` it gets ``target`` itself.
    5. Rename the staging path onto ``target`` and return ``ready()``.

    Args:
        target: what to make; its lock is :func:`lock_path` of it.
        make: fills the path it is given; its return value is ignored.
        ready: the finished result when ``target`` is complete, else None.
        timeout: seconds to wait for the lock.
        force: make it again even when ``ready()`` says it is complete.
        staging: ``"dir"``, ``"file"`` or ``"none"`` (see :data:`Staging`).

    Returns:
        What ``ready()`` returns once ``target`` is complete.

    Raises:
        CacheLockTimeoutError: another process held the lock for ``timeout`` seconds.
        ProvisionError: the staging path cannot be made, ``make`` failed with an ``OSError``, or
            ``target`` is still incomplete afterwards. Errors of llama-proc's own pass through.
    """
    if not force:
        found = ready()
        if found is not None:
            return found
    with cache_lock(lock_path(target), timeout):
        if not force:
            found = ready()
            if found is not None:
                logger.debug("%s was made by another process while this one waited", target)
                return found
        for stale in leftovers(target):
            logger.info("removing %s left by an interrupted run", stale)
            remove_tree(stale)
        path = target if staging == "none" else _new_staging(target, staging)
        try:
            make(path)
            if path != target:
                commit(path, target)
        except LlamaProcError:
            _discard(path, target)
            raise
        except OSError as err:
            _discard(path, target)
            msg = (
                f"creating {target} failed: {err}; check the free space and permissions of "
                "the cache (LLAMA_PROC_CACHE_DIR)"
            )
            raise ProvisionError(msg) from err
        except BaseException:
            _discard(path, target)
            raise
        found = ready()
    if found is None:
        msg = f"{target} is incomplete right after it was made; delete it and retry"
        raise ProvisionError(msg)
    return found


def _discard(path: Path, target: Path) -> None:
    if path != target:
        with contextlib.suppress(OSError):
            remove_tree(path)
