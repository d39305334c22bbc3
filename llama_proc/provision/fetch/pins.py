"""Pinning a build: every asset's size and sha256 and its tag's commit, into ``variants.toml``.

:func:`pin_release` reads them fresh from GitHub's API (or an https or local mirror), never from
the cache; :func:`pin_manifest_text` writes them into the manifest's text, comments kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.errors import ManifestError, NoMatchingVariantError, ProvisionError
from llama_proc.provision.fetch.download import make_session, plain_remote
from llama_proc.provision.fetch.listing import match_one, parse_listing
from llama_proc.provision.fetch.nightly import resolve_build
from llama_proc.provision.fetch.releases import (
    api_base,
    check_repo_tag,
    fetch_api_json,
)
from llama_proc.provision.manifest import load_manifest, parse_manifest

if TYPE_CHECKING:
    from collections.abc import Mapping

    import requests

    from llama_proc.config import Settings
    from llama_proc.provision.manifest import Manifest

__all__ = ["PinnedAsset", "ReleasePins", "pin_manifest_text", "pin_release"]

_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{40}$")


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


_PIN_HINTS: Final = {
    404: "check the build tag and LLAMA_PROC_MIRROR",
    403: "GitHub API rate limit or access denied; set LLAMA_PROC_GITHUB_TOKEN",
}


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
        build: the release tag, e.g. ``b11434``; a ``vX.Y.Z`` tag or ``latest`` pins the
            ``b`` build it names (see :mod:`~llama_proc.provision.fetch.nightly`); None = the
            manifest's build.
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
    check_repo_tag(repo, build)
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
        # A release tag (vX.Y.Z) or latest names the b build whose assets are pinned.
        build = resolve_build(build, repo, settings, sess)
        data = fetch_api_json(
            f"{origin}/repos/{repo}/releases/tags/{build}", settings, session=sess, hints=_PIN_HINTS
        )
        commit_data = fetch_api_json(
            f"{origin}/repos/{repo}/commits/{build}", settings, session=sess, hints=_PIN_HINTS
        )
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
                match_one(p, assets, variant, build).name for p in patterns
            )
        except NoMatchingVariantError as err:
            unmatched[variant.id] = str(err)
    pinned = sorted(PinnedAsset(a.name, a.size, a.require_sha256()) for a in assets)
    return ReleasePins(repo, build, commit, origin, tuple(pinned), variants, unmatched)


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
