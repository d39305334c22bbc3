"""Installing a prebuilt: download the release archive(s), verify, extract, smoke-check.

The variant's main archive and its extra archives (the CUDA runtime twin) are fetched into
``downloads/`` (sha256-verified, resumable), unpacked into one staging folder and installed by
:func:`~llama_proc.provision.installer.install_atomically`. Only the ladder's ``prebuilt`` step
imports this module, so a cache hit never loads ``requests`` or the archive readers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from llama_proc.provision import archive, download, releases
from llama_proc.provision.installer import install_atomically
from llama_proc.provision.layout import downloads_dir, install_dir
from llama_proc.provision.locking import cache_lock, lock_path, remove_tree
from llama_proc.vocab import InstallSource

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.install import Install
    from llama_proc.provision.releases import ReleaseAsset
    from llama_proc.provision.resolve import Resolution

__all__ = ["install_prebuilt"]

logger = logging.getLogger(__name__)

_EXTRACT_DIR: Final = ".extract"
"""Scratch folder inside staging where each archive is unpacked before it is merged."""


def _merge_tree(src: Path, dest: Path) -> None:
    """Move ``src``'s entries into ``dest`` (same filesystem: renames, symlinks kept)."""
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            _merge_tree(entry, target)
            continue
        if target.exists() or target.is_symlink():
            logger.warning("%s is in more than one archive; the later one wins", entry.name)
            if target.is_dir() and not target.is_symlink():
                remove_tree(target)
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
    sha256 = asset.require_sha256()
    folder = downloads_dir(settings)
    dest = folder / asset.name
    # The archive is shared by the variants built from it (cpu and rpc), so it has its own
    # lock; a crash leaves dest.part behind for the next attempt to resume.
    with cache_lock(lock_path(dest), settings.lock_timeout):
        if not (dest.is_file() and download.file_sha256(dest) == sha256):
            download.download_file(
                asset.url, dest, sha256=sha256, settings=settings, session=session, desc=asset.name
            )
        scratch = staging / f"{_EXTRACT_DIR}{index}"
        root = archive.extract_archive(dest, scratch)
        _merge_tree(root, staging)
        remove_tree(scratch)
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
            "source": InstallSource.PREBUILT,
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
