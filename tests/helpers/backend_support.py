"""Helpers for the build-backend tests: open wheels, make throwaway venvs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BACKEND_FILE = REPO / "build_backend" / "llama_proc_backend.py"
VENV_TIMEOUT = 120
CLI_TIMEOUT = 120


def load_backend(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import the in-tree PEP 517 backend the way a frontend does (cwd = the project root)."""
    pytest.importorskip("scikit_build_core")
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("llama_proc_backend", BACKEND_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is created.
    monkeypatch.setitem(sys.modules, "llama_proc_backend", module)
    spec.loader.exec_module(module)
    return module


@dataclass
class Wheel:
    """A built wheel, opened for checks."""

    path: Path

    @property
    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as zf:
            return zf.namelist()

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(name)

    def dist_info(self, name: str) -> str:
        [member] = [n for n in self.names if n.endswith(f".dist-info/{name}")]
        return self.read(member).decode()

    @property
    def tag(self) -> str:
        return "-".join(self.path.stem.split("-")[2:])

    def mode(self, name: str) -> int:
        with zipfile.ZipFile(self.path) as zf:
            return zf.getinfo(name).external_attr >> 16


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test environment without PYTHONPATH (it would shadow the installed package)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update(extra or {})
    return env


@dataclass
class Venv:
    """A fresh virtual environment with one wheel installed (offline, no dependencies).

    The dependencies come from the running interpreter's site-packages through a ``.pth`` line
    appended after the venv's own site-packages, so the installed wheel shadows any llama_proc
    there and nothing is downloaded.
    """

    path: Path

    @property
    def bin(self) -> Path:
        return self.path / ("Scripts" if sys.platform == "win32" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if sys.platform == "win32" else "python")

    def site_packages(self) -> Path:
        out = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=CLI_TIMEOUT,
        )
        return Path(out.stdout.strip())

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env=clean_env(env),
            cwd=cwd or self.path,
            timeout=CLI_TIMEOUT,
        )


def make_venv(path: Path, wheel: Path) -> Venv:
    """Create a venv at ``path`` and install ``wheel`` into it with this interpreter's pip."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)],
        check=True,
        timeout=VENV_TIMEOUT,
    )
    venv = Venv(path)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(venv.python), "install",
            "--no-deps", "--no-index", "--disable-pip-version-check", "-q", str(wheel),
        ],
        check=True,
        env=clean_env(),
        timeout=VENV_TIMEOUT,
    )  # fmt: skip
    deps = sysconfig.get_paths()["purelib"]
    (venv.site_packages() / "zz_llama_proc_test_deps.pth").write_text(deps + "\n")
    return venv
