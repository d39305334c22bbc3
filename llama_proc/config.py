"""Provisioning settings, resolved at call time from an injectable environment.

Precedence, highest first: explicit keyword arguments / CLI flags, PEP 517 ``config_settings``
(``llama-proc.<name>``, build backend only), ``LLAMA_PROC_*`` environment variables, defaults.

=============================  ==========================================================
Environment variable           Meaning
=============================  ==========================================================
LLAMA_PROC_CACHE_DIR           root of the per-user cache (default: platformdirs cache)
LLAMA_PROC_VARIANT             backend: auto, cpu, cuda, rocm, metal, vulkan, rpc (default: auto)
LLAMA_PROC_BUILD               llama.cpp build to use instead of the pinned one: bNNNN, a
                               release tag (v1.0.0) or latest (resolved to the bNNNN build)
LLAMA_PROC_PREFER              prebuilt or source: which provisioning path is tried first
LLAMA_PROC_NO_BUILD            1 = never compile from source (fail if no prebuilt fits)
LLAMA_PROC_NO_PREBUILT         1 = never download a prebuilt archive (compile instead)
LLAMA_PROC_SERVER_BIN          use this llama-server and skip provisioning entirely
LLAMA_PROC_OFFLINE             1 = never touch the network; use only what is cached
LLAMA_PROC_MIRROR              base URL that mirrors GitHub release listings and assets
LLAMA_PROC_INDEX_URL           package index (PEP 691 JSON) for source sdists and models
LLAMA_PROC_BUILD_SOURCE        llama.cpp source for builds: a folder, an archive URL, "release"
                               (pinned source archive) or "index" (package-index sdist)
LLAMA_PROC_CUDA_ARCH           CMAKE_CUDA_ARCHITECTURES for CUDA builds (default: native)
LLAMA_PROC_JOBS                parallel compile jobs (default: CPU count)
LLAMA_PROC_DOWNLOAD_TIMEOUT    seconds for connect/read on each HTTP request (default 60)
LLAMA_PROC_LOCK_TIMEOUT        seconds to wait for another process's install (default 3600)
LLAMA_PROC_PROGRESS            1 / 0 to force progress bars on / off (default: on a TTY)
LLAMA_PROC_GITHUB_TOKEN        token sent to the GitHub API to lift anonymous rate limits
LLAMA_PROC_COMPUTE_CHECK       0 = install without proving that the binary computes (default 1)
LLAMA_PROC_CPU_OFF             CPU feature groups new installs must not use, comma-separated:
                               amx, avx512ext, avx512, avx2 (x86-64); sme, sve, i8mm (arm64)
LLAMA_PROC_ALLOW_INSECURE_HUB  1 = accept a plain-http HF_ENDPOINT or hub redirect to another
                               machine (default: https, or http on loopback only)
LLAMA_PROC_SOURCE              build backend only: auto, prebuilt, build or none (what the
                               wheel bundles; ``-C llama-proc.source=...``)
LLAMA_PROC_PORTABLE            build backend only: 1 = compile for any CPU of the arch
=============================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from llama_proc.errors import ConfigError
from llama_proc.vocab import BACKEND_CHOICES, CPU_GROUPS, PREFER_CHOICES

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "default_cache_dir",
    "is_build_tag",
    "parse_bool",
    "parse_field",
]

ENV_PREFIX: Final = "LLAMA_PROC_"
CONFIG_SETTINGS_PREFIX: Final = "llama-proc."
_TRUTHY: Final = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSY: Final = frozenset({"", "0", "false", "f", "no", "n", "off"})
_SEMVER_TAG_RE: Final = re.compile(r"^[vV]\d+\.\d+\.\d+$")
_BUILD_TAG_RE: Final = re.compile(r"^b[0-9]+$")


def parse_bool(name: str, value: str) -> bool:
    """Parse a boolean setting the same way everywhere.

    Raises:
        ConfigError: the value is neither truthy nor falsy.
    """
    text = value.strip().lower()
    if text in _TRUTHY:
        return True
    if text in _FALSY:
        return False
    msg = f"{_shown(name, value)} is not a boolean; use 1/0, true/false, yes/no or on/off"
    raise ConfigError(msg)


def default_cache_dir() -> Path:
    """The per-user cache root when ``LLAMA_PROC_CACHE_DIR`` is not set."""
    from platformdirs import user_cache_path  # noqa: PLC0415 - keeps `import llama_proc` cheap

    return user_cache_path("llama-proc", appauthor=False)


def _meta(env: str, parse: str) -> dict[str, str]:
    return {"env": env, "parse": parse}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where and how llama-proc provisions llama-server. Build one with :meth:`from_env`."""

    cache_dir: Path = field(metadata=_meta("CACHE_DIR", "path"))
    """Root of the per-user cache. Env: LLAMA_PROC_CACHE_DIR."""
    variant: str = field(default="auto", metadata=_meta("VARIANT", "backend"))
    """The variant asked for (``--variant``): auto or a backend of ``vocab.BACKENDS`` (cpu, cuda,
    ...); the manifest's entry for this platform is chosen from it. Env: LLAMA_PROC_VARIANT.
    (``backend`` is its old, deprecated name.)"""
    build: str | None = field(default=None, metadata=_meta("BUILD", "build"))
    """llama.cpp build tag (``bNNNN``), release tag (``v1.0.0``) or ``latest``, resolved to the
    ``bNNNN`` build with binaries; None = the manifest's pinned build. Env: LLAMA_PROC_BUILD."""
    prefer: Literal["prebuilt", "source"] = field(
        default="prebuilt", metadata=_meta("PREFER", "prefer")
    )
    """Which provisioning path is tried first. Env: LLAMA_PROC_PREFER."""
    no_build: bool = field(default=False, metadata=_meta("NO_BUILD", "bool"))
    """Never compile from source. Env: LLAMA_PROC_NO_BUILD."""
    no_prebuilt: bool = field(default=False, metadata=_meta("NO_PREBUILT", "bool"))
    """Never download a prebuilt archive. Env: LLAMA_PROC_NO_PREBUILT."""
    server_binary: Path | None = field(default=None, metadata=_meta("SERVER_BIN", "path"))
    """Use this llama-server and skip provisioning. Env: LLAMA_PROC_SERVER_BIN."""
    offline: bool = field(default=False, metadata=_meta("OFFLINE", "bool"))
    """Never touch the network; fail if nothing usable is cached. Env: LLAMA_PROC_OFFLINE."""
    mirror: str | None = field(default=None, metadata=_meta("MIRROR", "url"))
    """Base URL mirroring GitHub's release API and downloads. Env: LLAMA_PROC_MIRROR."""
    index_url: str = field(default="https://pypi.org/simple", metadata=_meta("INDEX_URL", "url"))
    """Package index (PEP 691 JSON) for source sdists and models. Env: LLAMA_PROC_INDEX_URL."""
    build_source: str | None = field(default=None, metadata=_meta("BUILD_SOURCE", "str"))
    """llama.cpp source: folder, archive URL, "release" or "index". Env: LLAMA_PROC_BUILD_SOURCE."""
    cuda_arch: str | None = field(default=None, metadata=_meta("CUDA_ARCH", "str"))
    """CMAKE_CUDA_ARCHITECTURES for CUDA builds; None = native. Env: LLAMA_PROC_CUDA_ARCH."""
    jobs: int | None = field(default=None, metadata=_meta("JOBS", "int"))
    """Parallel compile jobs; None = CPU count. Env: LLAMA_PROC_JOBS."""
    download_timeout: float = field(default=60.0, metadata=_meta("DOWNLOAD_TIMEOUT", "float"))
    """Connect/read timeout in seconds for each HTTP request. Env: LLAMA_PROC_DOWNLOAD_TIMEOUT."""
    lock_timeout: float = field(default=3600.0, metadata=_meta("LOCK_TIMEOUT", "float"))
    """Seconds to wait for another process's install. Env: LLAMA_PROC_LOCK_TIMEOUT."""
    progress: bool | None = field(default=None, metadata=_meta("PROGRESS", "bool"))
    """Force progress bars on/off; None = only on a TTY. Env: LLAMA_PROC_PROGRESS."""
    github_token: str | None = field(
        default=None, repr=False, metadata=_meta("GITHUB_TOKEN", "str")
    )
    """Token for the GitHub API (rate limits). Env: LLAMA_PROC_GITHUB_TOKEN."""
    compute_check: bool = field(default=True, metadata=_meta("COMPUTE_CHECK", "bool"))
    """Serve a tiny generated model with every new install (and once with each older one)
    and compare its answer with a reference before using it. Env: LLAMA_PROC_COMPUTE_CHECK."""
    cpu_off: tuple[str, ...] = field(default=(), metadata=_meta("CPU_OFF", "cpu_groups"))
    """CPU feature groups new installs must not use (``amx``, ``avx512``...), on top of those the
    manifest knows to be broken; ``fetch --force`` re-installs with them. Env: LLAMA_PROC_CPU_OFF."""
    allow_insecure_hub: bool = field(default=False, metadata=_meta("ALLOW_INSECURE_HUB", "bool"))
    """Accept plain http to another machine for the Hugging Face Hub (``HF_ENDPOINT``, its
    redirects). Env: LLAMA_PROC_ALLOW_INSECURE_HUB."""

    def __post_init__(self) -> None:
        # Accept str paths from library callers the same way from_env does.
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())
        if self.server_binary is not None:
            object.__setattr__(self, "server_binary", Path(self.server_binary).expanduser())
        if self.variant not in BACKEND_CHOICES:
            msg = f"unknown variant {self.variant!r}; choose one of {', '.join(BACKEND_CHOICES)}"
            raise ConfigError(msg)
        object.__setattr__(self, "cpu_off", _check_cpu_groups("cpu_off", self.cpu_off))
        if self.prefer not in PREFER_CHOICES:
            msg = f"prefer={self.prefer!r} is invalid; choose {' or '.join(PREFER_CHOICES)}"
            raise ConfigError(msg)
        if self.no_build and self.no_prebuilt:
            msg = "no_build and no_prebuilt together leave no way to provision llama-server"
            raise ConfigError(msg)
        if self.jobs is not None and self.jobs < 1:
            msg = f"jobs={self.jobs} must be at least 1"
            raise ConfigError(msg)
        for name in ("download_timeout", "lock_timeout"):
            if getattr(self, name) <= 0:
                msg = f"{name} must be a positive number of seconds"
                raise ConfigError(msg)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``LLAMA_PROC_*`` variables; keyword overrides win.

        Args:
            env: the environment to read; ``os.environ`` when None.
            **overrides: field values that take precedence (None values are ignored).

        Raises:
            ConfigError: a variable or override has an invalid value.
        """
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = ENV_PREFIX + f.metadata["env"]
            raw = source.get(var)
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(var, f.metadata["parse"], raw)
        if overrides.get("backend") is not None:
            warnings.warn(_BACKEND_RENAMED, DeprecationWarning, stacklevel=2)
            overrides = {**overrides, "variant": overrides["backend"]}
        overrides.pop("backend", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            msg = f"unknown setting(s): {', '.join(sorted(unknown))}"
            raise ConfigError(msg)
        if values.get("cache_dir") is None:
            values["cache_dir"] = default_cache_dir()
        values["cache_dir"] = Path(values["cache_dir"]).expanduser()
        if values.get("server_binary") is not None:
            values["server_binary"] = Path(values["server_binary"]).expanduser()
        return cls(**values)

    @classmethod
    def from_config_settings(
        cls,
        config_settings: Mapping[str, str | list[str]] | None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build-backend entry: ``llama-proc.*`` keys from PEP 517 config_settings over env.

        Keys use the CLI spelling (``llama-proc.variant``, ``llama-proc.cuda-arch``,
        ``llama-proc.mirror``...). ``llama-proc.source`` (prebuilt|build|none|auto) is a
        backend-only key and is read by the backend itself, not here.

        Raises:
            ConfigError: an unknown ``llama-proc.*`` key or an invalid value.
        """
        by_key = {f.metadata["env"].lower().replace("_", "-"): f for f in dataclasses.fields(cls)}
        overrides: dict[str, Any] = {}
        for key, raw in (config_settings or {}).items():
            if not key.startswith(CONFIG_SETTINGS_PREFIX):
                continue
            name = key[len(CONFIG_SETTINGS_PREFIX) :]
            if name in BACKEND_ONLY_KEYS:
                continue
            f = by_key.get(name)
            if f is None:
                known = ", ".join(sorted([*by_key, *BACKEND_ONLY_KEYS]))
                msg = f"unknown config setting {key!r}; known: {known}"
                raise ConfigError(msg)
            value = raw[-1] if isinstance(raw, list) else raw
            overrides[f.name] = _parse(key, f.metadata["parse"], value)
        return cls.from_env(env, **overrides)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed (validated again)."""
        if "backend" in changes:
            warnings.warn(_BACKEND_RENAMED, DeprecationWarning, stacklevel=2)
            changes["variant"] = changes.pop("backend")
        return dataclasses.replace(self, **changes)


_BACKEND_RENAMED: Final = "Settings.backend is now Settings.variant (the --variant it holds)"

if not TYPE_CHECKING:

    def _backend(self: Settings) -> str:
        """Deprecated: :attr:`Settings.variant`."""
        warnings.warn(_BACKEND_RENAMED, DeprecationWarning, stacklevel=2)
        return self.variant

    Settings.backend = property(_backend)
    _dataclass_init = Settings.__init__

    def _init(self: Settings, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        if backend is not None:
            warnings.warn(_BACKEND_RENAMED, DeprecationWarning, stacklevel=2)
            kwargs.setdefault("variant", backend)
        _dataclass_init(self, *args, **kwargs)

    Settings.__init__ = _init


BACKEND_ONLY_KEYS: Final = frozenset({"source", "portable"})
"""``llama-proc.*`` config settings that only the build backend reads."""
BACKEND_ENV_VARS: Final = ("LLAMA_PROC_SOURCE", "LLAMA_PROC_PORTABLE")
"""Environment variables that only the build backend reads (documented in the table above)."""


def _parse_backend(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in BACKEND_CHOICES:
        msg = f"{_shown(name, raw)} is not a variant; choose one of {', '.join(BACKEND_CHOICES)}"
        raise ConfigError(msg)
    return value


def _parse_prefer(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in PREFER_CHOICES:
        msg = f"{_shown(name, raw)} is invalid; choose {' or '.join(PREFER_CHOICES)}"
        raise ConfigError(msg)
    return value


def is_build_tag(build: str) -> bool:
    """Whether ``build`` is a ``bNNNN`` tag (one that carries binaries), not ``vX.Y.Z``/latest."""
    return bool(_BUILD_TAG_RE.match(build))


def _parse_build(name: str, raw: str) -> str:
    value = raw.strip()
    # Upstream's release tags (vX.Y.Z) and "latest" name a b build; provisioning resolves them.
    if value.lower() == "latest" or _SEMVER_TAG_RE.match(value):
        return value.lower()
    digits = value.removeprefix("b")
    if not digits.isdigit():
        msg = (
            f"{_shown(name, raw)} is not a llama.cpp build tag; use the form b1234, a release "
            "tag like v1.0.0, or latest"
        )
        raise ConfigError(msg)
    return f"b{int(digits)}"


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        msg = f"{_shown(name, raw)} is not an integer"
        raise ConfigError(msg) from None


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        msg = f"{_shown(name, raw)} is not a number of seconds"
        raise ConfigError(msg) from None


def _parse_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(("http://", "https://", "file://")):
        msg = f"{_shown(name, raw)} is not an http(s):// or file:// URL"
        raise ConfigError(msg)
    return value


def _check_cpu_groups(name: str, groups: Any) -> tuple[str, ...]:
    if isinstance(groups, str):
        groups = [g for g in (part.strip().lower() for part in groups.split(",")) if g]
    out = tuple(dict.fromkeys(groups))
    unknown = [g for g in out if g not in CPU_GROUPS]
    if unknown:
        where = f"{name}: " if name else ""
        msg = (
            f"{where}unknown CPU feature group {unknown[0]!r}; choose from "
            f"{', '.join(CPU_GROUPS)} (comma-separated)"
        )
        raise ConfigError(msg)
    return out


_PARSERS: Final[dict[str, Callable[[str, str], object]]] = {
    "path": lambda _name, raw: Path(raw).expanduser(),
    "str": lambda _name, raw: raw.strip(),
    "bool": parse_bool,
    "int": _parse_int,
    "float": _parse_float,
    "url": _parse_url,
    "backend": _parse_backend,
    "prefer": _parse_prefer,
    "build": _parse_build,
    "cpu_groups": _check_cpu_groups,
}


def _parse(name: str, kind: str, raw: str) -> object:
    return _PARSERS[kind](name, raw)


def _shown(name: str, raw: str) -> str:
    """How a bad value is named in a message: ``NAME='raw'``, or ``'raw'`` without a name."""
    return f"{name}={raw!r}" if name else repr(raw)


def parse_field(field_name: str, raw: str, *, name: str = "") -> object:
    """Parse text as the value of ``Settings.<field_name>``, exactly as the environment is parsed.

    The CLI uses this for its flags, so a flag and its ``LLAMA_PROC_*`` variable accept the same
    spellings and normalise them the same way.

    Args:
        field_name: a :class:`Settings` field (``"build"``, ``"mirror"``...).
        raw: the text to parse.
        name: what the text is called in an error message (a variable or flag); "" shows only
            the value, for callers that name the source themselves (argparse does).

    Raises:
        ConfigError: the text is not a valid value for that field.
    """
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if field_name not in fields:
        msg = f"unknown setting {field_name!r}; choose one of {', '.join(fields)}"
        raise ConfigError(msg)
    return _parse(name, fields[field_name].metadata["parse"], raw)
