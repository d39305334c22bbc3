"""The shared libraries an ELF file needs (its DT_NEEDED entries), read without running it.

Enough of the ELF format to list a build's dependencies, so the CUDA runtime libraries a build
links are bundled beside it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path


_ELF_MAGIC: Final = b"\x7fELF"

_ELF_HEADER_SIZE: Final = 64

_PT_DYNAMIC: Final = 2

_PT_LOAD: Final = 1

_DT_NULL: Final = 0

_DT_NEEDED: Final = 1

_DT_STRTAB: Final = 5

_MAX_DYNAMIC_ENTRIES: Final = 4096


def elf_needed(path: Path) -> list[str]:
    """The ``DT_NEEDED`` libraries of a 64-bit little-endian ELF file ([] for anything else).

    Reads the program headers and the dynamic section only; nothing is loaded or run.
    """
    try:
        with path.open("rb") as f:
            head = f.read(_ELF_HEADER_SIZE)
            if len(head) < _ELF_HEADER_SIZE or head[:4] != _ELF_MAGIC or head[4:6] != b"\x02\x01":
                return []
            phoff = struct.unpack_from("<Q", head, 0x20)[0]
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            loads: list[tuple[int, int, int]] = []
            dynamic: tuple[int, int] | None = None
            for i in range(phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                    "<IIQQQQ", table, i * phentsize
                )
                if p_type == _PT_LOAD:
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == _PT_DYNAMIC:
                    dynamic = (p_offset, p_filesz)
            if dynamic is None:
                return []
            f.seek(dynamic[0])
            raw = f.read(min(dynamic[1], _MAX_DYNAMIC_ENTRIES * 16))
            entries = [struct.unpack_from("<qQ", raw, i) for i in range(0, len(raw) - 15, 16)]
            strtab = next((v for t, v in entries if t == _DT_STRTAB), None)
            base = next(
                (
                    off + strtab - va
                    for va, off, size in loads
                    if strtab is not None and va <= strtab < va + size
                ),
                None,
            )
            if base is None:
                return []
            names: list[str] = []
            for tag, value in entries:
                if tag == _DT_NULL:
                    break
                if tag == _DT_NEEDED:
                    f.seek(base + value)
                    names.append(f.read(256).split(b"\0", 1)[0].decode("utf-8", "replace"))
            return names
    except (OSError, struct.error):
        return []
