"""The llama-server bundled inside a platform wheel: where it lives, how one is made, its tag.

A wheel built by the in-tree backend (``build_backend/``) with a binary inside carries a complete
install at ``llama_proc/_bundled/``: the same files and the same ``install.json`` as an install in
the cache (written by :func:`~llama_proc.provision.cache.record.install_atomically`, ``source =
"bundled"``). The resolution ladder looks there right after an explicit binary
(:func:`find_bundled`); the backend makes one from a verified cache install with
:func:`stage_bundle` and names the wheel's platform with :func:`wheel_tag`.

Wheels cannot hold symlinks, so :func:`copy_install_tree` turns the shared-library symlink chains of
llama.cpp builds (``libllama.so -> libllama.so.0 -> libllama.so.0.6.0``) into one file under the
name the loader asks for (the ``DT_NEEDED`` entries read by :func:`read_elf`) instead of three
copies.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from llama_proc.errors import ConfigError, ProvisionError
from llama_proc.provision.cache.layout import INSTALL_JSON
from llama_proc.provision.cache.record import Install
from llama_proc.vocab import InstallSource

if TYPE_CHECKING:
    from collections.abc import Mapping

    from llama_proc.provision.manifest_records import Variant
    from llama_proc.provision.views import BuildView

__all__ = [
    "BUNDLE_DIRNAME",
    "ElfInfo",
    "bundled_dir",
    "copy_install_tree",
    "find_bundled",
    "read_elf",
    "stage_bundle",
    "wheel_tag",
]

logger = logging.getLogger(__name__)

BUNDLE_DIRNAME: Final = "_bundled"
"""Folder inside the ``llama_proc`` package that holds a wheel's bundled install."""
_SKIP_SUFFIXES: Final = (".lock", ".part")
_LIBRARY_RE: Final = re.compile(r"\.so(\.[0-9]+)*$|\.dylib$")
_GLIBC_RE: Final = re.compile(r"^GLIBC_([0-9]+)\.([0-9]+)(?:\.[0-9]+)?$")
_ELF_MAGIC: Final = b"\x7fELF"
_SHT_DYNAMIC: Final = 6
_SHT_GNU_VERNEED: Final = 0x6FFFFFFE
_DT_NULL: Final = 0
_DT_NEEDED: Final = 1
_DT_SONAME: Final = 14
_MAX_SECTION_BYTES: Final = 16 * 1024 * 1024
"""Dynamic and string sections are small; a larger one means a corrupt or hostile file."""
_WINDOWS_PLATFORMS: Final = {"x86_64": "win_amd64", "arm64": "win_arm64", "aarch64": "win_arm64"}


def bundled_dir() -> Path:
    """Where an installed wheel keeps its bundled install: ``<llama_proc package>/_bundled``."""
    return Path(__file__).resolve().parent.parent / BUNDLE_DIRNAME


def find_bundled(root: Path | None = None) -> Install | None:
    """The install bundled in this llama-proc's wheel, or None when it was installed without one.

    A source checkout, an editable install and a pure wheel have none.

    Args:
        root: look here instead of :func:`bundled_dir` (tests).

    Raises:
        ProvisionError: a bundle is present but its ``install.json`` is unreadable.
    """
    path = bundled_dir() if root is None else root
    if not (path / INSTALL_JSON).is_file():
        return None
    return Install.from_dir(path)


@dataclass(frozen=True)
class ElfInfo:
    """What the dynamic loader needs to run an ELF file."""

    needed: tuple[str, ...]
    """``DT_NEEDED`` library names, in order."""
    soname: str | None
    glibc: tuple[int, int] | None
    """Highest ``GLIBC_x.y`` symbol version the file requires; None = no glibc versions."""


def read_elf(path: Path) -> ElfInfo | None:
    """Read the dynamic section and glibc version needs of an ELF file.

    Returns None for anything that is not a readable ELF file (scripts, Mach-O, PE, text).
    """
    try:
        with path.open("rb") as f:
            return _read_elf(f)
    except (OSError, struct.error, ValueError):
        return None


def _read_elf(f: BinaryIO) -> ElfInfo | None:
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != _ELF_MAGIC or ident[4] not in (1, 2):
        return None
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    # e_type .. e_shstrndx after e_ident; only the section header table is needed.
    header = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    fields = struct.unpack(header, f.read(struct.calcsize(header)))
    shoff, shentsize, shnum = fields[5], fields[10], fields[11]
    if shoff == 0 or shnum == 0:
        return ElfInfo((), None, None)
    section = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    size = struct.calcsize(section)
    sections = []
    for i in range(shnum):
        f.seek(shoff + i * shentsize)
        _name, sh_type, _flags, _addr, offset, sh_size, link, info, _align, _ent = struct.unpack(
            section, f.read(size)
        )
        sections.append((sh_type, offset, sh_size, link, info))

    def read(index: int) -> bytes:
        _type, offset, sh_size, _link, _info = sections[index]
        if sh_size > _MAX_SECTION_BYTES:
            msg = "section too large"
            raise ValueError(msg)
        f.seek(offset)
        return f.read(sh_size)

    def cstr(table: bytes, offset: int) -> str:
        stop = table.find(b"\0", offset)
        return table[offset : stop if stop >= 0 else len(table)].decode("utf-8", "replace")

    needed: list[str] = []
    soname: str | None = None
    glibc: tuple[int, int] | None = None
    for index, (sh_type, _offset, _size, link, info) in enumerate(sections):
        if sh_type == _SHT_DYNAMIC:
            data, strings = read(index), read(link)
            entry = end + ("qQ" if is64 else "iI")
            step = struct.calcsize(entry)
            for pos in range(0, len(data) - step + 1, step):
                tag, value = struct.unpack_from(entry, data, pos)
                if tag == _DT_NULL:
                    break
                if tag == _DT_NEEDED:
                    needed.append(cstr(strings, value))
                elif tag == _DT_SONAME:
                    soname = cstr(strings, value)
        elif sh_type == _SHT_GNU_VERNEED:
            data, strings = read(index), read(link)
            pos = 0
            for _ in range(info):  # sh_info = number of Verneed entries
                _version, count, _file, aux, next_need = struct.unpack_from(
                    end + "HHIII", data, pos
                )
                apos = pos + aux
                for _ in range(count):
                    _hash, _flags, _other, name, next_aux = struct.unpack_from(
                        end + "IHHII", data, apos
                    )
                    match = _GLIBC_RE.match(cstr(strings, name))
                    if match:
                        version = (int(match[1]), int(match[2]))
                        glibc = version if glibc is None else max(glibc, version)
                    if next_aux == 0:
                        break
                    apos += next_aux
                if next_need == 0:
                    break
                pos += next_need
    return ElfInfo(tuple(needed), soname, glibc)


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Regular files and symlinks under ``root`` (relative), not following directory links."""
    files: list[Path] = []
    links: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        # Staging folders of a crashed install never belong to the install.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [*dirnames, *filenames]:
            path = base / name
            if path.is_symlink():
                links.append(path.relative_to(root))
            elif name in filenames:
                files.append(path.relative_to(root))
    return sorted(files), sorted(links)


def copy_install_tree(src: Path, dst: Path) -> list[str]:
    """Copy an install's files into ``dst`` with no symlinks left (wheels cannot hold them).

    Each symlink that the loader asks for by name (an ELF ``DT_NEEDED`` entry, or any
    non-library name) becomes a copy of its target; development aliases (``libllama.so``) and
    versioned real files that only exist behind such a link (``libllama.so.0.6.0``) are left out.
    Where no ELF file is found (macOS, Windows) every symlink is copied as a file. The top-level
    ``install.json`` and lock/partial files are not copied.

    Returns:
        The relative paths left out, for the log.

    Raises:
        ProvisionError: a symlink points outside the install or at nothing.
    """
    src = src.resolve()
    files, links = _walk(src)
    files = [p for p in files if p != Path(INSTALL_JSON) and not p.name.endswith(_SKIP_SUFFIXES)]
    needed: set[str] = set()
    for rel in files:
        info = read_elf(src / rel)
        if info is not None:
            needed.update(info.needed)
    elf_aware = bool(needed)
    targets: dict[Path, Path] = {}
    for rel in links:
        target = (src / rel).resolve()
        if not target.is_file() or not target.is_relative_to(src):
            msg = f"{src / rel} is a symlink to {target}, which is not a file inside the install"
            raise ProvisionError(msg)
        targets[rel] = target.relative_to(src)
    kept_links = [
        rel
        for rel in links
        if not elf_aware or rel.name in needed or not _LIBRARY_RE.search(rel.name)
    ]
    behind_kept = {targets[rel] for rel in kept_links}
    kept_files = [
        rel
        for rel in files
        if not (
            elf_aware
            and rel in behind_kept
            and rel.name not in needed
            and _LIBRARY_RE.search(rel.name)
        )
    ]
    # shutil imports bz2 and lzma; find_bundled (this module) runs on every cache hit.
    import shutil  # noqa: PLC0415  kept off the cache-hit path

    dst.mkdir(parents=True, exist_ok=True)
    for rel in kept_files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    for rel in kept_links:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / targets[rel], dst / rel)
    left_out = sorted({*links, *files} - {*kept_links, *kept_files})
    return [p.as_posix() for p in left_out]


def stage_bundle(
    install: Install,
    dest: Path,
    *,
    settings: BuildView,
    variant: Variant,
    os_name: str,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Install:
    """Make ``dest`` a bundled copy of a verified install, through the cache's own installer.

    The copy is smoke-checked and gets its own ``install.json`` (``source = "bundled"``, the
    original source and path under ``bundled_from``), exactly as a cache install would.

    Args:
        install: a complete install (usually in the cache).
        dest: the folder to create; its parent holds the lock and staging folders.
        settings: lock timeout and the like.
        variant: the manifest variant of ``install`` (which binaries it must provide).
        os_name: ``linux``, ``macos`` or ``windows`` (binary names).
        extra_metadata: more keys for ``install.json``.

    Raises:
        ProvisionError: copying or the smoke check failed.
    """
    # The installer imports the download and archive stack; find_bundled runs on every
    # resolution (a cache hit too) and must not pay for it.
    from llama_proc.provision.cache.installer import install_atomically  # noqa: PLC0415

    def populate(staging: Path) -> dict[str, Any]:
        left_out = copy_install_tree(install.path, staging)
        if left_out:
            logger.info("bundle: left out %d symlinked alias(es): %s", len(left_out), left_out)
        metadata = dict(install.metadata)
        metadata.update(
            variant_id=install.variant_id,
            build=install.build,
            source=InstallSource.BUNDLED,
            bundled_from={"source": install.source, "path": str(install.path)},
        )
        metadata.update(extra_metadata or {})
        return metadata

    return install_atomically(
        dest, populate, settings=settings, binaries=variant.binaries, os_name=os_name, force=True
    )


def _glibc_of_tree(root: Path) -> tuple[int, int] | None:
    found: tuple[int, int] | None = None
    for rel in _walk(root)[0]:
        info = read_elf(root / rel)
        if info is not None and info.glibc is not None:
            found = info.glibc if found is None else max(found, info.glibc)
    return found


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = [int(p) for p in re.findall(r"[0-9]+", text)[:2]]
    return (parts[0], parts[1] if len(parts) > 1 else 0) if parts else None


def wheel_tag(
    root: Path,
    *,
    os_name: str,
    arch: str,
    native: bool = False,
    libc: str | None = "glibc",
    min_glibc: str | None = None,
    min_macos: str | None = None,
) -> str:
    """The wheel tag for a bundle: ``py3-none-<platform>``; the binary carries no Python ABI.

    * Linux: ``manylinux_2_<N>_<arch>`` where ``2.N`` is the highest glibc the bundle's ELF files
      ask for, or ``min_glibc`` (the manifest's requirement for a prebuilt) if that is higher;
      ``linux_<arch>`` for a ``native`` build (tuned to this CPU, so it must not look portable),
      a non-glibc host, or when no glibc requirement can be read.
    * macOS: ``macosx_<major>_0_<arch>`` from ``min_macos`` (pip matches macOS 11+ by major).
    * Windows: ``win_amd64`` / ``win_arm64``.

    Args:
        root: the bundle folder (its ELF files are read on Linux).
        os_name: ``linux``, ``macos`` or ``windows``.
        arch: the variant's normalised arch.
        native: the binary was compiled for this machine's CPU (``GGML_NATIVE``).
        libc: the host's libc (``glibc``, ``musl`` or None).
        min_glibc: a glibc floor the binary is known to need (``"2.35"``).
        min_macos: the minimum macOS version (``"13.3"``).

    Raises:
        ConfigError: an OS the wheel tags cannot express.
    """
    if os_name == "linux":
        plat = f"linux_{arch}"
        if not native and libc == "glibc":
            found = _glibc_of_tree(root)
            floor = _version_tuple(min_glibc)
            need = max((v for v in (found, floor) if v is not None), default=None)
            if need is not None:
                plat = f"manylinux_{need[0]}_{need[1]}_{arch}"
        return f"py3-none-{plat}"
    if os_name == "macos":
        major, minor = _version_tuple(min_macos) or (11, 0)
        version = f"{major}_0" if major >= 11 else f"10_{minor}"
        return f"py3-none-macosx_{version}_{arch}"
    if os_name == "windows" and arch in _WINDOWS_PLATFORMS:
        return f"py3-none-{_WINDOWS_PLATFORMS[arch]}"
    msg = f"cannot name a wheel platform for {os_name}-{arch}; build a pure wheel instead"
    raise ConfigError(msg)
