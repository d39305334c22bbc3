"""The PEP 517 hooks called directly, with no network: pure wheels, sdists, config handling."""

from __future__ import annotations

import tarfile
import time
from typing import TYPE_CHECKING

import pytest
from backend_support import REPO, Wheel, load_backend

if TYPE_CHECKING:
    from pathlib import Path
    from types import ModuleType

PURE_TAG = "py3-none-any"


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_backend(monkeypatch)


def build(backend: ModuleType, tmp_path: Path, settings: dict[str, str]) -> Wheel:
    name = backend.build_wheel(str(tmp_path / "dist"), settings)
    return Wheel(tmp_path / "dist" / name)


def assert_pure(wheel: Wheel) -> None:
    assert wheel.tag == PURE_TAG
    assert "Root-Is-Purelib: true" in wheel.dist_info("WHEEL")
    assert not [n for n in wheel.names if "_bundled" in n]


def test_pure_wheel_contents(backend: ModuleType, tmp_path: Path) -> None:
    wheel = build(backend, tmp_path, {"llama-proc.source": "none"})
    assert_pure(wheel)
    names = wheel.names
    assert wheel.read("llama_proc/variants.toml") == (REPO / "variants.toml").read_bytes()
    assert "llama_proc/py.typed" in names
    assert "llama_proc/provision/bundle.py" in names
    assert not [n for n in names if n.startswith(("build_backend/", "tests/"))]
    assert "llama-proc = llama_proc.cli:main" in wheel.dist_info("entry_points.txt")
    metadata = wheel.dist_info("METADATA")
    assert "Name: llama-proc" in metadata
    assert "Requires-Dist: requests" in metadata


def test_none_says_so_on_stderr(
    backend: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    build(backend, tmp_path, {"llama-proc.source": "none"})
    err = capfd.readouterr().err
    assert "llama-proc: building a pure wheel" in err
    assert "provisioned on first use" in err


def test_source_from_env(
    backend: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLAMA_PROC_SOURCE", "none")
    assert_pure(build(backend, tmp_path, {}))
    assert "llama-proc.source=none" in capfd.readouterr().err


def test_auto_offline_with_empty_cache_falls_back_to_a_pure_wheel(
    backend: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    wheel = build(backend, tmp_path, {"llama-proc.offline": "1"})
    assert_pure(wheel)
    err = capfd.readouterr().err
    assert "no prebuilt llama-server could be fetched" in err
    assert "pure wheel" in err


def test_prebuilt_offline_fails_with_one_line(
    backend: ModuleType, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build(backend, tmp_path, {"llama-proc.source": "prebuilt", "llama-proc.offline": "1"})
    assert exc.value.code == 1
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llama-proc: error:")]
    assert len(errors) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        pytest.param({"llama-proc.source": "bogus"}, "llama-proc.source='bogus'", id="source"),
        pytest.param({"llama-proc.variant": "tpu"}, "llama-proc.variant='tpu'", id="variant"),
        pytest.param({"llama-proc.portable": "maybe"}, "llama-proc.portable", id="portable"),
        pytest.param({"llama-proc.colour": "red"}, "llama-proc.colour", id="unknown-key"),
    ],
)
def test_bad_settings_exit_with_the_key_named(
    backend: ModuleType,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    settings: dict[str, str],
    needle: str,
) -> None:
    with pytest.raises(SystemExit) as exc:
        build(backend, tmp_path, settings)
    assert exc.value.code == 1
    err = capfd.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_config_setting_wins_over_env(backend: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_PROC_SOURCE", "prebuilt")
    monkeypatch.setenv("LLAMA_PROC_PORTABLE", "1")
    request = backend.Request.read({"llama-proc.source": ["build", "none"]})
    assert request.source == "none"
    assert request.portable is True
    request = backend.Request.read({"llama-proc.portable": "off"})
    assert request.source == "prebuilt"
    assert request.portable is False


def test_provisioning_keys_reach_settings(backend: ModuleType, tmp_path: Path) -> None:
    request = backend.Request.read(
        {
            "llama-proc.source": "build",
            "llama-proc.variant": "cuda",
            "llama-proc.cuda-arch": "90",
            "llama-proc.mirror": "http://127.0.0.1:9/",
            "llama-proc.cache-dir": str(tmp_path),
            "cmake.define.FOO": "1",
        }
    )
    assert set(request.config) == {
        "llama-proc.variant",
        "llama-proc.cuda-arch",
        "llama-proc.mirror",
        "llama-proc.cache-dir",
    }
    settings = request.settings(env={})
    assert settings.variant == "cuda"
    assert settings.cuda_arch == "90"
    assert settings.mirror == "http://127.0.0.1:9"
    assert settings.cache_dir == tmp_path


def test_llama_proc_keys_do_not_reach_scikit_build_core(
    backend: ModuleType, tmp_path: Path
) -> None:
    # scikit-build-core rejects unknown config settings with SystemExit(7).
    ours = {"llama-proc.source": "none", "llama-proc.variant": "cpu"}
    assert backend.get_requires_for_build_sdist(ours) == []
    assert backend.get_requires_for_build_editable(ours) == []
    meta = tmp_path / "meta"
    meta.mkdir()
    dist_info = backend.prepare_metadata_for_build_wheel(str(meta), ours)
    assert (meta / dist_info / "METADATA").is_file()


def test_build_requires_cmake_and_ninja_only_when_compiling_without_them(
    backend: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no cmake, no ninja
    assert backend.get_requires_for_build_wheel({"llama-proc.source": "none"}) == []
    assert backend.get_requires_for_build_wheel({}) == []
    requires = backend.get_requires_for_build_wheel({"llama-proc.source": "build"})
    assert backend.CMAKE_REQUIREMENT in requires
    assert backend.NINJA_REQUIREMENT in requires


def test_editable_is_pure_and_quick(backend: ModuleType, tmp_path: Path) -> None:
    start = time.monotonic()
    name = backend.build_editable(str(tmp_path), {"llama-proc.source": "prebuilt"})
    elapsed = time.monotonic() - start
    wheel = Wheel(tmp_path / name)
    assert_pure(wheel)
    assert elapsed < 10, f"editable build took {elapsed:.1f}s"


def test_sdist_has_what_a_wheel_build_needs(backend: ModuleType, tmp_path: Path) -> None:
    name = backend.build_sdist(str(tmp_path), {"llama-proc.source": "build"})
    with tarfile.open(tmp_path / name) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in (
        "pyproject.toml",
        "PKG-INFO",
        "build_backend/llama_proc_backend.py",
        "variants.toml",
        "LICENSE",
        "README.md",
        "llama_proc/__init__.py",
        "llama_proc/provision/bundle.py",
        "llama_proc/py.typed",
    ):
        assert needed in names, needed
    assert not [n for n in names if "_bundled" in n or "__pycache__" in n]
