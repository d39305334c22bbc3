"""A cache that cannot hand out a broken binary.

Every file of an install is recorded in ``install.json`` (path, size, mtime, sha256). A cache
hit compares the cheap facts (stat only) and treats any difference as a broken install that the
resolver re-installs under the lock; ``install.json`` paths that leave the install folder are
refused; ``llama-proc cache verify`` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from http_server import FileServer
from release_fixtures import (
    LINUX,
    ON_LINUX,
    ReleaseFixture,
    make_release,
    needs_linux,
    serve_release,
    write_variants_toml,
)

from llama_proc import cli
from llama_proc.config import Settings
from llama_proc.errors import BinaryNotFoundError, ProvisionError
from llama_proc.provision import bundle
from llama_proc.provision.cache.checkup import verify_installs
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.cache.layout import INSTALL_JSON, install_dir
from llama_proc.provision.cache.record import FILES_KEY, Install, complete_install
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.fetch import download
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server, resolve_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llama_proc.provision.manifest_records import Manifest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims and links")

TAG = "b11434"
CPU = "linux-x86_64-cpu"
HOST_OS = "linux" if ON_LINUX else "macos"
SERVER_SHIM = (
    "#!/bin/sh\n"
    'if [ "$1" = "--version" ]; then echo "version: 11434 (abcdef0)" >&2; exit 0; fi\n'
    "exit 3\n"
)
LIB = "libllama.so.0.0.1"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)

    def no_builds(*_a: Any, **_k: Any) -> Any:
        pytest.fail("these tests must never compile llama.cpp")

    monkeypatch.setattr(build_module, "build_variant", no_builds)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=Path(os.environ["LLAMA_PROC_CACHE_DIR"]), lock_timeout=5.0)


class Populate:
    """Writes a fake llama-server, a library and its symlink chain; counts its calls."""

    def __init__(self, variant: str = CPU, build: str = TAG) -> None:
        self.calls = 0
        self.variant = variant
        self.build = build

    def __call__(self, staging: Path) -> dict[str, Any]:
        self.calls += 1
        (staging / "bin").mkdir()
        server = staging / "bin" / "llama-server"
        server.write_text(SERVER_SHIM)
        server.chmod(0o755)
        (staging / "bin" / LIB).write_bytes(b"\x7fELF fake library " + b"x" * 200)
        (staging / "bin" / "libllama.so.0").symlink_to(LIB)
        (staging / "bin" / "libllama.so").symlink_to("libllama.so.0")
        (staging / "LICENSE").write_text("MIT\n")
        return {"variant_id": self.variant, "build": self.build, "source": "prebuilt"}


def _install(settings: Settings, populate: Populate | None = None, **kw: Any) -> Install:
    populate = populate or Populate()
    return install_atomically(
        install_dir(settings, populate.build, populate.variant),
        populate,
        settings=settings,
        binaries=["llama-server"],
        os_name=HOST_OS,
        **kw,
    )


def _record(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / INSTALL_JSON).read_text())
    return data


def _write_record(path: Path, record: dict[str, Any]) -> None:
    (path / INSTALL_JSON).write_text(json.dumps(record))


def _same_size_edit(path: Path) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    # The kernel stamps times from a coarse clock: a write milliseconds after the install may
    # keep its mtime. A real edit comes later; say so explicitly.
    later = before.st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))


def _restore_times(path: Path, record: dict[str, Any], rel: str) -> None:
    ns = record[FILES_KEY][rel]["mtime_ns"]
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


# ----------------------------------------------------------------------------- the record
def test_install_json_records_every_file(settings: Settings) -> None:
    install = _install(settings)
    files = _record(install.path)[FILES_KEY]
    assert sorted(files) == [
        "LICENSE",
        "bin/libllama.so",
        "bin/libllama.so.0",
        f"bin/{LIB}",
        "bin/llama-server",
    ]
    for rel in ("LICENSE", f"bin/{LIB}", "bin/llama-server"):
        path = install.path / rel
        st = path.stat()
        assert files[rel]["size"] == st.st_size
        assert files[rel]["mtime_ns"] == st.st_mtime_ns
        assert files[rel]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert "link" not in files[rel]
    assert files["bin/libllama.so.0"]["link"] == LIB
    assert files["bin/libllama.so"]["link"] == "libllama.so.0"
    assert "sha256" not in files["bin/libllama.so"]
    assert install.problems() == []


# ----------------------------------------------------------------------------- escaping paths
def _outside_server(tmp_path: Path) -> Path:
    """A runnable llama-server shim in a folder outside any install; returns the folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "llama-server").write_text(SERVER_SHIM)
    (outside / "llama-server").chmod(0o755)
    return outside


@pytest.mark.parametrize(
    "escape",
    [
        pytest.param("../outside/llama-server", id="dotdot"),
        pytest.param("bin/../../outside/llama-server", id="dotdot-inner"),
        pytest.param("{outside}/llama-server", id="absolute"),
        pytest.param("..\\outside\\llama-server", id="windows-dotdot"),
        pytest.param("C:/outside/llama-server", id="windows-drive"),
    ],
)
def test_binary_path_outside_the_install_is_refused(
    settings: Settings, tmp_path: Path, escape: str
) -> None:
    outside = _outside_server(tmp_path)
    install = _install(settings)
    record = _record(install.path)
    record["binaries"]["llama-server"]["path"] = escape.format(outside=outside)
    _write_record(install.path, record)
    with pytest.raises(ProvisionError, match="outside the install folder"):
        Install.from_dir(install.path)
    assert complete_install(install.path) is None
    assert list_installs(settings) == []
    with pytest.raises(BinaryNotFoundError):
        resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    # Repair: installing again replaces the record (the escape is never followed).
    repaired = _install(settings)
    assert repaired.server_binary == install.path / "bin" / "llama-server"


def test_recorded_file_path_outside_the_install_is_refused(settings: Settings) -> None:
    install = _install(settings)
    record = _record(install.path)
    record[FILES_KEY]["../../elsewhere"] = {"size": 1, "mtime_ns": 1}
    _write_record(install.path, record)
    with pytest.raises(ProvisionError, match="outside the install folder"):
        Install.from_dir(install.path)


@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "legacy"])
def test_binary_symlink_resolving_outside_is_refused(
    settings: Settings, tmp_path: Path, legacy: bool
) -> None:
    outside = _outside_server(tmp_path)
    install = _install(settings)
    record = _record(install.path)
    if legacy:
        del record[FILES_KEY]
        _write_record(install.path, record)
    # The folder holding the binary becomes a link that leads out of the install.
    (install.path / "bin").rename(install.path / "bin-real")
    (install.path / "bin").symlink_to(outside)
    found = Install.from_dir(install.path)
    assert next(p.kind for p in found.problems() if p.path == "bin/llama-server") == "outside"
    assert found.missing_files() == ["llama-server"]
    assert complete_install(install.path) is None
    with pytest.raises(BinaryNotFoundError):
        resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)


# ----------------------------------------------------------------------------- damage is noticed
def _truncate_binary(path: Path) -> str:
    (path / "bin" / "llama-server").write_bytes(b"")
    return "bin/llama-server"


def _delete_library(path: Path) -> str:
    (path / "bin" / LIB).unlink()
    return f"bin/{LIB}"


def _delete_link(path: Path) -> str:
    (path / "bin" / "libllama.so.0").unlink()
    return "bin/libllama.so.0"


def _edit_library(path: Path) -> str:
    _same_size_edit(path / "bin" / LIB)
    return f"bin/{LIB}"


def _relink(path: Path) -> str:
    link = path / "bin" / "libllama.so"
    link.unlink()
    link.symlink_to(LIB)
    return "bin/libllama.so"


DAMAGE = [
    pytest.param(_truncate_binary, "size", id="truncated-binary"),
    pytest.param(_delete_library, "missing", id="deleted-so"),
    pytest.param(_delete_link, "missing", id="deleted-link"),
    pytest.param(_edit_library, "mtime", id="same-size-edit"),
    pytest.param(_relink, "size", id="relinked"),
]


@pytest.mark.parametrize(("damage", "kind"), DAMAGE)
def test_damage_is_noticed_and_install_atomically_repairs(
    settings: Settings, caplog: pytest.LogCaptureFixture, damage: Any, kind: str
) -> None:
    populate = Populate()
    first = _install(settings, populate)
    rel = damage(first.path)
    problems = Install.from_dir(first.path).problems()
    assert [(p.path, p.kind) for p in problems] == [(rel, kind)]
    assert complete_install(first.path) is None
    with caplog.at_level(logging.WARNING, logger="llama_proc"):
        again = _install(settings, populate)
    assert populate.calls == 2
    assert again.problems() == []
    assert any(rel in r.getMessage() and "re-installing" in r.getMessage() for r in caplog.records)


def test_legacy_install_is_checked_by_its_binaries_only(settings: Settings) -> None:
    install = _install(settings)
    record = _record(install.path)
    del record[FILES_KEY]
    _write_record(install.path, record)
    (install.path / "bin" / LIB).unlink()  # not recorded, so not noticed
    legacy = Install.from_dir(install.path)
    assert legacy.problems() == []
    assert complete_install(install.path) == legacy
    hit = resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    assert hit.path == install.path
    (install.path / "bin" / "llama-server").unlink()
    assert [(p.path, p.kind) for p in legacy.problems()] == [("bin/llama-server", "missing")]
    assert complete_install(install.path) is None


def test_legacy_built_install_with_a_files_list_stays_usable(settings: Settings) -> None:
    # Source builds have always put the list of copied names under "files".
    install = _install(settings)
    record = _record(install.path)
    del record[FILES_KEY]
    record["files"] = ["llama-server", LIB]
    _write_record(install.path, record)
    assert complete_install(install.path) == Install.from_dir(install.path)
    hit = resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    assert hit.path == install.path


def test_a_cache_hit_only_stats(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    install = _install(settings)

    def no_hashing(path: Path) -> str:
        pytest.fail(f"a cache hit hashed {path}")

    monkeypatch.setattr(download, "file_sha256", no_hashing)
    hit = resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    assert hit == install


# ----------------------------------------------------------------------------- the resolver repairs
@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture
def release(tmp_path: Path, server: FileServer) -> ReleaseFixture:
    fixture = make_release(tmp_path, TAG, ["ubuntu-x64"])
    serve_release(server, fixture)
    return fixture


@pytest.fixture
def manifest(tmp_path: Path, release: ReleaseFixture) -> Manifest:
    return load_manifest(write_variants_toml(tmp_path / "variants.toml", release))


def _lib(install: Install) -> Path:
    return install.path / "libllama.so.0.0.1"


RESOLVER_DAMAGE = [
    pytest.param(lambda i: i.server_binary.write_bytes(b"\x7fEL"), id="truncated-binary"),
    pytest.param(lambda i: _lib(i).unlink(), id="deleted-so"),
    pytest.param(lambda i: (i.path / "libllama.so.0").unlink(), id="deleted-link"),
    pytest.param(lambda i: _same_size_edit(_lib(i)), id="same-size-edit"),
    pytest.param(lambda i: _flip_keeping_times(_lib(i)), id="flipped-bytes-times-kept"),
    pytest.param(
        lambda i: (i.path / "libggml-cpu-planted.so").write_bytes(b"\x7fELF planted"),
        id="planted-library",
    ),
]


def _flip_keeping_times(path: Path) -> None:
    """Flip a byte and put size and mtime back: only the change time (or a hash) tells."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@needs_linux
@pytest.mark.parametrize("damage", RESOLVER_DAMAGE)
def test_resolver_repairs_a_damaged_cache_install(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    damage: Any,
) -> None:
    settings = settings.replace(mirror=server.url, progress=False)
    first = ensure_server(settings, host=LINUX, manifest=manifest)
    assert first.problems() == []
    damage(first)
    with pytest.raises(BinaryNotFoundError, match=r"damaged.*llama-proc fetch"):
        resolve_server(settings, provision=False, host=LINUX, manifest=manifest)
    explain: list[str] = []
    with caplog.at_level(logging.WARNING, logger="llama_proc"):
        repaired = ensure_server(settings, host=LINUX, manifest=manifest, explain=explain)
    assert repaired.path == first.path
    assert repaired.problems() == []
    assert server.hits(release.download_path(release.main_asset)) == 2
    cache_line = next(line for line in explain if line.startswith("cache:"))
    assert "damaged" in cache_line
    assert any("re-installing" in r.getMessage() for r in caplog.records)
    [report] = verify_installs(settings)
    assert report.ok
    hit = resolve_server(settings, provision=False, host=LINUX, manifest=manifest)
    assert hit.path == first.path


def _fetch_then_truncate(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, ReleaseFixture]:
    """This host's cpu prebuilt fetched through the CLI from a local mirror, its binary then
    truncated to nothing; (the binary, the release)."""
    shipped = load_manifest()
    host_release = make_release(tmp_path / "host", shipped.build)
    serve_release(server, host_release)
    code, out, err = _run(capsys, "fetch", "--variant", "cpu", "--mirror", server.url)
    if code != 0 or "prebuilt: installed" not in err:
        pytest.skip(f"no cpu prebuilt for this host: {err}")
    binary = Path(out.strip())
    binary.write_bytes(b"")
    return binary, host_release


@needs_linux
def test_which_and_fetch_do_not_hand_out_a_truncated_binary(
    server: FileServer, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary, host_release = _fetch_then_truncate(server, tmp_path, capsys)
    code, out, err = _run(capsys, "which", "--variant", "cpu")
    assert (code, out) == (1, "")
    assert "damaged" in err
    assert "llama-proc fetch" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = _run(capsys, "fetch", "--variant", "cpu", "--mirror", server.url)
    assert code == 0, err
    assert Path(out.strip()) == binary
    assert binary.stat().st_size > 0
    assert "cache: miss" in err
    assert "damaged" in err
    assert server.hits(host_release.download_path(host_release.main_asset)) == 2
    code, out, err = _run(capsys, "which", "--variant", "cpu")
    assert (code, out, err) == (0, f"{binary}\n", "")


@needs_linux
def test_a_failed_repair_says_the_install_was_damaged(
    server: FileServer, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fetch_then_truncate(server, tmp_path, capsys)
    # The repair cannot be made: the mirror is gone and nothing may be compiled.
    gone = "http://127.0.0.1:9/"
    code, out, err = _run(capsys, "-q", "fetch", "--variant", "cpu", "--mirror", gone, "--no-build")
    assert (code, out) == (1, "")
    [line] = err.strip().splitlines()
    assert line.startswith("llama-proc: error: ")
    assert f"the cached install {load_manifest().build}/" in line
    assert "was damaged and was not repaired" in line


# ----------------------------------------------------------------------------- llama-proc cache verify
def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cache_verify_reports_ok_and_exits_zero(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "cache", "verify")
    assert (code, out) == (0, "")
    assert err.startswith("no installs in ")
    _install(settings)
    _install(settings, Populate(build="b100"))
    code, out, err = _run(capsys, "cache", "verify")
    assert code == 0, err
    assert out.splitlines() == [
        f"{TAG}/{CPU}: OK (5 files)",
        f"b100/{CPU}: OK (5 files)",
    ]


def test_cache_verify_and_a_cache_hit_agree(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    install = _install(settings)
    healthy = _install(settings, Populate(build="b100"))
    record = _record(install.path)
    lib = install.path / "bin" / LIB
    # Same size and the old mtime: the change time moved, so a cache hit re-hashes it too.
    _same_size_edit(lib)
    _restore_times(lib, record, f"bin/{LIB}")
    assert [(p.path, p.kind) for p in install.problems()] == [(f"bin/{LIB}", "sha256")]
    (install.path / "bin" / "libggml-extra.so").write_bytes(b"planted")
    assert {(p.path, p.kind) for p in install.problems()} == {
        (f"bin/{LIB}", "sha256"),
        ("bin/libggml-extra.so", "extra"),
    }
    code, out, err = _run(capsys, "cache", "verify")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"{TAG}/{CPU}: BROKEN"
    assert f"  bin/{LIB}: content differs from install.json (sha256)" in lines
    assert "  bin/libggml-extra.so: not part of the install" in lines
    assert f"{healthy.id}: OK (5 files)" in lines
    assert "1 broken install" in err
    assert "llama-proc fetch --force" in err
    assert f"llama-proc cache rm {TAG}/{CPU}" in err

    code, out, _ = _run(capsys, "cache", "verify", "--json")
    assert code == 1
    reports = {r["id"]: r for r in json.loads(out)}
    broken = reports[f"{TAG}/{CPU}"]
    assert broken["ok"] is False
    assert broken["path"] == str(install.path)
    assert {(p["path"], p["kind"]) for p in broken["problems"]} == {
        (f"bin/{LIB}", "sha256"),
        ("bin/libggml-extra.so", "extra"),
    }
    assert all(p["message"] for p in broken["problems"])
    assert reports[healthy.id]["ok"] is True
    assert reports[healthy.id]["problems"] == []


def test_a_file_whose_change_time_moved_is_rehashed_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy or a chmod moves the change time: the file is re-hashed, found intact, and its
    record renewed, so the next use only stats again."""
    install = _install(settings)
    lib = install.path / "bin" / LIB
    lib.chmod(0o644)  # same mode: only the change time moves
    rehashed: list[str] = []
    assert install.problems(rehashed) == []
    assert rehashed == [f"bin/{LIB}"]
    hit = resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    assert hit.problems() == []

    def no_hashing(path: Path) -> str:
        pytest.fail(f"a renewed record re-hashed {path}")

    monkeypatch.setattr(download, "file_sha256", no_hashing)
    again = resolve_server(settings.replace(variant="cpu"), provision=False, host=LINUX)
    assert again.problems() == []


def test_verify_names_links_left_dangling(settings: Settings) -> None:
    install = _install(settings)
    (install.path / "bin" / LIB).unlink()
    [report] = verify_installs(settings)
    assert not report.ok
    assert [(p.path, p.kind) for p in report.problems] == [
        (f"bin/{LIB}", "missing"),
        ("bin/libllama.so", "dangling"),
        ("bin/libllama.so.0", "dangling"),
    ]
    assert str(report.problems[2]) == f"bin/libllama.so.0: symlink to {LIB!r} leads nowhere"


def test_cache_verify_reports_unreadable_and_escaping_records(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    install = _install(settings)
    record = _record(install.path)
    record["binaries"]["llama-server"]["path"] = "../../../../bin/sh"
    _write_record(install.path, record)
    code, out, err = _run(capsys, "cache", "verify")
    assert code == 1
    assert out.startswith(f"{TAG}/{CPU}: BROKEN\n  install.json: ")
    assert "outside the install folder" in out
    assert "llama-proc cache rm" in err


def test_cache_verify_legacy_install(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    install = _install(settings)
    record = _record(install.path)
    del record[FILES_KEY]
    _write_record(install.path, record)
    code, out, _ = _run(capsys, "cache", "verify")
    assert code == 0
    assert out == f"{TAG}/{CPU}: OK (no file records: made by an older llama-proc; binaries only)\n"
    install.server_binary.write_bytes(b"")
    code, out, _ = _run(capsys, "cache", "verify")
    assert code == 1
    assert out.splitlines() == [
        f"{TAG}/{CPU}: BROKEN",
        "  bin/llama-server: content differs from install.json (sha256)",
    ]


def test_cache_verify_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["cache", "verify", "--bogus"])
    assert info.value.code == 2


@needs_linux
def test_install_json_records_where_the_bytes_finally_came_from(
    server: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    settings = settings.replace(mirror=server.url, progress=False)
    asset = release.main_asset
    path, _sha = release.assets[asset]
    original = release.download_path(asset)
    server.add(original, b"", redirect=f"/moved/{asset}")
    server.add(f"/moved/{asset}", path)
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    record = _record(install.path)
    assert record["url"].endswith(original)
    assert record["final_url"] == server.url_for(f"/moved/{asset}")
    assert record["final_urls"][asset] == record["final_url"]
