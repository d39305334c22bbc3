"""``llama-proc pin``: upstream's real b11194 listing, served by a loopback mirror, pinned in.

The listing carries the sizes and sha256 digests GitHub published for b11194
(tests/helpers/upstream_listings.py); the manifest is a copy of the shipped one set to that build.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from http_server import FileServer
from upstream_listings import B11194, listing

from llama_proc import cli
from llama_proc._cli.handlers import maintain
from llama_proc.provision.fetch import download
from llama_proc.provision.manifest import load_manifest

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = "ggml-org/llama.cpp"
BUILD = "b11194"
COMMIT = "9f70b2cecd1a9a3f73ac525c47ca22a6ee9a7b69"
REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA12 = (
    f"llama-{BUILD}-bin-ubuntu-cuda-12.8-x64.tar.gz",
    f"cudart-llama-{BUILD}-bin-ubuntu-cuda-12.8-x64.tar.gz",
)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        srv.add_json(f"/repos/{REPO}/releases/tags/{BUILD}", listing(BUILD))
        srv.add_json(f"/repos/{REPO}/commits/{BUILD}", {"sha": COMMIT, "commit": {}})
        yield srv


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    text = (REPO_ROOT / "variants.toml").read_text(encoding="utf-8")
    path = tmp_path / "checkout" / "variants.toml"
    path.parent.mkdir()
    path.write_text(re.sub(r'(?m)^build = "b\d+"$', f'build = "{BUILD}"', text, count=1))
    path.chmod(0o644)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_pin_writes_sha256_size_and_commit(
    capsys: pytest.CaptureFixture[str], server: FileServer, manifest: Path
) -> None:
    before = manifest.read_text(encoding="utf-8")
    code, out, err = run(capsys, "pin", "--manifest", str(manifest), "--mirror", server.url)
    assert code == 0, err
    assert out.startswith(f"{manifest}: pinned ")
    assert f"of {BUILD} (commit {COMMIT[:12]})" in out
    pinned = load_manifest(manifest)
    assert pinned.commit == COMMIT
    cuda = pinned.get("linux-x86_64-cuda")
    assert dict(cuda.sha256) == {name: B11194[name][1] for name in CUDA12}
    assert dict(cuda.size) == {name: B11194[name][0] for name in CUDA12}
    raw = tomllib.loads(manifest.read_text(encoding="utf-8"))
    assert raw["llama_cpp"]["commit"] == COMMIT
    # Written by rename: same mode, no temporary file left beside it, comments kept.
    assert manifest.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["variants.toml"]
    after = manifest.read_text(encoding="utf-8")
    assert after.count("\n#") == before.count("\n#")

    code, out, _ = run(capsys, "pin", "--manifest", str(manifest), "--mirror", server.url)
    assert code == 0
    assert out.startswith(f"{manifest}: already pins ")
    assert manifest.read_text(encoding="utf-8") == after


def test_dry_run_prints_the_diff_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], server: FileServer, manifest: Path
) -> None:
    before = manifest.read_bytes()
    stamp = manifest.stat().st_mtime_ns
    code, out, err = run(
        capsys, "pin", "--dry-run", "--manifest", str(manifest), "--mirror", server.url
    )
    assert code == 0, err
    assert out.startswith(f"--- {manifest}\n+++ {manifest} (pinned)\n")
    assert f'+commit = "{COMMIT}"\n' in out
    sha = B11194[CUDA12[1]][1]
    assert any(line.startswith("+sha256 = {") and sha in line for line in out.splitlines())
    assert manifest.read_bytes() == before
    assert manifest.stat().st_mtime_ns == stamp


def test_a_failed_write_leaves_the_manifest_whole(
    capsys: pytest.CaptureFixture[str],
    server: FileServer,
    manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = manifest.read_bytes()

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code, out, err = run(capsys, "pin", "--manifest", str(manifest), "--mirror", server.url)
    assert (code, out) == (1, "")
    # Above the error: the variants b11194 has nothing for, as notes.
    *notes, line = err.splitlines()
    assert all(note.startswith("  not pinned: ") for note in notes)
    assert line == (
        f"llama-proc: error: cannot write {manifest}: No space left on device; nothing was changed"
    )
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["variants.toml"]


def test_pin_refuses_without_network_in_one_line(
    capsys: pytest.CaptureFixture[str], server: FileServer, manifest: Path
) -> None:
    before = manifest.read_bytes()
    code, out, err = run(
        capsys, "pin", "--offline", "--manifest", str(manifest), "--mirror", server.url
    )
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert line.startswith("llama-proc: error: pin reads the release listing from the network")
    assert server.hits() == 0

    with socket.socket() as sock:  # a loopback port with nobody listening: no network
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code, out, err = run(capsys, "pin", "--manifest", str(manifest), "--mirror", dead)
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert line.startswith("llama-proc: error: ")
    assert manifest.read_bytes() == before


def test_pin_refuses_another_build_than_the_manifests(
    capsys: pytest.CaptureFixture[str], server: FileServer, manifest: Path
) -> None:
    server.add_json(f"/repos/{REPO}/releases/tags/b11425", listing("b11425"))
    server.add_json(f"/repos/{REPO}/commits/b11425", {"sha": "a" * 40, "commit": {}})
    code, _, err = run(
        capsys, "pin", "--build", "11425", "--manifest", str(manifest), "--mirror", server.url
    )
    assert code == 1
    [line] = err.splitlines()
    assert "set its build to b11425 first" in line


def test_pin_refuses_a_plain_http_remote_mirror(
    capsys: pytest.CaptureFixture[str], manifest: Path
) -> None:
    code, _, err = run(
        capsys, "pin", "--manifest", str(manifest), "--mirror", "http://mirror.example"
    )
    assert code == 1
    assert "plain http" in err
    assert len(err.splitlines()) == 1


def test_default_manifest_is_the_checkouts() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["pin"])
    assert maintain._manifest_path(args) == REPO_ROOT / "variants.toml"
