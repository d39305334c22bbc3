"""The resolution ladder: which llama-server to run, fetching or building one if needed.

Steps, in order; each appends one :class:`~llama_proc.provision.explain.Step` to ``explain``
saying what it did or why it was skipped:

1. ``explicit``: ``settings.server_binary`` (``LLAMA_PROC_SERVER_BIN``) is used as is.
2. ``select``: the variant and build to look for (remembered per host and manifest by
   :mod:`~llama_proc.provision.cache.memo`, so a cache hit parses no manifest and probes no host).
3. ``bundled``: the install inside this llama-proc's wheel, when its variant and build are the
   ones requested.
4. ``cache``: a complete install of the selected variant and build in the cache.
5. ``prebuilt`` and ``build`` in the order ``settings.prefer`` gives: download the release
   archive (:mod:`~llama_proc.provision.fetch.prebuilt`) or compile from source. A prebuilt that
   fails (no asset, download error, does not run here) falls back to the build with a warning.
   A GPU install on a host with that GPU must list it (``--list-devices``); one that does not
   is refused, and ``auto`` falls to the next variant of the chain (an explicit backend fails).

Offline, only steps 1-4 run (and a prebuilt from a ``file://`` mirror, which is local).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from llama_proc.config import Settings, is_build_tag
from llama_proc.errors import (
    AttestationError,
    BinaryNotFoundError,
    CacheLockTimeoutError,
    ChecksumMismatchError,
    DeviceNotFoundError,
    LlamaProcError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision import bundle
from llama_proc.provision.cache import memo
from llama_proc.provision.cache.inventory import list_installs
from llama_proc.provision.cache.layout import install_dir
from llama_proc.provision.cache.record import Install, restamp
from llama_proc.provision.explain import Outcome, Step, StepName
from llama_proc.provision.resolution import Resolution
from llama_proc.vocab import AUTO, InstallSource

if TYPE_CHECKING:
    from llama_proc.provision.cache.verify import DeviceRequirement
    from llama_proc.provision.host.platform import HostInfo
    from llama_proc.provision.manifest import Manifest
    from llama_proc.provision.views import BuildView, CacheView

__all__ = ["Resolution", "concrete_build", "ensure_server", "plan", "resolve_server"]

logger = logging.getLogger(__name__)


def _say(explain: list[str] | None, line: str) -> None:
    """Log ``line`` and append it to ``explain`` (a :class:`Step`, or a plain line)."""
    logger.info("%s", line)
    if explain is not None:
        explain.append(line)


def _step(explain: list[str] | None, step: StepName, outcome: Outcome, reason: str) -> None:
    _say(explain, Step(step, outcome, reason))


def plan(
    settings: Settings,
    *,
    host: HostInfo | None = None,
    manifest: Manifest | None = None,
) -> Resolution:
    """Select the variant and build for ``settings`` on ``host`` (no I/O beyond detection).

    Raises:
        NoMatchingVariantError: nothing in the manifest fits.
        ManifestError: the manifest is invalid.
    """
    # Parsing the manifest (tomllib), probing the host (ctypes, subprocess) and selecting
    # (packaging) are what a remembered plan saves; a cache hit must not import them either.
    from llama_proc.provision.host.platform import detect_host  # noqa: PLC0415  off the hit path
    from llama_proc.provision.host.selection import select_variant  # noqa: PLC0415  off the hit path
    from llama_proc.provision.manifest import load_manifest  # noqa: PLC0415  off the hit path

    manifest = manifest or load_manifest()
    # Selection needs the driver and CUDA versions, not the GPU list: skip the cuInit probe.
    host = host or detect_host(gpu_details=False)
    selection = select_variant(manifest, host, settings.variant)
    return Resolution(selection, settings.build or manifest.build, host, manifest)


def _explicit(settings: Settings) -> Install:
    binary = Path(settings.server_binary or "")
    if not binary.is_file():
        msg = (
            f"LLAMA_PROC_SERVER_BIN={binary} does not exist or is not a file; point it at a "
            "llama-server executable or unset it"
        )
        raise BinaryNotFoundError(msg)
    binary = binary.resolve()
    return Install(
        path=binary.parent,
        variant_id=InstallSource.EXPLICIT,
        build="unknown",
        source=InstallSource.EXPLICIT,
        binaries={"llama-server": binary},
        metadata={"source": InstallSource.EXPLICIT, "path": str(binary)},
    )


def _bundled(target: memo.Target, explain: list[str] | None) -> Install | None:
    bundled_step = StepName.BUNDLED
    try:
        bundled = bundle.find_bundled()
    except ProvisionError as err:
        _step(explain, bundled_step, Outcome.FAILED, f"unusable ({err})")
        return None
    if bundled is None:
        reason = "none in this installation (pure wheel or source checkout)"
        _step(explain, bundled_step, Outcome.SKIPPED, reason)
        return None
    where = f"{bundled.variant_id} {bundled.build}"
    if bundled.variant_id != target.variant_id:
        reason = f"skipped, it is {where} and {target.variant_id} is wanted"
        _step(explain, bundled_step, Outcome.SKIPPED, reason)
        return None
    if bundled.build != target.build:
        reason = f"skipped, it is {where} and build {target.build} is wanted"
        _step(explain, bundled_step, Outcome.SKIPPED, reason)
        return None
    missing = bundled.missing_files()
    if missing:
        reason = f"skipped, {', '.join(missing)} missing from {bundled.path}"
        _step(explain, bundled_step, Outcome.SKIPPED, reason)
        return None
    _step(explain, bundled_step, Outcome.USED, f"using {where} at {bundled.path}")
    return bundled


def _cached(
    target: memo.Target, settings: Settings, damaged: list[str] | None = None
) -> tuple[Install | None, str]:
    """A usable cache install, or None and why not; ``damaged`` gets each broken one's id.

    Usable means intact by the cheap facts (``Install.problems()``: stat calls only). A broken
    one is passed over, and why is said; provisioning then re-installs it under its lock, as a
    fresh install.
    """
    canonical = install_dir(settings, target.build, target.variant_id)
    installs = list_installs(settings, build=target.build, variant_id=target.variant_id)
    if not installs:
        return None, f"no {target.variant_id} {target.build} install in {canonical.parent}"
    preferred = InstallSource.PREBUILT if settings.prefer == "prebuilt" else InstallSource.BUILT
    # The default install first, then the preferred source, then the newest custom build.
    installs.sort(
        key=lambda i: (i.path != canonical, i.source != preferred, str(i.metadata.get("created")))
    )
    reasons: list[str] = []
    for listed in installs:
        if settings.no_prebuilt and listed.source == InstallSource.PREBUILT:
            reasons.append(f"{listed.id} is a prebuilt and LLAMA_PROC_NO_PREBUILT is set")
            continue
        install = _check_first_use(listed, settings) if _unchecked(listed, settings) else listed
        rehashed: list[str] = []
        problems = install.problems(rehashed)
        if rehashed and not problems:
            restamp(install, rehashed, settings.lock_timeout)
        if problems:
            # Said once, by the cache step (and by the installer when it repairs it).
            reasons.append(f"{install.id} is damaged: {'; '.join(map(str, problems))}")
            if damaged is not None:
                damaged.append(install.id)
            continue
        return install, ""
    return None, "; ".join(reasons)


def _unchecked(install: Install, settings: BuildView) -> bool:
    """Whether a cache install still needs its one compute check (made before it existed)."""
    return (
        settings.compute_check
        and install.compute is None
        and install.metadata.get("smoke_check") == "ok"  # it ran on a host like this one
    )


def _check_first_use(install: Install, settings: CacheView) -> Install:
    # Imported here: a cache hit of a checked install never loads the check.
    from llama_proc.provision.compute.first_use import check_on_first_use  # noqa: PLC0415

    return check_on_first_use(install, settings.lock_timeout)


def _fallback_ok(err: LlamaProcError) -> bool:
    """Whether a failed prebuilt may fall back to a source build.

    A missing asset, a failed download or extraction and a binary that does not run here are
    worth a build; a lock timeout, offline mode, checksum and attestation problems are not (they need the
    user, and building around a tampered download would hide it), nor is a GPU build that sees
    no GPU (a build of it would not see one either: ``auto`` tries the next backend instead).
    """
    if isinstance(
        err,
        (
            AttestationError,
            CacheLockTimeoutError,
            OfflineError,
            ChecksumMismatchError,
            DeviceNotFoundError,
        ),
    ):
        return False
    return isinstance(err, (ProvisionError, NoMatchingVariantError))


def concrete_build(
    settings: Settings, manifest: Manifest | None = None, explain: list[str] | None = None
) -> Settings:
    """``settings`` with a release tag or ``latest`` build resolved to its ``bNNNN`` build.

    A ``bNNNN`` build (or none) is returned as is, without a request; see
    :mod:`~llama_proc.provision.fetch.nightly` for how the others resolve.

    Raises:
        OfflineError: offline and the build cannot be resolved from the cache.
        DownloadError: a listing could not be fetched.
        ProvisionError: the release names no build with binaries.
    """
    if settings.build is None or is_build_tag(settings.build):
        return settings
    from llama_proc.provision.fetch.nightly import resolve_build  # noqa: PLC0415  needs requests
    from llama_proc.provision.manifest import load_manifest  # noqa: PLC0415  off the hit path

    repo = (manifest or load_manifest()).repo
    found = resolve_build(settings.build, repo, settings)
    _step(explain, StepName.SELECT, Outcome.NOTE, f"build {settings.build} is {found}")
    return dataclasses.replace(settings, build=found)


def _target(
    settings: Settings, host: HostInfo | None, manifest: Manifest | None
) -> tuple[memo.Target, Resolution | None]:
    """The plan: remembered when host and manifest are the detected and shipped ones."""
    if host is None and manifest is None:
        remembered = memo.recall(settings)
        if remembered is not None:
            return remembered, None
    res = plan(settings, host=host, manifest=manifest)
    if host is None and manifest is None:
        memo.remember(settings, res.target)
    return res.target, res


def resolve_server(
    settings: Settings,
    *,
    explain: list[str] | None = None,
    provision: bool = True,
    force: bool = False,
    host: HostInfo | None = None,
    manifest: Manifest | None = None,
) -> Install:
    """Walk the resolution ladder (see the module docstring) and return the install to run.

    Args:
        settings: what to look for and how to provision.
        explain: gets one :class:`~llama_proc.provision.explain.Step` per step (what it did or
            why it was skipped); it is a ``str``, so printing it prints the line.
        provision: download or build when nothing usable is found; False only looks.
        force: skip the bundled and cached installs and install again.
        host: the detected host (detected when None).
        manifest: the manifest (the shipped one when None).

    Returns:
        The install; ``.server_binary`` is the executable.

    Raises:
        BinaryNotFoundError: the explicit binary is missing, or no step produced one.
        OfflineError: offline and nothing usable is cached.
        NoMatchingVariantError: no variant fits this host.
        CacheLockTimeoutError: another process held the install lock too long.
        ProvisionError: downloading, verifying, extracting or building failed.
    """
    if settings.server_binary is not None:
        explicit = _explicit(settings)
        reason = f"using {explicit.server_binary} (LLAMA_PROC_SERVER_BIN)"
        _step(explain, StepName.EXPLICIT, Outcome.USED, reason)
        return explicit
    _step(explain, StepName.EXPLICIT, Outcome.SKIPPED, "not set (LLAMA_PROC_SERVER_BIN)")
    settings = concrete_build(settings, manifest, explain)
    target, res = _target(settings, host, manifest)
    damaged: list[str] = []
    for line in target.why:
        _step(explain, StepName.SELECT, Outcome.NOTE, line)
    if force:
        _step(explain, StepName.BUNDLED, Outcome.SKIPPED, "skipped (--force)")
        _step(explain, StepName.CACHE, Outcome.SKIPPED, "skipped (--force)")
        why = "--force skips the cache"
    else:
        bundled = _bundled(target, explain)
        if bundled is not None:
            return bundled
        hit, why = _cached(target, settings, damaged)
        if hit is not None:
            reason = f"hit {hit.id} ({hit.source}, {hit.version or '?'})"
            _step(explain, StepName.CACHE, Outcome.USED, reason)
            return hit
        _step(explain, StepName.CACHE, Outcome.SKIPPED, f"miss, {why}")
    if not provision:
        msg = (
            f"no {target.variant_id} llama-server for build {target.build} is installed "
            f"({why}); run `llama-proc fetch` to install or repair it (or set "
            "LLAMA_PROC_SERVER_BIN)"
        )
        raise BinaryNotFoundError(msg)
    if res is None:
        # The remembered plan named what to look for; installing needs the variant itself.
        res = plan(settings)
    remember = host is None and manifest is None
    try:
        return _provision_chain(res, settings, force=force, explain=explain, remember=remember)
    except LlamaProcError as err:
        if damaged:
            # The error says why the repair failed; the note says there was one to make.
            err.add_note(
                f"the cached install {', '.join(damaged)} was damaged and was not repaired"
            )
        raise


def _device_need(res: Resolution) -> DeviceRequirement | None:
    """The GPU the new install must see (its backend's, when this host has one)."""
    from llama_proc.provision.cache.verify import device_requirement  # noqa: PLC0415  install path only

    return device_requirement(res.variant, res.host)


def _next_in_chain(res: Resolution, settings: Settings, refused: list[str]) -> Resolution | None:
    """The ``auto`` plan without the refused variants, or None when nothing else fits."""
    rest = tuple(v for v in res.manifest.variants if v.id not in refused)
    try:
        return plan(
            settings, host=res.host, manifest=dataclasses.replace(res.manifest, variants=rest)
        )
    except NoMatchingVariantError:
        return None


def _provision_chain(
    res: Resolution,
    settings: Settings,
    *,
    force: bool,
    explain: list[str] | None,
    remember: bool,
) -> Install:
    """:func:`_provision`; under ``auto`` a GPU build that sees no GPU makes way for the next.

    The refused install leaves nothing in the cache. The plan that replaces it is remembered
    (:mod:`~.memo`, keyed by the host's fingerprint, which a driver or library change renews),
    so later calls go straight to the backend that works here.
    """
    refused: list[str] = []
    while True:
        try:
            return _provision(res, settings, force=force, explain=explain)
        except DeviceNotFoundError as err:
            if settings.variant != AUTO:
                raise
            refused.append(res.variant.id)
            following = _next_in_chain(res, settings, refused)
            if following is None:
                raise
            line = (
                f"{res.variant.id} refused, it sees no GPU ({err.cause}); "
                f"next: {following.variant.id}"
            )
        logger.warning("%s", line)
        _step(explain, StepName.SELECT, Outcome.NOTE, line)
        res = following
        target = memo.Target(res.variant.id, res.build, (*res.selection.why, line))
        if remember:
            memo.remember(settings, target)
        hit, _why = (None, "") if force else _cached(target, settings)
        if hit is not None:
            reason = f"hit {hit.id} ({hit.source}, {hit.version or '?'})"
            _step(explain, StepName.CACHE, Outcome.USED, reason)
            return hit


def _provision(
    res: Resolution, settings: Settings, *, force: bool, explain: list[str] | None
) -> Install:
    prebuilt_step, build_step = StepName.PREBUILT, StepName.BUILD
    local_mirror = (settings.mirror or "").lower().startswith("file:")
    if settings.offline and not local_mirror:
        _step(explain, prebuilt_step, Outcome.SKIPPED, "skipped (offline)")
        _step(explain, build_step, Outcome.SKIPPED, "skipped (offline)")
        msg = (
            f"offline mode (LLAMA_PROC_OFFLINE) and no {res.variant.id} llama-server for build "
            f"{res.build} is cached; run `llama-proc fetch` once online, or set "
            "LLAMA_PROC_SERVER_BIN"
        )
        raise OfflineError(msg)
    order = ("prebuilt", "build") if settings.prefer == "prebuilt" else ("build", "prebuilt")
    need = _device_need(res)
    failures: list[str] = []
    for index, step in enumerate(order):
        build_later = "build" in order[index + 1 :] and not settings.no_build
        if step == "prebuilt":
            skip = _prebuilt_skip(res, settings)
            if skip:
                _step(explain, prebuilt_step, Outcome.SKIPPED, f"skipped, {skip}")
                failures.append(f"prebuilt: {skip}")
                continue
            # The download stack (requests, archives) is only imported when something is
            # downloaded: never on a cache hit.
            from llama_proc.provision.fetch.prebuilt import install_prebuilt  # noqa: PLC0415

            try:
                installed = install_prebuilt(res, settings, force=force, require_device=need)
            except LlamaProcError as err:
                if not (build_later and _fallback_ok(err)):
                    _step(explain, prebuilt_step, Outcome.FAILED, f"failed, {err}")
                    raise
                logger.warning("prebuilt %s failed (%s); building from source", res.variant.id, err)
                reason = f"failed, {err}; falling back to a source build"
                _step(explain, prebuilt_step, Outcome.FAILED, reason)
                failures.append(f"prebuilt: {err}")
                continue
            install = installed.install
            # A process that waited on the lock while another one installed says so.
            done = "installed" if installed.made else "already installed by another process:"
            reason = f"{done} {install.id} ({install.version or '?'})"
            _step(explain, prebuilt_step, Outcome.USED, reason)
            return install
        if settings.offline:
            _step(explain, build_step, Outcome.SKIPPED, "skipped (offline)")
            failures.append("build: offline")
            continue
        if settings.no_build:
            reason = "skipped (LLAMA_PROC_NO_BUILD / --no-build)"
            _step(explain, build_step, Outcome.SKIPPED, reason)
            failures.append("build: disabled by LLAMA_PROC_NO_BUILD")
            continue
        install = _build(res, settings, force=force, explain=explain, need=need)
        _step(
            explain, build_step, Outcome.USED, f"installed {install.id} ({install.version or '?'})"
        )
        return install
    msg = f"no way to get a {res.variant.id} llama-server for build {res.build}: " + "; ".join(
        failures
    )
    raise BinaryNotFoundError(msg)


def _prebuilt_skip(res: Resolution, settings: Settings) -> str:
    if settings.no_prebuilt:
        return "LLAMA_PROC_NO_PREBUILT is set"
    if not res.variant.has_prebuilt:
        return f"upstream publishes no prebuilt archive for {res.variant.id}"
    if res.selection.blockers:
        return "; ".join(res.selection.blockers)
    return ""


def _build(
    res: Resolution,
    settings: Settings,
    *,
    force: bool,
    explain: list[str] | None,
    need: DeviceRequirement | None = None,
) -> Install:
    # The build modules take ~30 ms to import: only a build, never a cache hit, pays for them.
    from llama_proc.provision.compile.build import build_variant  # noqa: PLC0415
    from llama_proc.provision.host.platform import detect_host  # noqa: PLC0415  off the hit path

    canonical = install_dir(settings, res.build, res.variant.id)
    replace_prebuilt = False
    if settings.no_prebuilt and (canonical / "install.json").is_file():
        # The pinned build installs where a prebuilt of the same variant lives; with
        # NO_PREBUILT the user wants it compiled, so the prebuilt makes way.
        try:
            replace_prebuilt = Install.from_dir(canonical).source == InstallSource.PREBUILT
        except ProvisionError:
            replace_prebuilt = True
        if replace_prebuilt:
            _say(explain, f"build: replacing the cached prebuilt at {canonical}")
    host = res.host
    if res.variant.backend == "cuda" and not host.compute_capabilities:
        # Selection detected without GPU details; a CUDA build targets the GPUs it finds.
        host = detect_host(gpu_details=True)
    _say(explain, f"build: compiling {res.variant.id} from source (this takes minutes)")
    install = build_variant(
        res.variant,
        settings,
        manifest=res.manifest,
        force=force or replace_prebuilt,
        host=host,
        explain=explain,
        require_device=need,
    )
    if install.build != res.build:
        # The source tree decides the build (e.g. the pinned sdist for another --build).
        _say(explain, f"build: warning, the source tree is {install.build}, not {res.build}")
    return install


def ensure_server(
    settings: Settings | None = None,
    *,
    force: bool = False,
    host: HostInfo | None = None,
    manifest: Manifest | None = None,
    explain: list[str] | None = None,
) -> Install:
    """A verified llama-server for this host: found, downloaded or built, in that order.

    Args:
        settings: provisioning settings (``Settings.from_env()`` when None).
        force: reinstall even when a usable install exists.
        host: the detected host (detected when None).
        manifest: the manifest (the shipped one when None).
        explain: gets one :class:`~llama_proc.provision.explain.Step` per ladder step.

    Returns:
        The install; ``.server_binary`` is the executable.

    Raises:
        BinaryNotFoundError: nothing could provide a binary (the message says why per step).
        OfflineError: offline and nothing usable is cached.
        NoMatchingVariantError: no variant fits this host.
        CacheLockTimeoutError: another process held the install lock too long.
        ProvisionError: downloading, verifying, extracting or building failed.
    """
    if settings is None:
        settings = Settings.from_env()
    return resolve_server(
        settings, explain=explain, provision=True, force=force, host=host, manifest=manifest
    )
