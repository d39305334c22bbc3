"""Model references as users copy them from the Hugging Face Hub, parsed into ModelRef.

``org/repo[:QUANT]``, ``hf://org/repo/path``, a huggingface.co link, each with an optional
``@REVISION``; anything else is a plain path, and a path that exists always wins.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from llama_proc.errors import (
    ModelFileError,
)
from llama_proc.models.hub_trust import (
    revision_problem,
)

HF_SCHEME: Final = "hf://"

HUB_HOSTS: Final = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})

GGUF_SUFFIX: Final = ".gguf"

_PART: Final = r"[A-Za-z0-9][\w.-]*"

_REPO_RE: Final = re.compile(rf"{_PART}/{_PART}")

_QUANT_RE: Final = re.compile(r"[A-Za-z0-9_]+")

# org/repo[@rev][:QUANT][@rev]: a git ref holds no ':' and a quant tag holds no '@'.
_REPO_REF_RE: Final = re.compile(
    rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev1>[^:@\s]+))?"
    r"(?::(?P<quant>[A-Za-z0-9_]+))?(?:@(?P<rev2>[^:@\s]+))?"
)

_HF_FILE_RE: Final = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^/@\s]+))?/(?P<path>.+)")

_URL_FILE_RE: Final = re.compile(
    rf"/(?P<repo>{_PART}/{_PART})/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<path>.+)"
)

_URL_REPO_RE: Final = re.compile(rf"/(?P<repo>{_PART}/{_PART})/?")


@dataclass(frozen=True)
class ModelRef:
    """A model on the Hugging Face Hub: a repository and a quantization tag or one file in it."""

    repo: str
    """``org/name`` of the model repository."""
    quant: str | None = None
    """Quantization tag (upper-cased, e.g. ``Q4_K_M``); None = llama.cpp's default choice."""
    file: str | None = None
    """Path of one GGUF inside the repository (``hf://`` form); excludes ``quant``."""
    revision: str | None = None
    """Branch, tag or commit; None = the default branch."""

    def __post_init__(self) -> None:
        if not _REPO_RE.fullmatch(self.repo):
            msg = f"{self.repo!r} is not a Hugging Face repository id; write it as org/name"
            raise ModelFileError(msg)
        if self.quant is not None:
            if not _QUANT_RE.fullmatch(self.quant):
                msg = f"{self.quant!r} is not a quantization tag; use one like Q4_K_M"
                raise ModelFileError(msg)
            object.__setattr__(self, "quant", self.quant.upper())
        if self.quant is not None and self.file is not None:
            msg = f"name either a quantization or a file of {self.repo}, not both"
            raise ModelFileError(msg)
        if self.revision is not None and (problem := revision_problem(self.revision)):
            # huggingface_hub writes refs/<revision> in its cache: no path may hide in it.
            msg = (
                f"revision {self.revision!r} of {self.repo} {problem}; name a branch, tag "
                "or commit of the repository"
            )
            raise ModelFileError(msg)

    @classmethod
    def parse(cls, text: str) -> ModelRef | None:
        """Read a reference the way users copy it; None when ``text`` is a plain path.

        Args:
            text: ``org/repo[:QUANT][@REV]``, ``hf://org/repo/file.gguf[@REV]``, a
                ``https://huggingface.co/...`` link, or a path.

        Returns:
            The reference, or None for a path (an existing path always counts as one).

        Raises:
            ModelFileError: ``text`` starts like a reference (``hf://``, a hub link) but is
                malformed.
        """
        text = text.strip()
        if not text or _is_existing_path(text):
            return None
        if text.startswith(HF_SCHEME):
            return _parse_hf_uri(text)
        parsed = urllib.parse.urlsplit(text)
        if parsed.scheme in ("http", "https") and (parsed.hostname or "") in HUB_HOSTS:
            return _parse_hub_url(text, parsed.path)
        if text.lower().endswith(GGUF_SUFFIX):
            return None  # "models/x.gguf" is a path, never a repo named like a file
        return _parse_repo_ref(text)

    def __str__(self) -> str:
        if self.file is not None:
            at = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
            return f"{HF_SCHEME}{self.repo}{at}/{self.file}"
        text = self.repo + (f":{self.quant}" if self.quant else "")
        return text + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of a fetched model, ready for ``llama-server -m ... [--mmproj ...]``."""

    model: Path
    """The file to pass as the model: the only file, or the first part of a split GGUF."""
    parts: tuple[Path, ...] = field(default=())
    """Every part in order (``model`` first); one entry for an unsplit model."""
    mmproj: Path | None = None
    """The multimodal projector, when asked for and the repository has one."""

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", (self.model,))


def _is_existing_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, RuntimeError):  # a name too long for the OS; "~user" of no such user
        return False


def _parse_repo_ref(text: str) -> ModelRef | None:
    match = _REPO_REF_RE.fullmatch(text)
    if match is None:
        return None
    if match["rev1"] and match["rev2"]:
        msg = f"{text!r} names two revisions; keep one @REVISION"
        raise ModelFileError(msg)
    return ModelRef(match["repo"], quant=match["quant"], revision=match["rev1"] or match["rev2"])


def _parse_hf_uri(text: str) -> ModelRef:
    body = text[len(HF_SCHEME) :]
    match = _HF_FILE_RE.fullmatch(body)
    if match is None:
        ref = _parse_repo_ref(body)
        if ref is None:
            msg = f"{text!r} is not a model reference; write hf://org/repo/path/file.gguf"
            raise ModelFileError(msg)
        return ref
    path, revision = match["path"], match["rev"]
    if revision is None and "@" in path:
        # hf://org/repo/file.gguf@REV: a trailing revision, which may itself hold '/'.
        head, _, tail = path.rpartition("@")
        if head.lower().endswith(GGUF_SUFFIX):
            path, revision = head, tail
    return _file_ref(text, match["repo"], path, revision and urllib.parse.unquote(revision))


def _parse_hub_url(text: str, url_path: str) -> ModelRef:
    match = _URL_FILE_RE.fullmatch(url_path)
    if match is not None:
        revision = urllib.parse.unquote(match["rev"])
        return _file_ref(text, match["repo"], urllib.parse.unquote(match["path"]), revision)
    match = _URL_REPO_RE.fullmatch(url_path)
    if match is None:
        msg = f"{text!r} is not a model page or file link; copy the link of a .gguf file"
        raise ModelFileError(msg)
    return ModelRef(match["repo"])


def _file_ref(text: str, repo: str, path: str, revision: str | None) -> ModelRef:
    if not path.lower().endswith(GGUF_SUFFIX) or path.startswith("/") or ".." in path.split("/"):
        msg = f"{text!r} does not name a .gguf file in the repository; llama-server loads GGUF"
        raise ModelFileError(msg)
    return ModelRef(repo, file=path, revision=revision or None)
