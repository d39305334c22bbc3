"""A GitHub release document -> its assets; a variant -> the assets it installs.

Assets are matched by the manifest's regular expressions against the release's own asset list,
never by guessing URLs. The listing's ``digest`` (``sha256:<hex>``) gives each asset a checksum;
a sha256 pinned in ``variants.toml`` wins, and a pin that contradicts the digest is an error.
Download URLs stay on the listing's origin (see :mod:`llama_proc.provision.fetch.releases`).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import ManifestError, NoMatchingVariantError, ProvisionError
from llama_proc.provision.fetch.download import plain_remote

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from llama_proc.provision.manifest import Variant

__all__ = [
    "GITHUB_API",
    "GITHUB_DOWNLOAD_HOST",
    "ReleaseAsset",
    "match_assets",
    "parse_listing",
]

GITHUB_API: Final = "https://api.github.com"
GITHUB_DOWNLOAD_HOST: Final = "github.com"
"""Where the GitHub API's listings may send downloads (over https only)."""
_DIGEST_RE: Final = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class ReleaseAsset:
    """One file attached to a release."""

    name: str
    url: str
    """Where to download it (the mirror's URL when a mirror is set)."""
    size: int
    """Bytes, from the listing; downloads are checked against it."""
    sha256: str | None
    """Lowercase hex; from the pin in variants.toml, else the listing's digest; None = unknown."""

    def require_sha256(self) -> str:
        """The checksum to verify against.

        Raises:
            ProvisionError: neither a pin nor a listing digest is known for this asset.
        """
        if self.sha256 is None:
            msg = (
                f"no sha256 is known for {self.name} (the release listing has no digest that "
                "can be trusted and variants.toml pins none); add it to the variant's sha256 "
                "table"
            )
            raise ProvisionError(msg)
        return self.sha256


def _check_asset_name(name: str, repo: str, tag: str) -> None:
    # The name becomes a URL path segment and a file name in the cache.
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        msg = (
            f"asset name {name!r} in the release listing for {repo} {tag} is not a plain file "
            "name; refusing the listing (check LLAMA_PROC_MIRROR)"
        )
        raise ProvisionError(msg)


def _github_download_url(raw: Mapping[str, Any], name: str, repo: str, tag: str) -> str:
    url = raw.get("browser_download_url") or ""
    if not isinstance(url, str) or not url:
        msg = f"asset {name} of {repo} {tag} has no browser_download_url"
        raise ProvisionError(msg)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        msg = (
            f"the release listing for {repo} {tag} names a download of {name} that is not "
            f"https ({url}); refusing the listing"
        )
        raise ProvisionError(msg)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if host != GITHUB_DOWNLOAD_HOST or port is not None or parts.username is not None:
        msg = (
            f"the release listing for {repo} {tag} names a download of {name} on another host "
            f"({parts.netloc}); a listing from {GITHUB_API} may only send downloads to "
            f"https://{GITHUB_DOWNLOAD_HOST}; refusing the listing"
        )
        raise ProvisionError(msg)
    return url


def parse_listing(data: Any, repo: str, tag: str, mirror: str | None = None) -> list[ReleaseAsset]:
    """Turn a GitHub release document into assets (download URLs on the mirror when set).

    Download URLs stay on the listing's origin: on the mirror (built from the asset name, the
    listing's own URLs are not used) or, for GitHub's API, on ``https://github.com``. The
    digests of a plain-http mirror on another machine are dropped (only pins can vouch there).

    Raises:
        ProvisionError: ``data`` does not have the GitHub release shape, is the listing of
            another tag, has an asset without a plain file name or a size, or names a download
            off its origin.
    """
    raw_assets = data.get("assets") if isinstance(data, dict) else None
    if not isinstance(raw_assets, list):
        msg = f"the release listing for {repo} {tag} has no 'assets' list"
        raise ProvisionError(msg)
    listed_tag = data.get("tag_name")
    if listed_tag is not None and listed_tag != tag:
        msg = (
            f"the release listing fetched for {repo} {tag} is the listing of {listed_tag!r}; "
            "refusing it (check LLAMA_PROC_MIRROR)"
        )
        raise ProvisionError(msg)
    trust_digests = mirror is None or not plain_remote(mirror)
    out: list[ReleaseAsset] = []
    for raw in raw_assets:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            msg = f"the release listing for {repo} {tag} has a malformed asset entry"
            raise ProvisionError(msg)
        name: str = raw["name"]
        _check_asset_name(name, repo, tag)
        if mirror:
            segment = urllib.parse.quote(name, safe="")
            url = f"{mirror.rstrip('/')}/{repo}/releases/download/{tag}/{segment}"
        else:
            url = _github_download_url(raw, name, repo, tag)
        size = raw.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            msg = (
                f"asset {name} of {repo} {tag} has no valid size ({size!r}) in the release "
                "listing; refusing the listing"
            )
            raise ProvisionError(msg)
        digest = raw.get("digest")
        match = _DIGEST_RE.match(digest) if isinstance(digest, str) and trust_digests else None
        out.append(
            ReleaseAsset(
                name=name,
                url=url,
                size=size,
                sha256=match.group(1).lower() if match else None,
            )
        )
    return out


def _pinned(asset: ReleaseAsset, variant: Variant) -> ReleaseAsset:
    size = variant.size.get(asset.name)
    if size is not None and size != asset.size:
        msg = (
            f"variants.toml pins size {size} for {asset.name} (variant {variant.id}) but the "
            f"release listing says {asset.size} bytes; the pin or the mirror is wrong — "
            "refusing to guess which"
        )
        raise ManifestError(msg)
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


def match_one(
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
    :meth:`ReleaseAsset.require_sha256`). A size pinned in the manifest must equal the
    listing's.

    Args:
        variant: the manifest variant.
        build: the release tag (fills ``{build}`` in the patterns).
        assets: from :func:`fetch_release_assets`.

    Returns:
        ``(main archive, extra archives)``.

    Raises:
        NoMatchingVariantError: the variant has no prebuilt, or a pattern matches no asset
            (the message lists the assets that exist).
        ManifestError: a pattern matches several assets, or a pin (sha256 or size)
            contradicts the listing.
    """
    if not variant.has_prebuilt:
        msg = f"variant {variant.id} has no prebuilt archive upstream; build it from source"
        raise NoMatchingVariantError(msg)
    main = _pinned(match_one(variant.asset_regex(build), assets, variant, build), variant)
    extras = [
        _pinned(match_one(p, assets, variant, build), variant)
        for p in variant.extra_asset_regexes(build)
    ]
    return main, extras
