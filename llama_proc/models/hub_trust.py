"""Checks on what the Hugging Face Hub (or a mirror) answers, made before huggingface_hub acts.

huggingface_hub joins the hub's ``ETag`` / ``X-Linked-Etag`` and ``X-Repo-Commit`` headers and
the revision it is given into paths of its cache without checking them: a hub answering
``ETag: "../../../site-packages/evil.pth"`` has it write a file that the next Python start
runs. So every answer huggingface_hub reads during a fetch passes through :func:`guarded`
first, which holds each to the shape the real hub sends:

* a commit (``X-Repo-Commit``, the model API's ``sha``) is 40 lowercase hex digits;
* an ETag (``X-Linked-Etag`` or ``ETag`` of a file's metadata) is hex (a git blob sha1 or an
  LFS sha256), optionally quoted and weak;
* a revision is a commit, a branch or tag name without path separators, ``..``, ``%`` or
  control characters, or a pull-request ref ``refs/pr/N`` (:func:`revision_problem`);
* a file name of the listing is a relative path without ``..``, backslashes or control
  characters (:func:`name_problem`), each LFS sha256 64 hex digits;
* every request, redirects included, stays on the trust chain (:func:`check_endpoint` for
  ``HF_ENDPOINT``): https, or plain http on loopback when the endpoint itself is loopback.
  Plain http to another machine (anyone on the path can swap the bytes) and a remote hub
  steering the client to a loopback service are refused unless the user opts in with
  ``LLAMA_PROC_ALLOW_INSECURE_HUB=1``.

The checks run as event hooks on huggingface_hub's shared HTTP client, active only inside
:func:`guarded` (a context variable), so they see every response, redirects included, before
huggingface_hub does, and leave other users of huggingface_hub in the process alone.
"""

from __future__ import annotations

import contextvars
import re
import unicodedata
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from llama_proc.config import ENV_PREFIX
from llama_proc.errors import DownloadError
from llama_proc.provision.fetch.session import is_local_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx2

__all__ = [
    "ALLOW_INSECURE_ENV",
    "check_commit",
    "check_endpoint",
    "guarded",
    "name_problem",
    "revision_problem",
]

ALLOW_INSECURE_ENV: Final = ENV_PREFIX + "ALLOW_INSECURE_HUB"
"""The opt-in for plain http to another machine (``Settings.allow_insecure_hub``)."""

COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
"""A full git commit id, as the hub names commits."""
ETAG_RE: Final = re.compile(r'(?:W/)?"?(?P<hex>[0-9a-fA-F]{32,128})"?')
"""A file ETag as the hub sends it: a git blob sha1 or an LFS sha256, quoted, maybe weak."""
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
MAX_REVISION: Final = 255
MAX_NAME: Final = 1024
"""Longest file path accepted from a listing (the hub's own limit is far below)."""
_REVISION_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_PR_REF_RE: Final = re.compile(r"refs/pr/[0-9]{1,9}")
_DRIVE_RE: Final = re.compile(r"[A-Za-z]:")
_ETAG_HEADERS: Final = ("X-Linked-Etag", "ETag")
_COMMIT_HEADER: Final = "X-Repo-Commit"
_HINT: Final = "the hub or HF_ENDPOINT mirror is broken or hostile; nothing was written"


@dataclass(frozen=True)
class _Policy:
    endpoint: str
    endpoint_local: bool
    allow_insecure: bool


_ACTIVE: Final[contextvars.ContextVar[_Policy | None]] = contextvars.ContextVar(
    "llama_proc_hub_guard", default=None
)


def revision_problem(revision: str) -> str | None:
    """What makes ``revision`` unsafe to hand to huggingface_hub, or None when it is fine.

    A branch or tag name may hold letters, digits and ``_ . + -`` (no path separator, no
    ``..``, no ``%``, no control or format characters); ``refs/pr/N`` names a pull request.
    """
    if len(revision) > MAX_REVISION:
        return f"is longer than {MAX_REVISION} characters"
    if _PR_REF_RE.fullmatch(revision):
        return None
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in revision):
        return "holds control characters"
    if "/" in revision or "\\" in revision:
        return "holds a path separator (only refs/pr/N may)"
    if ".." in revision:
        return "holds '..'"
    if not _REVISION_RE.fullmatch(revision):
        return "is not a branch, tag or commit name (letters, digits, _ . + -)"
    return None


def name_problem(name: object) -> str | None:
    """What makes a listed file name unsafe to join under the cache, or None when it is fine."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "holds control characters"
    if name.startswith("/") or "\\" in name or _DRIVE_RE.match(name):
        return "is not a relative path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "holds an empty, '.' or '..' path segment"
    return None


def check_endpoint(endpoint: str, *, allow_insecure: bool, what: str = "HF_ENDPOINT") -> None:
    """Refuse a hub endpoint that is not https and not plain http on loopback.

    Args:
        endpoint: the hub or mirror URL.
        allow_insecure: the user accepts plain http to another machine.
        what: how the endpoint is named in the message.

    Raises:
        DownloadError: the endpoint is plain http to another machine (without the opt-in) or
            not an http(s) URL at all.
    """
    scheme = urllib.parse.urlsplit(endpoint).scheme.lower()
    if scheme == "https" or (scheme == "http" and (allow_insecure or is_local_url(endpoint))):
        return
    if scheme == "http":
        msg = (
            f"{what} {_shown(endpoint)} is plain http to another machine: anyone on the path can "
            f"swap the model files; use an https:// mirror, or set {ALLOW_INSECURE_ENV}=1 if "
            "you trust the network path"
        )
    else:
        msg = (
            f"{what} {_shown(endpoint)} is not an https:// URL (plain http only on loopback, "
            f"or with {ALLOW_INSECURE_ENV}=1)"
        )
    raise DownloadError(msg)


def _check_url(policy: _Policy, url: str) -> None:
    """A request of the fetch (a redirect's target included) must stay on the trust chain."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    local = is_local_url(url)
    if scheme == "https" and (not local or policy.endpoint_local):
        return
    if scheme == "http" and ((local and policy.endpoint_local) or policy.allow_insecure):
        return
    why = (
        "a loopback address reached from a remote hub"
        if local and scheme in ("http", "https")
        else "plain http to another machine"
        if scheme == "http"
        else "not https"
    )
    msg = (
        f"the hub at {policy.endpoint} sent the download to {_shown(_no_query(url))}, "
        f"{why}: refused; set {ALLOW_INSECURE_ENV}=1 only if you trust the network path"
    )
    raise DownloadError(msg)


def _no_query(url: str) -> str:
    # A signed CDN URL carries its credentials in the query: never show it.
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def check_commit(value: object, what: str) -> str:
    """``value`` when it is a full commit id; otherwise a one-line refusal.

    Raises:
        DownloadError: ``value`` is not 40 lowercase hex digits.
    """
    if isinstance(value, str) and COMMIT_RE.fullmatch(value):
        return value
    msg = f"{what} names commit {_shown(value)}, not a 40-hex commit id; {_HINT}"
    raise DownloadError(msg)


def _check_etag(response: httpx2.Response) -> None:
    for header in _ETAG_HEADERS:
        value = response.headers.get(header)
        if value is None:
            continue
        if not ETAG_RE.fullmatch(value):
            msg = (
                f"{_where(response)} answered {header} {_shown(value)}, not a hex file digest; "
                f"{_HINT}"
            )
            raise DownloadError(msg)
        return  # huggingface_hub reads the first one present


def _on_request(request: httpx2.Request) -> None:
    policy = _ACTIVE.get()
    if policy is not None:
        _check_url(policy, str(request.url))


def _on_response(response: httpx2.Response) -> None:
    policy = _ACTIVE.get()
    if policy is None:
        return
    location = response.headers.get("Location")
    if location is not None and response.is_redirect:
        _check_url(policy, urllib.parse.urljoin(str(response.request.url), location))
    commit = response.headers.get(_COMMIT_HEADER)
    if commit is not None:
        check_commit(commit, f"{_where(response)} {_COMMIT_HEADER}")
        if response.request.method == "HEAD":
            # A file's metadata (huggingface_hub refuses one without a commit): it names the
            # cached blob after this ETag.
            _check_etag(response)


def _where(response: httpx2.Response) -> str:
    url = response.request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _install() -> None:
    """Add the hooks to huggingface_hub's shared client, once per client it creates."""
    from huggingface_hub import get_session  # noqa: PLC0415 - heavy, only to fetch

    session = get_session()
    hooks = session.event_hooks
    if _on_response not in hooks["response"]:
        session.event_hooks = {
            "request": [*hooks["request"], _on_request],
            "response": [*hooks["response"], _on_response],
        }


@contextmanager
def guarded(endpoint: str, *, allow_insecure: bool) -> Iterator[None]:
    """Hold every request and answer huggingface_hub makes in this context to the trust chain.

    Args:
        endpoint: the hub or mirror the fetch talks to (already passed by
            :func:`check_endpoint`).
        allow_insecure: the user accepts plain http to another machine.

    Raises:
        DownloadError: (inside the block) an answer had a malformed commit or ETag, or a
            request would leave the trust chain.
    """
    _install()
    policy = _Policy(endpoint, is_local_url(endpoint), allow_insecure)
    token = _ACTIVE.set(policy)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
