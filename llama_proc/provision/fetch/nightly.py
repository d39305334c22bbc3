"""Release tags and ``latest`` -> the ``bNNNN`` build that has binaries.

Since Aug 2026 upstream's semver tags (``v0.2.0`` ... ``v1.0.0``) carry no binaries: their only
asset, ``nightly-tag.txt``, names the ``b`` build that has them. The ``b`` tags are marked
prerelease, so GitHub's ``/releases/latest`` points at a semver tag without binaries.

* ``bNNNN`` is used as is (no request).
* ``vX.Y.Z``: its listing's ``nightly-tag.txt`` is read (a few bytes at most; one line, exactly
  ``b<digits>``), and the build it names must be a release with binaries. The mapping is
  remembered beside the cached listings (for the origin it came from), so it works offline later.
* ``latest``: ``/releases/latest``; a ``b`` tag with binaries is used, a semver tag is followed
  through its ``nightly-tag.txt``. It always asks the origin (never remembered).

Listings come through :func:`~llama_proc.provision.fetch.releases.fetch_release_assets`, so the
mirror's trust rules hold here too.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Final

from llama_proc.config import is_build_tag
from llama_proc.errors import DownloadError, OfflineError, ProvisionError
from llama_proc.provision.fetch.download import fetch_page
from llama_proc.provision.fetch.listing import ReleaseAsset, parse_listing
from llama_proc.provision.fetch.releases import (
    api_base,
    check_repo_tag,
    fetch_api_json,
    fetch_release_assets,
    listing_cache_path,
    write_json_atomically,
)

if TYPE_CHECKING:
    from pathlib import Path

    import requests

    from llama_proc.provision.views import CacheView, FetchView

__all__ = ["LATEST", "NIGHTLY_TAG_ASSET", "resolve_build"]

logger = logging.getLogger(__name__)

LATEST: Final = "latest"
NIGHTLY_TAG_ASSET: Final = "nightly-tag.txt"
MAX_NIGHTLY_TAG_BYTES: Final = 64
"""``b`` and a build number, and a newline: anything longer is not a nightly tag."""
_NIGHTLY_BODY_RE: Final = re.compile(rb"^(b[0-9]{1,12})\r?\n?$")
_SEMVER_RE: Final = re.compile(r"^v[0-9]+\.[0-9]+\.[0-9]+$")


def resolve_build(
    build: str, repo: str, settings: FetchView, session: requests.Session | None = None
) -> str:
    """The ``bNNNN`` build that ``build`` (``bNNNN``, ``vX.Y.Z`` or ``latest``) names.

    Args:
        build: the requested build.
        repo: ``owner/name``.
        settings: mirror, offline flag, cache folder, timeout, GitHub token.
        session: a ``requests`` session to reuse.

    Raises:
        OfflineError: offline, and ``latest`` was asked for or the tag was never resolved here.
        DownloadError: a listing or ``nightly-tag.txt`` could not be fetched.
        ProvisionError: the tag has no ``nightly-tag.txt``, it does not hold one ``b<digits>``
            line, or the build it names is missing or has no binaries.
    """
    if is_build_tag(build):
        return build
    if build == LATEST:
        return _resolve_latest(repo, settings, session)
    if _SEMVER_RE.match(build):
        return _resolve_semver(build, repo, settings, session)
    msg = f"{build!r} is not a llama.cpp build (bNNNN), release tag (vX.Y.Z) or latest"
    raise ProvisionError(msg)


def _memo_path(settings: CacheView, repo: str, tag: str) -> Path:
    return listing_cache_path(settings, repo, tag).with_suffix(".nightly.json")


def _recall(settings: FetchView, repo: str, tag: str) -> str | None:
    path = _memo_path(settings, repo, tag)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("origin") != api_base(settings):
        return None
    found = data.get("build")
    return found if isinstance(found, str) and is_build_tag(found) else None


def _resolve_semver(
    tag: str, repo: str, settings: FetchView, session: requests.Session | None
) -> str:
    remembered = _recall(settings, repo, tag)
    if remembered is not None:
        return remembered
    assets = fetch_release_assets(repo, tag, settings, session)
    found = _follow(tag, repo, assets, settings, session)
    write_json_atomically(
        _memo_path(settings, repo, tag), {"build": found, "origin": api_base(settings)}
    )
    logger.info("%s %s is build %s (its %s)", repo, tag, found, NIGHTLY_TAG_ASSET)
    return found


def _resolve_latest(repo: str, settings: FetchView, session: requests.Session | None) -> str:
    check_repo_tag(repo, LATEST)
    origin = api_base(settings)
    if settings.offline and not origin.lower().startswith("file:"):
        msg = (
            "offline mode (LLAMA_PROC_OFFLINE) and the build is latest, which only the release "
            "API can name; pass --build bNNNN (or LLAMA_PROC_BUILD) or run online"
        )
        raise OfflineError(msg)
    url = f"{origin}/repos/{repo}/releases/latest"
    data = fetch_api_json(
        url,
        settings,
        session=session,
        hints={404: f"{repo} has no latest release; pass --build bNNNN"},
    )
    tag = data.get("tag_name") if isinstance(data, dict) else None
    if not isinstance(tag, str):
        msg = f"{url} names no tag_name; is LLAMA_PROC_MIRROR a release mirror?"
        raise ProvisionError(msg)
    check_repo_tag(repo, tag)
    assets = parse_listing(data, repo, tag, settings.mirror)
    if is_build_tag(tag) and _has_binaries(tag, assets):
        found = tag
    elif _SEMVER_RE.match(tag):
        found = _follow(tag, repo, assets, settings, session)
    else:
        msg = (
            f"the latest release of {repo} is {tag}, which has no binaries and no "
            f"{NIGHTLY_TAG_ASSET}; pass --build bNNNN"
        )
        raise ProvisionError(msg)
    logger.info("the latest release of %s is %s: build %s", repo, tag, found)
    return found


def _has_binaries(build: str, assets: list[ReleaseAsset]) -> bool:
    return any(a.name.startswith(f"llama-{build}-bin-") for a in assets)


def _follow(
    tag: str,
    repo: str,
    assets: list[ReleaseAsset],
    settings: FetchView,
    session: requests.Session | None,
) -> str:
    """The build ``tag``'s ``nightly-tag.txt`` names, checked to be a release with binaries."""
    asset = next((a for a in assets if a.name == NIGHTLY_TAG_ASSET), None)
    if asset is None:
        msg = (
            f"release {tag} of {repo} has no {NIGHTLY_TAG_ASSET} naming its build; pass "
            "--build bNNNN"
        )
        raise ProvisionError(msg)
    if asset.size > MAX_NIGHTLY_TAG_BYTES:
        msg = (
            f"the {NIGHTLY_TAG_ASSET} of {repo} {tag} is listed at {asset.size} bytes; a build "
            f"tag takes at most {MAX_NIGHTLY_TAG_BYTES}: refusing it (check LLAMA_PROC_MIRROR)"
        )
        raise ProvisionError(msg)
    try:
        page = fetch_page(asset.url, settings, session=session, max_bytes=MAX_NIGHTLY_TAG_BYTES)
    except DownloadError as err:
        msg = f"cannot read the {NIGHTLY_TAG_ASSET} of {repo} {tag}: {err}"
        raise DownloadError(msg) from err
    body = page.text.encode("utf-8", errors="replace")
    match = _NIGHTLY_BODY_RE.match(body)
    if match is None:
        shown = body[:MAX_NIGHTLY_TAG_BYTES].decode("ascii", errors="replace")
        msg = (
            f"the {NIGHTLY_TAG_ASSET} of {repo} {tag} holds {shown!r}, not one b<digits> line; "
            "refusing it (pass --build bNNNN)"
        )
        raise ProvisionError(msg)
    build = match.group(1).decode("ascii")
    try:
        listed = fetch_release_assets(repo, build, settings, session)
    except DownloadError as err:
        msg = f"{repo} {tag} names build {build} in its {NIGHTLY_TAG_ASSET}, but: {err}"
        raise ProvisionError(msg) from err
    if not _has_binaries(build, listed):
        msg = (
            f"{repo} {tag} names build {build} in its {NIGHTLY_TAG_ASSET}, which has no "
            "binaries (no llama-<build>-bin-* asset); pass --build bNNNN"
        )
        raise ProvisionError(msg)
    return build
