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
  control characters, or a pull-request ref ``refs/pr/N`` (:func:`revision_problem`).

The checks run as event hooks on huggingface_hub's shared HTTP client, active only inside
:func:`guarded` (a context variable), so they see every response, redirects included, before
huggingface_hub does, and leave other users of huggingface_hub in the process alone.
"""

from __future__ import annotations

import contextvars
import re
import unicodedata
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from llama_proc.errors import DownloadError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx2

__all__ = ["check_commit", "guarded", "revision_problem"]

COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
"""A full git commit id, as the hub names commits."""
ETAG_RE: Final = re.compile(r'(?:W/)?"?(?P<hex>[0-9a-fA-F]{32,128})"?')
"""A file ETag as the hub sends it: a git blob sha1 or an LFS sha256, quoted, maybe weak."""
MAX_REVISION: Final = 255
_REVISION_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_PR_REF_RE: Final = re.compile(r"refs/pr/[0-9]{1,9}")
_ETAG_HEADERS: Final = ("X-Linked-Etag", "ETag")
_COMMIT_HEADER: Final = "X-Repo-Commit"
_HINT: Final = "the hub or HF_ENDPOINT mirror is broken or hostile; nothing was written"

_ACTIVE: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "llama_proc_hub_guard", default=False
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


def _on_response(response: httpx2.Response) -> None:
    if not _ACTIVE.get():
        return
    commit = response.headers.get(_COMMIT_HEADER)
    if commit is not None:
        check_commit(commit, f"{_where(response)} {_COMMIT_HEADER}")
    if response.request.method == "HEAD":
        # A file's metadata: huggingface_hub names the cached blob after this ETag.
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
            "request": list(hooks["request"]),
            "response": [*hooks["response"], _on_response],
        }


@contextmanager
def guarded() -> Iterator[None]:
    """Hold every answer huggingface_hub reads in this context to the hub's shapes.

    Raises:
        DownloadError: (inside the block) an answer had a malformed commit or ETag.
    """
    _install()
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
