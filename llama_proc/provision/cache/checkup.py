"""``llama-proc cache verify``: every file of each install re-hashed against its record.

Deeper than the stat check a cache hit makes: file hashes, symlink targets, and files that were
not part of the install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_proc.provision.cache.file_record import FileProblem, scan_tree
from llama_proc.provision.cache.layout import (
    INSTALL_JSON,
    build_number,
    list_dir,
    servers_dir,
)
from llama_proc.provision.cache.record import check_install

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.provision.views import CacheView


@dataclass(frozen=True)
class Verification:
    """What ``llama-proc cache verify`` found for one install folder."""

    id: str
    """``<build>/<folder>``, as ``cache ls`` and ``cache rm`` name it."""
    path: Path
    problems: tuple[FileProblem, ...]
    """Empty: every file is as ``install.json`` recorded it."""
    files: int | None
    """Files recorded in ``install.json``; None for an install that predates file records
    (only its binaries can be checked) or whose ``install.json`` cannot be used."""

    @property
    def ok(self) -> bool:
        """Whether nothing differs."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``cache verify --json``)."""
        return {
            "id": self.id,
            "path": str(self.path),
            "ok": self.ok,
            "files": self.files,
            "problems": [p.to_dict() for p in self.problems],
        }


def verify_install(path: Path) -> Verification:
    """Re-hash every file of the install at ``path`` against its ``install.json``.

    On top of :meth:`~llama_proc.provision.cache.record.Install.problems` (the stat facts a cache
    hit compares): each regular file's sha256, each symlink's target (it must still say what
    was recorded and stay inside the folder), and files that were not part of the install. An
    install without file records is checked by its binaries' recorded sha256 only.

    Args:
        path: an install folder (``install.json`` inside).

    Returns:
        The verdict; its ``problems`` are empty when the install is intact.
    """
    # hashlib comes with the download module: verifying is rare, a cache hit never hashes.
    from llama_proc.provision.fetch.download import file_sha256  # noqa: PLC0415  off the hit path

    def sha256(file: Path) -> str | None:
        try:
            return file_sha256(file)
        except OSError:
            return None

    ident = f"{path.parent.name}/{path.name}"
    install, problems = check_install(path)
    if install is None:
        return Verification(ident, path, tuple(problems), None)
    seen = {p.path for p in problems}
    root = path.resolve()
    if install.files is None:
        for name, binary in install.binaries.items():
            rel = binary.relative_to(path).as_posix()
            entry = (install.metadata.get("binaries") or {}).get(name)
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            if rel in seen or not isinstance(expected, str):
                continue
            actual = sha256(binary)
            if actual != expected:
                problems.append(FileProblem(rel, "sha256", expected, actual))
        return Verification(ident, path, tuple(problems), None)
    for rel, record in install.files.items():
        if rel in seen:
            continue
        file = path / rel
        if record.link is not None:
            try:
                target = str(file.readlink())
            except OSError:
                problems.append(FileProblem(rel, "missing"))
                continue
            try:
                real = file.resolve(strict=True)
            except (OSError, RuntimeError):  # its target is gone, or a loop
                problems.append(FileProblem(rel, "dangling", record.link))
                continue
            if target != record.link:
                problems.append(FileProblem(rel, "link", record.link, target))
            elif real != root and root not in real.parents:
                problems.append(FileProblem(rel, "outside", actual=str(real)))
        elif record.sha256 is not None:
            actual = sha256(file)
            if actual != record.sha256:
                problems.append(FileProblem(rel, "sha256", record.sha256, actual))
    try:
        extra = [rel for rel in scan_tree(path) if rel not in install.files]
    except OSError:
        extra = []
    problems.extend(FileProblem(rel, "extra") for rel in extra)
    return Verification(ident, path, tuple(problems), len(install.files))


def verify_installs(settings: CacheView) -> list[Verification]:
    """Verify every install in the cache (:func:`verify_install`), newest build first.

    Unlike :func:`list_installs`, installs whose ``install.json`` cannot be used (unreadable,
    or naming a path outside the folder) are reported, not skipped.

    Args:
        settings: ``cache_dir``.
    """
    root = servers_dir(settings)
    found: list[Path] = []
    for build_dir in list_dir(root):
        if not build_dir.is_dir() or build_dir.name.startswith("."):
            continue
        found.extend(
            entry
            for entry in list_dir(build_dir)
            if not entry.name.startswith(".") and (entry / INSTALL_JSON).is_file()
        )
    found.sort(key=lambda p: (-build_number(p.parent.name), p.name))
    return [verify_install(path) for path in found]
