"""GitHub release listings: fetch (or read the cached copy), parse, and match assets.

Assets are matched by the manifest's regular expressions against the release's own asset list,
never by guessing URLs. The listing's ``digest`` (``sha256:<hex>``) gives each asset a checksum;
a sha256 pinned in ``variants.toml`` wins, and a pin that contradicts the digest is an error.

With ``settings.mirror`` set, the listing comes from
``{mirror}/repos/{repo}/releases/tags/{tag}`` and assets from
``{mirror}/{repo}/releases/download/{tag}/{name}`` (the GitHub layout under another root).
The raw listing is cached at ``cache_dir/releases/<owner>_<name>/<tag>.json`` for offline use,
together with its origin (the API root it came from).

The trust chain:

* A listing's origin is GitHub's API or the mirror. Downloads stay on it: from the mirror, or
  for GitHub's API on ``https://github.com``; a listing (fetched or cached) that names a
  download anywhere else is refused, and a cached listing is used only for the origin it came
  from, so a listing from a mirror never steers a download once the mirror is unset.
* A plain-http mirror on another machine could have its listing and archives swapped on the
  way. It is refused before any connection unless every asset the variant fetches has a sha256
  pinned in ``variants.toml``, and its listing's digests are never used.
* Each asset's size from the listing is checked as well as its sha256 (see
  :func:`llama_proc.provision.fetch.download.download_file`).

Parsing and matching live in :mod:`~llama_proc.provision.fetch.listing`; pinning a build in
:mod:`~llama_proc.provision.fetch.pins`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.errors import DownloadError, OfflineError, ProvisionError
from llama_proc.provision.fetch.download import fetch_page, plain_remote
from llama_proc.provision.fetch.listing import GITHUB_API, ReleaseAsset, parse_listing

if TYPE_CHECKING:
    from collections.abc import Mapping

    import requests

    from llama_proc.provision.manifest import Variant
    from llama_proc.provision.views import CacheView, FetchView, NetView

__all__ = [
    "GITHUB_ACCEPT",
    "GITHUB_API_VERSION",
    "api_base",
    "check_repo_tag",
    "fetch_api_json",
    "fetch_release_assets",
    "listing_cache_path",
    "require_trusted_mirror",
    "write_json_atomically",
]

logger = logging.getLogger(__name__)

GITHUB_ACCEPT: Final = "application/vnd.github+json"
GITHUB_API_VERSION: Final = "2022-11-28"
_ORIGIN_KEY: Final = "llama_proc_origin"
"""Key added to a cached listing: the API root it came from."""
_REPO_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def api_base(settings: NetView) -> str:
    """The release API root: the mirror when set, else GitHub's API."""
    return (settings.mirror or GITHUB_API).rstrip("/")


def listing_cache_path(settings: CacheView, repo: str, tag: str) -> Path:
    """Where the listing for ``repo``/``tag`` is cached (the file records its origin)."""
    return settings.cache_dir / "releases" / repo.replace("/", "_") / f"{tag}.json"


def _unpinned_patterns(variant: Variant, build: str) -> list[str]:
    if not variant.has_prebuilt:
        return [f"(variant {variant.id} has no prebuilt)"]
    patterns = [variant.asset_regex(build), *variant.extra_asset_regexes(build)]
    return [p.pattern for p in patterns if not any(p.search(name) for name in variant.sha256)]


def require_trusted_mirror(settings: NetView, variant: Variant | None, build: str) -> None:
    """Refuse a plain-http mirror on another machine unless ``variant`` pins every asset.

    Over plain http anyone on the path can swap the archives together with the digests of the
    listing that vouches for them; only sha256 values pinned in ``variants.toml`` still hold.
    https, loopback and ``file://`` mirrors need no pins.

    Args:
        settings: ``mirror``.
        variant: what is about to be fetched (None = unknown, so nothing counts as pinned).
        build: the release tag (fills ``{build}`` in the variant's patterns).

    Raises:
        ProvisionError: the mirror is plain http to another machine and some asset the variant
            fetches has no pinned sha256.
    """
    mirror = settings.mirror
    if not mirror or not plain_remote(mirror):
        return
    unpinned = ["(no variant given)"] if variant is None else _unpinned_patterns(variant, build)
    if not unpinned:
        return
    which = f"variant {variant.id}" if variant is not None else "the variant"
    msg = (
        f"LLAMA_PROC_MIRROR {mirror} is plain http to another machine: anyone on the path can "
        "swap the archives together with the sha256 digests its listing vouches for; use an "
        "https:// mirror, a loopback or file:// mirror, or pin the sha256 of every asset of "
        f"{which} in variants.toml (unpinned: {', '.join(unpinned)})"
    )
    raise ProvisionError(msg)


def check_repo_tag(repo: str, tag: str) -> None:
    """Refuse a repository or tag that is not safe in a URL path and a cache file name."""
    if not _REPO_RE.match(repo) or ".." in repo:
        msg = f"{repo!r} is not a GitHub repository name like owner/name"
        raise ProvisionError(msg)
    if not tag or "/" in tag or tag.startswith("."):
        msg = f"{tag!r} is not a release tag"
        raise ProvisionError(msg)


def fetch_release_assets(
    repo: str,
    tag: str,
    settings: FetchView,
    session: requests.Session | None = None,
    *,
    variant: Variant | None = None,
) -> list[ReleaseAsset]:
    """The assets of release ``tag`` of ``repo``, from the API (or mirror) or the cache.

    Online, the listing is fetched and cached; if the fetch fails and a listing cached from the
    same origin exists, that one is used with a warning. Offline, only the cached listing is
    used, and only when it came from the same origin.

    Args:
        repo: ``owner/name``, e.g. ``ggml-org/llama.cpp``.
        tag: release tag, e.g. ``b11434``.
        settings: mirror, offline flag, cache folder, timeout, GitHub token.
        session: a ``requests`` session to reuse.
        variant: the variant about to be fetched; a plain-http mirror on another machine is
            used only when it pins the sha256 of every asset (see
            :func:`require_trusted_mirror`).

    Raises:
        OfflineError: offline and no listing from this origin was cached.
        DownloadError: the listing could not be fetched (and none is cached from this origin).
        ProvisionError: the listing is not a GitHub release document, names downloads off its
            origin, or the mirror is plain http to another machine without pins.
    """
    check_repo_tag(repo, tag)
    require_trusted_mirror(settings, variant, tag)  # before any connection
    cached = listing_cache_path(settings, repo, tag)
    origin = api_base(settings)
    url = f"{origin}/repos/{repo}/releases/tags/{tag}"
    # A file:// mirror is local, so it stays usable in offline mode.
    if settings.offline and not origin.lower().startswith("file:"):
        data, came_from = _read_cached(cached)
        if data is None:
            msg = (
                f"offline mode (LLAMA_PROC_OFFLINE) and the release listing for {repo} {tag} "
                f"was never cached (expected {cached}); run once online or unset offline mode"
            )
            raise OfflineError(msg)
        if came_from != origin:
            where = (
                "unset LLAMA_PROC_MIRROR"
                if came_from == GITHUB_API
                else f"set LLAMA_PROC_MIRROR={came_from}"
            )
            msg = (
                f"offline mode (LLAMA_PROC_OFFLINE) and the cached release listing for {repo} "
                f"{tag} came from {came_from or 'an unknown origin'}, not {origin}; {where} or "
                "run once online"
            )
            raise OfflineError(msg)
        return parse_listing(data, repo, tag, settings.mirror)
    hints = {
        404: f"release {tag} not found in {repo}; check LLAMA_PROC_BUILD"
        + (" and LLAMA_PROC_MIRROR" if settings.mirror else ""),
        403: "GitHub API rate limit or access denied; set LLAMA_PROC_GITHUB_TOKEN",
    }
    try:
        data = fetch_api_json(url, settings, session=session, hints=hints)
    except DownloadError as err:
        data, came_from = _read_cached(cached)
        if data is not None and came_from == origin:
            logger.warning("%s; using the cached release listing %s", err, cached)
            return parse_listing(data, repo, tag, settings.mirror)
        raise
    assets = parse_listing(data, repo, tag, settings.mirror)  # checked before it is cached
    write_json_atomically(cached, {**data, _ORIGIN_KEY: origin})
    return assets


def fetch_api_json(
    url: str,
    settings: NetView,
    *,
    session: requests.Session | None,
    hints: Mapping[int, str],
) -> Any:
    """One GitHub release-API answer (or a mirror's), parsed.

    Args:
        url: the API URL.
        settings: mirror, offline flag, timeout, token.
        session: the session to reuse (None = a new one).
        hints: per HTTP status, what the error message tells the user to do.

    Raises:
        DownloadError: the request failed.
        ProvisionError: the answer is not JSON.
    """
    page = fetch_page(
        url,
        settings,
        session=session,
        accept=GITHUB_ACCEPT,
        headers={"X-GitHub-Api-Version": GITHUB_API_VERSION},
        hints=hints,
    )
    try:
        return json.loads(page.text)
    except json.JSONDecodeError as err:
        msg = f"{url} did not return JSON ({err}); is LLAMA_PROC_MIRROR a release mirror?"
        raise ProvisionError(msg) from err


def _read_cached(path: Path) -> tuple[Any, str | None]:
    """The cached listing and its origin; ``(None, None)`` when nothing is cached."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        msg = f"cached release listing {path} is unreadable ({err}); delete it and retry online"
        raise ProvisionError(msg) from err
    origin = data.get(_ORIGIN_KEY) if isinstance(data, dict) else None
    return data, origin if isinstance(origin, str) else None


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` (best effort: a failure is logged, not raised)."""
    # Write-then-rename so a concurrent reader never sees half a listing.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        Path(tmp).replace(path)
    except OSError as err:
        logger.warning("could not cache the release listing at %s: %s", path, err)
