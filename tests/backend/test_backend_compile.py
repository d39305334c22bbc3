"""``llama-proc.source=build`` with the run's real CPU build: reuse, bundle, install, serve.

The compile path must not compile a second time: the hook resolves through the same ladder as
the runtime and finds the run's shared build in the cache (when the run was given an explicit
binary instead, that build folder is first installed into a cache the way ``build_variant``
would). The wheel is then installed into a fresh venv, whose own ladder must answer with the
bundled copy, and that copy serves the real model.
"""

from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from backend_support import Wheel, load_backend, make_venv

from llama_proc.vocab import InstallSource

if TYPE_CHECKING:
    from types import ModuleType

    from llama_proc.config import Settings

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux build and tags"),
]

ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(
    platform.machine().lower(), platform.machine().lower()
)
REUSE_SECONDS = 60
READY_TIMEOUT = 180.0
POLL_INTERVAL = 0.1
HTTP_TIMEOUT = 60


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_backend(monkeypatch)


def cache_with_the_runs_build(
    llama_server_bin: Path, real_settings: Settings, tmp_path: Path
) -> tuple[Path, Path]:
    """A cache dir holding the run's CPU build as a ``built`` install; and that install's path."""
    from llama_proc.provision.cache.installer import install_atomically
    from llama_proc.provision.cache.layout import install_dir
    from llama_proc.provision.cache.record import Install
    from llama_proc.provision.manifest import load_manifest

    for parent in llama_server_bin.parents:
        if (parent / "install.json").is_file():
            install = Install.from_dir(parent)
            if install.path.is_relative_to(real_settings.cache_dir):
                return real_settings.cache_dir, install.path
    # An explicit binary (LLAMA_PROC_TEST_SERVER_BIN): install its folder as build_variant would.
    manifest = load_manifest()
    variant = manifest.get(f"linux-{ARCH}-cpu")
    settings = real_settings.replace(cache_dir=tmp_path / "build-cache")

    def populate(staging: Path) -> dict[str, Any]:
        shutil.copytree(llama_server_bin.parent, staging, symlinks=True, dirs_exist_ok=True)
        return {
            "variant_id": variant.id,
            "build": manifest.build,
            "source": InstallSource.BUILT,
            "portable": False,
        }

    install = install_atomically(
        install_dir(settings, manifest.build, variant.id),
        populate,
        settings=settings,
        binaries=variant.binaries,
        os_name="linux",
    )
    return settings.cache_dir, install.path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"llama-server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=HTTP_TIMEOUT) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(POLL_INTERVAL)
    pytest.fail(f"{url}/health was not 200 within {READY_TIMEOUT}s")


def test_build_source_bundles_the_cached_build_and_it_serves(
    backend: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_server_bin: Path,
    real_settings: Settings,
    smol_model: Path,
) -> None:
    from llama_proc.provision.cache.record import Install

    cache, origin = cache_with_the_runs_build(llama_server_bin, real_settings, tmp_path)
    run_install = Install.from_dir(origin)
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(cache))
    settings = {
        # A run whose shared install is a download (GitHub reachable) bundles that instead.
        "llama-proc.source": "build" if run_install.source == InstallSource.BUILT else "auto",
        "llama-proc.variant": "cpu",
        "llama-proc.build": run_install.build,
        # Offline, a cache miss fails at once instead of compiling or downloading again.
        "llama-proc.offline": "1",
    }
    start = time.monotonic()
    name = backend.build_wheel(str(tmp_path / "dist"), settings)
    elapsed = time.monotonic() - start
    assert elapsed < REUSE_SECONDS, f"took {elapsed:.0f}s: compiled again instead of reusing"

    wheel = Wheel(tmp_path / "dist" / name)
    record = json.loads(wheel.read("llama_proc/_bundled/install.json"))
    assert record["bundled_from"]["path"] == str(origin)
    assert record["variant_id"] == f"linux-{ARCH}-cpu"
    assert record["source"] == "bundled"
    if record["bundled_from"]["source"] == InstallSource.BUILT and not record.get("portable"):
        # Tuned to this CPU: a host-only tag that PyPI refuses, not a manylinux promise.
        assert wheel.tag == f"py3-none-linux_{ARCH}"
    else:
        assert wheel.tag.startswith("py3-none-manylinux_2_")
    # No symlinks in a wheel: each library is there once, under the name the loader asks for.
    libs = [n for n in wheel.names if n.startswith("llama_proc/_bundled/") and ".so" in n]
    assert libs
    assert not [n for n in libs if n.endswith(".so") and f"{n}.0" in wheel.names]

    venv = make_venv(tmp_path / "venv", wheel.path)
    bundled = venv.site_packages() / "llama_proc" / "_bundled"
    code = "from llama_proc.provision import ensure_server; print(ensure_server().server_binary)"
    out = venv.run(str(venv.python), "-c", code, env={"LLAMA_PROC_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    binary = Path(out.stdout.strip())
    assert binary.is_relative_to(bundled)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(binary), "-m", str(smol_model), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["-c", "512", "-t", "2"]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc)
        body = json.dumps({"prompt": "The capital of France is", "n_predict": 8}).encode()
        request = urllib.request.Request(
            f"{url}/completion", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
            answer = json.loads(resp.read())
        assert answer["content"].strip()
        assert answer["tokens_predicted"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()

    out = venv.run(str(venv.bin / "llama-proc"), "which", "-v", env={"LLAMA_PROC_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert str(bundled) in out.stdout
    assert "bundled: using" in out.stdout + out.stderr
