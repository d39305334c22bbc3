"""Build-provenance attestations of release archives: fetched, checked, recorded, or refused.

No real upstream bundle can be fetched here (no network), and none can be made offline without
Sigstore's keys, so real signature verification is not exercised: these tests cover the
plumbing around it (none served, malformed, oversized, another digest, a forged bundle that
sigstore rejects, sigstore missing) through a loopback mirror.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from release_fixtures import (
    LINUX,
    ReleaseFixture,
    attestation_document,
    attestation_path,
    make_release,
    needs_linux,
    serve_release,
    write_variants_toml,
)

from llama_proc import cli
from llama_proc.config import Settings
from llama_proc.errors import AttestationError
from llama_proc.provision import bundle
from llama_proc.provision.cache.layout import INSTALL_JSON, install_dir
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.fetch import download
from llama_proc.provision.fetch.attest import MAX_ATTESTATION_BYTES
from llama_proc.provision.manifest import load_manifest
from llama_proc.provision.resolve import ensure_server

if TYPE_CHECKING:
    from http_server import FileServer

    from llama_proc.provision.manifest_records import Manifest

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims"),
    needs_linux,
]

TAG = "b11434"
CPU = "linux-x86_64-cpu"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)

    def no_builds(*_a: Any, **_k: Any) -> Any:
        pytest.fail("a refused attestation must not fall back to a source build")

    monkeypatch.setattr(build_module, "build_variant", no_builds)


@pytest.fixture
def release(tmp_path: Path, server: FileServer) -> ReleaseFixture:
    fixture = make_release(tmp_path, TAG, ["ubuntu-x64"], prerelease=True)
    serve_release(server, fixture)
    return fixture


@pytest.fixture
def manifest(tmp_path: Path, release: ReleaseFixture) -> Manifest:
    return load_manifest(write_variants_toml(tmp_path / "variants.toml", release))


@pytest.fixture
def settings(tmp_path: Path, server: FileServer) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mirror=server.url, progress=False)


def _sha(release: ReleaseFixture) -> str:
    return release.sha256(release.main_asset)


def _install_json(settings: Settings) -> dict[str, Any]:
    path = install_dir(settings, TAG, CPU) / INSTALL_JSON
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_no_attestation_served_is_recorded_as_absent(
    server: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    install = ensure_server(settings, host=LINUX, manifest=manifest)
    record = _install_json(settings)["attestation"]
    assert record["state"] == "absent"
    assert record["assets"][release.main_asset]["state"] == "absent"
    assert install.metadata["attestation"]["state"] == "absent"
    # It was asked for, by the archive's sha256, at GitHub's API path under the mirror.
    assert server.hits(attestation_path(_sha(release))) == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>rate limited</html>", id="not-json"),
        pytest.param(b'{"attestations": []}', id="empty-list"),
        pytest.param(b'{"attestations": [{"bundle": null}]}', id="no-bundle"),
        pytest.param(b'{"attestations": [{"bundle": {"dsseEnvelope": {}}}]}', id="no-payload"),
        pytest.param(
            b'{"attestations": [{"bundle": {"dsseEnvelope": {"payload": "!!"}}}]}',
            id="payload-not-base64",
        ),
        pytest.param(b" " * (MAX_ATTESTATION_BYTES + 1) + b"{}", id="oversized"),
    ],
)
def test_malformed_or_oversized_attestation_refuses_the_install(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    body: bytes,
) -> None:
    server.add(attestation_path(_sha(release)), body, content_type="application/json")
    with pytest.raises(AttestationError) as info:
        ensure_server(settings, host=LINUX, manifest=manifest)
    assert "\n" not in str(info.value)
    assert release.main_asset in str(info.value) or "bytes" in str(info.value)
    assert not install_dir(settings, TAG, CPU).exists()


def test_attestation_for_another_digest_refuses_the_install(
    server: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    other = "0" * 64
    server.add_json(attestation_path(_sha(release)), attestation_document(other))
    with pytest.raises(AttestationError) as info:
        ensure_server(settings, host=LINUX, manifest=manifest)
    text = str(info.value)
    assert other in text
    assert _sha(release) in text
    assert "\n" not in text
    assert not install_dir(settings, TAG, CPU).exists()


@pytest.mark.parametrize(
    "well_formed",
    [
        pytest.param(False, id="unparseable-certificate"),
        pytest.param(True, id="self-signed-not-fulcio"),
    ],
)
def test_forged_bundle_naming_the_right_digest_is_rejected_by_sigstore(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    well_formed: bool,
) -> None:
    """The statement names the archive's sha256, so only sigstore's verifier stands between.

    ``well_formed`` parses as a bundle and reaches the certificate-chain check.
    """
    pytest.importorskip("sigstore")
    doc = attestation_document(_sha(release), name=release.main_asset, well_formed=well_formed)
    server.add_json(attestation_path(_sha(release)), doc)
    with pytest.raises(AttestationError, match="does not verify") as info:
        ensure_server(settings, host=LINUX, manifest=manifest)
    assert "\n" not in str(info.value)
    assert not install_dir(settings, TAG, CPU).exists()


def test_served_bundle_without_sigstore_is_recorded_as_unavailable(
    server: FileServer,
    release: ReleaseFixture,
    manifest: Manifest,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in ("sigstore", "sigstore.errors", "sigstore.models", "sigstore.verify"):
        monkeypatch.setitem(sys.modules, module, None)
    doc = attestation_document(_sha(release), name=release.main_asset)
    server.add_json(attestation_path(_sha(release)), doc)
    ensure_server(settings, host=LINUX, manifest=manifest)
    record = _install_json(settings)["attestation"]
    assert record["state"] == "unavailable"
    assert "llama-proc[attest]" in record["detail"]


def test_attestation_service_error_is_recorded_as_unavailable(
    server: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    """The sha256 is verified already: a failing attestation endpoint does not block installs."""
    server.add(attestation_path(_sha(release)), b"", statuses=[403])
    ensure_server(settings, host=LINUX, manifest=manifest)
    record = _install_json(settings)["attestation"]
    assert record["state"] == "unavailable"
    assert "HTTP 403" in record["detail"]


def test_which_verbose_says_the_attestation_is_absent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, server: FileServer
) -> None:
    build = load_manifest().build
    fixture = make_release(tmp_path, build)
    serve_release(server, fixture)
    assert cli.main(["fetch", "--variant", "cpu", "--mirror", server.url]) == 0
    capsys.readouterr()
    assert cli.main(["which", "-v", "--variant", "cpu"]) == 0
    _out, err = capsys.readouterr()
    assert "  attestation: absent (the release serves none for this archive; sha256 only)" in err
    cache = Path(os.environ["LLAMA_PROC_CACHE_DIR"])
    assert cache.is_dir()


def test_bundle_served_only_by_url_is_recorded_as_unavailable(
    server: FileServer, release: ReleaseFixture, manifest: Manifest, settings: Settings
) -> None:
    """GitHub may answer with a ``bundle_url`` and no inline bundle: a shape of its API, not
    a tampered answer, so the install goes ahead and the record says why nothing was checked."""
    doc = {"attestations": [{"bundle": None, "bundle_url": "https://example.invalid/b.json"}]}
    server.add_json(attestation_path(_sha(release)), doc)
    ensure_server(settings, host=LINUX, manifest=manifest)
    record = _install_json(settings)["attestation"]
    assert record["state"] == "unavailable"
    assert "bundle_url" in record["detail"]
