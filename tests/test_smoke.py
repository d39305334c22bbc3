"""``llama-proc doctor --smoke``: the project's main job, end to end with a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.config import Settings


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_proc", "doctor", "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_smoke_serves_the_model_and_reports_the_answer(
    llama_server_bin: Path, smol_model: Path, real_settings: Settings
) -> None:
    env = {
        **os.environ,
        "LLAMA_PROC_SERVER_BIN": str(llama_server_bin),
        # The model was fetched into the persistent cache by the fixture: a cache hit here.
        "LLAMA_PROC_CACHE_DIR": str(real_settings.cache_dir),
    }
    out = _run(env)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert re.search(r"generation: \d+\.\d tokens/s", out.stdout)
    assert re.search(rf"^model: .*{re.escape(smol_model.name)} ", out.stdout, re.MULTILINE)


def test_smoke_offline_without_cache_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMA_PROC_OFFLINE": "1", "LLAMA_PROC_CACHE_DIR": str(tmp_path / "c")}
    out = _run(env)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("llama-proc: error:")]
    assert len(errors) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.compute_check
def test_smoke_says_what_the_compute_check_found(
    llama_server_bin: Path, smol_model: Path, real_settings: Settings
) -> None:
    from llama_proc.errors import ProvisionError
    from llama_proc.provision.cache.record import Install

    try:
        Install.from_dir(llama_server_bin.parent)
    except ProvisionError:
        pytest.skip(f"{llama_server_bin} is an explicit binary, which is never checked")
    env = {
        **os.environ,
        "LLAMA_PROC_CACHE_DIR": str(real_settings.cache_dir),
        "LLAMA_PROC_VARIANT": "cpu",
    }
    out = _run(env)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^compute check: ok: 4 tokens twice alike", out.stdout, re.MULTILINE)
    assert "Paris" in out.stdout
