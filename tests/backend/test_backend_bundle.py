"""llama_proc.provision.bundle: ELF reading, symlink-free copies, wheel tags, the bundle's place."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_proc.errors import ConfigError, ProvisionError
from llama_proc.provision import bundle
from llama_proc.provision.bundle import copy_install_tree, read_elf, wheel_tag

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF host needed")


def an_elf_with_needs() -> Path:
    """A real dynamically linked ELF executable from this machine."""
    for candidate in (sys.executable, "/bin/sh", "/usr/bin/env"):
        info = read_elf(Path(candidate).resolve())
        if info is not None and info.needed and info.glibc:
            return Path(candidate).resolve()
    pytest.skip("no dynamically linked glibc ELF executable found")


@linux_only
def test_read_elf_reads_needed_libraries_and_glibc_version() -> None:
    info = read_elf(an_elf_with_needs())
    assert info is not None
    assert any(name.startswith("libc.so") for name in info.needed)
    assert info.glibc is not None
    assert info.glibc[0] == 2


def test_read_elf_refuses_non_elf_and_truncated_files(tmp_path: Path) -> None:
    text = tmp_path / "llama-server"
    text.write_text("#!/bin/sh\nexec true\n")
    assert read_elf(text) is None
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 20)
    assert read_elf(truncated) is None
    assert read_elf(tmp_path / "missing") is None


@linux_only
def test_copy_collapses_library_symlink_chains(tmp_path: Path) -> None:
    exe = an_elf_with_needs()
    info = read_elf(exe)
    assert info is not None
    wanted = info.needed[0]  # e.g. libpython3.11.so.1.0 or libc.so.6
    src = tmp_path / "install"
    (src / "bin").mkdir(parents=True)
    shutil.copy2(exe, src / "bin" / "llama-server")
    real = src / "bin" / f"{wanted}.0.0"
    real.write_bytes(b"the real library")
    (src / "bin" / wanted).symlink_to(real.name)
    (src / "bin" / "libalias.so").symlink_to(wanted)  # a development alias
    (src / "bin" / "server-link").symlink_to("llama-server")  # not a library: kept
    (src / "install.json").write_text("{}")
    (src / "bin" / "x.lock").write_text("")
    dst = tmp_path / "copy"
    left_out = copy_install_tree(src, dst)
    names = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert names == sorted(["bin/llama-server", f"bin/{wanted}", "bin/server-link"])
    assert not [p for p in dst.rglob("*") if p.is_symlink()]
    assert (dst / "bin" / wanted).read_bytes() == b"the real library"
    assert os.access(dst / "bin" / "llama-server", os.X_OK)
    assert left_out == sorted([f"bin/{wanted}.0.0", "bin/libalias.so"])


def test_copy_without_elf_files_keeps_every_name(tmp_path: Path) -> None:
    src = tmp_path / "install"
    src.mkdir()
    (src / "libllama.0.0.dylib").write_bytes(b"mach-o")
    (src / "libllama.0.dylib").symlink_to("libllama.0.0.dylib")
    (src / "libllama.dylib").symlink_to("libllama.0.dylib")
    dst = tmp_path / "copy"
    assert copy_install_tree(src, dst) == []
    assert sorted(p.name for p in dst.iterdir()) == [
        "libllama.0.0.dylib",
        "libllama.0.dylib",
        "libllama.dylib",
    ]
    assert not [p for p in dst.iterdir() if p.is_symlink()]


def test_copy_refuses_a_symlink_out_of_the_install(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("x")
    src = tmp_path / "install"
    src.mkdir()
    (src / "libx.so").symlink_to(outside)
    with pytest.raises(ProvisionError, match="not a file inside the install"):
        copy_install_tree(src, tmp_path / "copy")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"os_name": "linux", "arch": "x86_64", "min_glibc": "2.35"},
            "py3-none-manylinux_2_35_x86_64",
            id="prebuilt-glibc-floor",
        ),
        pytest.param(
            {"os_name": "linux", "arch": "aarch64", "min_glibc": "2.39"},
            "py3-none-manylinux_2_39_aarch64",
            id="aarch64",
        ),
        pytest.param(
            {"os_name": "linux", "arch": "x86_64", "native": True, "min_glibc": "2.35"},
            "py3-none-linux_x86_64",
            id="native-build",
        ),
        pytest.param(
            {"os_name": "linux", "arch": "x86_64", "libc": "musl", "min_glibc": "2.35"},
            "py3-none-linux_x86_64",
            id="musl",
        ),
        pytest.param(
            {"os_name": "linux", "arch": "x86_64"}, "py3-none-linux_x86_64", id="unknown-glibc"
        ),
        pytest.param(
            {"os_name": "macos", "arch": "arm64", "min_macos": "13.3"},
            "py3-none-macosx_13_0_arm64",
            id="macos-13",
        ),
        pytest.param(
            {"os_name": "macos", "arch": "x86_64", "min_macos": "10.15"},
            "py3-none-macosx_10_15_x86_64",
            id="macos-10",
        ),
        pytest.param({"os_name": "windows", "arch": "x86_64"}, "py3-none-win_amd64", id="win"),
    ],
)
def test_wheel_tag_without_elf_files(tmp_path: Path, kwargs: dict[str, Any], expected: str) -> None:
    (tmp_path / "llama-server").write_text("#!/bin/sh\n")
    assert wheel_tag(tmp_path, **kwargs) == expected


@linux_only
def test_wheel_tag_reads_the_glibc_the_binaries_need(tmp_path: Path) -> None:
    exe = an_elf_with_needs()
    info = read_elf(exe)
    assert info is not None
    assert info.glibc is not None
    major, minor = info.glibc
    shutil.copy2(exe, tmp_path / "llama-server")
    assert wheel_tag(tmp_path, os_name="linux", arch="x86_64") == (
        f"py3-none-manylinux_{major}_{minor}_x86_64"
    )
    # The manifest's floor wins only when it is higher than what the files ask for.
    assert wheel_tag(tmp_path, os_name="linux", arch="x86_64", min_glibc="2.0") == (
        f"py3-none-manylinux_{major}_{minor}_x86_64"
    )
    assert wheel_tag(tmp_path, os_name="linux", arch="x86_64", min_glibc="2.99") == (
        "py3-none-manylinux_2_99_x86_64"
    )


def test_wheel_tag_refuses_an_unknown_platform(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="freebsd"):
        wheel_tag(tmp_path, os_name="freebsd", arch="x86_64")


def test_bundled_dir_is_inside_the_package() -> None:
    path = bundle.bundled_dir()
    assert path.name == "_bundled"
    assert (path.parent / "__init__.py").is_file()
    assert path.parent.name == "llama_proc"


def test_no_bundle_in_a_source_tree(tmp_path: Path) -> None:
    assert bundle.find_bundled() is None
    assert bundle.find_bundled(tmp_path) is None
