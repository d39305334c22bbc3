"""variants.toml: the shipped manifest, schema errors with key and line, variant selection."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from upstream_listings import B11434_NAMES

from llama_proc.errors import ManifestError, NoMatchingVariantError
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.host.selection import prebuilt_blockers, select_variant
from llama_proc.provision.manifest import load_manifest, parse_manifest

if TYPE_CHECKING:
    from llama_proc.provision.manifest_records import Manifest

REPO_MANIFEST = Path(__file__).resolve().parents[1] / "variants.toml"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest()


# ----------------------------------------------------------------------------- shipped manifest
def test_shipped_manifest_parses(manifest: Manifest) -> None:
    assert manifest.schema == 1
    assert manifest.repo == "ggml-org/llama.cpp"
    assert re.fullmatch(r"b[0-9]+", manifest.build)
    assert manifest.source.index is not None
    assert manifest.source.index.build == manifest.build
    assert len(manifest.source.index.sha256) == 64
    assert manifest.smoke_model is not None
    assert manifest.smoke_model.member.endswith(".gguf")
    assert load_manifest(REPO_MANIFEST) == manifest


EXPECTED = {
    ("linux", "x86_64"): {"cpu", "cuda", "rocm", "vulkan", "rpc"},
    ("linux", "aarch64"): {"cpu", "cuda", "vulkan", "rpc"},
    ("macos", "arm64"): {"metal", "cpu", "rpc"},
    ("macos", "x86_64"): {"cpu", "rpc"},
    ("windows", "x86_64"): {"cpu", "cuda", "rocm", "vulkan", "rpc"},
    ("windows", "arm64"): {"cpu", "vulkan", "rpc"},
}


def test_every_platform_and_backend_is_present(manifest: Manifest) -> None:
    found: dict[tuple[str, str], set[str]] = {}
    for v in manifest.variants:
        found.setdefault((v.os, v.arch), set()).add(v.backend)
        base = f"{v.os}-{v.arch}-{v.backend}"
        # CUDA 12 and 13 builds are separate variants: the newer one carries its major version.
        assert v.id == base or (v.backend == "cuda" and v.id == f"{base}13"), v.id
        if v.id.endswith("cuda13"):
            assert (v.requires.cuda or "").startswith("13."), v.id
        assert v.binaries[0] == "llama-server"
        assert v.cmake_flags, f"{v.id} cannot be built from source"
    assert found == EXPECTED
    for v in manifest.variants:
        if v.backend == "rpc":
            assert "ggml-rpc-server|rpc-server" in v.binaries
            assert "-DGGML_RPC=ON" in v.cmake_flags


B = "b11434"


@pytest.mark.parametrize(
    ("variant_id", "asset"),
    [
        ("linux-x86_64-cpu", f"llama-{B}-bin-ubuntu-x64.tar.gz"),
        ("linux-x86_64-rpc", f"llama-{B}-bin-ubuntu-x64.tar.gz"),
        ("linux-x86_64-vulkan", f"llama-{B}-bin-ubuntu-vulkan-x64.tar.gz"),
        ("linux-x86_64-cuda", f"llama-{B}-bin-ubuntu-cuda-12.8-x64.tar.gz"),
        ("linux-x86_64-cuda13", f"llama-{B}-bin-ubuntu-cuda-13.4-x64.tar.gz"),
        ("linux-x86_64-rocm", f"llama-{B}-bin-ubuntu-rocm-10.0-x64.tar.gz"),
        ("linux-aarch64-cuda13", f"llama-{B}-bin-ubuntu-cuda-13.4-arm64.tar.gz"),
        ("linux-aarch64-vulkan", f"llama-{B}-bin-ubuntu-vulkan-arm64.tar.gz"),
        ("linux-aarch64-cpu", f"llama-{B}-bin-ubuntu-arm64.tar.gz"),
        ("macos-arm64-metal", f"llama-{B}-bin-macos-arm64.tar.gz"),
        ("macos-x86_64-cpu", f"llama-{B}-bin-macos-x64.tar.gz"),
        ("windows-x86_64-cpu", f"llama-{B}-bin-win-cpu-x64.zip"),
        ("windows-x86_64-vulkan", f"llama-{B}-bin-win-vulkan-x64.zip"),
        ("windows-x86_64-cuda", f"llama-{B}-bin-win-cuda-12.4-x64.zip"),
        ("windows-x86_64-cuda13", f"llama-{B}-bin-win-cuda-13.4-x64.zip"),
        ("windows-x86_64-rocm", f"llama-{B}-bin-win-rocm-10.0-x64.zip"),
        ("windows-arm64-cpu", f"llama-{B}-bin-win-cpu-arm64.zip"),
    ],
)
def test_asset_patterns_match_upstream_names(
    manifest: Manifest, variant_id: str, asset: str
) -> None:
    assert manifest.get(variant_id).asset_regex(B).search(asset)


# The pinned build's real archive names (its release-publish.yml), twins and all.
UPSTREAM_ASSETS = B11434_NAMES


def test_each_pattern_matches_exactly_one_upstream_asset(manifest: Manifest) -> None:
    for v in manifest.variants:
        if not v.has_prebuilt:
            continue
        for pattern in (v.asset_regex(B), *v.extra_asset_regexes(B)):
            hits = [a for a in UPSTREAM_ASSETS if pattern.search(a)]
            assert len(hits) == 1, f"{v.id}: {pattern.pattern} matches {hits}"


def test_windows_cuda_brings_its_runtime(manifest: Manifest) -> None:
    v = manifest.get("windows-x86_64-cuda")
    [extra] = v.extra_asset_regexes(B)
    assert extra.search("cudart-llama-bin-win-cuda-12.4-x64.zip")
    assert not v.asset_regex(B).search("cudart-llama-bin-win-cuda-12.4-x64.zip")


def test_unknown_variant_id(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match="linux-x86_64-cpu"):
        manifest.get("linux-riscv64-cpu")


# ----------------------------------------------------------------------------- schema errors
GOOD = """\
schema = 1

[llama_cpp]
repo = "ggml-org/llama.cpp"
build = "b100"

[source]
release_url = "https://example/{build}.tar.gz"

[[variant]]
id = "linux-x86_64-cpu"
os = "linux"
arch = "x86_64"
backend = "cpu"
asset = '^llama-{build}-bin-ubuntu-x64\\.tar\\.gz$'
binaries = ["llama-server"]
requires = { glibc = "2.35" }
cmake_flags = ["-DGGML_NATIVE=ON"]

[[variant]]
id = "linux-x86_64-rpc"
os = "linux"
arch = "x86_64"
backend = "rpc"
binaries = ["llama-server", "ggml-rpc-server|rpc-server"]
cmake_flags = ["-DGGML_RPC=ON"]
"""


def _line(text: str, needle: str, nth: int = 0) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    return hits[nth]


def test_good_manifest() -> None:
    m = parse_manifest(GOOD, "good.toml")
    assert [v.id for v in m.variants] == ["linux-x86_64-cpu", "linux-x86_64-rpc"]
    assert m.variants[1].line == _line(GOOD, 'id = "linux-x86_64-rpc"')
    assert not m.variants[1].has_prebuilt
    assert m.variants[0].portable_cmake_flags == m.variants[0].cmake_flags
    assert m.variants[0].targets == ("llama-server",)


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        pytest.param("schema = 1", "schema = 2", "schema", None, id="schema"),
        pytest.param('build = "b100"', 'build = "latest"', "llama_cpp.build", 'build = "latest"',
                     id="build-tag"),
        pytest.param('os = "linux"\narch = "x86_64"\nbackend = "rpc"',
                     'os = "haiku"\narch = "x86_64"\nbackend = "rpc"',
                     "variant 'linux-x86_64-rpc'.os", 'os = "haiku"', id="os"),
        pytest.param('backend = "cpu"', 'backend = "tpu"', "variant 'linux-x86_64-cpu'.backend",
                     'backend = "tpu"', id="backend"),
        pytest.param('requires = { glibc = "2.35" }', 'requires = { glibc = "new" }',
                     "variant 'linux-x86_64-cpu'.requires.glibc", "requires =", id="version"),
        pytest.param('requires = { glibc = "2.35" }', 'requires = { gpu = true }',
                     "variant 'linux-x86_64-cpu'.requires.gpu", "requires =", id="requirement"),
        pytest.param('cmake_flags = ["-DGGML_RPC=ON"]', 'cmake_flags = ["GGML_RPC=ON"]',
                     "variant 'linux-x86_64-rpc'.cmake_flags", 'cmake_flags = ["GGML_RPC', id="flag"),
        pytest.param('binaries = ["llama-server"]', 'binaries = ["llama-cli"]',
                     "variant 'linux-x86_64-cpu'.binaries", 'binaries = ["llama-cli"]',
                     id="binaries"),
        pytest.param("asset = '^llama-{build}-bin-ubuntu-x64\\.tar\\.gz$'", "asset = '^llama-(['",
                     "variant 'linux-x86_64-cpu'.asset", "asset = '^llama-(['", id="regex"),
        pytest.param('id = "linux-x86_64-rpc"', 'id = "linux-x86_64-cpu"',
                     "variant 'linux-x86_64-cpu'.id", 'id = "linux-x86_64-cpu"', id="duplicate"),
        pytest.param('binaries = ["llama-server", "ggml', 'colour = "red"\nbinaries = ["llama-server", "ggml',
                     "variant[1].colour", 'colour = "red"', id="unknown-key"),
        pytest.param("[[variant]]\nid = \"linux-x86_64-rpc\"", "[[variant]]\nid = \"Linux Rpc\"",
                     "variant 'Linux Rpc'.id", 'id = "Linux Rpc"', id="id-chars"),
    ],
)  # fmt: skip
def test_bad_manifest_names_key_and_line(old: str, new: str, key: str, needle: str | None) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "bad.toml")
    message = str(info.value)
    assert key in message
    if needle is not None:
        nth = 1 if key.endswith(".id") and "duplicate" in message else 0
        line = _line(text, needle, nth)
        assert message.startswith(f"bad.toml:{line}: "), message
    else:
        assert message.startswith("bad.toml")


def test_invalid_toml_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="not valid TOML"):
        parse_manifest("schema = = 1", "broken.toml")


def test_no_variants() -> None:
    text = GOOD.split("[[variant]]", maxsplit=1)[0]
    with pytest.raises(ManifestError, match="no \\[\\[variant\\]\\]"):
        parse_manifest(text, "x.toml")


def test_missing_file() -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest("/nonexistent/variants.toml")


# ----------------------------------------------------------------------------- selection
X86 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
LINUX = HostInfo(os="linux", arch="x86_64", libc="glibc", libc_version="2.39", cpu_features=X86)
# A CUDA 12.8 driver: the 12.8 build runs, the 13.4 one does not.
NVIDIA = {"nvidia_driver": "570.133.07", "cuda_version": "12.8"}


def _host(base: HostInfo = LINUX, /, **changes: Any) -> HostInfo:
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("host", "requested", "variant", "blockers"),
    [
        pytest.param(LINUX, "auto", "linux-x86_64-cpu", [], id="linux-cpu"),
        pytest.param(_host(**NVIDIA), "auto", "linux-x86_64-cuda", [], id="linux-nvidia"),
        pytest.param(_host(libc_version="2.35", **NVIDIA), "auto", "linux-x86_64-cuda",
                     ["glibc >= 2.39"], id="nvidia-ubuntu22-needs-build"),
        pytest.param(_host(libc_version="2.31"), "auto", "linux-x86_64-cpu",
                     ["glibc >= 2.35; this host has 2.31"], id="old-glibc"),
        pytest.param(_host(libc="musl", libc_version="1.2.4"), "auto", "linux-x86_64-cpu",
                     ["needs glibc; this host has musl"], id="musl"),
        pytest.param(LINUX, "rpc", "linux-x86_64-rpc", [], id="rpc-requested"),
        pytest.param(LINUX, "vulkan", "linux-x86_64-vulkan", ["no Vulkan loader"],
                     id="vulkan-without-loader"),
        pytest.param(_host(vulkan=True), "vulkan", "linux-x86_64-vulkan", [], id="vulkan"),
        pytest.param(_host(arch="aarch64", cpu_features=frozenset({"neon", "dotprod"})), "auto",
                     "linux-aarch64-cpu", [], id="linux-arm64"),
        pytest.param(_host(arch="aarch64", cpu_features=frozenset()), "auto", "linux-aarch64-cpu",
                     ["CPU features neon"], id="arm64-without-neon"),
        pytest.param(_host(arch="aarch64", **NVIDIA), "auto", "linux-aarch64-cuda",
                     ["no prebuilt archive"], id="jetson-builds"),
        pytest.param(HostInfo(os="macos", arch="arm64", os_version="14.4", apple_silicon=True),
                     "auto", "macos-arm64-metal", [], id="macos-arm64"),
        pytest.param(HostInfo(os="macos", arch="arm64", os_version="12.6", apple_silicon=True),
                     "auto", "macos-arm64-metal", ["macOS >= 13.3"], id="old-macos"),
        pytest.param(HostInfo(os="macos", arch="x86_64", os_version="13.6", cpu_features=X86),
                     "auto", "macos-x86_64-cpu", [], id="intel-mac"),
        pytest.param(HostInfo(os="windows", arch="x86_64", cpu_features=X86), "auto",
                     "windows-x86_64-cpu", [], id="windows"),
        pytest.param(HostInfo(os="windows", arch="x86_64", cpu_features=X86,
                              nvidia_driver="551.61", cuda_version="12.4"),
                     "auto", "windows-x86_64-cuda", [], id="windows-nvidia"),
    ],
)  # fmt: skip
def test_select_variant(
    manifest: Manifest, host: HostInfo, requested: str, variant: str, blockers: list[str]
) -> None:
    selection = select_variant(manifest, host, requested)
    assert selection.variant.id == variant
    assert selection.why[0] == f"host: {host.summary()}"
    assert len(selection.blockers) == len(blockers)
    for want, got in zip(blockers, selection.blockers, strict=True):
        assert want in got
    assert selection.prebuilt_ok is (not blockers)


def test_old_nvidia_driver_falls_back_to_cpu(manifest: Manifest) -> None:
    selection = select_variant(manifest, _host(nvidia_driver="470.223.02", cuda_version="11.4"))
    assert selection.variant.id == "linux-x86_64-cpu"
    assert any("older than the 525.60.13" in line for line in selection.why)


def test_windows_driver_too_old_for_the_cuda_build(manifest: Manifest) -> None:
    host = HostInfo(
        os="windows", arch="x86_64", nvidia_driver="531.14", cuda_version="12.1", cpu_features=X86
    )
    selection = select_variant(manifest, host)
    assert selection.variant.id == "windows-x86_64-cpu"
    assert any("CUDA 12.1; the build needs 12.4" in line for line in selection.why)


def test_rosetta_python_gets_the_native_arm64_server(manifest: Manifest) -> None:
    host = HostInfo(os="macos", arch="x86_64", os_version="14.4", apple_silicon=True, rosetta=True)
    selection = select_variant(manifest, host)
    assert selection.variant.id == "macos-arm64-metal"
    assert selection.prebuilt_ok
    assert any("Rosetta" in line for line in selection.why)


@pytest.mark.parametrize(
    ("host", "requested", "match"),
    [
        pytest.param(HostInfo(os="freebsd", arch="x86_64"), "auto", "freebsd-x86_64",
                     id="unknown-platform"),
        pytest.param(LINUX, "metal", "no metal variant for linux-x86_64", id="metal-on-linux"),
    ],
)  # fmt: skip
def test_nothing_fits(manifest: Manifest, host: HostInfo, requested: str, match: str) -> None:
    with pytest.raises(NoMatchingVariantError, match=match):
        select_variant(manifest, host, requested)


def test_requested_cuda_without_driver_warns(manifest: Manifest) -> None:
    selection = select_variant(manifest, LINUX, "cuda")
    assert selection.variant.id == "linux-x86_64-cuda"
    assert any(line.startswith("warning: no NVIDIA driver") for line in selection.why)
    assert any("no NVIDIA driver" in b for b in prebuilt_blockers(selection.variant, LINUX))


# ----------------------------------------------------------------------------- twins and pins
CUDA = """
[[variant]]
id = "linux-x86_64-cuda"
os = "linux"
arch = "x86_64"
backend = "cuda"
asset = '^llama-{build}-bin-ubuntu-cuda-12\\.8-x64\\.tar\\.gz$'
extra_assets = ['^cudart-llama-{build}-bin-ubuntu-cuda-12\\.8-x64\\.tar\\.gz$']
binaries = ["llama-server"]
cmake_flags = ["-DGGML_CUDA=ON"]
"""
ROCM = """
[[variant]]
id = "linux-x86_64-rocm"
os = "linux"
arch = "x86_64"
backend = "rocm"
asset = '^llama-{build}-bin-ubuntu-rocm-10\\.0-x64\\.tar\\.gz$'
binaries = ["llama-server"]
requires = { glibc = "2.39", hip_runtime = true, gfx_targets = ["gfx1100", "gfx90a"] }
cmake_flags = ["-DGGML_HIP=ON"]
"""


def test_twin_gfx_and_size_pins_parse() -> None:
    text = GOOD.replace(
        'id = "linux-x86_64-cpu"\n',
        'id = "linux-x86_64-cpu"\nsize = { "llama-b100-bin-ubuntu-x64.tar.gz" = 17014362 }\n',
    )
    m = parse_manifest(text + CUDA + ROCM, "twins.toml")
    assert m.get("linux-x86_64-cpu").size == {"llama-b100-bin-ubuntu-x64.tar.gz": 17014362}
    cuda = m.get("linux-x86_64-cuda")
    assert cuda.extra_assets == (r"^cudart-llama-{build}-bin-ubuntu-cuda-12\.8-x64\.tar\.gz$",)
    rocm = m.get("linux-x86_64-rocm").requires
    assert (rocm.gfx_targets, rocm.hip_runtime) == (("gfx1100", "gfx90a"), True)


@pytest.mark.parametrize(
    ("extra", "old", "new", "key"),
    [
        pytest.param(CUDA, "extra_assets = [", "# extra_assets = [",
                     "variant 'linux-x86_64-cuda'.extra_assets", id="cuda-without-twin"),
        pytest.param(ROCM, ', gfx_targets = ["gfx1100", "gfx90a"]', "",
                     "variant 'linux-x86_64-rocm'.requires", id="rocm-without-gfx"),
        pytest.param(ROCM, '"gfx90a"', '"vega"', "variant 'linux-x86_64-rocm'.requires.gfx_targets",
                     id="bad-gfx"),
        pytest.param(CUDA, 'binaries = ["llama-server"]',
                     'size = { "a.tar.gz" = -1 }\nbinaries = ["llama-server"]',
                     "variant 'linux-x86_64-cuda'.size", id="bad-size"),
    ],
)  # fmt: skip
def test_twin_and_gpu_schema_errors(extra: str, old: str, new: str, key: str) -> None:
    assert old in extra
    with pytest.raises(ManifestError) as info:
        parse_manifest(GOOD + extra.replace(old, new, 1), "bad.toml")
    assert key in str(info.value)
    assert str(info.value).startswith("bad.toml:")


def test_cuda_twin_message_says_why(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match=r"cudart- twin.*cannot load"):
        parse_manifest(GOOD + CUDA.replace("extra_assets = [", "# extra_assets = ["), "x.toml")
