"""Writing a checked archive plan to disk, confined to the destination.

Folders, files, hard links and symlinks; modes are normalized (no setuid, group or world write)
and every link is verified to stay inside the tree after writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Literal

from llama_proc.errors import ArchiveError

if TYPE_CHECKING:
    from collections.abc import Callable


_RATIO_FLOOR: Final = 4 << 20
"""Any archive may unpack to this much, whatever its ratio (tiny archives compress oddly)."""

_COPY_CHUNK: Final = 1 << 20

_MAX_LINK_HOPS: Final = 40

_FILE_MODE: Final = 0o644

_EXEC_MODE: Final = 0o755

_DIR_MODE: Final = 0o755

_CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
)

_Kind = Literal["dir", "file", "symlink", "hardlink"]

_Parts = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Member:
    """One entry of the tree being planned: an archive member or something already on disk."""

    name: str
    """As the archive spells it (for messages), or the path below the destination."""
    parts: _Parts
    kind: _Kind
    target: str = ""
    """Symlink target with ``/`` separators; for a hardlink, the name it was given."""
    source: _Parts = ()
    """For a hardlink: the path of the earlier file member it names."""
    executable: bool = False
    existing: bool = False
    """Already in the destination (an earlier archive of a merge)."""
    reader: Callable[[], IO[bytes]] | None = dataclasses.field(default=None, compare=False)


class _Budget:
    """Running count of real unpacked bytes against the total and ratio caps."""

    def __init__(self, archive: Path, max_bytes: int, max_ratio: float) -> None:
        self.archive = archive
        by_ratio = max(int(archive.stat().st_size * max_ratio), _RATIO_FLOOR)
        self.limit = min(max_bytes, by_ratio)
        self.reason = (
            f"{max_ratio:g} times the archive's size"
            if by_ratio < max_bytes
            else f"the cap of {max_bytes} bytes"
        )
        self.used = 0

    def check(self, total: int, member: str) -> None:
        """Raise once ``total`` unpacked bytes would pass the cap."""
        if total > self.limit:
            msg = (
                f"{self.archive.name}: member {member!r} takes the unpacked size past "
                f"{self.reason} ({self.limit} bytes); refusing a likely archive bomb: delete the "
                "archive and download it from a trusted source (or raise the cap if it is genuine)"
            )
            raise ArchiveError(msg)

    def charge(self, size: int, member: str) -> None:
        """Count ``size`` more real bytes written for ``member``."""
        self.used += size
        self.check(self.used, member)


def _is_absolute(text: str) -> bool:
    return text.startswith("/") or (len(text) > 1 and text[1] == ":")


def _bind_hardlinks(members: list[_Member], archive: Path) -> list[_Member]:
    """Point each hardlink at the earlier regular file it names."""
    earlier: dict[_Parts, _Member] = {}
    bound: list[_Member] = []
    for member in members:
        entry = member
        if member.kind == "hardlink":
            text = member.target.replace("\\", "/")
            parts = tuple(p for p in text.split("/") if p not in ("", "."))
            if ".." in parts:
                msg = (
                    f"{archive.name}: hardlink {member.name!r} -> {member.target!r} points "
                    "outside the archive; refusing it"
                )
                raise ArchiveError(msg)
            source = earlier.get(parts)
            if source is None or source.kind != "file":
                msg = (
                    f"{archive.name}: hardlink {member.name!r} -> {member.target!r} does not name "
                    "an earlier file of the archive; refusing it"
                )
                raise ArchiveError(msg)
            entry = dataclasses.replace(member, source=source.parts)
        bound.append(entry)
        earlier[entry.parts] = entry
    return bound


def _resolve(
    tree: dict[_Parts, _Member], parts: _Parts, link: _Member, archive: Path
) -> _Parts | None:
    """Where the symlink at ``parts`` really lands, following every link; ``None`` if outside."""
    current = list(parts[:-1])
    pending: list[str] = []
    target: str | None = link.target
    hops = 0
    while target is not None or pending:
        if target is not None:
            if _is_absolute(target):
                return None
            pending.extend(reversed(target.split("/")))
            target = None
            continue
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return None
            current.pop()
            continue
        node = tree.get((*current, part))
        if node is None or node.kind != "symlink":
            current.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            msg = (
                f"{archive.name}: link {link.name!r} is part of a symlink loop; the archive is "
                "malformed, refusing it"
            )
            raise ArchiveError(msg)
        target = node.target
    return tuple(current)


def _write(
    members: list[_Member],
    tree: dict[_Parts, _Member],
    dest: Path,
    archive: Path,
    budget: _Budget,
) -> None:
    """Write the planned members; on any failure remove what was created."""
    created: list[Path] = []
    folders: set[_Parts] = {()}
    try:
        for member in members:
            if member.kind == "dir":
                _make_dirs(dest, member.parts, folders, created, member, archive)
            elif member.kind != "symlink":
                _make_dirs(dest, member.parts[:-1], folders, created, member, archive)
                path = _clear(dest.joinpath(*member.parts))
                if member.kind == "file":
                    _write_file(member, path, created, budget)
                else:
                    _write_hardlink(member, path, dest, created, budget)
        # Links last, so no link exists while files are written (besides those of an earlier
        # archive, which the plan keeps every member away from).
        for member in members:
            if member.kind == "symlink":
                _make_dirs(dest, member.parts[:-1], folders, created, member, archive)
                path = _clear(dest.joinpath(*member.parts))
                _write_symlink(member, path, tree, dest, archive, created, budget)
        _verify_links(tree, dest, archive)
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        raise


def _make_dirs(
    dest: Path,
    parts: _Parts,
    folders: set[_Parts],
    created: list[Path],
    member: _Member,
    archive: Path,
) -> None:
    """Create the folders of ``parts`` one by one, refusing any that is not a real folder."""
    for depth in range(1, len(parts) + 1):
        if parts[:depth] in folders:
            continue
        path = dest.joinpath(*parts[:depth])
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            path.mkdir(_DIR_MODE)
            created.append(path)
        else:
            if not stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
                msg = (
                    f"{archive.name}: member {member.name!r} would be written through "
                    f"{'/'.join(parts[:depth])!r}, which is not a folder; refusing to extract"
                )
                raise ArchiveError(msg)
        folders.add(parts[:depth])


def _clear(path: Path) -> Path:
    """Remove a file or link at ``path`` (never what a link points to)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(mode):
        path.unlink()
    return path


def _copy(source: IO[bytes], path: Path, name: str, created: list[Path], budget: _Budget) -> None:
    fd = os.open(path, _CREATE_FLAGS, _FILE_MODE)
    created.append(path)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            budget.charge(len(chunk), name)
            out.write(chunk)


def _write_file(member: _Member, path: Path, created: list[Path], budget: _Budget) -> None:
    if member.reader is None:  # pragma: no cover - every file member has a reader
        msg = f"member {member.name!r} has no data"
        raise ArchiveError(msg)
    with member.reader() as source:
        _copy(source, path, member.name, created, budget)
    path.chmod(_EXEC_MODE if member.executable else _FILE_MODE)


def _write_hardlink(
    member: _Member, path: Path, dest: Path, created: list[Path], budget: _Budget
) -> None:
    original = dest.joinpath(*member.source)  # a file this extraction wrote
    try:
        os.link(original, path, follow_symlinks=False)
    except (OSError, NotImplementedError):
        with original.open("rb") as data:
            _copy(data, path, member.name, created, budget)
        path.chmod(stat.S_IMODE(original.stat().st_mode))
    else:
        created.append(path)


def _write_symlink(
    member: _Member,
    path: Path,
    tree: dict[_Parts, _Member],
    dest: Path,
    archive: Path,
    created: list[Path],
    budget: _Budget,
) -> None:
    resolved = _resolve(tree, member.parts, member, archive) or ()
    is_dir = getattr(tree.get(resolved), "kind", "") == "dir"
    try:
        path.symlink_to(member.target, target_is_directory=is_dir)
    except OSError:
        # Windows without symlink privilege: a copy of the file serves the same purpose.
        source = dest.joinpath(*resolved)
        if not source.is_file() or source.is_symlink():
            msg = f"{archive.name}: cannot create link {member.name!r} -> {member.target!r}"
            raise ArchiveError(msg) from None
        with source.open("rb") as data:
            _copy(data, path, member.name, created, budget)
    else:
        created.append(path)


def _verify_links(tree: dict[_Parts, _Member], dest: Path, archive: Path) -> None:
    """Re-check every link on disk.

    A case-insensitive filesystem can join names that the plan kept apart.
    """
    root = Path(os.path.realpath(dest))
    for parts, node in tree.items():
        if node.kind != "symlink":
            continue
        path = dest.joinpath(*parts)
        if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
            msg = f"{archive.name}: link {node.name!r} resolves outside {dest}; refusing it"
            raise ArchiveError(msg)
