"""GitHub release listings: fetch (or read the cached copy), parse, and match assets.

Assets are matched by the manifest's regular expressions against the release's own asset list,
never by guessing URLs. The listing's ``digest`` (``sha256:<hex>``) gives each asset a checksum;
a sha256 pinned in ``variants.toml`` wins, and a pin that contradicts the digest is an error.

With ``settings.mirror`` set, the listing comes from
``{mirror}/repos/{repo}/releases/tags/{tag}`` and assets from
``{mirror}/{repo}/releases/download/{tag}/{name}`` (the GitHub layout under another root).
The raw listing is cached at ``cache_dir/releases/<owner>_<name>/<tag>.json`` for offline use.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import (
    DownloadError,
    ManifestError,
    NoMatchingVariantError,
    OfflineError,
    ProvisionError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.manifest import Variant

__all__ = [
    "GITHUB_API",
    "ReleaseAsset",
    "api_base",
    "fetch_release_assets",
    "listing_cache_path",
    "match_assets",
    "parse_listing",
]

logger = logging.getLogger(__name__)

GITHUB_API: Final = "https://api.github.com"
GITHUB_ACCEPT: Final = "application/vnd.github+json"
GITHUB_API_VERSION: Final = "2022-11-28"
_DIGEST_RE: Final = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_REPO_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ReleaseAsset:
    """One file attached to a release."""

    name: str
    url: str
    """Where to download it (the mirror's URL when a mirror is set)."""
    size: int
    sha256: str | None
    """Lowercase hex; from the pin in variants.toml, else the listing's digest; None = unknown."""

    def require_sha256(self) -> str:
        """The checksum to verify against.

        Raises:
            ProvisionError: neither a pin nor a listing digest is known for this asset.
        """
        if self.sha256 is None:
            msg = (
                f"no sha256 is known for {self.name} (the release listing has no digest and "
                "variants.toml pins none); add it to the variant's sha256 table"
            )
            raise ProvisionError(msg)
        return self.sha256


def api_base(settings: Settings) -> str:
    """The release API root: the mirror when set, else GitHub's API."""
    return (settings.mirror or GITHUB_API).rstrip("/")


def listing_cache_path(settings: Settings, repo: str, tag: str) -> Path:
    """Where the listing for ``repo``/``tag`` is cached."""
    return settings.cache_dir / "releases" / repo.replace("/", "_") / f"{tag}.json"


def _check_repo_tag(repo: str, tag: str) -> None:
    if not _REPO_RE.match(repo) or ".." in repo:
        msg = f"{repo!r} is not a GitHub repository name like owner/name"
        raise ProvisionError(msg)
    if not tag or "/" in tag or tag.startswith("."):
        msg = f"{tag!r} is not a release tag"
        raise ProvisionError(msg)


def fetch_release_assets(
    repo: str,
    tag: str,
    settings: Settings,
    session: requests.Session | None = None,
) -> list[ReleaseAsset]:
    """The assets of release ``tag`` of ``repo``, from the API (or mirror) or the cache.

    Online, the listing is fetched and cached; if the fetch fails and a cached listing exists,
    the cached one is used with a warning. Offline, only the cached listing is used.

    Args:
        repo: ``owner/name``, e.g. ``ggml-org/llama.cpp``.
        tag: release tag, e.g. ``b11434``.
        settings: mirror, offline flag, cache folder, timeout, GitHub token.
        session: a ``requests`` session to reuse.

    Raises:
        OfflineError: offline and the listing was never cached.
        DownloadError: the listing could not be fetched (and none is cached).
        ProvisionError: the listing is not a GitHub release document.
    """
    from llama_proc.provision.download import fetch_page

    _check_repo_tag(repo, tag)
    cached = listing_cache_path(settings, repo, tag)
    base = api_base(settings)
    url = f"{base}/repos/{repo}/releases/tags/{tag}"
    # A file:// mirror is local, so it stays usable in offline mode.
    if settings.offline and not base.lower().startswith("file:"):
        if not cached.is_file():
            msg = (
                f"offline mode (LLAMA_PROC_OFFLINE) and the release listing for {repo} {tag} "
                f"was never cached (expected {cached}); run once online or unset offline mode"
            )
            raise OfflineError(msg)
        return parse_listing(_read_cached(cached), repo, tag, settings.mirror)
    hints = {
        404: f"release {tag} not found in {repo}; check LLAMA_PROC_BUILD"
        + (" and LLAMA_PROC_MIRROR" if settings.mirror else ""),
        403: "GitHub API rate limit or access denied; set LLAMA_PROC_GITHUB_TOKEN",
    }
    try:
        page = fetch_page(
            url,
            settings,
            session=session,
            accept=GITHUB_ACCEPT,
            headers={"X-GitHub-Api-Version": GITHUB_API_VERSION},
            hints=hints,
        )
    except DownloadError as err:
        if cached.is_file():
            logger.warning("%s; using the cached release listing %s", err, cached)
            return parse_listing(_read_cached(cached), repo, tag, settings.mirror)
        raise
    try:
        data = json.loads(page.text)
    except json.JSONDecodeError as err:
        msg = f"{url} did not return JSON ({err}); is LLAMA_PROC_MIRROR a release mirror?"
        raise ProvisionError(msg) from err
    assets = parse_listing(data, repo, tag, settings.mirror)
    _write_cache(cached, data)
    return assets


def _read_cached(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        msg = f"cached release listing {path} is unreadable ({err}); delete it and retry online"
        raise ProvisionError(msg) from err


def _write_cache(path: Path, data: Any) -> None:
    # Write-then-rename so a concurrent reader never sees half a listing.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        Path(tmp).replace(path)
    except OSError as err:
        logger.warning("could not cache the release listing at %s: %s", path, err)


def parse_listing(data: Any, repo: str, tag: str, mirror: str | None = None) -> list[ReleaseAsset]:
    """Turn a GitHub release document into assets (download URLs rewritten for a mirror).

    Raises:
        ProvisionError: ``data`` does not have the GitHub release shape.
    """
    raw_assets = data.get("assets") if isinstance(data, dict) else None
    if not isinstance(raw_assets, list):
        msg = f"the release listing for {repo} {tag} has no 'assets' list"
        raise ProvisionError(msg)
    out: list[ReleaseAsset] = []
    for raw in raw_assets:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            msg = f"the release listing for {repo} {tag} has a malformed asset entry"
            raise ProvisionError(msg)
        name: str = raw["name"]
        if mirror:
            url = f"{mirror.rstrip('/')}/{repo}/releases/download/{tag}/{name}"
        else:
            url = raw.get("browser_download_url") or ""
            if not isinstance(url, str) or not url:
                msg = f"asset {name} of {repo} {tag} has no browser_download_url"
                raise ProvisionError(msg)
        digest = raw.get("digest")
        match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
        size = raw.get("size")
        out.append(
            ReleaseAsset(
                name=name,
                url=url,
                size=size if isinstance(size, int) else 0,
                sha256=match.group(1).lower() if match else None,
            )
        )
    return out


def _pinned(asset: ReleaseAsset, variant: Variant) -> ReleaseAsset:
    pin = variant.sha256.get(asset.name)
    if not pin:
        return asset
    if asset.sha256 is not None and asset.sha256 != pin:
        msg = (
            f"variants.toml pins sha256 {pin} for {asset.name} (variant {variant.id}) but the "
            f"release listing's digest is {asset.sha256}; the pin or the mirror is wrong — "
            "refusing to guess which"
        )
        raise ManifestError(msg)
    return replace(asset, sha256=pin)


def _match_one(
    pattern: re.Pattern[str], assets: Sequence[ReleaseAsset], variant: Variant, build: str
) -> ReleaseAsset:
    hits = [a for a in assets if pattern.search(a.name)]
    if not hits:
        names = ", ".join(sorted(a.name for a in assets)) or "none"
        msg = (
            f"no asset of release {build} matches {pattern.pattern!r} (variant {variant.id}); "
            f"the release has: {names}"
        )
        raise NoMatchingVariantError(msg)
    if len(hits) > 1:
        names = ", ".join(sorted(a.name for a in hits))
        msg = (
            f"asset pattern {pattern.pattern!r} of variant {variant.id} matches several assets "
            f"of release {build}: {names}; anchor it so it matches exactly one"
        )
        raise ManifestError(msg)
    return hits[0]


def match_assets(
    variant: Variant, build: str, assets: Sequence[ReleaseAsset]
) -> tuple[ReleaseAsset, list[ReleaseAsset]]:
    """Pick the variant's archive (and its extra archives) from a release's assets.

    Each returned asset carries the sha256 to verify: the manifest's pin when there is one,
    else the listing's digest (``None`` when neither exists; see
    :meth:`ReleaseAsset.require_sha256`).

    Args:
        variant: the manifest variant.
        build: the release tag (fills ``{build}`` in the patterns).
        assets: from :func:`fetch_release_assets`.

    Returns:
        ``(main archive, extra archives)``.

    Raises:
        NoMatchingVariantError: the variant has no prebuilt, or a pattern matches no asset
            (the message lists the assets that exist).
        ManifestError: a pattern matches several assets, or a pin contradicts the digest.
    """
    if not variant.has_prebuilt:
        msg = f"variant {variant.id} has no prebuilt archive upstream; build it from source"
        raise NoMatchingVariantError(msg)
    main = _pinned(_match_one(variant.asset_regex(build), assets, variant, build), variant)
    extras = [
        _pinned(_match_one(p, assets, variant, build), variant)
        for p in variant.extra_asset_regexes(build)
    ]
    return main, extras
