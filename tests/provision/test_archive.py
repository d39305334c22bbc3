"""Safe extraction of real tar.gz / zip archives and binary lookup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from release_fixtures import make_release, make_tar, make_zip

from llama_proc.errors import ArchiveError
from llama_proc.provision.archive import archive_kind, extract_archive, find_binaries

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and symlinks")


def _is_exec(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


@posix_only
def test_upstream_tar_layout_keeps_symlinks_and_exec_bits(tmp_path: Path) -> None:
    release = make_release(tmp_path, "b11434", ["ubuntu-x64"])
    archive = release.assets[release.main_asset][0]
    root = extract_archive(archive, tmp_path / "x")
    assert root == tmp_path / "x" / "llama-b11434"
    assert os.readlink(root / "libllama.so") == "libllama.so.0"
    assert os.readlink(root / "libllama.so.0") == "libllama.so.0.0.1"
    assert (root / "libllama.so").read_bytes().startswith(b"\x7fELF")
    assert _is_exec(root / "llama-server")
    assert _is_exec(root / "ggml-rpc-server")
    assert not _is_exec(root / "LICENSE")
    result = subprocess.run(
        [root / "llama-server", "--version"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0
    assert "version: 11434 (abcdef0)" in result.stderr


@posix_only
def test_macos_tar_has_dylib_chain(tmp_path: Path) -> None:
    release = make_release(tmp_path, "b7", ["macos-arm64"])
    root = extract_archive(release.assets[release.main_asset][0], tmp_path / "x")
    assert os.readlink(root / "libllama.dylib") == "libllama.0.dylib"
    assert (root / "libllama.dylib").resolve().name == "libllama.0.0.1.dylib"


def test_windows_zip_has_files_at_root(tmp_path: Path) -> None:
    release = make_release(tmp_path, "b11434", ["win-cuda-12.4-x64"])
    dest = tmp_path / "x"
    root = extract_archive(release.assets[release.main_asset][0], dest)
    assert root == dest
    cudart = "cudart-llama-bin-win-cuda-12.4-x64.zip"
    assert extract_archive(release.assets[cudart][0], dest) == dest
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(
        [
            *("llama-server.exe", "ggml-rpc-server.exe", "llama.dll", "ggml.dll"),
            *("cudart64_12.dll", "cublas64_12.dll"),
        ]
    )
    assert find_binaries(root, ["llama-server"], "windows") == {
        "llama-server": dest / "llama-server.exe"
    }


@posix_only
def test_zip_exec_bit_from_external_attr(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "a.zip",
        [("top/run", (b"#!/bin/sh\necho ran\n", 0o755)), ("top/data.txt", (b"x", 0o644))],
    )
    root = extract_archive(archive, tmp_path / "x")
    assert root == tmp_path / "x" / "top"
    assert _is_exec(root / "run")
    assert not _is_exec(root / "data.txt")
    assert subprocess.run([root / "run"], capture_output=True, text=True).stdout == "ran\n"


@posix_only
def test_zip_symlink_chain_preserved(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "a.zip",
        [
            ("lib/libx.so", (b"libx.so.1", stat.S_IFLNK | 0o777)),
            ("lib/libx.so.1", (b"libx.so.1.0", stat.S_IFLNK | 0o777)),
            ("lib/libx.so.1.0", b"real"),
        ],
    )
    root = extract_archive(archive, tmp_path / "x")
    assert os.readlink(root / "libx.so") == "libx.so.1"
    assert (root / "libx.so").read_bytes() == b"real"


@pytest.mark.parametrize(
    ("members", "expect_root"),
    [
        pytest.param([("a/b", b"1"), ("a/c/d", b"2")], "a", id="single-folder"),
        pytest.param([("./a/b", b"1")], "a", id="dot-prefixed"),
        pytest.param([("a/b", b"1"), ("z", b"2")], None, id="folder-and-file"),
        pytest.param([("only-file", b"1")], None, id="single-file"),
        pytest.param([("a/b", b"1"), ("c/d", b"2")], None, id="two-folders"),
    ],
)
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_root_detection(
    tmp_path: Path, members: list[tuple[str, Any]], expect_root: str | None, kind: str
) -> None:
    maker = make_tar if kind == "tar.gz" else make_zip
    archive = maker(tmp_path / f"a.{kind}", members)
    dest = tmp_path / "x"
    assert extract_archive(archive, dest) == (dest / expect_root if expect_root else dest)


UNSAFE_TAR = [
    pytest.param([("../escape", b"x")], "climbs out", id="dotdot"),
    pytest.param([("a/../../escape", b"x")], "climbs out", id="nested-dotdot"),
    pytest.param([("/tmp/abs-escape", b"x")], "absolute", id="absolute"),
    pytest.param([("link", {"symlink": "../../outside"})], "outside", id="symlink-out"),
    pytest.param([("link", {"symlink": "/etc/passwd"})], "absolute", id="symlink-abs"),
    pytest.param(
        [("a/", {"dir": True}), ("a/link", {"symlink": "../.."})], "outside", id="symlink-up-2"
    ),
    pytest.param([("hard", {"hardlink": "../outside"})], "outside", id="hardlink-out"),
    pytest.param([("hard", {"hardlink": "/etc/passwd"})], "absolute", id="hardlink-abs"),
    pytest.param([("dev", {"type": tarfile.CHRTYPE})], "special", id="char-device"),
    pytest.param([("blk", {"type": tarfile.BLKTYPE})], "special", id="block-device"),
    pytest.param([("fifo", {"type": tarfile.FIFOTYPE})], "special", id="fifo"),
    pytest.param(
        [("d", {"symlink": "."}), ("d/l", {"symlink": ".."})], "below symlink", id="through-link"
    ),
]


@pytest.mark.parametrize(("members", "match"), UNSAFE_TAR)
def test_unsafe_tar_members_are_refused(
    tmp_path: Path, members: list[tuple[str, Any]], match: str
) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", [("ok.txt", b"fine"), *members])
    dest = tmp_path / "deep" / "x"
    with pytest.raises(ArchiveError, match=match):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything was written
    assert not (tmp_path / "deep" / "escape").exists()
    assert not (tmp_path / "escape").exists()


UNSAFE_ZIP = [
    pytest.param([("../escape", b"x")], "climbs out", id="dotdot"),
    pytest.param([("..\\escape", b"x")], "climbs out", id="backslash-dotdot"),
    pytest.param([("/abs-escape", b"x")], "absolute", id="absolute"),
    pytest.param([("C:/Windows/x", b"x")], "absolute", id="drive"),
    pytest.param([("link", (b"../../outside", stat.S_IFLNK | 0o777))], "outside", id="symlink-out"),
    pytest.param([("link", (b"/etc/passwd", stat.S_IFLNK | 0o777))], "absolute", id="symlink-abs"),
    pytest.param([("dev", (b"", stat.S_IFCHR | 0o644))], "device", id="char-device"),
    pytest.param([("fifo", (b"", stat.S_IFIFO | 0o644))], "fifo", id="fifo"),
    pytest.param(
        [("d", (b".", stat.S_IFLNK | 0o777)), ("d/f", b"x")], "below symlink", id="through-link"
    ),
]


@pytest.mark.parametrize(("members", "match"), UNSAFE_ZIP)
def test_unsafe_zip_members_are_refused(
    tmp_path: Path, members: list[tuple[str, Any]], match: str
) -> None:
    archive = make_zip(tmp_path / "evil.zip", [("ok.txt", b"fine"), *members])
    dest = tmp_path / "deep" / "x"
    with pytest.raises(ArchiveError, match=match):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "deep" / "escape").exists()


def test_in_tree_hardlink_is_fine(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "a.tar.gz",
        [("top/real", (b"data", 0o755)), ("top/alias", {"hardlink": "top/real"})],
    )
    root = extract_archive(archive, tmp_path / "x")
    assert (root / "alias").read_bytes() == b"data"


def test_setuid_bit_is_dropped(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [("top/s", (b"x", 0o4755))])
    root = extract_archive(archive, tmp_path / "x")
    assert not root.joinpath("s").stat().st_mode & stat.S_ISUID


def test_corrupt_archives(tmp_path: Path) -> None:
    release = make_release(tmp_path, "b1", ["ubuntu-x64"])
    good = release.assets[release.main_asset][0].read_bytes()
    truncated = tmp_path / "t.tar.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(truncated, tmp_path / "x1")
    bad_zip = tmp_path / "b.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArchiveError, match="corrupt"):
        extract_archive(bad_zip, tmp_path / "x2")


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="unsupported archive type"):
        extract_archive(tmp_path / "a.rar", tmp_path / "x")
    assert archive_kind(Path("x.TGZ")) == "tar"
    assert archive_kind(Path("x.whl")) == "zip"


# ------------------------------------------------------------------------------ find_binaries
def _touch(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    path.chmod(mode)
    return path


def test_find_binaries_search_order(tmp_path: Path) -> None:
    nested = _touch(tmp_path / "build" / "bin" / "Release" / "llama-server")
    assert find_binaries(tmp_path, ["llama-server"], "linux") == {"llama-server": nested}
    in_bin = _touch(tmp_path / "bin" / "llama-server")
    assert find_binaries(tmp_path, ["llama-server"], "linux") == {"llama-server": in_bin}
    at_root = _touch(tmp_path / "llama-server")
    assert find_binaries(tmp_path, ["llama-server"], "linux") == {"llama-server": at_root}


def test_find_binaries_alternatives_keep_manifest_key(tmp_path: Path) -> None:
    _touch(tmp_path / "llama-server")
    old = _touch(tmp_path / "rpc-server")
    spec = "ggml-rpc-server|rpc-server"
    assert find_binaries(tmp_path, ["llama-server", spec], "linux")[spec] == old
    new = _touch(tmp_path / "sub" / "ggml-rpc-server")
    # The first alternative wins even when it sits deeper.
    assert find_binaries(tmp_path, [spec], "linux")[spec] == new


def test_find_binaries_windows_adds_exe(tmp_path: Path) -> None:
    exe = _touch(tmp_path / "llama-server.exe")
    _touch(tmp_path / "llama-server")
    assert find_binaries(tmp_path, ["llama-server"], "windows") == {"llama-server": exe}


def test_find_binaries_ignores_directories_with_the_name(tmp_path: Path) -> None:
    (tmp_path / "llama-server").mkdir()
    real = _touch(tmp_path / "bin" / "llama-server")
    assert find_binaries(tmp_path, ["llama-server"], "linux") == {"llama-server": real}


def test_find_binaries_missing_lists_what_exists(tmp_path: Path) -> None:
    _touch(tmp_path / "llama-cli")
    _touch(tmp_path / "libggml.so", 0o644)
    with pytest.raises(ArchiveError, match=r"ggml-rpc-server\|rpc-server not found.*llama-cli"):
        find_binaries(tmp_path, ["ggml-rpc-server|rpc-server"], "linux")
