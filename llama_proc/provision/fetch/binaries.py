"""Finding the llama.cpp programs in an unpacked release, wherever the archive put them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ArchiveError

if TYPE_CHECKING:
    from collections.abc import Sequence


_EXEC_BITS: Final = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def find_binaries(root: Path, names: Sequence[str], os_name: str) -> dict[str, Path]:
    """Locate executables in an extracted archive or a build's output folder.

    Looks in ``root``, then ``root/bin``, then anywhere below ``root`` (shallowest first).

    Args:
        root: folder to search.
        names: manifest binary names; ``"a|b"`` accepts either (the first found in name order).
        os_name: ``windows`` adds ``.exe``.

    Returns:
        ``{manifest name: path}`` for every entry of ``names``.

    Raises:
        ArchiveError: one of the names is not found (the message lists what is there).
    """
    suffix = ".exe" if os_name == "windows" else ""
    found: dict[str, Path] = {}
    everything: list[Path] | None = None
    missing: list[str] = []
    for spec in names:
        alternatives = [n for n in spec.split("|") if n]
        hit: Path | None = None
        for alt in alternatives:
            filename = alt + suffix
            for candidate in (root / filename, root / "bin" / filename):
                if candidate.is_file():
                    hit = candidate
                    break
            if hit is None:
                if everything is None:
                    everything = _walk(root)
                hit = next((p for p in everything if p.name == filename and p.is_file()), None)
            if hit is not None:
                break
        if hit is None:
            missing.append(spec)
        else:
            found[spec] = hit
    if missing:
        have = sorted({p.name for p in everything or _walk(root) if _looks_executable(p)})
        listing = ", ".join(have[:20]) or "no executables"
        msg = f"{', '.join(missing)} not found in {root} (found: {listing})"
        raise ArchiveError(msg)
    return found


def _walk(root: Path) -> list[Path]:
    paths = [Path(d) / f for d, _dirs, files in os.walk(root) for f in files]
    return sorted(paths, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def _looks_executable(path: Path) -> bool:
    if path.suffix.lower() == ".exe":
        return True
    try:
        return path.is_file() and bool(path.stat().st_mode & _EXEC_BITS) and path.suffix == ""
    except OSError:
        return False
