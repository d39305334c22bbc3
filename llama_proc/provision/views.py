"""The parts of :class:`~llama_proc.config.Settings` each provisioning layer reads.

A function below the entry points declares which part it needs, so its signature says what it
reads and a caller can hand it a :class:`~llama_proc.provision.cache.root.Cache`, a
:class:`~llama_proc.provision.fetch.net.Net`, or the whole ``Settings`` (which has every part):

* :class:`CacheView`: where the cache is and how long to wait for another process's lock;
* :class:`NetView`: how to reach the network (offline, mirror, index, timeout, token, bars);
* :class:`FetchView`: both, for the steps that download into the cache;
* :class:`BuildView`: a fetch, plus what a source build is asked (build, source, jobs...).

The entry points (``ensure_server``, ``resolve_server``, ``build_variant``, the CLI) take the
whole ``Settings``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["BuildView", "CacheView", "FetchView", "NetView"]


class CacheView(Protocol):
    """Where the cache is, and how long to wait for another process's lock."""

    @property
    def cache_dir(self) -> Path:
        """The cache root."""
        ...

    @property
    def lock_timeout(self) -> float:
        """Seconds to wait for another process's install."""
        ...


class NetView(Protocol):
    """How to reach the network."""

    @property
    def offline(self) -> bool:
        """Never touch the network."""
        ...

    @property
    def mirror(self) -> str | None:
        """Base URL mirroring GitHub's release API and downloads."""
        ...

    @property
    def index_url(self) -> str:
        """Package index (PEP 691 JSON) for source sdists and models."""
        ...

    @property
    def download_timeout(self) -> float:
        """Connect/read timeout of each HTTP request."""
        ...

    @property
    def github_token(self) -> str | None:
        """Token for the GitHub API."""
        ...

    @property
    def progress(self) -> bool | None:
        """Progress bars on/off; None = only on a terminal."""
        ...


class FetchView(CacheView, NetView, Protocol):
    """A download into the cache: the cache and the network."""


class BuildView(FetchView, Protocol):
    """A source build: what to fetch and where, and what the build is asked."""

    @property
    def build(self) -> str | None:
        """llama.cpp build tag; None = the manifest's pinned build."""
        ...

    @property
    def build_source(self) -> str | None:
        """llama.cpp source: folder, archive URL, "release" or "index"."""
        ...

    @property
    def cuda_arch(self) -> str | None:
        """CMAKE_CUDA_ARCHITECTURES for CUDA builds."""
        ...

    @property
    def jobs(self) -> int | None:
        """Parallel compile jobs."""
        ...

    @property
    def cpu_off(self) -> tuple[str, ...]:
        """CPU feature groups new installs must not use."""
        ...

    @property
    def compute_check(self) -> bool:
        """Prove a new install computes before using it."""
        ...
