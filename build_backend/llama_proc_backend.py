"""In-tree PEP 517 backend: bundle a verified llama-server, then let scikit-build-core make the wheel.

``pip install .`` (or from the sdist) asks :mod:`llama_proc.provision` (the same code the runtime
uses, imported from this source tree) for a llama-server for the build host, copies that install
into the wheel as ``llama_proc/_bundled/`` and tags the wheel for the platform it needs
(``py3-none-manylinux_2_35_x86_64``...). Without one it makes a pure ``py3-none-any`` wheel whose
llama-proc provisions on first use. Editable installs and sdists are never bundled.

Choices, as ``--config-settings`` (``-C``) or environment variables (config settings win):

=================================  =========================  ====================================
config setting                     environment                meaning
=================================  =========================  ====================================
``llama-proc.source``              ``LLAMA_PROC_SOURCE``      ``auto`` (default): bundle a
                                                              prebuilt (or a cached install) when
                                                              one can be had, else a pure wheel;
                                                              ``prebuilt``: bundle one or fail;
                                                              ``build``: compile (or reuse a
                                                              cached build) and bundle it;
                                                              ``none``: pure wheel
``llama-proc.portable``            ``LLAMA_PROC_PORTABLE``    with ``build``: compile for any CPU
                                                              of the arch (manylinux tag) instead
                                                              of this one (``linux_<arch>`` tag)
``llama-proc.variant`` ...         ``LLAMA_PROC_VARIANT`` ..  every provisioning setting, with the
                                                              CLI's names: ``variant``,
                                                              ``cuda-arch``, ``mirror``,
                                                              ``offline``, ``cache-dir``, ``build``
                                                              ``jobs``, ``build-source`` ...
=================================  =========================  ====================================

Other ``-C`` keys go to scikit-build-core unchanged. What happened is written to stderr, which pip
shows with ``-v`` (``pip install -v .``). Each hook reads its inputs afresh: a frontend may run
every hook in a new process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, cast

import scikit_build_core.build as _skbuild

if TYPE_CHECKING:
    from llama_proc.config import Settings
    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import Variant

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
]

ConfigSettings = Mapping[str, "str | list[str]"] | None
Source = Literal["auto", "prebuilt", "build", "none"]

PREFIX: Final = "llama-proc."
SOURCES: Final = ("auto", "prebuilt", "build", "none")
BACKEND_KEYS: Final = ("source", "portable")
"""``llama-proc.*`` keys this backend reads itself; the rest are :class:`Settings` fields."""
BUNDLE_DEST: Final = "llama_proc/_bundled"
CMAKE_REQUIREMENT: Final = "cmake>=3.21"
NINJA_REQUIREMENT: Final = "ninja>=1.11"
_LOG_FORMAT: Final = "llama-proc: %(message)s"


def _say(message: str) -> None:
    """One line on stderr: pip shows a backend's output with ``-v`` and on failure."""
    sys.stderr.write(f"llama-proc: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _errors_exit() -> Iterator[None]:
    """Turn llama-proc errors into one readable line and exit status 1, not a traceback."""
    from llama_proc.errors import LlamaProcError

    try:
        yield
    except LlamaProcError as err:
        _say(f"error: {err}")
        raise SystemExit(1) from None


@contextlib.contextmanager
def _provision_logging() -> Iterator[None]:
    """Show llama-proc's own log lines (downloads, builds) in the hook's stderr."""
    log = logging.getLogger("llama_proc")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)


def _last(value: str | list[str]) -> str:
    return value[-1] if isinstance(value, list) else value


def _skbuild_settings(config_settings: ConfigSettings) -> dict[str, str | list[str]]:
    """The config settings meant for scikit-build-core (it rejects unknown keys)."""
    return {k: v for k, v in (config_settings or {}).items() if not k.startswith(PREFIX)}


@dataclass(frozen=True)
class Request:
    """What the user asked the backend for, read from config settings over the environment."""

    source: Source
    portable: bool
    config: Mapping[str, str | list[str]]
    """The ``llama-proc.*`` settings for :meth:`Settings.from_config_settings`."""

    @classmethod
    def read(cls, config_settings: ConfigSettings, env: Mapping[str, str] | None = None) -> Request:
        """Parse the backend's own keys; provisioning keys are checked by :meth:`settings`.

        Raises:
            ConfigError: an invalid ``source`` or ``portable`` value.
        """
        from llama_proc.config import parse_bool
        from llama_proc.errors import ConfigError

        environ = os.environ if env is None else env
        ours = {k: v for k, v in (config_settings or {}).items() if k.startswith(PREFIX)}
        raw_source = ours.get(PREFIX + "source")
        name = f"{PREFIX}source" if raw_source is not None else "LLAMA_PROC_SOURCE"
        source = (_last(raw_source) if raw_source is not None else "") or environ.get(
            "LLAMA_PROC_SOURCE", ""
        )
        source = source.strip().lower() or "auto"
        if source not in SOURCES:
            msg = f"{name}={source!r} is invalid; choose one of {', '.join(SOURCES)}"
            raise ConfigError(msg)
        raw_portable = ours.get(PREFIX + "portable")
        if raw_portable is not None:
            portable = parse_bool(PREFIX + "portable", _last(raw_portable))
        else:
            portable = parse_bool("LLAMA_PROC_PORTABLE", environ.get("LLAMA_PROC_PORTABLE", ""))
        config = {k: v for k, v in ours.items() if k[len(PREFIX) :] not in BACKEND_KEYS}
        return cls(source=cast("Source", source), portable=portable, config=config)

    def settings(self, env: Mapping[str, str] | None = None) -> Settings:
        """Provisioning settings: ``llama-proc.*`` config settings over ``LLAMA_PROC_*``.

        Raises:
            ConfigError: an unknown key or invalid value.
        """
        from llama_proc.config import Settings

        return Settings.from_config_settings(self.config, env)


@dataclass(frozen=True)
class Bundle:
    """A staged bundle and the wheel tag it needs."""

    install: Install
    origin: Install
    """The install it was copied from (usually in the cache)."""
    tag: str


def _obtain(request: Request) -> tuple[Install, Variant, HostInfo]:
    """Get a verified install for this host through llama_proc.provision (no logic of our own)."""
    from llama_proc.provision import detect_host, ensure_server, load_manifest

    settings = request.settings()
    if settings.server_binary is not None:
        # An arbitrary binary has no install.json, variant or verified origin to bundle.
        _say(f"ignoring LLAMA_PROC_SERVER_BIN={settings.server_binary} for the wheel's bundle")
        settings = settings.replace(server_binary=None)
    host = detect_host()
    manifest = load_manifest()
    if request.source == "build" and request.portable:
        from llama_proc.provision.compile.build import build_variant
        from llama_proc.provision.host.selection import select_variant

        variant = select_variant(manifest, host, settings.variant).variant
        install = build_variant(
            variant,
            settings.replace(no_build=False, no_prebuilt=True),
            host=host,
            manifest=manifest,
            portable=True,
        )
    elif request.source == "build":
        # The runtime's own ladder: a cached build of this variant is reused, else it compiles.
        install = ensure_server(
            settings.replace(no_build=False, no_prebuilt=True, prefer="source"),
            host=host,
            manifest=manifest,
        )
    else:
        install = ensure_server(
            settings.replace(no_build=True, no_prebuilt=False, prefer="prebuilt"),
            host=host,
            manifest=manifest,
        )
    return install, manifest.get(install.variant_id), host


def _is_native(install: Install, request: Request) -> bool:
    """A build tuned to this CPU (``GGML_NATIVE``) must not get a portable-looking tag."""
    if install.source != "built":
        return False
    if "portable" in install.metadata:
        return not bool(install.metadata["portable"])
    return not request.portable


def make_bundle(request: Request, staging: Path) -> Bundle | None:
    """Provision and stage the bundle under ``staging``; None = make a pure wheel.

    Raises:
        LlamaProcError: ``source`` is ``prebuilt`` or ``build`` and provisioning failed.
    """
    from llama_proc.errors import LlamaProcError
    from llama_proc.provision.bundle import stage_bundle, wheel_tag

    if request.source == "none":
        _say(
            "building a pure wheel (llama-proc.source=none): llama-server will be provisioned "
            "on first use"
        )
        return None
    try:
        # The ladder logs one line per step; _provision_logging shows them in pip -v.
        origin, variant, host = _obtain(request)
    except LlamaProcError as err:
        if request.source != "auto":
            raise
        _say(
            f"no prebuilt llama-server could be fetched for this host ({err}); building a pure "
            "wheel: llama-server will be provisioned on first use (`llama-proc fetch` does it "
            "now; -C llama-proc.source=build compiles one into the wheel)"
        )
        return None
    settings = request.settings()
    bundled = stage_bundle(
        origin,
        staging / "_bundled",
        settings=settings,
        variant=variant,
        os_name=host.os,
        extra_metadata={"wheel_source": request.source},
    )
    tag = wheel_tag(
        bundled.path,
        os_name=variant.os,
        arch=variant.arch,
        native=_is_native(origin, request),
        libc=host.libc,
        min_glibc=variant.requires.glibc if origin.source == "prebuilt" else None,
        min_macos=variant.requires.macos if origin.source == "prebuilt" else host.os_version,
    )
    return Bundle(install=bundled, origin=origin, tag=tag)


# --------------------------------------------------------------------------------- PEP 517 hooks


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> list[str]:
    """scikit-build-core's requirements, plus CMake/Ninja from the index when compiling needs them."""
    with _errors_exit():
        request = Request.read(config_settings)
    requires = list(_skbuild.get_requires_for_build_wheel(_skbuild_settings(config_settings)))
    if request.source == "build":
        if shutil.which("cmake") is None:
            requires.append(CMAKE_REQUIREMENT)
        if shutil.which("ninja") is None and sys.platform != "win32":
            requires.append(NINJA_REQUIREMENT)
    return requires


def get_requires_for_build_sdist(config_settings: ConfigSettings = None) -> list[str]:
    """scikit-build-core's requirements for an sdist."""
    return list(_skbuild.get_requires_for_build_sdist(_skbuild_settings(config_settings)))


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> list[str]:
    """scikit-build-core's requirements for an editable wheel (never bundled, never compiled)."""
    return list(_skbuild.get_requires_for_build_editable(_skbuild_settings(config_settings)))


def build_sdist(sdist_directory: str, config_settings: ConfigSettings = None) -> str:
    """The sdist: sources, ``build_backend/`` and ``variants.toml``; never a binary."""
    return str(_skbuild.build_sdist(sdist_directory, _skbuild_settings(config_settings)))


def build_editable(
    wheel_directory: str,
    config_settings: ConfigSettings = None,
    metadata_directory: str | None = None,
) -> str:
    """A pure editable wheel: the runtime provisions llama-server on first use."""
    _say("editable installs never bundle llama-server; it is provisioned on first use")
    return str(
        _skbuild.build_editable(
            wheel_directory, _skbuild_settings(config_settings), metadata_directory
        )
    )


def build_wheel(
    wheel_directory: str,
    config_settings: ConfigSettings = None,
    metadata_directory: str | None = None,
) -> str:
    """Bundle a llama-server when asked or possible, then build the wheel with scikit-build-core."""
    with _errors_exit(), _provision_logging():
        request = Request.read(config_settings)
        request.settings()  # report a bad setting before any provisioning
        with tempfile.TemporaryDirectory(prefix="llama-proc-bundle-") as tmp:
            bundle = make_bundle(request, Path(tmp))
            settings = _skbuild_settings(config_settings)
            if bundle is not None:
                settings.update(
                    {
                        "wheel.platlib": "true",
                        "wheel.tags": bundle.tag,
                        f"wheel.force-include.{bundle.install.path}": BUNDLE_DEST,
                    }
                )
                # The prepared metadata describes a pure wheel; the platform wheel's WHEEL file
                # differs, so scikit-build-core must not compare against it.
                metadata_directory = None
            name = str(_skbuild.build_wheel(wheel_directory, settings, metadata_directory))
        if bundle is not None:
            origin = bundle.origin
            _say(
                f"bundled llama-server {origin.build} ({origin.variant_id}, {origin.source} "
                f"from {origin.path}) into {name}"
            )
        return name


if hasattr(_skbuild, "prepare_metadata_for_build_wheel"):

    def prepare_metadata_for_build_wheel(
        metadata_directory: str, config_settings: ConfigSettings = None
    ) -> str:
        """Metadata without building (the same for pure and bundled wheels)."""
        return str(
            _skbuild.prepare_metadata_for_build_wheel(
                metadata_directory, _skbuild_settings(config_settings)
            )
        )

    def prepare_metadata_for_build_editable(
        metadata_directory: str, config_settings: ConfigSettings = None
    ) -> str:
        """Metadata for an editable install."""
        return str(
            _skbuild.prepare_metadata_for_build_editable(
                metadata_directory, _skbuild_settings(config_settings)
            )
        )

    __all__ += ["prepare_metadata_for_build_editable", "prepare_metadata_for_build_wheel"]
