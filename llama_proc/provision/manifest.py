"""Parse and validate ``variants.toml`` into frozen dataclasses.

Every problem raises :class:`~llama_proc.errors.ManifestError` naming the key and, where it can
be found, the line of the manifest it came from.

A variant's prebuilt is one binary archive (``asset``) plus the archives that must be unpacked
beside it (``extra_assets``): upstream's Linux and Windows CUDA builds leave the CUDA runtime
out and publish it as a ``cudart-`` twin, which the release API lists first. A CUDA prebuilt
without its twin is refused here, and :meth:`Variant.assets` picks every archive a variant
needs from a release listing, never taking the twin for the binary.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ManifestError
from llama_proc.provision.manifest_records import (
    _BUILD_RE,
    AssetMatch,
    AssetRole,
    CudaToolkitSpec,
    IndexFile,
    KnownBadCpu,
    Manifest,
    NamedAsset,
    Requirements,
    SourceSpec,
    Variant,
)
from llama_proc.vocab import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "AssetMatch",
    "AssetRole",
    "CudaToolkitSpec",
    "IndexFile",
    "KnownBadCpu",
    "Manifest",
    "NamedAsset",
    "Requirements",
    "SourceSpec",
    "Variant",
    "load_manifest",
    "parse_manifest",
    "split_alternatives",
]

SCHEMA_VERSION: Final = 1
OSES: Final = ("linux", "macos", "windows")
ARCHES: Final = ("x86_64", "aarch64", "arm64")
_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_VERSION_RE: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_GFX_RE: Final = re.compile(r"^gfx[0-9a-f]+$")
_REQUIREMENT_KEYS: Final = frozenset(
    {
        "glibc", "nvidia_driver", "cuda", "cpu_features", "macos", "vulkan", "apple_silicon",
        "gfx_targets", "hip_runtime",
    }
)  # fmt: skip
_TWIN_BACKENDS: Final = frozenset({"cuda"})
"""Backends whose upstream prebuilts ship their runtime libraries as a separate archive."""


class _Ctx:
    """Finds manifest lines for messages (tomllib does not report positions)."""

    def __init__(self, text: str, origin: str) -> None:
        self.lines = text.splitlines()
        self.origin = origin

    def line_of(
        self, key: str, table: str | None = None, nth: int = 0, *, strict: bool = False
    ) -> int:
        start = 0
        if table is not None:
            seen = -1
            for i, raw in enumerate(self.lines):
                if raw.strip() == table:
                    seen += 1
                    if seen == nth:
                        start = i
                        break
            else:
                return 0
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start, len(self.lines)):
            if i > start and table is not None and self.lines[i].lstrip().startswith("["):
                break
            if pattern.match(self.lines[i]):
                return i + 1
        return start + 1 if table is not None and not strict else 0

    def fail(self, key: str, problem: str, table: str | None = None, nth: int = 0) -> ManifestError:
        parts = key.split(".")
        line = self.line_of(parts[-1], table, nth, strict=True)
        if not line:
            # Keys of inline tables (requires = { glibc = ... }) sit on their parent's line.
            line = self.line_of(parts[-2] if len(parts) > 1 else parts[-1], table, nth)
        where = f"{self.origin}:{line}" if line else self.origin
        return ManifestError(f"{where}: {key}: {problem}")


def _str(ctx: _Ctx, data: Mapping[str, Any], key: str, name: str, **loc: Any) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ctx.fail(name, "must be a non-empty string", **loc)
    return value


def _opt_str(ctx: _Ctx, data: Mapping[str, Any], key: str, name: str, **loc: Any) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ctx.fail(name, "must be a string", **loc)
    return value


def _str_list(
    ctx: _Ctx, data: Mapping[str, Any], key: str, name: str, **loc: Any
) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise ctx.fail(name, "must be a list of non-empty strings", **loc)
    return tuple(value)


def _check_sha(ctx: _Ctx, value: str, name: str, **loc: Any) -> str:
    if value and not _SHA256_RE.match(value):
        raise ctx.fail(name, "must be 64 lowercase hex digits (or empty when unknown)", **loc)
    return value


def _index_file(ctx: _Ctx, data: Any, table: str) -> IndexFile:
    loc: dict[str, Any] = {"table": f"[{table}]"}
    if not isinstance(data, dict):
        raise ctx.fail(table, "must be a table", **loc)
    known = {"project", "version", "filename", "sha256", "subdir", "member", "build"}
    for key in data:
        if key not in known:
            raise ctx.fail(f"{table}.{key}", f"unknown key; expected {sorted(known)}", **loc)
    sha = _check_sha(ctx, _str(ctx, data, "sha256", f"{table}.sha256", **loc), f"{table}.sha256")
    build = _opt_str(ctx, data, "build", f"{table}.build", **loc)
    if build and not _BUILD_RE.match(build):
        raise ctx.fail(f"{table}.build", "must look like b1234", **loc)
    return IndexFile(
        project=_str(ctx, data, "project", f"{table}.project", **loc),
        version=_str(ctx, data, "version", f"{table}.version", **loc),
        filename=_str(ctx, data, "filename", f"{table}.filename", **loc),
        sha256=sha,
        subdir=_opt_str(ctx, data, "subdir", f"{table}.subdir", **loc),
        member=_opt_str(ctx, data, "member", f"{table}.member", **loc),
        build=build,
    )


def _cuda_toolkit(ctx: _Ctx, data: Any, nth: int) -> CudaToolkitSpec:
    table = "[[cuda_toolkit]]"
    loc: dict[str, Any] = {"table": table, "nth": nth}
    if not isinstance(data, dict):
        raise ctx.fail("cuda_toolkit", "must be a table", **loc)
    known = {"cuda", "os", "arch", "wheels"}
    for key in data:
        if key not in known:
            raise ctx.fail(f"cuda_toolkit.{key}", f"unknown key; expected {sorted(known)}", **loc)
    cuda = _str(ctx, data, "cuda", "cuda_toolkit.cuda", **loc)
    if not _VERSION_RE.match(cuda):
        raise ctx.fail("cuda_toolkit.cuda", f"{cuda!r} must be a version like 13.0", **loc)
    os_name = _str(ctx, data, "os", "cuda_toolkit.os", **loc)
    arch = _str(ctx, data, "arch", "cuda_toolkit.arch", **loc)
    if os_name not in OSES or arch not in ARCHES:
        raise ctx.fail("cuda_toolkit.os", f"{os_name}/{arch} is not a known platform", **loc)
    raw = data.get("wheels")
    if not isinstance(raw, list) or not raw:
        raise ctx.fail("cuda_toolkit.wheels", "must list the toolkit's wheels", **loc)
    wheels = tuple(_index_file(ctx, w, "cuda_toolkit.wheels") for w in raw)
    for wheel in wheels:
        if not wheel.sha256:
            raise ctx.fail("cuda_toolkit.wheels.sha256", "every wheel must be pinned", **loc)
        if not wheel.filename.endswith(".whl"):
            raise ctx.fail("cuda_toolkit.wheels.filename", f"{wheel.filename} is no wheel", **loc)
    return CudaToolkitSpec(cuda=cuda, os=os_name, arch=arch, wheels=wheels)


def _known_bad_cpu(ctx: _Ctx, data: Any, nth: int) -> KnownBadCpu:
    from llama_proc.provision.compute.ladder import feature_group  # noqa: PLC0415  a leaf

    loc: dict[str, Any] = {"table": "[[known_bad_cpu]]", "nth": nth}
    if not isinstance(data, dict):
        raise ctx.fail("known_bad_cpu", "must be a table", **loc)
    known = {"group", "why", "first_fixed"}
    for key in data:
        if key not in known:
            raise ctx.fail(f"known_bad_cpu.{key}", f"unknown key; expected {sorted(known)}", **loc)
    group = _str(ctx, data, "group", "known_bad_cpu.group", **loc)
    try:
        feature_group(group)
    except KeyError:
        raise ctx.fail(
            "known_bad_cpu.group", f"{group!r} is not a CPU feature group", **loc
        ) from None
    fixed = _opt_str(ctx, data, "first_fixed", "known_bad_cpu.first_fixed", **loc)
    if fixed and not _BUILD_RE.match(fixed):
        raise ctx.fail("known_bad_cpu.first_fixed", "must look like b1234", **loc)
    why = _str(ctx, data, "why", "known_bad_cpu.why", **loc)
    return KnownBadCpu(group=group, why=why, first_fixed=fixed)


def _requirements(ctx: _Ctx, data: Any, name: str, nth: int) -> Requirements:
    loc: dict[str, Any] = {"table": "[[variant]]", "nth": nth}
    if not isinstance(data, dict):
        raise ctx.fail(name, "must be an inline table", **loc)
    for key in data:
        if key not in _REQUIREMENT_KEYS:
            raise ctx.fail(
                f"{name}.{key}", f"unknown requirement; expected {sorted(_REQUIREMENT_KEYS)}", **loc
            )
    versions: dict[str, str | None] = {}
    for key in ("glibc", "nvidia_driver", "cuda", "macos"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not _VERSION_RE.match(value)):
            raise ctx.fail(f"{name}.{key}", "must be a dotted version string like '2.35'", **loc)
        versions[key] = value
    flags: dict[str, bool] = {}
    for key in ("vulkan", "apple_silicon", "hip_runtime"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise ctx.fail(f"{name}.{key}", "must be true or false", **loc)
        flags[key] = value
    features = _str_list(ctx, data, "cpu_features", f"{name}.cpu_features", **loc)
    gfx = _str_list(ctx, data, "gfx_targets", f"{name}.gfx_targets", **loc)
    for target in gfx:
        if not _GFX_RE.match(target):
            raise ctx.fail(f"{name}.gfx_targets", f"{target!r} is not a gfx target", **loc)
    return Requirements(
        glibc=versions["glibc"],
        nvidia_driver=versions["nvidia_driver"],
        cuda=versions["cuda"],
        cpu_features=tuple(f.lower() for f in features),
        macos=versions["macos"],
        vulkan=flags["vulkan"],
        apple_silicon=flags["apple_silicon"],
        gfx_targets=gfx,
        hip_runtime=flags["hip_runtime"],
    )


_VARIANT_KEYS: Final = frozenset(
    {
        "id", "os", "arch", "backend", "asset", "extra_assets", "sha256", "size", "binaries",
        "requires", "cmake_flags", "portable_cmake_flags", "targets",
    }
)  # fmt: skip


def _variant(ctx: _Ctx, data: Any, nth: int) -> Variant:
    loc: dict[str, Any] = {"table": "[[variant]]", "nth": nth}
    name = f"variant[{nth}]"
    if not isinstance(data, dict):
        raise ctx.fail(name, "must be a table", **loc)
    for key in data:
        if key not in _VARIANT_KEYS:
            raise ctx.fail(
                f"{name}.{key}", f"unknown key; expected one of {sorted(_VARIANT_KEYS)}", **loc
            )
    vid = _str(ctx, data, "id", f"{name}.id", **loc)
    name = f"variant {vid!r}"
    if not _ID_RE.match(vid):
        raise ctx.fail(f"{name}.id", "use lowercase letters, digits, '.', '_' and '-'", **loc)
    os_name = _str(ctx, data, "os", f"{name}.os", **loc)
    arch = _str(ctx, data, "arch", f"{name}.arch", **loc)
    backend = _str(ctx, data, "backend", f"{name}.backend", **loc)
    for key, value, allowed in (
        ("os", os_name, OSES),
        ("arch", arch, ARCHES),
        ("backend", backend, BACKENDS),
    ):
        if value not in allowed:
            raise ctx.fail(f"{name}.{key}", f"{value!r} is not one of {', '.join(allowed)}", **loc)
    asset = data.get("asset")
    if asset is not None and (not isinstance(asset, str) or not asset):
        raise ctx.fail(f"{name}.asset", "must be a regular expression string", **loc)
    extra = _str_list(ctx, data, "extra_assets", f"{name}.extra_assets", **loc)
    for pattern in (*(p for p in [asset] if p), *extra):
        try:
            re.compile(pattern.replace("{build}", "b1"))
        except re.error as err:
            raise ctx.fail(f"{name}.asset", f"invalid regular expression: {err}", **loc) from err
    if extra and asset is None:
        raise ctx.fail(f"{name}.extra_assets", "needs an asset to go with", **loc)
    sha_raw = data.get("sha256", {})
    if not isinstance(sha_raw, dict):
        raise ctx.fail(f"{name}.sha256", "must be a table of asset file name -> sha256", **loc)
    sha = {str(k): _check_sha(ctx, str(v), f"{name}.sha256.{k}", **loc) for k, v in sha_raw.items()}
    size_raw = data.get("size", {})
    if not isinstance(size_raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size_raw.values()
    ):
        raise ctx.fail(f"{name}.size", "must be a table of asset file name -> bytes (> 0)", **loc)
    if asset is not None and backend in _TWIN_BACKENDS and os_name != "macos" and not extra:
        raise ctx.fail(
            f"{name}.extra_assets",
            "a CUDA prebuilt needs its runtime archive (the cudart- twin) in extra_assets; "
            "without it the GPU backend cannot load",
            **loc,
        )
    binaries = _str_list(ctx, data, "binaries", f"{name}.binaries", **loc)
    if not binaries or "llama-server" not in binaries[0].split("|"):
        raise ctx.fail(f"{name}.binaries", "must start with llama-server", **loc)
    targets = _str_list(ctx, data, "targets", f"{name}.targets", **loc) or ("llama-server",)
    cmake_flags = _str_list(ctx, data, "cmake_flags", f"{name}.cmake_flags", **loc)
    portable = _str_list(ctx, data, "portable_cmake_flags", f"{name}.portable_cmake_flags", **loc)
    for flag in (*cmake_flags, *portable):
        if not flag.startswith("-D"):
            raise ctx.fail(
                f"{name}.cmake_flags", f"{flag!r} is not a -DNAME=VALUE definition", **loc
            )
    requires = _requirements(ctx, data.get("requires", {}), f"{name}.requires", nth)
    if asset is not None and backend == "rocm" and not requires.gfx_targets:
        raise ctx.fail(
            f"{name}.requires", "a ROCm prebuilt must list the gfx_targets it was built for", **loc
        )
    return Variant(
        id=vid,
        os=os_name,
        arch=arch,
        backend=backend,
        asset=asset,
        extra_assets=extra,
        sha256=sha,
        binaries=binaries,
        requires=requires,
        cmake_flags=cmake_flags,
        portable_cmake_flags=portable or cmake_flags,
        targets=targets,
        line=ctx.line_of("id", "[[variant]]", nth),
        size={str(k): int(v) for k, v in size_raw.items()},
    )


def parse_manifest(text: str, origin: str = "variants.toml") -> Manifest:
    """Parse manifest text.

    Args:
        text: the TOML document.
        origin: a name for messages (usually the file path).

    Raises:
        ManifestError: the document is not valid TOML or breaks the schema.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = f"{origin}: not valid TOML: {err}"
        raise ManifestError(msg) from err
    ctx = _Ctx(text, origin)
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise ctx.fail(
            "schema", f"unsupported schema {schema!r}; this llama-proc reads {SCHEMA_VERSION}"
        )
    llama = data.get("llama_cpp")
    if not isinstance(llama, dict):
        raise ctx.fail("llama_cpp", "missing [llama_cpp] table")
    loc: dict[str, Any] = {"table": "[llama_cpp]"}
    build = _str(ctx, llama, "build", "llama_cpp.build", **loc)
    if not _BUILD_RE.match(build):
        raise ctx.fail("llama_cpp.build", f"{build!r} must look like b1234", **loc)
    source_data = data.get("source", {})
    if not isinstance(source_data, dict):
        raise ctx.fail("source", "must be a table")
    sloc: dict[str, Any] = {"table": "[source]"}
    source = SourceSpec(
        release_url=_str(ctx, source_data, "release_url", "source.release_url", **sloc),
        release_sha256=_check_sha(
            ctx,
            _opt_str(ctx, source_data, "release_sha256", "source.release_sha256", **sloc),
            "source.release_sha256",
            **sloc,
        ),
        index=_index_file(ctx, source_data["index"], "source.index")
        if "index" in source_data
        else None,
    )
    build_table = data.get("build", {})
    if not isinstance(build_table, dict):
        raise ctx.fail("build", "must be a table")
    variants_raw = data.get("variant")
    if not isinstance(variants_raw, list) or not variants_raw:
        raise ctx.fail("variant", "the manifest lists no [[variant]] entries")
    variants = tuple(_variant(ctx, v, i) for i, v in enumerate(variants_raw))
    seen: set[str] = set()
    for i, v in enumerate(variants):
        if v.id in seen:
            raise ctx.fail(
                f"variant {v.id!r}.id", "duplicate variant id", table="[[variant]]", nth=i
            )
        seen.add(v.id)
    smoke = data.get("smoke_model")
    toolkits_raw = data.get("cuda_toolkit", [])
    if not isinstance(toolkits_raw, list):
        raise ctx.fail("cuda_toolkit", "must be an array of tables ([[cuda_toolkit]])")
    bad_raw = data.get("known_bad_cpu", [])
    if not isinstance(bad_raw, list):
        raise ctx.fail("known_bad_cpu", "must be an array of tables ([[known_bad_cpu]])")
    return Manifest(
        schema=SCHEMA_VERSION,
        repo=_str(ctx, llama, "repo", "llama_cpp.repo", **loc),
        build=build,
        commit=_opt_str(ctx, llama, "commit", "llama_cpp.commit", **loc),
        source=source,
        cmake_flags=_str_list(
            ctx, build_table, "cmake_flags", "build.cmake_flags", table="[build]"
        ),
        smoke_model=_index_file(ctx, smoke, "smoke_model") if smoke is not None else None,
        variants=variants,
        path=origin,
        cuda_toolkits=tuple(_cuda_toolkit(ctx, t, i) for i, t in enumerate(toolkits_raw)),
        known_bad_cpu=tuple(_known_bad_cpu(ctx, k, i) for i, k in enumerate(bad_raw)),
    )


def _manifest_text() -> tuple[str, str]:
    packaged = resources.files("llama_proc") / "variants.toml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8"), "variants.toml"
    # A source checkout (or editable install) keeps the manifest at the top of the repository.
    top = Path(__file__).resolve().parents[2] / "variants.toml"
    if top.is_file():
        return top.read_text(encoding="utf-8"), str(top)
    msg = "variants.toml is missing from the llama_proc package; reinstall llama-proc"
    raise ManifestError(msg)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Load the manifest shipped with llama-proc, or one at ``path``.

    Raises:
        ManifestError: the file is missing or invalid.
    """
    if path is None:
        text, origin = _manifest_text()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            msg = f"cannot read manifest {path}: {err.strerror}"
            raise ManifestError(msg) from err
        origin = str(path)
    return parse_manifest(text, origin)


def split_alternatives(name: str) -> Sequence[str]:
    """``"ggml-rpc-server|rpc-server"`` -> ``["ggml-rpc-server", "rpc-server"]``."""
    return [n for n in name.split("|") if n]
