"""The compute check: a tiny model llama-proc writes itself, served, compared with a reference.

The real llama-server must pass it; a server that computes wrong numbers (the real one against
a deliberately corrupted reference, the fake one adding 1.0) or dies with SIGILL must fail it.
Repairs walk down the CPU feature ladder: prebuilt CPU-variant libraries are removed, a source
build is rebuilt with compiler flags. The fakes die with SIGILL by rule (``fake-cpu`` beside the
shim, see fake_llama_server.py), exactly where the real AMX kernels die.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from release_fixtures import make_tar, serve_release, sha256_of, write_variants_toml
from upstream_listings import listing

from llama_proc import cli
from llama_proc.config import Settings
from llama_proc.diagnosis import diagnose
from llama_proc.errors import ComputeCheckError, ManifestError, ProvisionError
from llama_proc.provision import bundle
from llama_proc.provision.cache.layout import INSTALL_JSON, install_dir
from llama_proc.provision.cache.record import COMPUTE_KEY, Install
from llama_proc.provision.compute import check, ladder, plan
from llama_proc.provision.compute.check import (
    GENERATED_TOKENS,
    LOGPROB_TOLERANCE,
    run_compute_check,
)
from llama_proc.provision.compute.quants import QuantType, dequantize_row
from llama_proc.provision.compute.reference import Reference
from llama_proc.provision.compute.tiny_model import make_tiny_model, write_gguf
from llama_proc.provision.fetch import download
from llama_proc.provision.fetch.prebuilt import install_prebuilt
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.manifest import load_manifest, parse_manifest
from llama_proc.provision.resolve import ensure_server
from llama_proc.provision.resolve import plan as resolve_plan

if TYPE_CHECKING:
    from collections.abc import Iterable

    from http_server import FileServer
    from release_fixtures import ReleaseFixture

needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="runs POSIX shell shims"
)
FAKE_SERVER = Path(__file__).parents[1] / "helpers" / "fake_llama_server.py"
TAG = "b11194"
LINUX_CPU = f"llama-{TAG}-bin-ubuntu-x64.tar.gz"
AMX_HOST = HostInfo(
    os="linux",
    arch="x86_64",
    libc="glibc",
    libc_version="2.39",
    cpu_features=frozenset(
        {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "amx_tile"}
    ),
    cpu_count=2,
)
VARIANTS = ("x64", "haswell", "skylakex", "icelake", "sapphirerapids")
"""The CPU-variant libraries a fake portable archive ships (a subset of upstream's)."""


def _shim(path: Path, *, compute: str = "right", mode: str = "ready") -> Path:
    """A llama-server stand-in that runs the fake server with its own folder as the lib dir."""
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "version: 11194 (abcdef0)" >&2; exit 0; fi\n'
        f'exec "{sys.executable}" "{FAKE_SERVER}" --fake-lib-dir "$(dirname "$0")" '
        f'--fake-compute {compute} --mode {mode} "$@"\n',
        encoding="utf-8",
    )
    path.chmod(0o755)
    return path


# ----------------------------------------------------------------------------- the model
def test_tiny_model_is_a_gguf_that_gguf_decodes_exactly_like_the_reference(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model = make_tiny_model()
    reader = GGUFReader(write_gguf(model, tmp_path / "tiny.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.name for t in reader.tensors} == set(model.tensors)
    assert {"F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K"} <= set(model.type_names)
    for tensor in reader.tensors:
        ours = model.tensors[tensor.name]
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        rows = [
            dequantize_row(
                ours.kind, ours.data[r * ours.row_size : (r + 1) * ours.row_size], ours.cols
            )
            for r in range(ours.rows)
        ]
        assert np.array_equal(np.array(rows, dtype=np.float64).reshape(-1), theirs), tensor.name


def test_tiny_model_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    first = write_gguf(make_tiny_model(), tmp_path / "a.gguf").read_bytes()
    assert write_gguf(make_tiny_model(), tmp_path / "b.gguf").read_bytes() == first
    assert write_gguf(make_tiny_model(seed=1), tmp_path / "c.gguf").read_bytes() != first


def test_every_matrix_takes_the_cpu_backends_special_paths() -> None:
    """AMX wants rows that are multiples of 32 and K-quants 256 wide; repack wants 8 rows."""
    for tensor in make_tiny_model().tensors.values():
        if tensor.rows == 1:
            continue
        assert tensor.rows % 32 == 0, tensor.name
        assert tensor.cols % (256 if tensor.kind is QuantType.Q4_K else 32) == 0, tensor.name


# ----------------------------------------------------------------------------- the real server
@pytest.mark.compute_check
def test_the_real_server_computes_like_the_reference(llama_server_bin: Path) -> None:
    report = run_compute_check(llama_server_bin)
    assert report.ok, report.reason
    assert report.max_error is not None
    assert report.max_error <= LOGPROB_TOLERANCE
    assert len(report.tokens) == GENERATED_TOKENS
    assert report.threads >= 1
    assert "CPU_Mapped" in report.buffers or "CPU" in report.buffers
    assert report.cpu_features, "llama-server's system_info line was not read"
    assert report.seconds < 15
    record = report.to_json()
    assert record["ok"] is True
    assert record["tolerance"] == LOGPROB_TOLERANCE


@pytest.mark.compute_check
def test_the_run_install_records_what_is_off_on_this_host(llama_server_bin: Path) -> None:
    """On an AMX host the pinned build computes with AMX off (the manifest knows it is broken)."""
    try:
        install = Install.from_dir(llama_server_bin.parent)
    except ProvisionError:  # an explicit binary outside the cache
        pytest.skip(f"{llama_server_bin} is not a llama-proc install")
    from llama_proc.provision.host.platform import detect_host

    record = install.compute
    assert record is not None
    assert record["ok"] is True
    host_has_amx = "amx_tile" in detect_host(gpu_details=False).cpu_features
    if record.get("first_use"):
        pytest.skip("this install was made before the compute check (checked on first use)")
    assert ("amx" in record["features_off"]) == host_has_amx
    if host_has_amx:
        assert "AMX_INT8" not in record["cpu_features"]
        assert "known broken" in record["why_off"]["amx"]


class _CorruptReference(Reference):
    """The reference with one weight matrix's nibble halves swapped: as if a kernel read the
    packed 4-bit codes in the wrong order. The server is then "wrong" by that much."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        matrix = self._layers[0][0]["ffn_gate"]
        matrix.rows = [
            [v for b in range(0, len(row), 32) for v in row[b + 16 : b + 32] + row[b : b + 16]]
            for row in matrix.rows
        ]


@pytest.mark.compute_check
def test_a_deliberately_wrong_result_is_caught(
    llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check, "Reference", _CorruptReference)
    report = run_compute_check(llama_server_bin)
    assert not report.ok
    assert report.wrong_numbers
    assert report.points_at_cpu
    assert report.max_error is not None
    assert report.max_error > 3 * LOGPROB_TOLERANCE
    assert report.reason.startswith("wrong numbers: log-probability off by")


# ----------------------------------------------------------------------------- fakes
@needs_linux
@pytest.mark.compute_check
@pytest.mark.parametrize(
    ("mode", "says"),
    [("wrong", "wrong numbers: log-probability off by 1.000"), ("nan", "not finite")],
)
def test_a_server_that_computes_wrong_numbers_fails(tmp_path: Path, mode: str, says: str) -> None:
    report = run_compute_check(_shim(tmp_path / "llama-server", compute=mode))
    assert not report.ok
    assert says in report.reason
    assert report.points_at_cpu


@needs_linux
@pytest.mark.compute_check
def test_the_fake_server_passes_by_computing_honestly(tmp_path: Path) -> None:
    report = run_compute_check(_shim(tmp_path / "llama-server"))
    assert report.ok, report.reason
    assert report.max_error is not None
    assert report.max_error < 1e-9


@needs_linux
@pytest.mark.compute_check
def test_sigill_during_warm_up_is_named(tmp_path: Path) -> None:
    (tmp_path / "fake-cpu").write_text("sigill-if-lib sapphirerapids\n")
    (tmp_path / "libggml-cpu-sapphirerapids.so").write_bytes(b"")
    report = run_compute_check(_shim(tmp_path / "llama-server"))
    assert not report.ok
    assert report.signal == "SIGILL"
    assert report.points_at_cpu
    assert "died with SIGILL while loading the model or warming up" in report.reason
    assert any("illegal instruction" in line for line in report.log_tail)


@needs_linux
@pytest.mark.compute_check
def test_a_server_that_never_answers_is_given_up_on_by_the_deadline(tmp_path: Path) -> None:
    import time

    started = time.monotonic()
    report = run_compute_check(
        _shim(tmp_path / "llama-server", mode="hang-after-health"), timeout=4
    )
    assert time.monotonic() - started < 10
    assert not report.ok
    assert not report.points_at_cpu
    assert "while computing (request 1)" in report.reason


def test_a_server_that_does_not_start_is_not_blamed_on_the_cpu(tmp_path: Path) -> None:
    report = run_compute_check(tmp_path / "missing-llama-server")
    assert not report.ok
    assert not report.points_at_cpu
    assert "could not start" in report.reason


# ----------------------------------------------------------------------------- manifest
def test_the_manifest_knows_amx_is_broken_in_the_pinned_build() -> None:
    manifest = load_manifest()
    bad = manifest.known_bad_groups(manifest.build)
    assert set(bad) == {"amx"}
    assert "26954" in bad["amx"]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('group = "sse"\nwhy = "x"', "'sse' is not a CPU feature group"),
        ('group = "amx"', "known_bad_cpu.why: must be a non-empty string"),
        ('group = "amx"\nwhy = "x"\nfirst_fixed = "soon"', "must look like b1234"),
        ('group = "amx"\nwhy = "x"\nbuilds = 3', "unknown key"),
    ],
)
def test_bad_known_bad_entries_name_the_line(entry: str, problem: str) -> None:
    text = (Path(__file__).parents[2] / "variants.toml").read_text(encoding="utf-8")
    text = re.sub(
        r"(?ms)^\[\[known_bad_cpu\]\]\n.*?(?=^\[smoke_model\])",
        f"[[known_bad_cpu]]\n{entry}\n\n",
        text,
    )
    with pytest.raises(ManifestError, match=re.escape(problem)) as info:
        parse_manifest(text, "v.toml")
    assert re.match(r"v\.toml:\d+: ", str(info.value))


def test_first_fixed_limits_a_known_bad_entry() -> None:
    entry = dataclasses.replace(load_manifest().known_bad_cpu[0], first_fixed="b12000")
    assert entry.applies_to("b11434")
    assert not entry.applies_to("b12000")
    assert entry.applies_to("unknown")


# ----------------------------------------------------------------------------- the ladder
def test_the_variant_table_matches_the_pinned_ggml(real_settings: Settings) -> None:
    manifest = load_manifest()
    index = manifest.source.index
    assert index is not None
    stem = re.sub(r"\.(tar\.gz|zip)$", "", index.filename)
    folder = real_settings.cache_dir / "sources" / f"{stem}-{index.sha256[:12]}"
    found = sorted(folder.glob(f"*/{index.subdir}/ggml/src/CMakeLists.txt"))
    if not found:
        pytest.skip(f"the pinned llama.cpp tree is not unpacked in {folder}")
    text = found[0].read_text(encoding="utf-8")
    declared = {
        m.group(1): frozenset(m.group(2).split())
        for m in re.finditer(r"ggml_add_cpu_backend_variant\(([\w.]+)\s*([^)]*)\)", text)
        # Android, Apple, POWER, RISC-V and s390x (z15...) variants are not ours to prune.
        if not re.match(r"(android_|apple_|power|riscv|z\d|tag_name)", m.group(1))
    }
    assert declared == ladder.CPU_VARIANT_FEATURES


def test_host_ladder_skips_what_the_cpu_lacks() -> None:
    names = [g.name for g in ladder.host_ladder("x86_64", {"avx2", "avx512f"})]
    assert names == ["avx512", "avx2"]
    assert [g.name for g in ladder.host_ladder("x86_64", AMX_HOST.cpu_features)] == [
        "amx",
        "avx512ext",
        "avx512",
        "avx2",
    ]
    assert [g.name for g in ladder.host_ladder("aarch64", {"sve", "i8mm"})] == ["sve", "i8mm"]
    assert ladder.host_ladder("riscv64", {"v"}) == ()


def test_every_group_is_in_the_settings_vocabulary() -> None:
    from llama_proc.vocab import CPU_GROUPS

    assert {g.name for lad in ladder.LADDERS.values() for g in lad} == set(CPU_GROUPS)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ((), ["-DCMAKE_C_FLAGS=-mno-a -mno-b", "-DCMAKE_CXX_FLAGS=-mno-a -mno-b"]),
        (
            ("-DX=1", "-DCMAKE_C_FLAGS=-O3"),
            ["-DX=1", "-DCMAKE_C_FLAGS=-O3 -mno-a -mno-b", "-DCMAKE_CXX_FLAGS=-mno-a -mno-b"],
        ),
        (
            ("-DCMAKE_CXX_FLAGS=",),
            ["-DCMAKE_CXX_FLAGS=-mno-a -mno-b", "-DCMAKE_C_FLAGS=-mno-a -mno-b"],
        ),
    ],
)
def test_compiler_flags_join_the_users_own(given: tuple[str, ...], expected: list[str]) -> None:
    assert ladder.with_compiler_flags(given, ["-mno-a", "-mno-b"]) == expected
    assert ladder.with_compiler_flags(given, []) == list(given)


def test_pruning_removes_every_variant_that_uses_a_group(tmp_path: Path) -> None:
    for name in (*VARIANTS, "alderlake", "zen4"):
        (tmp_path / f"libggml-cpu-{name}.so").write_bytes(b"")
    (tmp_path / "libggml-base.so").write_bytes(b"")
    amx = ladder.feature_group("amx")
    assert ladder.prune_cpu_variants(tmp_path, [amx]) == ["libggml-cpu-sapphirerapids.so"]
    removed = ladder.prune_cpu_variants(tmp_path, [amx, ladder.feature_group("avx512")])
    assert sorted(removed) == [
        "libggml-cpu-icelake.so",
        "libggml-cpu-skylakex.so",
        "libggml-cpu-zen4.so",
    ]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "libggml-base.so",
        "libggml-cpu-alderlake.so",
        "libggml-cpu-haswell.so",
        "libggml-cpu-x64.so",
    ]


def test_initial_off_takes_known_bad_and_asked_groups_the_host_has() -> None:
    rungs, off = plan.initial_off(
        "x86_64", AMX_HOST.cpu_features, {"amx": "broken", "sme": "arm only"}, ("avx2",)
    )
    assert [g.name for g in rungs] == ["amx", "avx512ext", "avx512", "avx2"]
    assert off == {"amx": "known broken in this build: broken", "avx2": plan.ASKED}


# ----------------------------------------------------------------------------- prebuilt ladder
def _portable_release(tmp_path: Path, rules: str) -> ReleaseFixture:
    """Upstream's real b11194 listing; its CPU archive holds a shim and CPU-variant libraries."""
    from release_fixtures import ReleaseFixture

    top = f"llama-{TAG}"
    shim = _shim(tmp_path / "shim").read_bytes()
    entries: list[tuple[str, Any]] = [
        (f"{top}/", {"dir": True}),
        (f"{top}/llama-server", (shim, 0o755)),
        (f"{top}/fake-cpu", rules.encode()),
        (f"{top}/libggml-base.so", b"base"),
        *((f"{top}/libggml-cpu-{name}.so", name.encode()) for name in VARIANTS),
    ]
    archive = make_tar(tmp_path / LINUX_CPU, entries)
    root = tmp_path / "release"
    root.mkdir(exist_ok=True)
    doc = listing(TAG)
    assets: dict[str, tuple[Path, str]] = {}
    for entry in doc["assets"]:
        if entry["name"] == LINUX_CPU:
            sha = sha256_of(archive)
            entry["size"], entry["digest"] = archive.stat().st_size, f"sha256:{sha}"
            assets[LINUX_CPU] = (archive, sha)
    listing_path = root / "listing.json"
    listing_path.write_text(json.dumps(doc), encoding="utf-8")
    return ReleaseFixture("ggml-org/llama.cpp", TAG, root, listing_path, doc, assets)


def _manifest_text(tmp_path: Path, release: ReleaseFixture, *, known_bad: bool) -> Path:
    path = write_variants_toml(tmp_path / "variants.toml", release)
    if not known_bad:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(?ms)^\[\[known_bad_cpu\]\]\n.*?(?=^\[smoke_model\])", "", text)
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def mirror_settings(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, progress=False, variant="cpu")


def _prebuilt(
    tmp_path: Path, server: FileServer, settings: Settings, rules: str, *, known_bad: bool
) -> Install:
    release = _portable_release(tmp_path, rules)
    serve_release(server, release)
    manifest = load_manifest(_manifest_text(tmp_path, release, known_bad=known_bad))
    res = resolve_plan(settings, host=AMX_HOST, manifest=manifest)
    return install_prebuilt(res, settings).install


def _libs(install: Install) -> list[str]:
    return sorted(p.name for p in install.server_binary.parent.glob("libggml-cpu-*.so"))


@needs_linux
@pytest.mark.compute_check
def test_prebuilt_without_the_known_bad_variant_installs_at_the_first_try(
    tmp_path: Path, server: FileServer, mirror_settings: Settings
) -> None:
    install = _prebuilt(
        tmp_path, server, mirror_settings, "sigill-if-lib sapphirerapids\n", known_bad=True
    )
    record = install.compute
    assert record is not None
    assert record["ok"] is True
    assert record["features_off"] == ["amx"]
    assert "known broken in this build" in record["why_off"]["amx"]
    assert len(record["attempts"]) == 1
    assert "libggml-cpu-sapphirerapids.so" not in _libs(install)
    assert install.metadata["cpu_variants_removed"] == ["libggml-cpu-sapphirerapids.so"]
    assert install.problems() == []


@needs_linux
@pytest.mark.compute_check
def test_prebuilt_walks_down_the_ladder_until_it_computes(
    tmp_path: Path, server: FileServer, mirror_settings: Settings
) -> None:
    rules = "sigill-if-lib sapphirerapids\nsigill-if-lib icelake\n"
    install = _prebuilt(tmp_path, server, mirror_settings, rules, known_bad=False)
    record = install.compute
    assert record is not None
    assert record["ok"] is True
    assert record["features_off"] == ["amx", "avx512ext"]
    assert record["why_off"]["amx"].startswith("the compute check failed with it on: ")
    assert "SIGILL" in record["why_off"]["avx512ext"]
    assert len(record["attempts"]) == 3
    assert _libs(install) == [
        "libggml-cpu-haswell.so",
        "libggml-cpu-skylakex.so",
        "libggml-cpu-x64.so",
    ]
    assert install.problems() == []  # the file records are taken after the repairs


@needs_linux
@pytest.mark.compute_check
def test_prebuilt_that_never_computes_installs_nothing(
    tmp_path: Path, server: FileServer, mirror_settings: Settings
) -> None:
    with pytest.raises(ComputeCheckError) as info:
        _prebuilt(tmp_path, server, mirror_settings, "sigill-if-lib x64\n", known_bad=True)
    text = str(info.value)
    assert "does not compute correctly on this host" in text
    assert "died with SIGILL" in text
    assert "nothing was installed" in text
    target = install_dir(mirror_settings, TAG, "linux-x86_64-cpu")
    assert not (target / INSTALL_JSON).exists()
    assert not [p for p in target.parent.glob("*") if "staging" in p.name or "incoming" in p.name]


# ----------------------------------------------------------------------------- source ladder
SCRIPT_TREE = {
    "CMakeLists.txt": """\
cmake_minimum_required(VERSION 3.15)
project(fake_llama C)
if (NOT DEFINED LLAMA_BUILD_NUMBER)
    set(LLAMA_BUILD_NUMBER 0)
endif()
add_subdirectory(tools/server)
""",
    # The "server" is a shell shim with this configure's C flags baked in, as a real build
    # bakes them into its machine code.
    "tools/server/CMakeLists.txt": """\
set(TARGET llama-server)
configure_file(server.sh.in ${CMAKE_BINARY_DIR}/bin/llama-server @ONLY
               FILE_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE)
configure_file(fake-cpu ${CMAKE_BINARY_DIR}/bin/fake-cpu COPYONLY)
add_custom_target(${TARGET} ALL)
""",
    "tools/server/server.sh.in": """\
#!/bin/sh
if [ "$1" = "--version" ]; then echo "version: @LLAMA_BUILD_NUMBER@ (abcdef0)" >&2; exit 0; fi
exec "PYTHON" "FAKE" --fake-lib-dir "$(dirname "$0")" --fake-cflags "@CMAKE_C_FLAGS@" "$@"
""",
    "tools/server/fake-cpu": "sigill-unless-flag -mno-amx-tile\n",
}


def _script_tree(root: Path) -> Path:
    for rel, text in SCRIPT_TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            text.replace("PYTHON", sys.executable).replace("FAKE", str(FAKE_SERVER)),
            encoding="utf-8",
        )
    return root


def _build(tmp_path: Path, *, known_bad: bool, cpu_off: Iterable[str] = ()) -> Install:
    from build_fixtures import can_build_c, fake_variant

    from llama_proc.provision.compile.build import build_variant

    if not can_build_c():
        pytest.skip("needs cmake and a C compiler")
    manifest = load_manifest()
    if not known_bad:
        manifest = dataclasses.replace(manifest, known_bad_cpu=())
    settings = Settings(
        cache_dir=tmp_path / "cache",
        build_source=str(_script_tree(tmp_path / "src")),
        progress=False,
        cpu_off=tuple(cpu_off),
    )
    variant = fake_variant("cpu", arch="x86_64")
    return build_variant(variant, settings, source_build="b11434", host=AMX_HOST, manifest=manifest)


@needs_linux
@pytest.mark.compute_check
def test_a_source_build_on_an_amx_host_builds_once_with_amx_off(tmp_path: Path) -> None:
    install = _build(tmp_path, known_bad=True)
    flags = install.metadata["cmake_flags"]
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in flags
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in flags
    assert install.metadata["cpu_off"] == ["amx"]
    record = install.compute
    assert record is not None
    assert record["ok"] is True
    assert len(record["attempts"]) == 1


@needs_linux
@pytest.mark.compute_check
def test_a_source_build_that_dies_is_rebuilt_without_the_feature(tmp_path: Path) -> None:
    install = _build(tmp_path, known_bad=False)
    record = install.compute
    assert record is not None
    assert record["ok"] is True
    assert record["features_off"] == ["amx"]
    assert "died with SIGILL" in record["why_off"]["amx"]
    assert len(record["attempts"]) == 2
    assert install.metadata["cpu_off"] == ["amx"]
    assert any(
        f.startswith("-DCMAKE_C_FLAGS=-mno-amx-tile") for f in install.metadata["cmake_flags"]
    )
    builds = sorted((tmp_path / "cache" / "build").glob("*/CMakeCache.txt"))
    assert len(builds) == 2  # each rung keeps its own build folder


@needs_linux
@pytest.mark.compute_check
def test_asked_groups_are_turned_off_too(tmp_path: Path) -> None:
    install = _build(tmp_path, known_bad=True, cpu_off=("avx512",))
    flags = " ".join(install.metadata["cmake_flags"])
    assert "-mno-amx-tile" in flags
    assert "-mno-avx512f" in flags
    record = install.compute
    assert record is not None
    assert record["features_off"] == ["amx", "avx512"]


# ----------------------------------------------------------------------------- old installs
def _as_shipped(monkeypatch: pytest.MonkeyPatch, manifest_path: Path) -> None:
    """``manifest_path`` as the shipped manifest, on the AMX host."""
    monkeypatch.setattr(
        "llama_proc.provision.manifest._manifest_text",
        lambda: (manifest_path.read_text(), "variants.toml"),
    )
    monkeypatch.setattr("llama_proc.provision.host.platform.detect_host", lambda **_kw: AMX_HOST)


def _plant_old_install(settings: Settings, *, crashes: bool) -> Path:
    """An install as an older llama-proc left it: complete, smoke-checked, no compute record."""
    target = install_dir(settings, TAG, "linux-x86_64-cpu")
    target.mkdir(parents=True)
    _shim(target / "llama-server")
    if crashes:
        (target / "fake-cpu").write_text("sigill-if-lib sapphirerapids\n")
        (target / "libggml-cpu-sapphirerapids.so").write_bytes(b"")
    record = {
        "schema": 1,
        "variant_id": "linux-x86_64-cpu",
        "build": TAG,
        "source": "prebuilt",
        "binaries": {"llama-server": {"path": "llama-server", "sha256": ""}},
        "os": "linux",
        "smoke_check": "ok",
        "version": "version: 11194 (abcdef0)",
    }
    (target / INSTALL_JSON).write_text(json.dumps(record), encoding="utf-8")
    return target


@needs_linux
@pytest.mark.compute_check
def test_an_old_install_is_checked_once_on_first_use(
    tmp_path: Path, mirror_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest_path = _manifest_text(tmp_path, _portable_release(tmp_path, ""), known_bad=True)
    settings = mirror_settings.replace(build=TAG, offline=True)
    _as_shipped(monkeypatch, manifest_path)
    target = _plant_old_install(settings, crashes=False)
    calls: list[Path] = []
    real = check.run_compute_check

    def counting(server: Path, **kw: Any) -> check.ComputeReport:
        calls.append(server)
        return real(server, **kw)

    monkeypatch.setattr(check, "run_compute_check", counting)
    first = ensure_server(settings)
    assert first.path == target
    assert first.compute is not None
    assert first.compute["ok"] is True
    assert first.compute["first_use"] is True
    second = ensure_server(settings)
    assert second.compute == first.compute
    assert len(calls) == 1


@needs_linux
@pytest.mark.compute_check
def test_a_planted_broken_install_is_repaired(
    tmp_path: Path, server: FileServer, mirror_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = _portable_release(tmp_path, "sigill-if-lib sapphirerapids\n")
    serve_release(server, release)
    manifest_path = _manifest_text(tmp_path, release, known_bad=True)
    _as_shipped(monkeypatch, manifest_path)
    settings = mirror_settings.replace(build=TAG)
    target = _plant_old_install(settings, crashes=True)
    explain: list[str] = []
    fixed = ensure_server(settings, explain=explain)
    assert fixed.path == target
    assert fixed.metadata["source"] == "prebuilt"
    assert fixed.compute is not None
    assert fixed.compute["ok"] is True
    assert "libggml-cpu-sapphirerapids.so" not in _libs(fixed)
    said = "\n".join(explain)
    assert "failed the compute check: llama-server died with SIGILL" in said


# ----------------------------------------------------------------------------- remedies
def test_the_illegal_instruction_remedy_names_real_commands() -> None:
    cause = diagnose(["fake: illegal instruction"], returncode=-signal.SIGILL)
    assert cause.kind == "illegal_instruction"
    assert "llama-proc fetch --force" in cause.text
    assert "LLAMA_PROC_CPU_OFF=" in cause.text


@needs_linux
@pytest.mark.compute_check
def test_the_remedy_runs_and_turns_the_group_off(
    tmp_path: Path,
    server: FileServer,
    mirror_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the diagnosis prints, run as written: a forced re-install with a group off."""
    cause = diagnose(["fake: illegal instruction"], returncode=-signal.SIGILL)
    remedy = re.search(r"`(LLAMA_PROC_CPU_OFF=(\w+) (llama-proc fetch --force))`", cause.text)
    assert remedy is not None, cause.text
    release = _portable_release(tmp_path, "")
    serve_release(server, release)
    manifest_path = _manifest_text(tmp_path, release, known_bad=True)
    _as_shipped(monkeypatch, manifest_path)
    monkeypatch.setenv("LLAMA_PROC_CPU_OFF", remedy.group(2))
    monkeypatch.setenv("LLAMA_PROC_MIRROR", server.url)
    monkeypatch.setenv("LLAMA_PROC_BUILD", TAG)
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "cpu")
    argv = remedy.group(3).split()[1:]
    assert cli.main(["-q", *argv]) == 0
    install = Install.from_dir(install_dir(mirror_settings, TAG, "linux-x86_64-cpu"))
    record = install.compute
    assert record is not None
    assert remedy.group(2) in record["features_off"]
    assert record["ok"] is True
    assert json.loads((install.path / INSTALL_JSON).read_text())[COMPUTE_KEY] == record


# ----------------------------------------------------------------------------- GPU builds
@pytest.mark.compute_check
@pytest.mark.parametrize(("gpu", "checked", "layers"), [(True, "ok", 999), (False, "ok", 0)])
def test_a_gpu_build_is_checked_with_every_layer_offloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu: bool, checked: str, layers: int
) -> None:
    from llama_proc.provision.cache import installer

    seen: list[int] = []

    def fake(server: Path, **kw: Any) -> check.ComputeReport:
        seen.append(kw["gpu_layers"])
        return check.ComputeReport(ok=True, reason="ok", seconds=0.0, threads=1)

    monkeypatch.setattr(check, "run_compute_check", fake)
    record, _ = installer._compute_record(
        tmp_path, None, server=lambda: tmp_path / "llama-server", checked=checked, gpu=gpu
    )
    assert seen == [layers]
    assert record["ok"] is True


def test_a_build_checked_against_a_driver_stub_is_not_computed_on(tmp_path: Path) -> None:
    from llama_proc.provision.cache import installer

    stub = "ok against the libcuda stub in /x: this host has no NVIDIA driver"
    record, updates = installer._compute_record(
        tmp_path, None, server=lambda: tmp_path / "llama-server", checked=stub, gpu=False
    )
    assert record == {"ok": None, "reason": f"skipped: {stub}"}
    assert updates == {}
