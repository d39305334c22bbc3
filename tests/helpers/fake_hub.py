"""A loopback stand-in for the Hugging Face Hub, speaking the shapes huggingface_hub relies on.

Point ``HF_ENDPOINT`` (or ``endpoint=``) at :attr:`FakeHub.url`. Two servers, as on the real
hub, where LFS files live on a storage host behind a redirect:

* the hub answers

  - ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]``: ``{"id", "sha", "siblings":
    [{"rfilename", "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}], "gated",
    "private"}`` (sizes and LFS data only with ``blobs=true``);
  - ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``302`` to the storage host, with
    ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256, quoted), ``X-Linked-Size`` and ``ETag``;

* :attr:`FakeHub.storage` (the tests' ``FileServer``: ranges, dropped bodies, delays, a hit
  log) serves the bytes at ``/lfs/{sha256}``.

Errors carry the hub's ``X-Error-Code`` header, which huggingface_hub maps to its exceptions:
``RepoNotFound`` (401 without a token, 404 with one), ``RevisionNotFound`` and
``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with one not granted access).
A revision is a branch or tag name or the 40-hex commit id.

A hostile hub: :attr:`FakeHub.resolve_headers` replaces headers of every ``resolve`` answer
(``X-Linked-Etag``, ``X-Repo-Commit``, ``Location``...) and :attr:`FakeHub.info_fields`
replaces fields of every model-info answer (``sha``, ``siblings``...).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from http_server import FileServer, LoopbackServer

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from http_server import Route

__all__ = ["FakeHub", "HubHit"]

_POINTER_SIZE = 134  # a git-lfs pointer file's size, as the hub reports it
_HASH_CHUNK = 1 << 20
_digests: dict[tuple[str, int, int], str] = {}


def sha256_of(body: bytes | Path) -> str:
    """Hex sha256 of bytes or a file (files are hashed once per process)."""
    if isinstance(body, bytes):
        return hashlib.sha256(body).hexdigest()
    stat = body.stat()
    key = (str(body.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with body.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


@dataclass(frozen=True)
class _Blob:
    sha256: str
    size: int
    body: bytes | Path


@dataclass
class _Repo:
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)  # commit -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    gated: bool = False
    private: bool = False
    tokens: frozenset[str] = frozenset()

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class HubHit:
    """One request the hub (not the storage host) saw."""

    method: str
    path: str
    authorization: str | None
    at: float = field(default_factory=time.monotonic)


class FakeHub(LoopbackServer):
    """The hub plus its storage host, each on ``127.0.0.1:0``; a context manager."""

    def __init__(self) -> None:
        self.storage = FileServer()
        self._repos: dict[str, _Repo] = {}
        self._log: list[HubHit] = []
        self._lock = threading.Lock()
        self.resolve_headers: dict[str, str] = {}
        """Headers that replace the hub's own on every ``resolve`` answer (a hostile hub)."""
        self.info_fields: dict[str, Any] = {}
        """Fields that replace the hub's own in every model-info answer (a hostile hub)."""
        super().__init__(_make_handler(self))

    def close(self) -> None:
        super().close()
        self.storage.close()

    # -- content --------------------------------------------------------------------------------
    def add_repo(
        self,
        repo: str,
        files: Mapping[str, bytes | Path],
        *,
        revision: str = "main",
        gated: bool = False,
        private: bool = False,
        tokens: Iterable[str] = (),
    ) -> str:
        """Commit ``files`` to ``repo`` as ``revision`` (a branch or tag); returns the commit id.

        Calling it again for the same repository adds another revision.
        """
        blobs = {name: _Blob(sha256_of(body), _size(body), body) for name, body in files.items()}
        listing = json.dumps(
            [repo, revision, sorted((n, b.sha256) for n, b in blobs.items())]
        ).encode()
        commit = hashlib.sha1(listing, usedforsecurity=False).hexdigest()
        with self._lock:
            entry = self._repos.setdefault(repo, _Repo())
            entry.commits[commit] = blobs
            entry.refs[revision] = commit
            entry.gated, entry.private = gated, private
            entry.tokens = entry.tokens | frozenset(tokens)
        for blob in blobs.values():
            route = self.storage.add(f"/lfs/{blob.sha256}", blob.body)
            route.headers["ETag"] = f'"{blob.sha256}"'
        return commit

    def blob_route(self, repo: str, name: str, revision: str = "main") -> Route:
        """The storage route serving ``name``: set faults (``drop_after``, ``delay``) on it."""
        return self.storage.route(self.blob_path(repo, name, revision))

    def blob_path(self, repo: str, name: str, revision: str = "main") -> str:
        """The storage path of ``name`` at ``revision``."""
        entry = self._repos[repo]
        commit = entry.commit_of(revision)
        assert commit is not None, revision
        return f"/lfs/{entry.commits[commit][name].sha256}"

    # -- what happened -------------------------------------------------------------------------
    @property
    def log(self) -> list[HubHit]:
        with self._lock:
            return list(self._log)

    def hits(self, method: str | None = None, contains: str = "") -> list[HubHit]:
        """Hub requests with this method whose path contains ``contains``."""
        return [
            h for h in self.log if (method is None or h.method == method) and contains in h.path
        ]

    def _record(self, hit: HubHit) -> None:
        with self._lock:
            self._log.append(hit)

    def _repo(self, repo: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo)


def _size(body: bytes | Path) -> int:
    return len(body) if isinstance(body, bytes) else body.stat().st_size


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _send(
            self, status: int, body: bytes = b"", *, head: bool = False, **headers: str
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _fail(self, status: int, code: str, message: str, *, head: bool, **extra: str) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(
                status,
                body,
                head=head,
                Content_Type="application/json",
                X_Error_Code=code,
                X_Error_Message=message,
                **extra,
            )

        def _serve(self, *, head: bool) -> None:
            split = urllib.parse.urlsplit(self.path)
            auth = self.headers.get("authorization")
            hub._record(HubHit(self.command, split.path, auth))
            token = auth.removeprefix("Bearer ").strip() if auth else None
            segments = [urllib.parse.unquote(s) for s in split.path.split("/")[1:]]
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                revision = segments[5] if len(segments) >= 6 and segments[4] == "revision" else None
                query = urllib.parse.parse_qs(split.query)
                self._model_info(
                    "/".join(segments[2:4]), revision or "main", "blobs" in query, token, head
                )
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._resolve(
                    "/".join(segments[:2]), segments[3], "/".join(segments[4:]), token, head
                )
            else:
                self._send(404, b"not found", head=head)

        def _find(self, name: str, token: str | None, head: bool) -> _Repo | None:
            repo = hub._repo(name)
            if repo is None or (repo.private and token not in repo.tokens):
                status = 401 if token is None else 404
                self._fail(status, "RepoNotFound", "Repository not found", head=head)
                return None
            return repo

        def _at(
            self, name: str, revision: str, token: str | None, head: bool
        ) -> tuple[_Repo, str] | None:
            """The repo and the commit ``revision`` names, or None once the error is sent."""
            repo = self._find(name, token, head)
            if repo is None:
                return None
            commit = repo.commit_of(revision)
            if commit is None:
                self._fail(404, "RevisionNotFound", "Invalid rev id: " + revision, head=head)
                return None
            return repo, commit

        def _model_info(
            self, name: str, revision: str, blobs: bool, token: str | None, head: bool
        ) -> None:
            found = self._at(name, revision, token, head)
            if found is None:
                return
            repo, commit = found
            siblings: list[dict[str, Any]] = []
            for filename, blob in sorted(repo.commits[commit].items()):
                entry: dict[str, Any] = {"rfilename": filename}
                if blobs:
                    entry["size"] = blob.size
                    entry["blobId"] = hashlib.sha1(
                        blob.sha256.encode(), usedforsecurity=False
                    ).hexdigest()
                    entry["lfs"] = {
                        "sha256": blob.sha256,
                        "size": blob.size,
                        "pointerSize": _POINTER_SIZE,
                    }
                siblings.append(entry)
            info = {
                "id": name,
                "modelId": name,
                "sha": commit,
                "private": repo.private,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"],
                "siblings": siblings,
                **hub.info_fields,
            }
            self._send(200, json.dumps(info).encode(), head=head, Content_Type="application/json")

        def _resolve(
            self, name: str, revision: str, filename: str, token: str | None, head: bool
        ) -> None:
            found = self._at(name, revision, token, head)
            if found is None:
                return
            repo, commit = found
            if repo.gated and token not in repo.tokens:
                status = 401 if token is None else 403
                message = (
                    f"Access to model {name} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in."
                )
                self._fail(status, "GatedRepo", message, head=head)
                return
            blob = repo.commits[commit].get(filename)
            if blob is None:
                self._fail(404, "EntryNotFound", "Entry not found", head=head, X_Repo_Commit=commit)
                return
            headers = {
                "Location": f"{hub.storage.url}/lfs/{blob.sha256}",
                "ETag": f'"{hashlib.sha1(blob.sha256.encode(), usedforsecurity=False).hexdigest()}"',
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(blob.size),
                **hub.resolve_headers,
            }
            self._send(302, b"", head=head, **headers)

    return Handler
