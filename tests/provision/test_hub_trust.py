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

from llama_proc.config import Settings
from llama_proc.errors import ChecksumMismatchError, DownloadError, ModelFileError
from llama_proc.models.choose import choose_files
from llama_proc.models.hub import fetch_model
from llama_proc.models.hub_trust import check_endpoint
from llama_proc.models.model_ref import ModelRef
from llama_proc.vocab import MAX_SPLIT_PARTS

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


def _cached_files(cache: Path) -> list[Path]:
    """Model files (blobs and snapshot links) in the HF cache."""
    return [
        p
        for p in cache.rglob("*")
        if ("blobs" in p.parts or "snapshots" in p.parts) and not p.is_dir()
    ]


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


# -- the bytes and where they come from ---------------------------------------------------------


def test_altered_bytes_are_refused_and_removed(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo(REPO, {NAME: b"GGUF the real bytes"})
    # A CDN (or a redirect) serving other bytes of the same size.
    hub.storage.add(hub.blob_path(REPO, NAME), b"GGUF the evil bytes")

    with pytest.raises(ChecksumMismatchError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    assert "\n" not in str(info.value)
    assert _cached_files(hf_cache) == [], "the altered file stayed in the cache"
    # Once the hub serves the right bytes again, the next fetch downloads and accepts them.
    hub.storage.add(hub.blob_path(REPO, NAME), b"GGUF the real bytes")
    assert _fetch(hub, hf_cache, f"{REPO}:Q4_0").model.read_bytes() == b"GGUF the real bytes"


def test_a_short_file_is_refused(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo(REPO, {NAME: b"GGUF the real bytes"})
    hub.info_fields["siblings"] = [{"rfilename": NAME, "size": 4096}]

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    assert "\n" not in str(info.value)
    assert "4096" in str(info.value)


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("http://mirror.example/lfs/blob", id="plain-http-remote"),
        pytest.param("ftp://mirror.example/lfs/blob", id="other-scheme"),
    ],
)
@pytest.mark.parametrize("where", ["hub", "storage"])
def test_a_redirect_off_the_trust_chain_is_refused(
    hub: FakeHub, hf_cache: Path, target: str, where: str
) -> None:
    hub.add_repo(REPO, {NAME: PAYLOAD})
    if where == "hub":
        hub.resolve_headers["Location"] = target
    else:
        hub.storage.route(hub.blob_path(REPO, NAME)).redirect = target

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    assert "\n" not in str(info.value)
    assert "mirror.example" in str(info.value)
    assert "LLAMA_PROC_ALLOW_INSECURE_HUB" in str(info.value)
    assert _cached_files(hf_cache) == []


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        pytest.param("https://huggingface.co", True, id="https"),
        pytest.param("http://127.0.0.1:8080", True, id="loopback"),
        pytest.param("http://localhost:8080/", True, id="localhost"),
        pytest.param("http://hub.example", False, id="plain-http-remote"),
        pytest.param("ftp://hub.example", False, id="ftp"),
        pytest.param("hub.example", False, id="no-scheme"),
    ],
)
def test_an_endpoint_must_be_https_or_loopback(endpoint: str, allowed: bool) -> None:
    if allowed:
        check_endpoint(endpoint, allow_insecure=False)
    else:
        with pytest.raises(DownloadError) as info:
            check_endpoint(endpoint, allow_insecure=False)
        assert "\n" not in str(info.value)
        assert "LLAMA_PROC_ALLOW_INSECURE_HUB" in str(info.value)
    if endpoint.startswith("http"):
        check_endpoint(endpoint, allow_insecure=True)


def test_a_plain_http_hf_endpoint_is_refused_before_connecting(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.example")
    with pytest.raises(DownloadError, match=r"HF_ENDPOINT .* is plain http to another machine"):
        fetch_model(f"{REPO}:Q4_0", cache_dir=hf_cache, progress=False)
    # The user can say so, for a mirror on a network they trust (the settings carry it).
    settings = Settings.from_env({"LLAMA_PROC_ALLOW_INSECURE_HUB": "1"}, cache_dir=hf_cache)
    assert settings.allow_insecure_hub


def test_a_split_model_of_too_many_parts_is_refused_before_fetching(
    hub: FakeHub, hf_cache: Path
) -> None:
    count = MAX_SPLIT_PARTS + 1
    names = [f"m-Q4_0-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    hub.add_repo(REPO, dict.fromkeys(names, b"GGUF"))

    with pytest.raises(ModelFileError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 400
    assert not hub.storage.log


def test_a_split_listing_claiming_99999_parts_is_one_short_line() -> None:
    with pytest.raises(ModelFileError) as info:
        choose_files(ModelRef(REPO, quant="Q4_0"), ["m-Q4_0-00001-of-99999.gguf"])
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "siblings",
    [
        pytest.param([{"rfilename": "../evil-Q4_0.gguf"}], id="dot-dot"),
        pytest.param([{"rfilename": "/abs-Q4_0.gguf"}], id="absolute"),
        pytest.param([{"rfilename": "d/../../e-Q4_0.gguf"}], id="inner-dot-dot"),
        pytest.param([{"rfilename": "m\\..\\..\\e-Q4_0.gguf"}], id="backslash"),
        pytest.param([{"rfilename": "a\x00-Q4_0.gguf"}], id="nul"),
        pytest.param([{"rfilename": "a\x1b[2J\u202e-Q4_0.gguf"}], id="escape-bidi"),
        pytest.param([{"rfilename": "x" * 5000 + "-Q4_0.gguf"}], id="long"),
        pytest.param([{"rfilename": None}], id="null"),
        pytest.param([{"rfilename": 5}], id="number"),
        pytest.param([{"rfilename": NAME, "size": "big"}], id="size-text"),
        pytest.param([{"rfilename": NAME, "size": -1}], id="size-negative"),
        pytest.param(
            [{"rfilename": NAME, "lfs": {"sha256": "zz", "size": 4, "pointerSize": 1}}],
            id="lfs-sha",
        ),
    ],
)
def test_hostile_sibling_names_are_one_line(
    hub: FakeHub, hf_cache: Path, site: Path, siblings: list[dict[str, Any]]
) -> None:
    hub.add_repo(REPO, {NAME: PAYLOAD})
    hub.info_fields["siblings"] = siblings

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q4_0")

    message = str(info.value)
    assert "\n" not in message
    assert "\x1b" not in message
    assert "\u202e" not in message
    assert "\x00" not in message
    assert len(message) < 600
    assert not hub.storage.log
    assert _written(site.parent, hf_cache) == []
