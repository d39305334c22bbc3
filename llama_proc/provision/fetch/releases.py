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
* :func:`pin_release` reads the sha256 and size of every asset of a build, and the commit of
  its tag, for maintainers to pin in ``variants.toml``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import urllib.parse
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
from llama_proc.provision.fetch.download import fetch_page, is_local_url, make_session, plain_remote
from llama_proc.provision.manifest import load_manifest, parse_manifest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.manifest import Manifest, Variant

__all__ = [
    "GITHUB_API",
    "GITHUB_DOWNLOAD_HOST",
    "PinnedAsset",
    "ReleaseAsset",
    "ReleasePins",
    "api_base",
    "fetch_release_assets",
    "is_local_url",
    "listing_cache_path",
    "match_assets",
    "parse_listing",
    "pin_manifest_text",
    "pin_release",
    "require_trusted_mirror",
]

logger = logging.getLogger(__name__)

GITHUB_API: Final = "https://api.github.com"
GITHUB_DOWNLOAD_HOST: Final = "github.com"
"""Where the GitHub API's listings may send downloads (over https only)."""
GITHUB_ACCEPT: Final = "application/vnd.github+json"
GITHUB_API_VERSION: Final = "2022-11-28"
_ORIGIN_KEY: Final = "llama_proc_origin"
"""Key added to a cached listing: the API root it came from."""
_DIGEST_RE: Final = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_REPO_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{40}$")


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


def api_base(settings: Settings) -> str:
    """The release API root: the mirror when set, else GitHub's API."""
    return (settings.mirror or GITHUB_API).rstrip("/")


def listing_cache_path(settings: Settings, repo: str, tag: str) -> Path:
    """Where the listing for ``repo``/``tag`` is cached (the file records its origin)."""
    return settings.cache_dir / "releases" / repo.replace("/", "_") / f"{tag}.json"


def _unpinned_patterns(variant: Variant, build: str) -> list[str]:
    if not variant.has_prebuilt:
        return [f"(variant {variant.id} has no prebuilt)"]
    patterns = [variant.asset_regex(build), *variant.extra_asset_regexes(build)]
    return [p.pattern for p in patterns if not any(p.search(name) for name in variant.sha256)]


def require_trusted_mirror(settings: Settings, variant: Variant | None, build: str) -> None:
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
    _check_repo_tag(repo, tag)
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
        page = fetch_page(
            url,
            settings,
            session=session,
            accept=GITHUB_ACCEPT,
            headers={"X-GitHub-Api-Version": GITHUB_API_VERSION},
            hints=hints,
        )
    except DownloadError as err:
        data, came_from = _read_cached(cached)
        if data is not None and came_from == origin:
            logger.warning("%s; using the cached release listing %s", err, cached)
            return parse_listing(data, repo, tag, settings.mirror)
        raise
    try:
        data = json.loads(page.text)
    except json.JSONDecodeError as err:
        msg = f"{url} did not return JSON ({err}); is LLAMA_PROC_MIRROR a release mirror?"
        raise ProvisionError(msg) from err
    assets = parse_listing(data, repo, tag, settings.mirror)  # checked before it is cached
    _write_cache(cached, {**data, _ORIGIN_KEY: origin})
    return assets


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
    main = _pinned(_match_one(variant.asset_regex(build), assets, variant, build), variant)
    extras = [
        _pinned(_match_one(p, assets, variant, build), variant)
        for p in variant.extra_asset_regexes(build)
    ]
    return main, extras


# --------------------------------------------------------------------------------- pinning
@dataclass(frozen=True, order=True)
class PinnedAsset:
    """One asset's pin: its name, size in bytes and sha256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ReleasePins:
    """A build's pins: every asset's size and sha256, its tag's commit, each variant's assets."""

    repo: str
    build: str
    commit: str
    origin: str
    """The API root the values were read from."""
    assets: tuple[PinnedAsset, ...]
    """Every asset of the release, sorted by name."""
    variants: Mapping[str, tuple[str, ...]]
    """Variant id -> the names of the archives it installs from this release."""
    unmatched: Mapping[str, str]
    """Variant id -> why this release has nothing for it (its prebuilt is not published)."""

    def asset(self, name: str) -> PinnedAsset:
        """The pin of the asset called ``name``."""
        return next(a for a in self.assets if a.name == name)

    def to_toml(self) -> str:
        """A standalone ``[pins]`` document: the commit and every asset (for review)."""
        lines = [
            f"# Every asset of {self.repo} {self.build} with its size and sha256, and the commit",
            f"# its tag names, as {self.origin} listed them.",
            "[pins]",
            f"repo = {_toml_str(self.repo)}",
            f"build = {_toml_str(self.build)}",
            f"commit = {_toml_str(self.commit)}",
            "",
            "[pins.assets]",
        ]
        lines += [
            f"{_toml_str(a.name)} = {{ size = {a.size}, sha256 = {_toml_str(a.sha256)} }}"
            for a in self.assets
        ]
        return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(value)


def pin_release(
    build: str | None,
    settings: Settings,
    *,
    manifest: Manifest | None = None,
    session: requests.Session | None = None,
) -> ReleasePins:
    """Read the size and sha256 of every asset of a build, its tag's commit, and its variants.

    For maintainers: :func:`pin_manifest_text` writes the result into ``variants.toml``. The
    listing is read fresh from GitHub's API (or ``settings.mirror``, which must then be https
    or on this machine), never from the cache.

    Args:
        build: the release tag, e.g. ``b11434``; None = the manifest's build.
        settings: mirror, offline flag, timeout, GitHub token.
        manifest: whose variants to match (the shipped one when None); gives the repo.
        session: a ``requests`` session to reuse.

    Raises:
        OfflineError: offline mode.
        DownloadError: the listing or the commit could not be fetched.
        ManifestError: a variant's pattern matches several assets of the release.
        ProvisionError: the mirror is plain http to another machine, the listing is malformed
            or lacks a digest for some asset, or the tag names no commit.
    """
    manifest = load_manifest() if manifest is None else manifest
    repo = manifest.repo
    build = build or manifest.build
    _check_repo_tag(repo, build)
    origin = api_base(settings)
    if plain_remote(origin):
        msg = (
            f"LLAMA_PROC_MIRROR {origin} is plain http to another machine: anyone on the path "
            "can swap the digests to pin; pin from GitHub's API, an https:// mirror or a local one"
        )
        raise ProvisionError(msg)
    own = session is None
    sess = make_session(settings) if session is None else session
    try:
        data = _fetch_json(f"{origin}/repos/{repo}/releases/tags/{build}", settings, sess)
        commit_data = _fetch_json(f"{origin}/repos/{repo}/commits/{build}", settings, sess)
    finally:
        if own:
            sess.close()
    assets = parse_listing(data, repo, build, settings.mirror)
    if not assets:
        msg = f"release {build} of {repo} has no assets to pin; is it a b<N> build tag?"
        raise ProvisionError(msg)
    missing = [a.name for a in assets if a.sha256 is None]
    if missing:
        msg = (
            f"the release listing for {repo} {build} has no sha256 digest for "
            f"{', '.join(missing)}; download those assets and pin their sha256 by hand"
        )
        raise ProvisionError(msg)
    commit = commit_data.get("sha") if isinstance(commit_data, dict) else None
    if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
        msg = (
            f"{origin} names no commit id for tag {build} of {repo} (got {commit!r}); check the "
            "tag and LLAMA_PROC_MIRROR"
        )
        raise ProvisionError(msg)
    variants: dict[str, tuple[str, ...]] = {}
    unmatched: dict[str, str] = {}
    for variant in manifest.variants:
        if not variant.has_prebuilt:
            continue
        patterns = [variant.asset_regex(build), *variant.extra_asset_regexes(build)]
        try:
            # The manifest's current pins are what is being replaced: match without them.
            variants[variant.id] = tuple(
                _match_one(p, assets, variant, build).name for p in patterns
            )
        except NoMatchingVariantError as err:
            unmatched[variant.id] = str(err)
    pinned = sorted(PinnedAsset(a.name, a.size, a.require_sha256()) for a in assets)
    return ReleasePins(repo, build, commit, origin, tuple(pinned), variants, unmatched)


def _fetch_json(url: str, settings: Settings, session: requests.Session) -> Any:
    page = fetch_page(
        url,
        settings,
        session=session,
        accept=GITHUB_ACCEPT,
        headers={"X-GitHub-Api-Version": GITHUB_API_VERSION},
        hints={
            404: "check the build tag and LLAMA_PROC_MIRROR",
            403: "GitHub API rate limit or access denied; set LLAMA_PROC_GITHUB_TOKEN",
        },
    )
    try:
        return json.loads(page.text)
    except json.JSONDecodeError as err:
        msg = f"{url} did not return JSON ({err}); is LLAMA_PROC_MIRROR a release mirror?"
        raise ProvisionError(msg) from err


_HEADER_RE: Final = re.compile(r"^\s*\[")
_VARIANT_HEADER_RE: Final = re.compile(r"^\s*\[\[\s*variant\s*\]\]\s*(#.*)?$")
_LLAMA_HEADER_RE: Final = re.compile(r"^\s*\[\s*llama_cpp\s*\]\s*(#.*)?$")
_PIN_KEY_RE: Final = re.compile(r"^\s*(sha256|size)\s*=")
_ID_LINE_RE: Final = re.compile(r"^\s*id\s*=\s*\"([^\"]*)\"\s*(#.*)?$")
_COMMIT_LINE_RE: Final = re.compile(r"^\s*commit\s*=")


def pin_manifest_text(text: str, pins: ReleasePins) -> str:
    """``variants.toml`` text with ``pins`` written in: the commit and each variant's pins.

    In ``[llama_cpp]`` the ``commit`` is set; in each ``[[variant]]`` the ``sha256`` and
    ``size`` tables are replaced by the pins of the archives it installs from the release
    (variants the release has nothing for lose their stale pins). Everything else, comments
    included, is kept as written.

    Args:
        text: the manifest's text; its ``build`` must be ``pins.build``.
        pins: from :func:`pin_release`.

    Raises:
        ManifestError: the text is not a valid manifest, pins another build or repository, or
            could not be rewritten so that it reads back with exactly these pins.
    """
    before = parse_manifest(text)
    if (before.repo, before.build) != (pins.repo, pins.build):
        msg = (
            f"the manifest is for {before.repo} {before.build} but the pins are for {pins.repo} "
            f"{pins.build}; set its build to {pins.build} first or pin {before.build}"
        )
        raise ManifestError(msg)
    out: list[str] = []
    table = ""
    commit_written = False
    for line in text.splitlines(keepends=True):
        if _HEADER_RE.match(line):
            if table == "llama_cpp" and not commit_written:
                out.append(f"commit = {_toml_str(pins.commit)}\n")
                commit_written = True
            if _VARIANT_HEADER_RE.match(line):
                table = "variant"
            elif _LLAMA_HEADER_RE.match(line):
                table = "llama_cpp"
            else:
                table = "other"
        elif table == "llama_cpp" and _COMMIT_LINE_RE.match(line):
            out.append(f"commit = {_toml_str(pins.commit)}\n")
            commit_written = True
            continue
        elif table == "variant" and _PIN_KEY_RE.match(line):
            continue  # replaced below the variant's id line
        out.append(line)
        match = _ID_LINE_RE.match(line) if table == "variant" else None
        if match and match.group(1) in pins.variants:
            chosen = [pins.asset(name) for name in pins.variants[match.group(1)]]
            sha = ", ".join(f"{_toml_str(a.name)} = {_toml_str(a.sha256)}" for a in chosen)
            size = ", ".join(f"{_toml_str(a.name)} = {a.size}" for a in chosen)
            out.append(f"sha256 = {{ {sha} }}\nsize = {{ {size} }}\n")
    if table == "llama_cpp" and not commit_written:
        out.append(f"commit = {_toml_str(pins.commit)}\n")
    result = "".join(out)
    _check_pinned(parse_manifest(result), pins)
    return result


def _check_pinned(manifest: Manifest, pins: ReleasePins) -> None:
    ok = manifest.commit == pins.commit and all(
        dict(v.sha256) == {n: pins.asset(n).sha256 for n in pins.variants.get(v.id, ())}
        and dict(v.size) == {n: pins.asset(n).size for n in pins.variants.get(v.id, ())}
        for v in manifest.variants
    )
    if not ok:
        msg = (
            "the pinned manifest does not read back with the pins written into it (a sha256 or "
            "size table outside its [[variant]] line?); edit variants.toml by hand"
        )
        raise ManifestError(msg)
