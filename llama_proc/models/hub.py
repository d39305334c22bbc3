"""Models named the way users copy them from the Hugging Face Hub, fetched with huggingface_hub.

A reference is one of (:meth:`ModelRef.parse`):

* ``org/repo`` or ``org/repo:QUANT``: llama.cpp's own ``-hf`` syntax. QUANT (case-insensitive)
  picks the GGUF whose name carries that tag; without one, llama.cpp's choice: Q4_K_M, then
  Q8_0, then the first model GGUF of the repo.
* ``hf://org/repo/path/file.gguf``: one file (``hf://org/repo@REV/path``, huggingface_hub's
  own URI form, works too).
* ``https://huggingface.co/org/repo/resolve/REV/path`` (or ``/blob/``): a link from a model page.
* an optional ``@REVISION`` (branch, tag or commit) on each form: ``org/repo:Q4_K_M@v1.0``.
* anything else: a plain path, left alone. A path that exists always wins over a reference.

The transfer and the cache are huggingface_hub's: the files land in the user's Hugging Face
cache (``HF_HUB_CACHE`` / ``HF_HOME``, shared with every other tool, so no second copy), with
``HF_TOKEN``, ``HF_ENDPOINT`` mirrors and ``HF_HUB_OFFLINE`` honoured, a dropped connection
resumed with a range request, and a per-file lock so two processes pulling the same file
download it once. This module chooses the files (quantization, split parts, ``mmproj``),
checks disk space before downloading, and turns the hub's errors into one-line llama-proc
errors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc.config import parse_bool
from llama_proc.errors import (
    ChecksumMismatchError,
    DownloadError,
    LlamaProcError,
    ModelFileError,
    OfflineError,
    ProvisionError,
)
from llama_proc.models.choose import DEFAULT_QUANTS, _shown, choose_files
from llama_proc.models.hub_trust import (
    ALLOW_INSECURE_ENV,
    SHA256_RE,
    check_commit,
    check_endpoint,
    guarded,
    name_problem,
)
from llama_proc.models.model_ref import GGUF_SUFFIX, ModelFiles, ModelRef

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from llama_proc.config import Settings

__all__ = ["DEFAULT_QUANTS", "ModelFiles", "ModelRef", "choose_files", "fetch_model"]

logger = logging.getLogger(__name__)

DEFAULT_REVISION: Final = "main"
LOGIN_HINT: Final = "set HF_TOKEN (or run `hf auth login`)"
_HASH_CHUNK: Final = 1 << 20
_GIB: Final = 1 << 30
_MIB: Final = 1 << 20


# -- choosing files ---------------------------------------------------------------------------


# -- fetching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    names: tuple[str, ...]
    sizes: Mapping[str, int]
    commit: str | None
    sha256: Mapping[str, str] = field(default_factory=dict)  # LFS files only


def fetch_model(
    ref: ModelRef | str,
    *,
    settings: Settings | None = None,
    with_mmproj: bool = False,
    progress: bool | None = None,
    offline: bool | None = None,
    cache_dir: Path | str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ModelFiles:
    """Local paths of a model reference, downloading what the Hugging Face cache lacks.

    Args:
        ref: a :class:`ModelRef` or text for :meth:`ModelRef.parse`; a plain path comes back
            unchanged.
        settings: supplies ``offline``, ``progress`` and ``download_timeout`` when the
            arguments below leave them None.
        with_mmproj: also fetch the repository's multimodal projector (``mmproj-*.gguf``).
        progress: show progress bars (True/False); None = huggingface_hub's default (on a TTY,
            unless ``HF_HUB_DISABLE_PROGRESS_BARS``).
        offline: use only the cache; None = ``settings.offline`` or ``HF_HUB_OFFLINE``.
        cache_dir: the Hugging Face hub cache; None = huggingface_hub's (``HF_HUB_CACHE``,
            ``HF_HOME``).
        endpoint: the hub or a mirror; None = ``HF_ENDPOINT`` or huggingface.co.
        token: access token; None = ``HF_TOKEN`` or the token saved by ``hf auth login``.
        on_progress: called as ``on_progress(bytes_done, bytes_total)`` while downloading,
            from the downloading thread (for a status display).

    Returns:
        The model file (the first part of a split model), every part, and the projector.

    Raises:
        ModelFileError: no such repository, revision, file or quantization (the message lists
            the quantizations the repository has).
        DownloadError: a gated or private repository without a token that grants access, the
            hub or the network failed, or a transfer broke off for good.
        OfflineError: offline and the files are not in the cache.
        ProvisionError: not enough free disk space for the files (checked before downloading).
    """
    parsed = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    if parsed is None:
        path = Path(str(ref)).expanduser()
        return ModelFiles(model=path, parts=(path,))
    if settings is not None and progress is None:
        progress = settings.progress
    allow_insecure = (
        settings.allow_insecure_hub
        if settings is not None
        else parse_bool(ALLOW_INSECURE_ENV, os.environ.get(ALLOW_INSECURE_ENV, ""))
    )
    hub = _Hub(
        parsed,
        cache_dir=cache_dir,
        endpoint=endpoint,
        token=token,
        timeout=settings.download_timeout if settings is not None else None,
    )
    if offline is None:
        offline = (settings is not None and settings.offline) or hub.offline_by_env()
    if not offline:
        check_endpoint(
            hub.endpoint,
            allow_insecure=allow_insecure,
            what="the hub endpoint" if endpoint else "HF_ENDPOINT",
        )
    with guarded(hub.endpoint, allow_insecure=allow_insecure):
        return _fetch(
            hub,
            parsed,
            offline=offline,
            with_mmproj=with_mmproj,
            progress=progress,
            on_progress=on_progress,
        )


def _fetch(
    hub: _Hub,
    parsed: ModelRef,
    *,
    offline: bool,
    with_mmproj: bool,
    progress: bool | None,
    on_progress: Callable[[int, int], None] | None,
) -> ModelFiles:
    listing = hub.cached_listing() if offline else hub.listing()
    try:
        parts, mmproj = choose_files(parsed, listing.names, with_mmproj=with_mmproj)
    except ModelFileError as err:
        if not offline:
            raise
        # The cache holds only part of the repository: say so, not that the repo lacks it.
        raise hub.offline_error(cached=listing.names) from err
    wanted = (*parts, mmproj) if mmproj else parts
    total = 0
    fresh: set[str] = set()
    if not offline:
        fresh = {name for name in wanted if not hub.is_cached(name, listing)}
        total = _check_disk_space(hub, listing, fresh)
    bar = _bar_class(
        progress=progress, counter=_Counter(total, on_progress) if on_progress else None
    )
    paths = []
    for name in wanted:
        path = hub.download(name, offline=offline, bar_class=bar)
        if not offline:
            _check_bytes(hub, listing, name, path, hash_it=name in fresh)
        paths.append(path)
    logger.info("model %s ready at %s", parsed, paths[0])
    return ModelFiles(
        model=paths[0], parts=tuple(paths[: len(parts)]), mmproj=paths[-1] if mmproj else None
    )


class _Counter:
    """Adds up the bytes of every file of one fetch for ``on_progress``."""

    def __init__(self, total: int, report: Callable[[int, int], None]) -> None:
        self.done, self.total, self.report = 0, total, report

    def __call__(self, n: int) -> None:
        self.done += n
        self.report(self.done, max(self.total, self.done))


def _bar_class(*, progress: bool | None, counter: _Counter | None) -> type[Any] | None:
    """A tqdm class for huggingface_hub that forces bars on or off and feeds ``counter``."""
    if progress is None and counter is None:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415 - only when a bar is drawn or counted

    disable = None if progress is None else not progress

    class _Bar(tqdm):  # type: ignore[misc]  # tqdm ships no types
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = disable  # None: tqdm shows the bar only on a TTY
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if counter is not None and n:
                counter(int(n))
            result: bool | None = super().update(n)
            return result

    return _Bar


def _check_bytes(hub: _Hub, listing: _Listing, name: str, path: Path, *, hash_it: bool) -> None:
    """Hold a fetched file to the hub's listing: its size, and its LFS sha256 once downloaded.

    huggingface_hub checks neither, so bytes altered on a CDN or behind a redirect would be
    used as they came. A file that fails is removed from the cache, so the next fetch
    downloads it again.
    """
    size = listing.sizes.get(name)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        _discard(hub, path)
        msg = (
            f"{_shown(name)} of {hub.ref} is {actual_size} bytes but the hub lists {size}; "
            "it was removed from the cache: run it again, or check HF_ENDPOINT"
        )
        raise DownloadError(msg)
    expected = listing.sha256.get(name)
    if not hash_it or expected is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        _discard(hub, path)
        what = f"{hub.ref.repo}/{_shown(name)}"
        raise ChecksumMismatchError(what, expected, digest.hexdigest())


def _discard(hub: _Hub, path: Path) -> None:
    """Remove a refused file (the snapshot's link and the blob it points to) from the cache."""
    blob = path.resolve()
    for each in (path, blob):
        if each.is_relative_to(hub.cache_dir.resolve()) or each == path:
            each.unlink(missing_ok=True)


def _check_disk_space(hub: _Hub, listing: _Listing, fresh: set[str]) -> int:
    """Refuse before downloading when the cache's disk cannot hold the missing files.

    Returns:
        The bytes still to download.
    """
    need = sum(listing.sizes.get(name, 0) for name in fresh)
    if need == 0:
        return 0
    cache = hub.cache_dir
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        msg = (
            f"not enough disk space for {hub.ref}: {_human(need)} to download into {cache}, "
            f"{_human(free)} free; free some space or point HF_HUB_CACHE at a larger disk"
        )
        raise ProvisionError(msg)
    return need


def _human(size: int) -> str:
    return f"{size / _GIB:.1f} GiB" if size >= _GIB else f"{size / _MIB:.1f} MiB"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _Hub:
    """The huggingface_hub calls of one fetch, with its errors mapped to llama-proc's.

    huggingface_hub (and httpx under it) is imported here, on first use, so that parsing a
    reference or importing llama_proc stays cheap.
    """

    def __init__(
        self,
        ref: ModelRef,
        *,
        cache_dir: Path | str | None,
        endpoint: str | None,
        token: str | None,
        timeout: float | None,
    ) -> None:
        from huggingface_hub import constants  # noqa: PLC0415 - heavy: httpx, only to fetch

        self.ref = ref
        self.revision = ref.revision or DEFAULT_REVISION
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
        self.token = token
        self.timeout = timeout
        self._constants = constants

    def offline_by_env(self) -> bool:
        """``HF_HUB_OFFLINE``, as huggingface_hub read it."""
        return bool(self._constants.is_offline_mode())

    def listing(self) -> _Listing:
        """The repository's files at the revision, with sizes, from the hub's model API."""
        from huggingface_hub import HfApi  # noqa: PLC0415 - see the class docstring

        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(
                self.ref.repo, revision=self.revision, files_metadata=True, timeout=self.timeout
            )
        except LlamaProcError:
            raise  # the hub's answer was refused (hub_trust); the message says why
        except Exception as err:
            if _is_connection_error(err):
                # Like hf_hub_download: an unreachable hub falls back to what is cached.
                logger.warning("cannot reach %s (%s); using the cache", self.endpoint, err)
                try:
                    return self.cached_listing()
                except OfflineError:
                    raise self._error(err) from err
            raise self._error(err) from err
        where = f"the listing of {self.ref.repo} on {self.endpoint}"
        commit = check_commit(info.sha, where)
        sizes: dict[str, int] = {}
        sha256: dict[str, str] = {}
        names: list[str] = []
        for sibling in info.siblings or ():
            name = getattr(sibling, "rfilename", None)
            problem = name_problem(name)
            if problem or not isinstance(name, str):
                raise self._refused(where, f"file {_shown(str(name))} {problem}")
            names.append(name)
            lfs = sibling.lfs
            size = lfs.size if lfs is not None else sibling.size
            if size is not None:
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise self._refused(where, f"size {_shown(str(size))} of {_shown(name)}")
                sizes[name] = size
            if lfs is not None:
                if not isinstance(lfs.sha256, str) or not SHA256_RE.fullmatch(lfs.sha256):
                    raise self._refused(
                        where, f"sha256 {_shown(str(lfs.sha256))} of {_shown(name)}"
                    )
                sha256[name] = lfs.sha256
        return _Listing(tuple(names), sizes, commit, sha256)

    @staticmethod
    def _refused(where: str, what: str) -> DownloadError:
        msg = f"{where} holds an invalid {what}; the hub or HF_ENDPOINT mirror is broken or hostile"
        return DownloadError(msg)

    def cached_listing(self) -> _Listing:
        """The GGUF files of the revision that the cache holds; no network."""
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - see the class docstring
        from huggingface_hub.errors import (  # noqa: PLC0415 - see the class docstring
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
        )

        try:
            folder = Path(
                snapshot_download(
                    self.ref.repo,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=True,
                    allow_patterns=[f"*{GGUF_SUFFIX}"],
                )
            )
        except IncompleteSnapshotError as err:
            folder = Path(err.snapshot_path)  # some files of the revision are cached: use them
        except LocalEntryNotFoundError as err:
            raise self.offline_error() from err
        names = tuple(
            p.relative_to(folder).as_posix() for p in folder.rglob(f"*{GGUF_SUFFIX}") if p.exists()
        )
        return _Listing(names, {}, folder.name)

    def is_cached(self, name: str, listing: _Listing) -> bool:
        """Whether the cache already holds ``name`` at the listed commit."""
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - see the class docstring

        found = try_to_load_from_cache(
            self.ref.repo, name, cache_dir=self.cache_dir, revision=listing.commit or self.revision
        )
        return isinstance(found, str)

    def download(self, name: str, *, offline: bool, bar_class: type[Any] | None) -> Path:
        """One file through the cache (a cache hit touches only the hub's metadata)."""
        from huggingface_hub import hf_hub_download  # noqa: PLC0415 - see the class docstring
        from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415 - see above

        extra: dict[str, Any] = {} if self.timeout is None else {"etag_timeout": self.timeout}
        try:
            path = hf_hub_download(
                self.ref.repo,
                name,
                revision=self.revision,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self.token,
                local_files_only=offline,
                tqdm_class=bar_class,
                **extra,
            )
        except LocalEntryNotFoundError as err:
            if offline:
                raise self.offline_error(name) from err
            raise self._error(err.__cause__ or err, name) from err
        except LlamaProcError:
            raise  # the hub's answer was refused (hub_trust); the message says why
        except Exception as err:
            raise self._error(err, name) from err
        return Path(path)

    def offline_error(self, name: str | None = None, cached: Sequence[str] = ()) -> OfflineError:
        """Offline, and the cache lacks ``name`` (or the reference's files)."""
        what = f"{name} of {self.ref}" if name else str(self.ref)
        held = f" (cached: {', '.join(sorted(cached))})" if cached else ""
        msg = (
            f"offline and {what} is not in the Hugging Face cache {self.cache_dir}{held}: "
            "fetch it once with network access, or turn offline mode off (HF_HUB_OFFLINE, "
            "LLAMA_PROC_OFFLINE)"
        )
        return OfflineError(msg)

    def _error(self, err: BaseException, name: str | None = None) -> Exception:
        """One-line llama-proc error for what huggingface_hub or httpx raised."""
        from huggingface_hub import errors  # noqa: PLC0415 - see the class docstring

        repo, host = self.ref.repo, urllib.parse.urlsplit(self.endpoint).netloc
        status = _status(err)
        if isinstance(err, errors.GatedRepoError):
            if status == 403:
                msg = (
                    f"the token in use has no access to the gated repository {repo}: accept its "
                    f"terms on its page with that account, or {LOGIN_HINT} with another token"
                )
            else:
                msg = (
                    f"{repo} is gated: accept its terms on its page, then {LOGIN_HINT} "
                    "with a token of that account"
                )
            return DownloadError(msg)
        if isinstance(err, errors.RepositoryNotFoundError):
            msg = (
                f"no model repository {repo} on {host}: check the name, or if it is private "
                f"{LOGIN_HINT}"
            )
            return ModelFileError(msg)
        if isinstance(err, errors.RevisionNotFoundError):
            msg = f"{repo} has no revision {self.revision!r}; name a branch, tag or commit of it"
            return ModelFileError(msg)
        if isinstance(err, errors.RemoteEntryNotFoundError):
            msg = f"{repo} has no file {name or self.ref.file} at {self.revision}"
            return ModelFileError(msg)
        what = f"{name} of {self.ref}" if name else str(self.ref)
        if isinstance(err, errors.HfHubHTTPError) and status is not None:
            msg = f"{host} answered HTTP {status} for {what}; try again later or check HF_ENDPOINT"
            return DownloadError(msg)
        if _is_connection_error(err):
            msg = (
                f"cannot reach {self.endpoint} for {what} ({_first_line(err)}); check the "
                "network, a proxy or HF_ENDPOINT"
            )
            return DownloadError(msg)
        msg = f"downloading {what} failed: {_first_line(err)}; run it again to resume"
        return DownloadError(msg)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_connection_error(err: BaseException) -> bool:
    import httpx2  # noqa: PLC0415 - comes with huggingface_hub, which is already loaded here
    from huggingface_hub.errors import OfflineModeIsEnabled  # noqa: PLC0415 - as above

    return isinstance(err, (httpx2.TransportError, OfflineModeIsEnabled))
