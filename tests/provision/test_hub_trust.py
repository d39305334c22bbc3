"""What a hostile hub or a hostile reference can make llama-proc write: nothing outside the cache.

huggingface_hub joins the hub's ``ETag`` and ``X-Repo-Commit`` and the user's revision into
paths of its cache without checking them; a hub answering ``ETag: "../../../site/evil.pth"``
once made ``llama-proc pull`` write a ``.pth`` file into site-packages. These tests run the
real huggingface_hub against the loopback fake hub, so they fail again if llama-proc stops
checking the hub's answers before huggingface_hub acts on them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from llama_proc.errors import DownloadError, ModelFileError
from llama_proc.provision.hub import ModelRef, fetch_model

if TYPE_CHECKING:
    from pathlib import Path

    from fake_hub import FakeHub

REPO = "org/m"
NAME = "m-Q4_0.gguf"
PAYLOAD = b"import os; os.system('touch /tmp/pwned')\n"


def _fetch(hub: FakeHub, cache: Path, ref: str | ModelRef, **kwargs: Any) -> Any:
    kwargs.setdefault("progress", False)
    return fetch_model(ref, cache_dir=cache, endpoint=hub.url, **kwargs)


def _written(root: Path, cache: Path) -> list[str]:
    """Every file under ``root`` but outside ``cache`` (the HF home the fixture made is empty)."""
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not path.startswith(str(cache) + os.sep):
                found.append(os.path.relpath(path, root))
    return sorted(found)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A stand-in for site-packages, next to the cache as ``../../../site`` reaches it."""
    folder = tmp_path / "site"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param("X-Linked-Etag", '"../../../site/evil.pth"', id="linked-etag"),
        pytest.param("X-Linked-Etag", "W/../../../site/evil.pth", id="weak-etag"),
        pytest.param("X-Linked-Etag", '"..%2F..%2F..%2Fsite%2Fevil.pth"', id="encoded-etag"),
        pytest.param("X-Repo-Commit", "../../../../site", id="commit"),
        pytest.param("X-Repo-Commit", "a" * 39 + "/", id="commit-slash"),
    ],
)
def test_a_hostile_hub_answer_writes_nothing_outside_the_cache(
    hub: FakeHub, hf_cache: Path, site: Path, header: str, value: str
) -> None:
    hub.add_repo(REPO, {NAME: PAYLOAD})
    hub.resolve_headers[header] = value

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    message = str(info.value)
    assert "\n" not in message
    assert header.lower() in message.lower()
    assert list(site.iterdir()) == []
    assert _written(site.parent, hf_cache) == []
    assert not hub.storage.log  # refused before any byte was fetched


def test_a_hostile_listing_commit_is_refused(hub: FakeHub, hf_cache: Path, site: Path) -> None:
    hub.add_repo(REPO, {NAME: PAYLOAD})
    hub.info_fields["sha"] = "../../../site"

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    assert "\n" not in str(info.value)
    assert "commit" in str(info.value)
    assert _written(site.parent, hf_cache) == []


HOSTILE_REVISION = "../../../site/evil"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"{REPO}:Q4_0@{HOSTILE_REVISION}", id="at-rev"),
        pytest.param(f"{REPO}@{HOSTILE_REVISION}:Q4_0", id="rev-then-quant"),
        pytest.param(f"hf://{REPO}@..%2F..%2F..%2Fsite%2Fevil/{NAME}", id="hf-uri-encoded"),
        pytest.param(f"hf://{REPO}/{NAME}@{HOSTILE_REVISION}", id="hf-uri-trailing"),
        pytest.param(
            f"https://huggingface.co/{REPO}/resolve/..%2F..%2F..%2Fsite%2Fevil/{NAME}",
            id="link-encoded",
        ),
        pytest.param(
            f"https://huggingface.co/{REPO}/resolve/%2e%2e/{NAME}", id="link-encoded-dots"
        ),
        pytest.param(f"{REPO}@main\x1b[2J", id="control"),
        pytest.param(f"{REPO}@v1\\..\\x", id="backslash"),
    ],
)
def test_a_hostile_revision_is_refused_before_the_hub_is_asked(
    hub: FakeHub, hf_cache: Path, site: Path, text: str
) -> None:
    # A hostile hub answers for any revision; the reference must never reach it.
    hub.add_repo(REPO, {NAME: PAYLOAD}, revision=HOSTILE_REVISION)
    hub.add_repo(REPO, {NAME: PAYLOAD}, revision="..")

    with pytest.raises(ModelFileError) as info:
        _fetch(hub, hf_cache, text)

    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)
    assert "revision" in str(info.value)
    assert not hub.log
    assert _written(site.parent, hf_cache) == []


def test_a_hostile_revision_given_apart_is_refused() -> None:
    # --revision and library callers build the reference directly.
    with pytest.raises(ModelFileError):
        ModelRef(REPO, quant="Q4_0", revision=HOSTILE_REVISION)
    with pytest.raises(ModelFileError):
        ModelRef(REPO, revision="refs/pr/1/../../x")


@pytest.mark.parametrize(
    "revision", ["main", "v1.0", "release-2024_01", "refs/pr/3", "a" * 40, "abc1234"]
)
def test_ordinary_revisions_pass(revision: str) -> None:
    assert ModelRef(REPO, revision=revision).revision == revision
