"""Platform wheels with a prebuilt llama-server from a local release mirror, installed for real.

The release is the provisioning tests' fake upstream release (shell-shim ``llama-server``)
served by a loopback file server; the download, sha256 check, extraction and install all run
for real, then the wheel is installed into a fresh venv with pip (offline, ``--no-deps``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from backend_support import REPO, Wheel, clean_env, load_backend, make_venv
from http_server import FileServer
from release_fixtures import ReleaseFixture, make_release, serve_release

from llama_proc.provision.manifest import load_manifest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the shim release is POSIX; tags checked on Linux"
)

ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(
    platform.machine().lower(), platform.machine().lower()
)
BUNDLE = "llama_proc/_bundled/"
PIP_TIMEOUT = 300


Mirror = tuple[str, ReleaseFixture, FileServer]


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_backend(monkeypatch)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    """The manifest's pinned build, published on a loopback mirror."""
    fixture = make_release(tmp_path / "upstream", load_manifest().build)
    with FileServer() as server:
        yield serve_release(server, fixture), fixture, server


def prebuilt_settings(url: str) -> dict[str, str]:
    return {
        "llama-proc.source": "prebuilt",
        "llama-proc.variant": "cpu",
        "llama-proc.mirror": url,
    }


def bundle_record(wheel: Wheel) -> dict[str, Any]:
    return cast("dict[str, Any]", json.loads(wheel.read(BUNDLE + "install.json")))


def test_prebuilt_wheel_is_platform_tagged_and_bundles_the_install(
    backend: ModuleType, tmp_path: Path, mirror: Mirror, capfd: pytest.CaptureFixture[str]
) -> None:
    url, fixture, server = mirror
    name = backend.build_wheel(str(tmp_path / "dist"), prebuilt_settings(url))
    wheel = Wheel(tmp_path / "dist" / name)

    # The manifest says upstream's Linux archives need glibc 2.35; the shims add no ELF needs.
    assert wheel.tag == f"py3-none-manylinux_2_35_{ARCH}"
    assert "Root-Is-Purelib: false" in wheel.dist_info("WHEEL")
    assert f"Tag: py3-none-manylinux_2_35_{ARCH}" in wheel.dist_info("WHEEL")
    record = bundle_record(wheel)
    assert record["source"] == "bundled"
    assert record["variant_id"] == f"linux-{ARCH}-cpu"
    assert record["build"] == fixture.tag
    assert record["bundled_from"]["source"] == "prebuilt"

    names = wheel.names
    servers = [n for n in names if n.startswith(BUNDLE) and n.rsplit("/", 1)[1] == "llama-server"]
    assert len(servers) == 1
    assert wheel.mode(servers[0]) & 0o111, "llama-server lost its exec bit"
    assert "llama_proc/variants.toml" in names
    assert not [n for n in names if n.endswith((".lock", ".part")) or "incoming" in n]
    # Every member of the symlink chain is a plain file under its own name.
    chain = {n.rsplit("/", 1)[-1] for n in names if "libllama.so" in n}
    assert chain == {"libllama.so", "libllama.so.0", "libllama.so.0.0.1"}
    # The RECORD lists every file (pip refuses wheels whose RECORD is wrong).
    recorded = {line.split(",", 1)[0] for line in wheel.dist_info("RECORD").splitlines()}
    assert set(names) == recorded

    assert server.hits(fixture.download_path(fixture.main_asset)) == 1
    err = capfd.readouterr().err
    assert f"bundled llama-server {fixture.tag} (linux-{ARCH}-cpu, prebuilt" in err

    # A second wheel comes from the cache: no new download.
    backend.build_wheel(str(tmp_path / "dist2"), prebuilt_settings(url))
    assert server.hits(fixture.download_path(fixture.main_asset)) == 1


def test_auto_bundles_when_a_prebuilt_can_be_fetched(
    backend: ModuleType, tmp_path: Path, mirror: Mirror
) -> None:
    url, _fixture, _server = mirror
    settings = {"llama-proc.variant": "cpu", "llama-proc.mirror": url}
    name = backend.build_wheel(str(tmp_path / "dist"), settings)
    wheel = Wheel(tmp_path / "dist" / name)
    assert wheel.tag == f"py3-none-manylinux_2_35_{ARCH}"
    assert bundle_record(wheel)["wheel_source"] == "auto"


def test_auto_without_a_release_on_the_mirror_makes_a_pure_wheel(
    backend: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with FileServer() as server:  # serves nothing: the release listing is a 404
        name = backend.build_wheel(
            str(tmp_path / "dist"),
            {"llama-proc.variant": "cpu", "llama-proc.mirror": str(server.url)},
        )
        assert server.hits() >= 1
    assert name.endswith("-py3-none-any.whl")
    err = capfd.readouterr().err
    assert "no prebuilt llama-server could be fetched" in err
    assert "provisioned on first use" in err


def test_prebuilt_without_a_release_on_the_mirror_fails(
    backend: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with FileServer() as server, pytest.raises(SystemExit) as exc:
        backend.build_wheel(str(tmp_path / "dist"), prebuilt_settings(str(server.url)))
    assert exc.value.code == 1
    err = capfd.readouterr().err
    assert "llama-proc: error:" in err
    assert "Traceback" not in err


def test_installed_wheel_finds_its_bundle_before_the_cache(
    backend: ModuleType, tmp_path: Path, mirror: Mirror
) -> None:
    url, fixture, _server = mirror
    name = backend.build_wheel(str(tmp_path / "dist"), prebuilt_settings(url))
    venv = make_venv(tmp_path / "venv", tmp_path / "dist" / name)
    bundled = venv.site_packages() / "llama_proc" / "_bundled"
    assert (bundled / "install.json").is_file()

    # The cache (LLAMA_PROC_CACHE_DIR, set by the autouse fixture) holds the very install the
    # wheel was made from; the ladder must still answer with the bundled copy.
    code = (
        "from llama_proc.provision import ensure_server\n"
        "i = ensure_server()\n"
        "print(i.source, i.build, i.server_binary)\n"
    )
    out = venv.run(str(venv.python), "-c", code, env={"LLAMA_PROC_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    source, build, binary = out.stdout.split()
    assert (source, build) == ("bundled", fixture.tag)
    assert Path(binary).is_relative_to(bundled)
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert f"version: {fixture.tag[1:]}" in version.stderr

    # The cache (LLAMA_PROC_CACHE_DIR, set by the autouse fixture) holds the very install the
    # wheel was made from; the ladder still answers with the bundled copy, and says why.
    out = venv.run(str(venv.bin / "llama-proc"), "which", "-v", env={"LLAMA_PROC_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert str(bundled) in out.stdout
    assert "bundled: using" in out.stdout + out.stderr


def test_sdist_then_pip_wheel_installs_the_same_way(
    backend: ModuleType, tmp_path: Path, mirror: Mirror
) -> None:
    """``python -m build --sdist`` output, built by pip as a user's ``pip install`` would."""
    url, fixture, _server = mirror
    dist = tmp_path / "sdist"
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), "."],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=PIP_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [sdist] = dist.glob("llama_proc-*.tar.gz")
    with tarfile.open(sdist) as tf:
        members = {n.split("/", 1)[-1] for n in tf.getnames()}
    assert {"build_backend/llama_proc_backend.py", "variants.toml", "LICENSE"} <= members

    wheels = tmp_path / "wheels"
    config = [f"--config-settings={k}={v}" for k, v in prebuilt_settings(url).items()]
    out = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--no-index", "-v", "-w", str(wheels), *config, str(sdist),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=PIP_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "bundled llama-server" in out.stdout + out.stderr  # pip -v shows the backend's line
    [built] = wheels.glob("llama_proc-*.whl")
    wheel = Wheel(built)
    assert wheel.tag == f"py3-none-manylinux_2_35_{ARCH}"
    assert bundle_record(wheel)["build"] == fixture.tag

    venv = make_venv(tmp_path / "venv", built)
    out = venv.run(str(venv.bin / "llama-proc"), "which", env={"LLAMA_PROC_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert str(venv.site_packages() / "llama_proc" / "_bundled") in out.stdout
