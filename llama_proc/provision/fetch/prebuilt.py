"""Installing a prebuilt: download the release archives, verify, unpack, smoke-check.

A variant's archives are :meth:`~llama_proc.provision.manifest.Variant.assets`: the binary
archive first, then its runtime twins (upstream's ``cudart-`` archives, without which the CUDA
backend cannot load). Each is fetched into ``downloads/`` and checked against its sha256 (the
pin in ``variants.toml``, else the listing's digest) and its size from the listing, then
unpacked into one staging folder (:func:`~llama_proc.provision.fetch.archive.extract_archive` with
``merge=True``), which :func:`~llama_proc.provision.cache.installer.install_once` smoke-checks and
renames into place.

The verified archives stay in ``downloads/`` until the install is committed, so a process
killed after unpacking does not cost the next one a download; after the rename they are
deleted (what an interrupted or failed install leaves, ``llama-proc cache prune`` removes).

:func:`fetch_for_platform` does the same for another machine (``llama-proc fetch --platform``):
the same archives into a folder of the caller's choosing, never run here.

Only the ladder's ``prebuilt`` step and ``fetch --platform`` import this module, so a cache hit
never loads ``requests`` or the archive readers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_proc.errors import ConfigError, ManifestError, ProvisionError
from llama_proc.provision.cache.installer import Installed, install_once
from llama_proc.provision.cache.layout import INSTALL_JSON, downloads_dir, install_dir
from llama_proc.provision.cache.locking import cache_lock, lock_path, try_lock
from llama_proc.provision.cache.record import Install
from llama_proc.provision.compute.ladder import prune_cpu_variants
from llama_proc.provision.compute.plan import ComputePlan, initial_off
from llama_proc.provision.fetch import archive, attest, download, releases
from llama_proc.provision.fetch.nightly import resolve_build
from llama_proc.provision.host.host_info import HostInfo, normalize_arch, normalize_os
from llama_proc.provision.host.selection import select_variant
from llama_proc.provision.manifest import ARCHES, OSES, load_manifest
from llama_proc.vocab import AUTO, InstallSource

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.cache.verify import DeviceRequirement
    from llama_proc.provision.compute.ladder import FeatureGroup
    from llama_proc.provision.fetch.listing import ReleaseAsset
    from llama_proc.provision.manifest_records import AssetMatch, Manifest, Variant
    from llama_proc.provision.resolution import Resolution
    from llama_proc.provision.views import BuildView, FetchView

__all__ = ["fetch_for_platform", "install_prebuilt", "parse_platform"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Archive:
    """One archive of the install: where it comes from and what it must be."""

    name: str
    url: str
    sha256: str
    size: int

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "sha256": self.sha256, "size": self.size}


def _checked(match: AssetMatch[ReleaseAsset], variant: Variant) -> _Archive:
    """The sha256 and size to verify: a pin wins, and one that contradicts the listing fails."""
    asset = match.asset
    if match.size is not None and match.size != asset.size:
        msg = (
            f"variants.toml pins size {match.size} for {asset.name} (variant {variant.id}) but "
            f"the release listing says {asset.size} bytes; the pin or the mirror is wrong, "
            "refusing to guess which"
        )
        raise ManifestError(msg)
    pin = match.sha256
    if pin and asset.sha256 is not None and asset.sha256 != pin:
        msg = (
            f"variants.toml pins sha256 {pin} for {asset.name} (variant {variant.id}) but the "
            f"release listing's digest is {asset.sha256}; the pin or the mirror is wrong, "
            "refusing to guess which"
        )
        raise ManifestError(msg)
    sha256 = pin or asset.require_sha256()
    return _Archive(asset.name, asset.url, sha256, asset.size)


def _archives(
    variant: Variant,
    repo: str,
    build: str,
    settings: FetchView,
    session: requests.Session,
) -> list[_Archive]:
    """Every archive ``variant`` installs from release ``build``: the binary, then its twins."""
    # variant= lets a plain-http remote mirror through only when every asset is pinned.
    listing = releases.fetch_release_assets(repo, build, settings, session, variant=variant)
    return [_checked(match, variant) for match in variant.assets(build, listing)]


def _unpack(
    item: _Archive,
    staging: Path,
    settings: FetchView,
    session: requests.Session,
    came_from: list[str],
) -> Path:
    """Download ``item`` (unless a verified copy is kept) and unpack it into ``staging``.

    ``came_from`` gets the URL the bytes finally came from, after redirects ("" for a copy
    kept from an earlier, interrupted install).
    """
    dest = downloads_dir(settings) / item.name
    # An archive may serve several variants (cpu and rpc), so it has its own lock, held until
    # it is unpacked: nobody deletes it under a reader. A crash leaves dest.part to resume.
    with cache_lock(lock_path(dest), settings.lock_timeout):
        kept = dest.is_file() and dest.stat().st_size == item.size
        if not (kept and download.file_sha256(dest) == item.sha256):
            download.download_file(
                item.url,
                dest,
                sha256=item.sha256,
                size=item.size,
                settings=settings,
                session=session,
                desc=item.name,
                came_from=came_from,
            )
        else:
            logger.info("using %s, downloaded and verified earlier", dest)
            came_from.append("")  # fetched by an earlier, interrupted install
        archive.extract_archive(dest, staging, merge=True)
    return dest


def _discard_downloads(paths: Sequence[Path]) -> None:
    """Delete archives once their install is committed; one in use is left to ``cache prune``."""
    for path in paths:
        held = try_lock(lock_path(path))
        if held is None:
            logger.debug("%s is in use by another install; leaving it", path)
            continue
        with held:
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("could not remove %s (%s); `llama-proc cache prune` will", path, err)


def _install(
    target: Path,
    variant: Variant,
    build: str,
    repo: str,
    settings: BuildView,
    session: requests.Session | None,
    metadata: Mapping[str, Any],
    *,
    force: bool,
    run_here: bool,
    require_device: DeviceRequirement | None = None,
    cpu: tuple[tuple[FeatureGroup, ...], dict[str, str]] = ((), {}),
) -> Installed:
    """Fetch, verify and unpack ``variant``'s archives into ``target`` (atomically, locked).

    ``cpu`` is this host's feature-group ladder and the groups off from the start (-> why):
    the CPU-variant libraries that use them are removed, and more on the way down the ladder
    when the compute check fails.
    """
    ladder, why = cpu
    initial = tuple(g for g in ladder if g.name in why)
    owned: list[requests.Session] = []
    downloaded: list[Path] = []

    def populate(staging: Path) -> Mapping[str, Any]:
        # Made here, not earlier: a process that finds the install done after waiting on the
        # lock never needs requests at all.
        sess = session
        if sess is None:
            sess = download.make_session(settings)
            owned.append(sess)
        items = _archives(variant, repo, build, settings, sess)
        came_from: list[str] = []
        downloaded.extend(_unpack(item, staging, settings, sess, came_from) for item in items)
        # After the sha256 check: a served attestation that does not verify refuses the install.
        attested = [
            (item.name, attest.check_asset(repo, item.name, item.sha256, settings, sess))
            for item in items
        ]
        removed = _prune(staging, initial) or []
        return {
            "cpu_off": [g.name for g in initial],
            "cpu_variants_removed": removed,
            "variant_id": variant.id,
            "build": build,
            "source": InstallSource.PREBUILT,
            "backend": variant.backend,
            "repo": repo,
            "url": items[0].url,
            "final_url": came_from[0] or None,
            "sha256": items[0].sha256,
            "assets": [item.record() for item in items],
            # Where each archive's bytes finally came from, after redirects ("" = kept from an
            # earlier, interrupted install).
            "final_urls": {
                item.name: where or None for item, where in zip(items, came_from, strict=True)
            },
            "mirror": settings.mirror,
            "attestation": attest.summarize(attested),
            **metadata,
        }

    def repair(staging: Path, groups: tuple[FeatureGroup, ...]) -> dict[str, Any] | None:
        removed = _prune(staging, groups)
        if not removed:
            return None
        return {"cpu_off": [g.name for g in groups], "cpu_variants_removed": removed}

    populate_fn: Callable[[Path], Mapping[str, Any]] = populate
    try:
        done = install_once(
            target,
            populate_fn,
            settings=settings,
            binaries=variant.binaries,
            os_name=variant.os,
            force=force,
            run_here=run_here,
            require_device=require_device,
            compute=ComputePlan(ladder=ladder, off=why, repair=repair),
        )
    finally:
        for sess in owned:
            sess.close()
    # Only now, with the install committed, are the archives no longer needed.
    _discard_downloads(downloaded)
    return done


def _prune(staging: Path, groups: tuple[FeatureGroup, ...]) -> list[str] | None:
    """Remove the staged CPU-variant libraries that use ``groups``; the names removed.

    They sit beside the binary, in the archive's one top folder. None when none was removed.
    """
    removed: list[str] = []
    for folder in {p.parent for p in staging.rglob("*ggml-cpu-*")}:
        removed += prune_cpu_variants(folder, groups)
    return removed or None


def install_prebuilt(
    res: Resolution,
    settings: BuildView,
    *,
    force: bool = False,
    session: requests.Session | None = None,
    require_device: DeviceRequirement | None = None,
) -> Installed:
    """Download, verify, unpack and smoke-check the variant's release archives into the cache.

    The binary archive and its runtime twins land in one folder. With ``require_device`` (the
    resolver's :func:`~llama_proc.provision.cache.verify.device_requirement`) the build must also
    list that GPU, or the install is refused with DeviceNotFoundError.

    Returns:
        The install, and whether this call made it (False: another process finished it
        while this one waited for the lock).

    Raises:
        NoMatchingVariantError: the release lacks the variant's archive or its runtime twin.
        ManifestError: a pattern matches several assets, or a pin contradicts the listing.
        DownloadError: the listing or an archive could not be fetched, or its size is wrong.
        ChecksumMismatchError: an archive's sha256 is wrong.
        ArchiveError: an archive is corrupt or unsafe.
        ProvisionError: the binary does not run here (``--version`` failed), or a plain-http
            mirror on another machine without pins.
        OfflineError: offline without a ``file://`` mirror.
        CacheLockTimeoutError: another process held the install lock too long.
    """
    target = install_dir(settings, res.build, res.variant.id)
    metadata = {"host": res.host.to_dict(), "manifest": res.manifest.path}
    cpu = initial_off(
        res.host.arch,
        res.host.cpu_features,
        res.manifest.known_bad_groups(res.build),
        settings.cpu_off,
    )
    return _install(
        target,
        res.variant,
        res.build,
        res.manifest.repo,
        settings,
        session,
        metadata,
        force=force,
        run_here=True,
        require_device=require_device,
        cpu=cpu,
    )


def parse_platform(text: str) -> HostInfo:
    """A host that is only a platform: ``OS-ARCH`` as ``--platform`` takes it.

    OS is ``linux``, ``macos`` or ``windows``; ARCH is ``x86_64`` or ``aarch64``/``arm64``
    (spelled the way the manifest spells it for that OS; ``amd64``/``x64`` are accepted too).
    Nothing else is known about such a host: no libc, CPU features or GPU driver.

    Raises:
        ConfigError: ``text`` is not ``OS-ARCH`` with a known OS and arch.
    """
    os_part, sep, arch_part = text.strip().lower().partition("-")
    os_name = normalize_os(os_part)
    arch = normalize_arch(arch_part, os_name) if arch_part else ""
    if not sep or os_name not in OSES or arch not in ARCHES:
        msg = (
            f"platform {text!r} is not OS-ARCH with OS one of {', '.join(OSES)} and ARCH one "
            "of x86_64, aarch64, arm64 (e.g. linux-x86_64, windows-x86_64, macos-arm64)"
        )
        raise ConfigError(msg)
    return HostInfo(os=os_name, arch=arch)


def _check_dest(dest: Path, variant: Variant, build: str, *, force: bool) -> None:
    """Refuse a folder that holds something other than an install this call may replace."""
    try:
        entries = list(dest.iterdir()) if dest.is_dir() else None
    except OSError as err:
        msg = f"cannot read the destination {dest}: {err.strerror or err}; pick another --dest"
        raise ProvisionError(msg) from err
    if dest.exists() and entries is None:
        msg = f"the destination {dest} exists and is not a folder; pick another --dest"
        raise ProvisionError(msg)
    if not entries:
        return
    # Installing replaces the folder as a whole: never a folder llama-proc did not make.
    if not (dest / INSTALL_JSON).is_file():
        msg = (
            f"the destination {dest} is not empty and holds no llama-proc install "
            f"({INSTALL_JSON}); pick a new or empty folder for --dest"
        )
        raise ProvisionError(msg)
    try:
        there = Install.from_dir(dest)
    except ProvisionError:
        return  # a broken install of ours: replacing it is what the user needs
    if not force and (there.variant_id, there.build) != (variant.id, build):
        msg = (
            f"the destination {dest} holds {there.variant_id} {there.build}, not {variant.id} "
            f"{build}; pass --force to replace it or pick another --dest"
        )
        raise ProvisionError(msg)


def fetch_for_platform(
    settings: Settings,
    platform: str,
    dest: Path,
    *,
    force: bool = False,
    manifest: Manifest | None = None,
    session: requests.Session | None = None,
) -> Installed:
    """Download, verify and unpack a variant for another machine into ``dest``; never run it.

    The archives are exactly those an install on a ``platform`` machine gets (the binary and
    its runtime twins), verified the same way; ``install.json`` is written and ``dest`` is
    made atomically under ``<dest>.lock``. The binaries are not smoke-checked: they are meant
    for the other machine. Which variant: ``settings.backend`` for that platform; with several
    (CUDA 12 and 13) the one asking least of the machine's driver, since it is unknown here.

    Args:
        settings: ``backend`` (not ``auto``: another machine's GPU cannot be detected from
            here), ``build``, ``mirror``, ``offline``, cache (for the downloads), timeouts.
        platform: ``OS-ARCH``, e.g. ``windows-x86_64`` (see :func:`parse_platform`).
        dest: the folder to create; an existing one must be empty or hold an install.
        force: replace an install already in ``dest``.
        manifest: the manifest (the shipped one when None).
        session: a ``requests`` session to reuse.

    Returns:
        The install in ``dest`` and whether this call made it (False: it was there already).

    Raises:
        ConfigError: ``platform`` is malformed, or the backend is ``auto``.
        NoMatchingVariantError: no such backend for that platform, or the release lacks its
            archive or runtime twin.
        ManifestError: a pattern matches several assets, or a pin contradicts the listing.
        DownloadError: the listing or an archive could not be fetched, or its size is wrong.
        ChecksumMismatchError: an archive's sha256 is wrong.
        ArchiveError: an archive is corrupt or unsafe.
        OfflineError: offline without a ``file://`` mirror.
        ProvisionError: ``dest`` holds something else, or a plain-http mirror on another
            machine without pins.
        CacheLockTimeoutError: another process held the lock too long.
    """
    host = parse_platform(platform)
    if settings.variant == AUTO:
        msg = (
            f"--platform {host.platform} needs a backend: pass --variant (e.g. cpu, cuda, "
            "vulkan); auto detects this machine's GPU, not the other machine's"
        )
        raise ConfigError(msg)
    manifest = manifest or load_manifest()
    variant = select_variant(manifest, host, settings.variant).variant
    # A release tag (vX.Y.Z) or latest names the b build that has the binaries.
    build = resolve_build(settings.build or manifest.build, manifest.repo, settings, session)
    dest = Path(dest).expanduser().absolute()
    _check_dest(dest, variant, build, force=force)
    metadata = {"platform": host.platform, "manifest": manifest.path}
    return _install(
        dest,
        variant,
        build,
        manifest.repo,
        settings,
        session,
        metadata,
        force=force,
        run_here=False,
    )
