"""The manifest against upstream's real releases: real listings, real hosts, real release.yml.

The listings are the ones recorded in UPSTREAM-RELEASES.md (tests/helpers/upstream_listings.py),
in the API's order (runtime twins first). Every prebuilt variant must pick exactly its archives
from them, and the host chain must land on the right ones. When the pinned source tree is in
the user cache, its own release workflow is checked against the manifest too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import pytest
from upstream_listings import B11194, assets, listing

from llama_proc.errors import ManifestError, NoMatchingVariantError
from llama_proc.provision.fetch.listing import match_assets, parse_listing
from llama_proc.provision.host.host_info import HostInfo
from llama_proc.provision.host.selection import BlockerKind, select_variant
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.manifest_records import AssetRole, Manifest, Variant

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.config import Settings

B = "b11194"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest()


def _names(variant: Variant, tag: str, **kw: Any) -> list[str]:
    return [m.name for m in variant.assets(tag, assets(tag, **kw))]


def _cuda(tag: str, ver: str, arch: str) -> list[str]:
    return [f"llama-{tag}-bin-ubuntu-cuda-{ver}-{arch}.tar.gz",
            f"cudart-llama-{tag}-bin-ubuntu-cuda-{ver}-{arch}.tar.gz"]  # fmt: skip


def _win_cuda(tag: str, ver: str) -> list[str]:
    return [f"llama-{tag}-bin-win-cuda-{ver}-x64.zip", f"cudart-llama-bin-win-cuda-{ver}-x64.zip"]


EXPECTED_B11194: dict[str, list[str] | None] = {
    "linux-x86_64-cpu": [f"llama-{B}-bin-ubuntu-x64.tar.gz"],
    "linux-x86_64-cuda13": _cuda(B, "13.4", "x64"),
    "linux-x86_64-cuda": _cuda(B, "12.8", "x64"),
    "linux-x86_64-rocm": [f"llama-{B}-bin-ubuntu-rocm-10.0-x64.tar.gz"],
    "linux-x86_64-vulkan": [f"llama-{B}-bin-ubuntu-vulkan-x64.tar.gz"],
    "linux-x86_64-rpc": [f"llama-{B}-bin-ubuntu-x64.tar.gz"],
    "linux-aarch64-cpu": [f"llama-{B}-bin-ubuntu-arm64.tar.gz"],
    "linux-aarch64-cuda13": _cuda(B, "13.4", "arm64"),
    "linux-aarch64-vulkan": [f"llama-{B}-bin-ubuntu-vulkan-arm64.tar.gz"],
    "linux-aarch64-rpc": [f"llama-{B}-bin-ubuntu-arm64.tar.gz"],
    "macos-arm64-metal": [f"llama-{B}-bin-macos-arm64.tar.gz"],
    "macos-arm64-cpu": [f"llama-{B}-bin-macos-arm64.tar.gz"],
    "macos-arm64-rpc": [f"llama-{B}-bin-macos-arm64.tar.gz"],
    "macos-x86_64-cpu": [f"llama-{B}-bin-macos-x64.tar.gz"],
    "macos-x86_64-rpc": [f"llama-{B}-bin-macos-x64.tar.gz"],
    "windows-x86_64-cpu": [f"llama-{B}-bin-win-cpu-x64.zip"],
    "windows-x86_64-cuda13": _win_cuda(B, "13.4"),
    "windows-x86_64-cuda": _win_cuda(B, "12.4"),
    "windows-x86_64-rocm": [f"llama-{B}-bin-win-rocm-10.0-x64.zip"],
    "windows-x86_64-vulkan": [f"llama-{B}-bin-win-vulkan-x64.zip"],
    "windows-x86_64-rpc": [f"llama-{B}-bin-win-cpu-x64.zip"],
    "windows-arm64-cpu": [f"llama-{B}-bin-win-cpu-arm64.zip"],
    "windows-arm64-rpc": [f"llama-{B}-bin-win-cpu-arm64.zip"],
    "windows-arm64-vulkan": None,  # first published after b11194
}


# ----------------------------------------------------------------------------- the listings
def test_fixture_is_in_api_order_with_twins_first() -> None:
    names = [a.name for a in assets(B)]
    assert names[:5] == sorted(n for n in B11194 if n.startswith("cudart-"))
    assert len(names) == len(B11194) == 21


def test_every_prebuilt_variant_is_in_the_contract(manifest: Manifest) -> None:
    assert {v.id for v in manifest.variants if v.has_prebuilt} == set(EXPECTED_B11194)


@pytest.mark.parametrize(("variant_id", "expected"), list(EXPECTED_B11194.items()))
def test_b11194_picks_exactly_the_right_archives(
    manifest: Manifest, variant_id: str, expected: list[str] | None
) -> None:
    variant = manifest.get(variant_id)
    if expected is None:
        with pytest.raises(NoMatchingVariantError, match="the release has"):
            variant.assets(B, assets(B))
        return
    matches = variant.assets(B, assets(B))
    assert [m.name for m in matches] == expected
    assert [m.role for m in matches] == [AssetRole.BINARY] + [AssetRole.RUNTIME] * (
        len(expected) - 1
    )
    for m in matches:
        assert (m.asset.size, m.asset.sha256) == B11194[m.name]
        assert not m.name.startswith("cudart-") or m.role is AssetRole.RUNTIME


def test_every_cuda_prebuilt_brings_its_twin(manifest: Manifest) -> None:
    cuda = [v for v in manifest.variants if v.backend == "cuda" and v.has_prebuilt]
    assert {v.id for v in cuda} == {
        "linux-x86_64-cuda13", "linux-x86_64-cuda", "linux-aarch64-cuda13",
        "windows-x86_64-cuda13", "windows-x86_64-cuda",
    }  # fmt: skip
    for variant in cuda:
        binary, twin = variant.assets(B, assets(B))
        assert twin.name == "cudart-" + binary.name.replace(f"-{B}-", "-" if "win" in binary.name
                                                            else f"-{B}-")  # fmt: skip
        assert not variant.asset_regex(B).search(twin.name)


@pytest.mark.parametrize(
    ("variant_id", "twin"),
    [
        ("linux-x86_64-cuda", f"cudart-llama-{B}-bin-ubuntu-cuda-12.8-x64.tar.gz"),
        ("linux-x86_64-cuda13", f"cudart-llama-{B}-bin-ubuntu-cuda-13.4-x64.tar.gz"),
        ("linux-aarch64-cuda13", f"cudart-llama-{B}-bin-ubuntu-cuda-13.4-arm64.tar.gz"),
        ("windows-x86_64-cuda", "cudart-llama-bin-win-cuda-12.4-x64.zip"),
        ("windows-x86_64-cuda13", "cudart-llama-bin-win-cuda-13.4-x64.zip"),
    ],
)
def test_a_listing_without_the_twin_is_not_installable(
    manifest: Manifest, variant_id: str, twin: str
) -> None:
    with pytest.raises(NoMatchingVariantError) as info:
        manifest.get(variant_id).assets(B, assets(B, drop=(twin,)))
    text = str(info.value)
    assert "not installable" in text
    assert "cudart" in text
    assert "run on the CPU" in text


def test_a_binary_pattern_that_takes_the_twin_is_refused(manifest: Manifest) -> None:
    loose = dataclasses.replace(
        manifest.get("linux-x86_64-cuda"), asset=r"ubuntu-cuda-12\.8-x64\.tar\.gz$"
    )
    with pytest.raises(ManifestError, match="matches several assets"):
        loose.assets(B, assets(B))
    # With the binary gone, the loose pattern would silently take the twin: refused too.
    binary = f"llama-{B}-bin-ubuntu-cuda-12.8-x64.tar.gz"
    with pytest.raises(ManifestError, match="also matches the runtime archive"):
        loose.assets(B, assets(B, drop=(binary,)))


def test_pins_of_size_and_digest_ride_along(manifest: Manifest) -> None:
    name = f"llama-{B}-bin-ubuntu-x64.tar.gz"
    size, sha = B11194[name]
    pinned = dataclasses.replace(
        manifest.get("linux-x86_64-cpu"), sha256={name: sha}, size={name: size}
    )
    [match] = pinned.assets(B, assets(B))
    assert (match.sha256, match.size) == (sha, size)
    [unpinned] = manifest.get("linux-x86_64-cpu").assets(B, assets(B))
    assert (unpinned.sha256, unpinned.size) == (None, None)


@pytest.mark.parametrize(
    ("tag", "variant_id", "expected"),
    [
        ("b11039", "linux-x86_64-cuda13", _cuda("b11039", "13.3", "x64")),
        ("b11039", "linux-x86_64-cuda", _cuda("b11039", "12.8", "x64")),
        ("b11039", "linux-x86_64-cpu", ["llama-b11039-bin-ubuntu-x64.tar.gz"]),
        ("b11039", "windows-x86_64-cuda", _win_cuda("b11039", "12.4")),
        ("b11425", "linux-x86_64-cuda", _cuda("b11425", "12.8", "x64")),
        ("b11457", "linux-x86_64-cuda", _cuda("b11457", "12.8", "x64")),
        ("b11457", "linux-x86_64-cuda13", _cuda("b11457", "13.4", "x64")),
        ("b11457", "linux-aarch64-cpu", ["llama-b11457-bin-ubuntu-arm64.tar.gz"]),
        ("b11434", "linux-aarch64-cuda13", _cuda("b11434", "13.4", "arm64")),
        ("b11434", "windows-arm64-vulkan", ["llama-b11434-bin-win-vulkan-arm64.zip"]),
        ("b11434", "windows-x86_64-rocm", ["llama-b11434-bin-win-rocm-10.0-x64.zip"]),
    ],
)
def test_other_recorded_builds(
    manifest: Manifest, tag: str, variant_id: str, expected: list[str]
) -> None:
    assert _names(manifest.get(variant_id), tag) == expected


def test_b11457_arm64_twin_is_missing_from_the_record(manifest: Manifest) -> None:
    # The record lists the arm64 twin but not the arm64 CUDA binary: no half install.
    with pytest.raises(NoMatchingVariantError, match="the release has"):
        manifest.get("linux-aarch64-cuda13").assets("b11457", assets("b11457"))


def test_real_listing_through_release_parsing(manifest: Manifest) -> None:
    parsed = parse_listing(listing(B), "ggml-org/llama.cpp", B)
    main, extras = match_assets(manifest.get("linux-x86_64-cuda"), B, parsed)
    assert main.name == f"llama-{B}-bin-ubuntu-cuda-12.8-x64.tar.gz"
    assert [e.name for e in extras] == [f"cudart-llama-{B}-bin-ubuntu-cuda-12.8-x64.tar.gz"]
    assert (main.size, main.sha256) == B11194[main.name]


# ----------------------------------------------------------------------------- hosts
X86 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
LINUX = HostInfo(os="linux", arch="x86_64", libc="glibc", libc_version="2.39", cpu_features=X86)
ARM = dataclasses.replace(LINUX, arch="aarch64", cpu_features=frozenset({"neon", "dotprod"}))
WIN = HostInfo(os="windows", arch="x86_64", cpu_features=X86)
NV_ICD: dict[str, Any] = {"vulkan": True, "vulkan_icds": ("nvidia_icd.json",)}
RADV: dict[str, Any] = {"vulkan": True, "vulkan_icds": ("radeon_icd.x86_64.json",)}


def _nv(driver: str, cuda: str) -> dict[str, Any]:
    return {"nvidia_driver": driver, "cuda_version": cuda}


def _amd(*gfx: str, hip: bool = True) -> dict[str, Any]:
    return {"amd_driver": True, "amd_gpus": gfx, "hip_runtime": hip}


HOSTS = [
    pytest.param(LINUX, "linux-x86_64-cpu", id="linux-plain"),
    pytest.param(dataclasses.replace(LINUX, **_nv("595.45.04", "13.4")), "linux-x86_64-cuda13",
                 id="cuda13-driver"),
    pytest.param(dataclasses.replace(LINUX, **_nv("580.95.05", "13.0")), "linux-x86_64-cuda",
                 id="driver-cuda-13.0-is-older-than-the-13.4-build"),
    pytest.param(dataclasses.replace(LINUX, nvidia_driver="580.95.05"), "linux-x86_64-cuda13",
                 id="cuda-version-unknown-driver-floor-decides"),
    pytest.param(dataclasses.replace(LINUX, **_nv("570.133.07", "12.8")), "linux-x86_64-cuda",
                 id="cuda12-driver"),
    pytest.param(dataclasses.replace(LINUX, **_nv("550.54.15", "12.4")), "linux-x86_64-cpu",
                 id="driver-older-than-any-build"),
    pytest.param(dataclasses.replace(LINUX, **_nv("550.54.15", "12.4"), **NV_ICD),
                 "linux-x86_64-vulkan", id="old-driver-falls-to-vulkan"),
    pytest.param(dataclasses.replace(LINUX, **_amd("gfx1100")), "linux-x86_64-rocm", id="rocm"),
    pytest.param(dataclasses.replace(LINUX, **_amd("gfx803"), **RADV), "linux-x86_64-vulkan",
                 id="gfx-unsupported"),
    pytest.param(dataclasses.replace(LINUX, **_amd("gfx1100", hip=False), **RADV),
                 "linux-x86_64-vulkan", id="no-hip-runtime"),
    pytest.param(dataclasses.replace(LINUX, vulkan=True, vulkan_icds=("lvp_icd.x86_64.json",)),
                 "linux-x86_64-cpu", id="lavapipe-is-no-gpu"),
    pytest.param(dataclasses.replace(ARM, **_nv("580.95.05", "13.4")), "linux-aarch64-cuda13",
                 id="arm64-cuda13"),
    pytest.param(dataclasses.replace(ARM, **NV_ICD), "linux-aarch64-vulkan", id="arm64-vulkan"),
    pytest.param(ARM, "linux-aarch64-cpu", id="arm64-cpu"),
    pytest.param(dataclasses.replace(WIN, **_nv("591.44", "13.4")), "windows-x86_64-cuda13",
                 id="win-cuda13"),
    pytest.param(dataclasses.replace(WIN, **_nv("551.61", "12.4")), "windows-x86_64-cuda",
                 id="win-cuda12"),
    pytest.param(dataclasses.replace(WIN, **_amd("gfx1151")), "windows-x86_64-rocm", id="win-rocm"),
    pytest.param(dataclasses.replace(WIN, vulkan=True), "windows-x86_64-vulkan", id="win-vulkan"),
    pytest.param(HostInfo(os="windows", arch="arm64"), "windows-arm64-cpu", id="win-arm64"),
    pytest.param(HostInfo(os="macos", arch="arm64", os_version="15.1", apple_silicon=True),
                 "macos-arm64-metal", id="macos"),
]  # fmt: skip


@pytest.mark.parametrize(("host", "variant_id"), HOSTS)
def test_host_gets_the_right_archives(manifest: Manifest, host: HostInfo, variant_id: str) -> None:
    selection = select_variant(manifest, host)
    assert selection.variant.id == variant_id
    assert selection.prebuilt_ok, selection.blockers
    assert _names(selection.variant, B) == EXPECTED_B11194[variant_id]


def _kinds(selection: Any) -> list[tuple[str, list[BlockerKind]]]:
    return [(c.variant.id, [b.kind for b in c.blockers]) for c in selection.skipped]


def test_each_skipped_step_of_the_chain_says_why(manifest: Manifest) -> None:
    selection = select_variant(manifest, LINUX)
    assert _kinds(selection) == [
        ("linux-x86_64-cuda13", [BlockerKind.NO_NVIDIA_DRIVER]),
        ("linux-x86_64-cuda", [BlockerKind.NO_NVIDIA_DRIVER]),
        ("linux-x86_64-rocm", [BlockerKind.NO_AMD_GPU]),
        ("linux-x86_64-vulkan", [BlockerKind.NO_VULKAN_LOADER]),
    ]
    assert selection.candidates[-1].variant is selection.variant
    assert selection.candidates[-1].usable
    # The people's version is one line in `why`, the same reasons in the same order.
    [skip] = [line for line in selection.why if line.startswith("skip ")]
    assert skip.index("cuda13") < skip.index("rocm") < skip.index("vulkan")


def test_driver_too_old_for_cuda13_then_cuda_too_old_for_12_8(manifest: Manifest) -> None:
    host = dataclasses.replace(LINUX, **_nv("550.54.15", "12.4"))
    selection = select_variant(manifest, host)
    kinds = dict(_kinds(selection))
    assert kinds["linux-x86_64-cuda13"] == [BlockerKind.DRIVER_TOO_OLD]
    assert kinds["linux-x86_64-cuda"] == [BlockerKind.CUDA_TOO_OLD]
    assert any("the driver supports CUDA 12.4; the build needs 12.8" in w for w in selection.why)


def test_unsupported_gfx_names_the_build_list(manifest: Manifest) -> None:
    selection = select_variant(manifest, dataclasses.replace(LINUX, **_amd("gfx803")))
    [rocm] = [c for c in selection.skipped if c.variant.backend == "rocm"]
    [blocker] = rocm.blockers
    assert blocker.kind is BlockerKind.GFX_UNSUPPORTED
    assert "gfx803" in blocker.text
    assert "gfx1100" in blocker.text


def test_unknown_gfx_is_skipped_by_auto_but_a_request_goes_ahead(manifest: Manifest) -> None:
    host = dataclasses.replace(WIN, amd_driver=True, hip_runtime=True)
    auto = select_variant(manifest, host)
    assert auto.variant.id == "windows-x86_64-cpu"
    assert dict(_kinds(auto))["windows-x86_64-rocm"] == [BlockerKind.GFX_UNKNOWN]
    asked = select_variant(manifest, host, "rocm")
    assert asked.variant.id == "windows-x86_64-rocm"
    assert asked.prebuilt_ok
    assert any(line.startswith("warning: an AMD GPU driver") for line in asked.why)


def test_requested_cuda_takes_the_newest_build_the_driver_runs(manifest: Manifest) -> None:
    new = select_variant(manifest, dataclasses.replace(LINUX, **_nv("595.45.04", "13.4")), "cuda")
    assert new.variant.id == "linux-x86_64-cuda13"
    old = select_variant(manifest, dataclasses.replace(LINUX, **_nv("570.133.07", "12.8")), "cuda")
    assert old.variant.id == "linux-x86_64-cuda"
    assert [c.variant.id for c in old.skipped] == ["linux-x86_64-cuda13"]
    # No build fits the driver: the oldest is chosen and compiled here instead of downloaded.
    older = dataclasses.replace(LINUX, **_nv("550.54.15", "12.4"))
    built = select_variant(manifest, older, "cuda")
    assert built.variant.id == "linux-x86_64-cuda"
    assert not built.prebuilt_ok
    assert any(b.kind is BlockerKind.CUDA_TOO_OLD for b in built.prebuilt_reasons)


# ----------------------------------------------------------------------------- release.yml
_EXPR = re.compile(r"\$\{\{\s*([^}]+?)\s*\}\}")
_ARCHIVE = re.compile(r"(?:tar -czvf|7z a(?: -snl)?)\s+(\S+\.(?:tar\.gz|zip))")
_GLIBC = {"ubuntu-22.04": "2.35", "ubuntu22.04": "2.35", "ubuntu-24.04": "2.39",
          "ubuntu24.04": "2.39"}  # fmt: skip
# Archives of the pinned build that llama-proc deliberately does not use.
NOT_USED = re.compile(
    r"-(s390x|sycl-[a-z0-9]+-x64|sycl-x64|openvino-.*|opencl-adreno-arm64|android-arm64.*"
    r"|linux-arm64-snapdragon|cuda-13\.[0-9]+-arm64)\.(tar\.gz|zip)$|xcframework|-ui\.tar\.gz"
)


@dataclasses.dataclass(frozen=True)
class Published:
    name: str
    job: str
    matrix: dict[str, Any]
    glibc: str | None


def _pinned_workflows(settings: Settings, manifest: Manifest) -> tuple[Path, Path]:
    index = manifest.source.index
    assert index is not None
    stem = re.sub(r"\.(tar\.gz|tgz|zip)$", "", index.filename)
    folder = settings.cache_dir / "sources" / f"{stem}-{index.sha256[:12]}"
    for root in (folder, *sorted(p for p in folder.glob("*") if p.is_dir())):
        workflows = root / index.subdir / ".github" / "workflows"
        if (workflows / "release.yml").is_file():
            return workflows / "release.yml", workflows / "release-publish.yml"
    pytest.skip(
        f"the pinned llama.cpp source tree ({index.filename}) is not unpacked in {folder.parent}; "
        "run `llama-proc build` (or the test suite's real build) once to fetch it"
    )


def _published(release_yml: Path, build: str) -> list[Published]:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads upstream's workflow")
    jobs = yaml.safe_load(release_yml.read_text(encoding="utf-8"))["jobs"]
    out = []
    for job_name, job in jobs.items():
        include = (job.get("strategy") or {}).get("matrix", {}).get("include") or [{}]
        for matrix in include:

            def sub(text: str, matrix: dict[str, Any] = matrix) -> str:
                def one(m: re.Match[str]) -> str:
                    expr = m.group(1)
                    if expr.startswith("matrix."):
                        return str(matrix.get(expr.removeprefix("matrix."), "*"))
                    if expr == "needs.check-release.outputs.tag_name":
                        return build
                    if expr == "env.ROCM_VERSION_SHORT":
                        return ".".join(str(matrix["ROCM_VERSION"]).split(".")[:2])
                    return "*"

                return _EXPR.sub(one, text)

            image = sub(str(job.get("container") or job.get("runs-on") or ""))
            glibc = next((v for k, v in _GLIBC.items() if k in image), None)
            for step in job.get("steps") or []:
                for made in _ARCHIVE.findall(sub(str(step.get("run", "")))):
                    # release-publish.yml puts the build number into the Windows zip names.
                    name = re.sub(r"^llama-bin-win-", f"llama-{build}-bin-win-", made)
                    out.append(Published(name, job_name, matrix, glibc))
    return out


@pytest.fixture(scope="module")
def published(real_settings: Settings, manifest: Manifest) -> list[Published]:
    release_yml, publish_yml = _pinned_workflows(real_settings, manifest)
    items = _published(release_yml, manifest.build)
    assert publish_yml.is_file()
    assert "llama-${{ steps.tag.outputs.name }}-${base_name#llama-}.zip" in publish_yml.read_text(
        encoding="utf-8"
    ), "release-publish.yml no longer renames the Windows zips the way this test assumes"
    assert len(items) > 20
    return items


def _by_name(published: list[Published]) -> dict[str, Published]:
    return {p.name: p for p in published}


def test_pinned_workflow_publishes_every_manifest_archive(
    manifest: Manifest, published: list[Published]
) -> None:
    names = list(_by_name(published))
    for variant in (v for v in manifest.variants if v.has_prebuilt):
        for pattern in (variant.asset_regex(manifest.build), *variant.extra_asset_regexes(
            manifest.build
        )):  # fmt: skip
            hits = [n for n in names if pattern.search(n)]
            assert len(hits) == 1, f"{variant.id}: {pattern.pattern} matches {hits}"


def test_manifest_uses_or_knowingly_skips_every_published_archive(
    manifest: Manifest, published: list[Published]
) -> None:
    patterns = [
        p
        for v in manifest.variants
        if v.has_prebuilt
        for p in (v.asset_regex(manifest.build), *v.extra_asset_regexes(manifest.build))
    ]
    unknown = [
        p.name
        for p in published
        if "*" not in p.name
        and not NOT_USED.search(p.name)
        and not any(r.search(p.name) for r in patterns)
    ]
    assert unknown == [], "upstream publishes archives the manifest neither uses nor skips"


def test_glibc_floors_match_the_build_images(
    manifest: Manifest, published: list[Published]
) -> None:
    by_name = _by_name(published)
    for variant in (v for v in manifest.variants if v.has_prebuilt and v.os == "linux"):
        [name] = [n for n in by_name if variant.asset_regex(manifest.build).search(n)]
        assert by_name[name].glibc is not None, f"{name}: unknown build image"
        assert variant.requires.glibc == by_name[name].glibc, variant.id


def test_cuda_toolkits_and_gfx_targets_match_the_workflow(
    manifest: Manifest, published: list[Published]
) -> None:
    by_name = _by_name(published)
    for variant in (v for v in manifest.variants if v.has_prebuilt):
        [name] = [n for n in by_name if variant.asset_regex(manifest.build).search(n)]
        matrix = by_name[name].matrix
        if variant.backend == "cuda":
            toolkit = str(matrix.get("label") or matrix["cuda"])
            assert variant.requires.cuda == toolkit, variant.id
        if variant.backend == "rocm":
            assert ";".join(variant.requires.gfx_targets) == matrix["gpu_targets"], variant.id
