"""Safe extraction of real tar.gz / zip archives and binary lookup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from release_fixtures import make_release, make_tar, make_zip

from llama_proc.errors import ArchiveError
from llama_proc.provision.fetch import archive as archive_mod
from llama_proc.provision.fetch.archive import (
    MAX_COMPRESSION_RATIO,
    MAX_EXTRACT_BYTES,
    archive_kind,
    extract_archive,
)
from llama_proc.provision.fetch.binaries import find_binaries

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and symlinks")


def _is_exec(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


@posix_only
def test_upstream_tar_layout_keeps_symlinks_and_exec_bits(tmp_path: Path, tar_filter: str) -> None:
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
    tmp_path: Path, members: list[tuple[str, Any]], match: str, tar_filter: str
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


def test_in_tree_hardlink_is_fine(tmp_path: Path, tar_filter: str) -> None:
    archive = make_tar(
        tmp_path / "a.tar.gz",
        [("top/real", (b"data", 0o755)), ("top/alias", {"hardlink": "top/real"})],
    )
    root = extract_archive(archive, tmp_path / "x")
    assert (root / "alias").read_bytes() == b"data"


@pytest.mark.parametrize("merge", [False, True])
def test_hardlink_after_folder_entries(tmp_path: Path, merge: bool, tar_filter: str) -> None:
    archive = make_tar(
        tmp_path / "a.tar.gz",
        [
            ("./", {"dir": True}),
            ("top/", {"dir": True}),
            ("top/real", (b"data", 0o755)),
            ("top/alias", {"hardlink": "top/real"}),
        ],
    )
    root = extract_archive(archive, tmp_path / "x", merge=merge)
    assert root == tmp_path / "x" / ("" if merge else "top")
    assert (root / "alias").read_bytes() == b"data"
    assert _is_exec(root / "alias")


def test_links_become_copies_where_the_filesystem_refuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows without the symlink privilege, or a filesystem without hardlinks."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(Path, "symlink_to", refuse)
    archive = make_tar(
        tmp_path / "a.tar.gz",
        [
            ("top/real", (b"data", 0o755)),
            ("top/alias", {"hardlink": "top/real"}),
            ("top/lib.so", {"symlink": "sub/lib.so.1"}),
            ("top/sub/lib.so.1", b"lib"),
        ],
    )
    root = extract_archive(archive, tmp_path / "x")
    assert (root / "alias").read_bytes() == b"data"
    assert _is_exec(root / "alias")
    assert not (root / "lib.so").is_symlink()
    assert (root / "lib.so").read_bytes() == b"lib"


def test_setuid_bit_is_dropped(tmp_path: Path, tar_filter: str) -> None:
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


# ------------------------------------------------------------------------ chains, merges, bombs
LINK = stat.S_IFLNK | 0o777
MiB = 1 << 20


def _without_data_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Python versions whose tarfile has no ``data`` filter; tarfile's own extraction is
    booby-trapped too: the checks must depend on neither."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "fully_trusted_filter", raising=False)

    def trap(*_args: object, **_kwargs: object) -> None:
        pytest.fail("tarfile's own extraction was used")

    monkeypatch.setattr(tarfile.TarFile, "extractall", trap)
    monkeypatch.setattr(tarfile.TarFile, "extract", trap)


@pytest.fixture(params=["data-filter", "no-data-filter"])
def tar_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a tar test with and without tarfile's ``data`` filter."""
    if request.param == "no-data-filter":
        _without_data_filter(monkeypatch)
    return str(request.param)


@pytest.fixture(params=["zip", "tar", "tar-no-data-filter"])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The archive kind a test builds with :func:`_make`; tar also without the data filter."""
    if request.param == "tar-no-data-filter":
        _without_data_filter(monkeypatch)
    return str(request.param)


def _links(kind: str, links: list[tuple[str, str]], extra: list[tuple[str, Any]]) -> list[Any]:
    if kind == "zip":
        return [*extra, *((name, (target.encode(), LINK)) for name, target in links)]
    return [*extra, *((name, {"symlink": target}) for name, target in links)]


def _make(kind: str, path: Path, entries: list[Any]) -> Path:
    if kind == "zip":
        return make_zip(path.with_suffix(".zip"), entries)
    return make_tar(path.with_suffix(".tar.gz"), entries)


# Each link is inside the tree when read on its own; followed through the others, c escapes:
# a -> d1, b -> a/.. = the root, c -> b/.. = the root's parent.
CHAIN = [("d1/d2/a", ".."), ("d1/d2/b", "a/.."), ("d1/d2/c", "b/..")]


@posix_only
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_symlink_chain_that_escapes_is_refused(tmp_path: Path, kind: str, order: str) -> None:
    chain = CHAIN if order == "forward" else CHAIN[::-1]
    archive = _make(kind, tmp_path / "chain", _links(kind, chain, [("d1/d2/ok", b"fine")]))
    dest = tmp_path / "deep" / "x"
    with pytest.raises(ArchiveError, match=r"'d1/d2/c'.*outside"):
        extract_archive(archive, dest)
    assert list(dest.iterdir()) == []


@posix_only
def test_symlink_chain_inside_the_tree_survives(tmp_path: Path, kind: str) -> None:
    links = [
        ("top/lib/libx.so", "libx.so.1"),
        ("top/lib/libx.so.1", "../real/libx.so.1.0"),
        ("top/bin/libs", "../lib"),
        ("top/bin/libx", "libs/libx.so"),
    ]
    files = [("top/real/libx.so.1.0", b"real"), ("top/bin/run", (b"#!/bin/sh\n", 0o755))]
    archive = _make(kind, tmp_path / "ok", _links(kind, links, files))
    root = extract_archive(archive, tmp_path / "x")
    assert root == tmp_path / "x" / "top"
    assert (root / "bin" / "libx").read_bytes() == b"real"
    assert os.readlink(root / "bin" / "libx") == "libs/libx.so"
    assert _is_exec(root / "bin" / "run")


def test_symlink_loop_is_refused(tmp_path: Path, kind: str) -> None:
    archive = _make(kind, tmp_path / "loop", _links(kind, [("a", "b"), ("b", "c"), ("c", "a")], []))
    with pytest.raises(ArchiveError, match="loop"):
        extract_archive(archive, tmp_path / "x")


def test_zip_link_member_with_huge_target_is_not_read_into_memory(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", [("link", (b"a" * (32 * MiB), LINK))])
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match=r"'link'.*target"):
            extract_archive(archive, tmp_path / "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


@posix_only
def test_merge_puts_archive_contents_beside_what_is_there(tmp_path: Path, kind: str) -> None:
    """The CUDA binary archive plus its cudart twin unpacked into one install folder."""
    binary = _make(
        kind,
        tmp_path / "bin",
        _links(
            kind,
            [("llama-b1/libggml.so", "libggml.so.0")],
            [("llama-b1/llama-server", (b"#!/bin/sh\n", 0o755)), ("llama-b1/libggml.so.0", b"g")],
        ),
    )
    twin = _make(kind, tmp_path / "cudart", [("libcudart.so.12", b"rt"), ("LICENSE", b"nv")])
    dest = tmp_path / "install"
    assert extract_archive(binary, dest, merge=True) == dest
    assert extract_archive(twin, dest, merge=True) == dest
    assert sorted(p.name for p in dest.iterdir()) == [
        "LICENSE",
        "libcudart.so.12",
        "libggml.so",
        "libggml.so.0",
        "llama-server",
    ]
    assert os.readlink(dest / "libggml.so") == "libggml.so.0"
    assert _is_exec(dest / "llama-server")


@posix_only
def test_merge_never_writes_through_a_link_onto_another_file(tmp_path: Path, kind: str) -> None:
    first = _make(
        kind,
        tmp_path / "a",
        _links(kind, [("top/libcudart.so.12", "libggml.so")], [("top/libggml.so", b"ggml")]),
    )
    second = _make(kind, tmp_path / "b", [("top/libcudart.so.12", b"cudart")])
    dest = tmp_path / "install"
    extract_archive(first, dest, merge=True)
    extract_archive(second, dest, merge=True)
    assert (dest / "libggml.so").read_bytes() == b"ggml"
    assert not (dest / "libcudart.so.12").is_symlink()
    assert (dest / "libcudart.so.12").read_bytes() == b"cudart"


@posix_only
def test_merge_refuses_members_below_a_link_from_an_earlier_archive(
    tmp_path: Path, kind: str
) -> None:
    first = _make(kind, tmp_path / "a", _links(kind, [("top/lib", "sub")], [("top/sub/x", b"A")]))
    second = _make(kind, tmp_path / "b", [("top/first", b"B"), ("top/lib/x", b"B")])
    dest = tmp_path / "install"
    extract_archive(first, dest, merge=True)
    with pytest.raises(ArchiveError, match=r"'top/lib/x'.*below symlink"):
        extract_archive(second, dest, merge=True)
    assert (dest / "sub" / "x").read_bytes() == b"A"
    assert not (dest / "first").exists()  # checked before anything was written


@posix_only
def test_merge_refuses_a_link_planted_outside(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "install"
    dest.mkdir()
    (dest / "out").symlink_to(outside)
    second = _make(kind, tmp_path / "b", [("top/out/x", b"B"), ("top/y", b"B")])
    with pytest.raises(ArchiveError, match="'top/out/x'"):
        extract_archive(second, dest, merge=True)
    assert list(outside.iterdir()) == []
    unrelated = _make(kind, tmp_path / "c", [("top/y", b"C")])
    with pytest.raises(ArchiveError, match=r"'out' -> .*already in the destination.*outside"):
        extract_archive(unrelated, dest, merge=True)
    assert not (dest / "y").exists()


@posix_only
def test_merge_refuses_a_chain_completed_by_a_later_archive(tmp_path: Path, kind: str) -> None:
    chain = [(f"top/{name}", target) for name, target in CHAIN]  # top/ is merged away
    first = _make(kind, tmp_path / "a", _links(kind, chain[:2], [("top/d1/d2/f", b"A")]))
    second = _make(kind, tmp_path / "b", _links(kind, chain[2:], [("top/d1/d2/g", b"B")]))
    dest = tmp_path / "install"
    extract_archive(first, dest, merge=True)
    assert (dest / "d1" / "d2" / "b").resolve() == dest.resolve()
    with pytest.raises(ArchiveError, match=r"'top/d1/d2/c'.*outside"):
        extract_archive(second, dest, merge=True)
    assert not (dest / "d1" / "d2" / "c").is_symlink()
    assert not (dest / "d1" / "d2" / "g").exists()


def test_merge_refuses_a_folder_over_a_file(tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "install"
    extract_archive(_make(kind, tmp_path / "a", [("top/lib", b"file")]), dest, merge=True)
    with pytest.raises(ArchiveError, match=r"'top/lib/x'"):
        extract_archive(_make(kind, tmp_path / "b", [("top/lib/x", b"B")]), dest, merge=True)
    assert (dest / "lib").read_bytes() == b"file"


def _peak_while(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ratio_cap_stops_a_bomb_without_reading_it_into_memory(tmp_path: Path, kind: str) -> None:
    bomb = _make(kind, tmp_path / "bomb", [("top/ok", b"fine"), ("top/zeros", bytes(24 * MiB))])
    assert bomb.stat().st_size * MAX_COMPRESSION_RATIO < 24 * MiB
    dest = tmp_path / "x"

    def refused() -> None:
        with pytest.raises(ArchiveError, match=r"'top/zeros'.*bomb"):
            extract_archive(bomb, dest)

    assert _peak_while(refused) < 4 * MiB
    assert list(dest.iterdir()) == []  # nothing left filling the disk
    root = extract_archive(bomb, tmp_path / "y", max_ratio=100_000)
    assert (root / "zeros").stat().st_size == 24 * MiB


def test_total_cap_counts_real_bytes(tmp_path: Path, kind: str) -> None:
    noise = os.urandom(3 * MiB)  # incompressible: only the total cap can stop it
    archive = _make(kind, tmp_path / "big", [("a", noise[:MiB]), ("b", noise[MiB:])])
    dest = tmp_path / "x"
    with pytest.raises(ArchiveError, match=r"'b'.*2097152 bytes"):
        extract_archive(archive, dest, max_bytes=2 * MiB)
    assert list(dest.iterdir()) == []
    assert MAX_EXTRACT_BYTES >= 4 << 30  # the real releases unpack to a few GB
    extract_archive(archive, tmp_path / "y")
    assert (tmp_path / "y" / "b").read_bytes() == noise[MiB:]


def test_member_count_cap(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_mod, "MAX_MEMBERS", 3)
    archive = _make(kind, tmp_path / "many", [(f"f{i}", b"x") for i in range(4)])
    with pytest.raises(ArchiveError, match=r"'f3'.*more than 3 members"):
        extract_archive(archive, tmp_path / "x")


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


# ----------------------------------------------------------------------------- free space
def test_unpacked_size_is_read_from_the_archives_own_headers(tmp_path: Path) -> None:
    import gzip

    entries = [("top/", {"dir": True}), ("top/a.bin", os.urandom(300_000)), ("top/b", b"x" * 5000)]
    tar = make_tar(tmp_path / "a.tar.gz", entries)
    assert archive_mod.unpacked_size(tar) == len(gzip.decompress(tar.read_bytes()))
    zipped = make_zip(tmp_path / "a.zip", entries[1:])
    assert archive_mod.unpacked_size(zipped) == 305_000
    assert archive_mod.unpacked_size(tmp_path / "missing.tar.gz") is None
    (tmp_path / "x.tar.xz").write_bytes(b"\xfd7zXZ")
    assert archive_mod.unpacked_size(tmp_path / "x.tar.xz") is None


def test_an_archive_that_cannot_fit_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    tar = make_tar(tmp_path / "big.tar.gz", [("top/", {"dir": True}), ("top/w", b"\0" * 2_500_000)])
    real = shutil.disk_usage

    def tight(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1_000_000, 1_000_000)

    monkeypatch.setattr(shutil, "disk_usage", tight)
    dest = tmp_path / "staging"
    with pytest.raises(ArchiveError) as info:
        extract_archive(tar, dest)
    text = str(info.value)
    assert "not enough free space" in text
    assert "it unpacks to 2.5 MB and 1.0 MB is free" in text
    assert "LLAMA_PROC_CACHE_DIR" in text
    assert "\n" not in text
    assert not dest.exists()
