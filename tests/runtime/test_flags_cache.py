"""The binary's --help is remembered on disk, keyed by the binary's identity."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from llama_proc.config import Settings
from llama_proc.runtime.flags import clear_flags_cache, probe_flags
from llama_proc.vocab import FLAGS_CACHE_FOLDER

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.skipif(os.name != "posix", reason="shell-script stand-in")

HELP = """----- common params -----
-h,    --help, --usage                  print usage and exit
-c,    --ctx-size N                     size of the prompt context (env: LLAMA_ARG_CTX_SIZE)
--host HOST                             ip address to listen (env: LLAMA_ARG_HOST)
--port PORT                             port to listen (env: LLAMA_ARG_PORT)
"""


def _binary(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    """A stand-in llama-server whose --help prints HELP and counts its runs."""
    counter = tmp_path / "help-runs"
    (tmp_path / "help.txt").write_text(HELP + extra)
    script = tmp_path / "llama-server"
    script.write_text(f'#!/bin/sh\necho run >> "{counter}"\ncat "{tmp_path / "help.txt"}"\n')
    script.chmod(0o755)
    return script, counter


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(env={}, cache_dir=tmp_path / "cache")


def test_a_new_process_reuses_the_remembered_help(tmp_path: Path, settings: Settings) -> None:
    binary, counter = _binary(tmp_path)
    clear_flags_cache()
    first = probe_flags(binary, settings=settings)
    assert first is not None
    assert _runs(counter) == 1
    assert list((settings.cache_dir / FLAGS_CACHE_FOLDER).glob("*.json"))
    clear_flags_cache()  # what a new process starts with
    second = probe_flags(binary, settings=settings)
    assert _runs(counter) == 1, "the remembered --help was not used"
    assert second is not None
    assert dict(second.hints) == dict(first.hints)
    assert dict(second.envs) == dict(first.envs)
    assert second.source == str(binary)
    assert second.takes_value("-c")


def test_a_replaced_binary_is_probed_again(tmp_path: Path, settings: Settings) -> None:
    binary, counter = _binary(tmp_path)
    clear_flags_cache()
    probe_flags(binary, settings=settings)
    # Replace the binary in place (new inode, size and mtime), as an upgrade would.
    replacement = tmp_path / "new"
    replacement.write_text(binary.read_text() + "# v2\n")
    replacement.chmod(0o755)
    replacement.replace(binary)
    clear_flags_cache()
    flags = probe_flags(binary, settings=settings)
    assert _runs(counter) == 2
    assert flags is not None


def test_a_failed_probe_is_not_remembered(tmp_path: Path, settings: Settings) -> None:
    script = tmp_path / "not-llama"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    clear_flags_cache()
    assert probe_flags(script, settings=settings) is None
    assert not (settings.cache_dir / FLAGS_CACHE_FOLDER).exists()


def test_an_unusable_cache_only_costs_the_probe(tmp_path: Path) -> None:
    binary, counter = _binary(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    settings = Settings.from_env(env={}, cache_dir=blocker)
    clear_flags_cache()
    assert probe_flags(binary, settings=settings) is not None
    clear_flags_cache()
    assert probe_flags(binary, settings=settings) is not None
    assert _runs(counter) == 2


def test_a_corrupt_record_is_ignored(tmp_path: Path, settings: Settings) -> None:
    binary, counter = _binary(tmp_path)
    clear_flags_cache()
    probe_flags(binary, settings=settings)
    for record in (settings.cache_dir / FLAGS_CACHE_FOLDER).glob("*.json"):
        record.write_text("{not json")
    clear_flags_cache()
    assert probe_flags(binary, settings=settings) is not None
    assert _runs(counter) == 2


def test_settings_default_to_the_environment(tmp_path: Path) -> None:
    # The autouse fixture points LLAMA_PROC_CACHE_DIR at a temporary folder.
    binary, _counter = _binary(tmp_path)
    clear_flags_cache()
    probe_flags(binary)
    cache = Settings.from_env().cache_dir
    assert list((cache / FLAGS_CACHE_FOLDER).glob("*.json"))


def test_a_binary_that_cannot_load_is_not_probed_into_a_warning(
    tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # As a CUDA build on a host without the driver: the loader fails before main().
    script = tmp_path / "llama-server"
    script.write_text(
        "#!/bin/sh\necho 'llama-server: error while loading shared libraries: libcuda.so.1: "
        "cannot open shared object file' >&2\nexit 127\n"
    )
    script.chmod(0o755)
    clear_flags_cache()
    with caplog.at_level("DEBUG", logger="llama_proc"):
        assert probe_flags(script, settings=settings) is None
    # Starting it reports the real cause; the probe adds no misleading warning of its own.
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "exited with 127" in caplog.text
    assert not list((settings.cache_dir / FLAGS_CACHE_FOLDER).glob("*.json"))
