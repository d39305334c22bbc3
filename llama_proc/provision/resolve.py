"""The resolution ladder: which llama-server to run, fetching or building one if needed.

Steps, in order; each appends one line to ``explain`` saying what it did or why it was skipped:

1. ``explicit``: ``settings.server_binary`` (``LLAMA_PROC_SERVER_BIN``) is used as is.
2. ``bundled``: the install inside this llama-proc's wheel, when its variant and build are the
   ones requested.
3. ``cache``: a complete install of the selected variant and build in the cache.
4. ``prebuilt`` and ``build`` in the order ``settings.prefer`` gives: download the release
   archive (sha256-verified, extracted, smoke-checked) or compile from source. A prebuilt that
   fails (no asset, download error, does not run here) falls back to the build with a warning.

Offline, only steps 1-3 run (and a prebuilt from a ``file://`` mirror, which is local).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import (
    BinaryNotFoundError,
    CacheLockTimeoutError,
    ChecksumMismatchError,
    LlamaProcError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.cache import Install
    from llama_proc.provision.manifest import Manifest, Variant
    from llama_proc.provision.platform import HostInfo
    from llama_proc.provision.releases import ReleaseAsset
    from llama_proc.provision.selection import Selection

__all__ = ["Resolution", "ensure_server", "install_prebuilt", "plan", "resolve_server"]

logger = logging.getLogger(__name__)

PREBUILT_SOURCE: Final = "prebuilt"
BUILT_SOURCE: Final = "built"
EXPLICIT_SOURCE: Final = "explicit"
_EXTRACT_DIR: Final = ".extract"
"""Scratch folder inside staging where each archive is unpacked before it is merged."""


@dataclass(frozen=True)
class Resolution:
    """What the ladder will look for: the variant, the build and why."""

    selection: Selection
    build: str
    host: HostInfo
    manifest: Manifest

    @property
    def variant(self) -> Variant:
        """The selected variant."""
        return self.selection.variant


def _say(explain: list[str] | None, line: str) -> None:
    logger.info("%s", line)
    if explain is not None:
        explain.append(line)


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
    from llama_proc.provision.manifest import load_manifest
    from llama_proc.provision.platform import detect_host
    from llama_proc.provision.selection import select_variant

    manifest = manifest or load_manifest()
    # Selection needs the driver and CUDA versions, not the GPU list: skip the cuInit probe.
    host = host or detect_host(gpu_details=False)
    selection = select_variant(manifest, host, settings.backend)
    return Resolution(selection, settings.build or manifest.build, host, manifest)


# ----------------------------------------------------------------------------- ladder steps
def _explicit(settings: Settings) -> Install:
    from llama_proc.provision.cache import Install

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
        variant_id=EXPLICIT_SOURCE,
        build="unknown",
        source=EXPLICIT_SOURCE,
        binaries={"llama-server": binary},
        metadata={"source": EXPLICIT_SOURCE, "path": str(binary)},
    )


def _bundled(res: Resolution, explain: list[str] | None) -> Install | None:
    from llama_proc.provision.bundle import find_bundled

    try:
        bundled = find_bundled()
    except ProvisionError as err:
        _say(explain, f"bundled: unusable ({err})")
        return None
    if bundled is None:
        _say(explain, "bundled: none in this installation (pure wheel or source checkout)")
        return None
    where = f"{bundled.variant_id} {bundled.build}"
    if bundled.variant_id != res.variant.id:
        _say(explain, f"bundled: skipped, it is {where} and {res.variant.id} is wanted")
        return None
    if bundled.build != res.build:
        _say(explain, f"bundled: skipped, it is {where} and build {res.build} is wanted")
        return None
    missing = bundled.missing_files()
    if missing:
        _say(explain, f"bundled: skipped, {', '.join(missing)} missing from {bundled.path}")
        return None
    _say(explain, f"bundled: using {where} at {bundled.path}")
    return bundled


def _cached(res: Resolution, settings: Settings) -> tuple[Install | None, str]:
    """A usable cache install, or None and why not."""
    from llama_proc.provision.cache import install_dir, list_installs

    canonical = install_dir(settings, res.build, res.variant.id)
    installs = list_installs(settings, build=res.build, variant_id=res.variant.id)
    if not installs:
        return None, f"no {res.variant.id} {res.build} install in {canonical.parent}"
    preferred = PREBUILT_SOURCE if settings.prefer == "prebuilt" else BUILT_SOURCE
    # The default install first, then the preferred source, then the newest custom build.
    installs.sort(
        key=lambda i: (i.path != canonical, i.source != preferred, str(i.metadata.get("created")))
    )
    reasons: list[str] = []
    for install in installs:
        if settings.no_prebuilt and install.source == PREBUILT_SOURCE:
            reasons.append(f"{install.id} is a prebuilt and LLAMA_PROC_NO_PREBUILT is set")
            continue
        missing = install.missing_files()
        if missing:
            reasons.append(f"{install.id} lost {', '.join(missing)}")
            continue
        return install, ""
    return None, "; ".join(reasons)


def _fallback_ok(err: LlamaProcError) -> bool:
    """Whether a failed prebuilt may fall back to a source build.

    A missing asset, a failed download or extraction and a binary that does not run here are
    worth a build; a lock timeout, offline mode and checksum problems are not (they need the
    user, and building around a tampered download would hide it).
    """
    if isinstance(err, (CacheLockTimeoutError, OfflineError, ChecksumMismatchError)):
        return False
    return isinstance(err, (ProvisionError, NoMatchingVariantError))


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
        explain: gets one line per step (what it did or why it was skipped).
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
        _say(explain, f"explicit: using {explicit.server_binary} (LLAMA_PROC_SERVER_BIN)")
        return explicit
    _say(explain, "explicit: not set (LLAMA_PROC_SERVER_BIN)")
    res = plan(settings, host=host, manifest=manifest)
    for line in res.selection.why:
        _say(explain, f"select: {line}")
    if force:
        _say(explain, "bundled: skipped (--force)")
        _say(explain, "cache: skipped (--force)")
    else:
        bundled = _bundled(res, explain)
        if bundled is not None:
            return bundled
        hit, why = _cached(res, settings)
        if hit is not None:
            _say(explain, f"cache: hit {hit.id} ({hit.source}, {hit.version or '?'})")
            return hit
        _say(explain, f"cache: miss, {why}")
    if not provision:
        msg = (
            f"no {res.variant.id} llama-server for build {res.build} is installed; run "
            "`llama-proc fetch` (or set LLAMA_PROC_SERVER_BIN)"
        )
        raise BinaryNotFoundError(msg)
    return _provision(res, settings, force=force, explain=explain)


def _provision(
    res: Resolution, settings: Settings, *, force: bool, explain: list[str] | None
) -> Install:
    local_mirror = (settings.mirror or "").lower().startswith("file:")
    if settings.offline and not local_mirror:
        _say(explain, "prebuilt: skipped (offline)")
        _say(explain, "build: skipped (offline)")
        msg = (
            f"offline mode (LLAMA_PROC_OFFLINE) and no {res.variant.id} llama-server for build "
            f"{res.build} is cached; run `llama-proc fetch` once online, or set "
            "LLAMA_PROC_SERVER_BIN"
        )
        raise OfflineError(msg)
    order = ("prebuilt", "build") if settings.prefer == "prebuilt" else ("build", "prebuilt")
    failures: list[str] = []
    for index, step in enumerate(order):
        build_later = "build" in order[index + 1 :] and not settings.no_build
        if step == "prebuilt":
            skip = _prebuilt_skip(res, settings)
            if skip:
                _say(explain, f"prebuilt: skipped, {skip}")
                failures.append(f"prebuilt: {skip}")
                continue
            try:
                install = install_prebuilt(res, settings, force=force)
            except LlamaProcError as err:
                if not (build_later and _fallback_ok(err)):
                    _say(explain, f"prebuilt: failed, {err}")
                    raise
                logger.warning("prebuilt %s failed (%s); building from source", res.variant.id, err)
                _say(explain, f"prebuilt: failed, {err}; falling back to a source build")
                failures.append(f"prebuilt: {err}")
                continue
            _say(explain, f"prebuilt: installed {install.id} ({install.version or '?'})")
            return install
        if settings.offline:
            _say(explain, "build: skipped (offline)")
            failures.append("build: offline")
            continue
        if settings.no_build:
            _say(explain, "build: skipped (LLAMA_PROC_NO_BUILD / --no-build)")
            failures.append("build: disabled by LLAMA_PROC_NO_BUILD")
            continue
        install = _build(res, settings, force=force, explain=explain)
        _say(explain, f"build: installed {install.id} ({install.version or '?'})")
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
    res: Resolution, settings: Settings, *, force: bool, explain: list[str] | None
) -> Install:
    from llama_proc.provision.cache import install_dir

    try:
        from llama_proc.provision.build import build_variant
    except ImportError as err:  # pragma: no cover - the build module ships with the package
        msg = f"source builds are not available in this installation ({err})"
        raise ProvisionError(msg) from err
    canonical = install_dir(settings, res.build, res.variant.id)
    replace_prebuilt = False
    if settings.no_prebuilt and (canonical / "install.json").is_file():
        # The pinned build installs where a prebuilt of the same variant lives; with
        # NO_PREBUILT the user wants it compiled, so the prebuilt makes way.
        from llama_proc.provision.cache import Install

        try:
            replace_prebuilt = Install.from_dir(canonical).source == PREBUILT_SOURCE
        except ProvisionError:
            replace_prebuilt = True
        if replace_prebuilt:
            _say(explain, f"build: replacing the cached prebuilt at {canonical}")
    host = res.host
    if res.variant.backend == "cuda" and not host.compute_capabilities:
        from llama_proc.provision.platform import detect_host

        host = detect_host(gpu_details=True)
    _say(explain, f"build: compiling {res.variant.id} from source (this takes minutes)")
    install = build_variant(
        res.variant,
        settings,
        manifest=res.manifest,
        cuda_arch=settings.cuda_arch,
        jobs=settings.jobs,
        force=force or replace_prebuilt,
        host=host,
        explain=explain,
    )
    if install.build != res.build:
        # The source tree decides the build (e.g. the pinned sdist for another --build).
        _say(explain, f"build: warning, the source tree is {install.build}, not {res.build}")
    return install


# ----------------------------------------------------------------------------- prebuilt install
def _merge_tree(src: Path, dest: Path) -> None:
    """Move ``src``'s entries into ``dest`` (same filesystem: renames, symlinks kept)."""
    import shutil

    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            _merge_tree(entry, target)
            continue
        if target.exists() or target.is_symlink():
            logger.warning("%s is in more than one archive; the later one wins", entry.name)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        entry.rename(target)


def _fetch_and_extract(
    asset: ReleaseAsset,
    staging: Path,
    settings: Settings,
    session: requests.Session | None,
    index: int,
) -> dict[str, Any]:
    import shutil

    from llama_proc.provision import archive, download
    from llama_proc.provision.cache import cache_lock, downloads_dir

    sha256 = asset.require_sha256()
    folder = downloads_dir(settings)
    dest = folder / asset.name
    # The archive is shared by the variants built from it (cpu and rpc), so it has its own
    # lock; a crash leaves dest.part behind for the next attempt to resume.
    with cache_lock(folder / f"{asset.name}.lock", settings.lock_timeout):
        if not (dest.is_file() and download.file_sha256(dest) == sha256):
            download.download_file(
                asset.url, dest, sha256=sha256, settings=settings, session=session, desc=asset.name
            )
        scratch = staging / f"{_EXTRACT_DIR}{index}"
        root = archive.extract_archive(dest, scratch)
        _merge_tree(root, staging)
        shutil.rmtree(scratch)
        dest.unlink(missing_ok=True)
    return {"name": asset.name, "url": asset.url, "sha256": sha256, "size": asset.size}


def install_prebuilt(
    res: Resolution,
    settings: Settings,
    *,
    force: bool = False,
    session: requests.Session | None = None,
) -> Install:
    """Download, verify, extract and smoke-check the variant's release archive(s) into the cache.

    The main archive and its extra archives (e.g. Windows cudart) land in one folder.

    Raises:
        NoMatchingVariantError: the release has no asset for the variant.
        ManifestError: a pattern matches several assets, or a pin contradicts the listing.
        DownloadError: the listing or an archive could not be fetched.
        ChecksumMismatchError: an archive's sha256 is wrong.
        ArchiveError: an archive is corrupt or unsafe.
        ProvisionError: the binary does not run here (``--version`` failed).
        OfflineError: offline without a ``file://`` mirror.
        CacheLockTimeoutError: another process held the install lock too long.
    """
    from llama_proc.provision import download, releases
    from llama_proc.provision.cache import install_atomically, install_dir

    variant = res.variant
    target = install_dir(settings, res.build, variant.id)
    owned: list[requests.Session] = []

    def populate(staging: Path) -> Mapping[str, Any]:
        # Made here, not earlier: a process that finds the install done after waiting on the
        # lock never needs requests at all.
        sess = session
        if sess is None:
            sess = download.make_session(settings)
            owned.append(sess)
        assets = releases.fetch_release_assets(res.manifest.repo, res.build, settings, sess)
        main, extras = releases.match_assets(variant, res.build, assets)
        records = [
            _fetch_and_extract(asset, staging, settings, sess, i)
            for i, asset in enumerate((main, *extras))
        ]
        return {
            "variant_id": variant.id,
            "build": res.build,
            "source": PREBUILT_SOURCE,
            "backend": variant.backend,
            "repo": res.manifest.repo,
            "url": main.url,
            "sha256": records[0]["sha256"],
            "assets": records,
            "mirror": settings.mirror,
            "host": res.host.to_dict(),
            "manifest": res.manifest.path,
        }

    populate_fn: Callable[[Path], Mapping[str, Any]] = populate
    try:
        return install_atomically(
            target,
            populate_fn,
            settings=settings,
            binaries=variant.binaries,
            os_name=variant.os,
            force=force,
        )
    finally:
        for sess in owned:
            sess.close()


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
        explain: gets one line per ladder step.

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
        from llama_proc.config import Settings

        settings = Settings.from_env()
    return resolve_server(
        settings, explain=explain, provision=True, force=force, host=host, manifest=manifest
    )
