"""The official installer's one ``llama`` binary as the server binary: ``llama serve <flags>``.

The stand-in is a shell script named ``llama`` in front of the real llama-server: ``serve`` is
dropped and the rest passed on, ``--version`` goes straight through, anything else fails (as a
``llama`` without a subcommand would not start a server). Every call is logged, so the test sees
which argv each probe and the start used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from llama_proc.config import Settings
from llama_proc.provision.cache.verify import smoke_check
from llama_proc.provision.resolve import resolve_server
from llama_proc.runtime.flags import server_command
from llama_proc.server import LlamaServer

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell stand-in"),
]

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def _fake_llama(folder: Path, real: Path) -> tuple[Path, Path]:
    """A ``llama`` that runs ``real`` for ``llama serve ...``; returns (it, its call log)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls.log"
    script = folder / "llama"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'if [ "$1" = "serve" ]; then shift; exec "' + str(real) + '" "$@"; fi\n'
        'if [ "$1" = "--version" ]; then exec "' + str(real) + '" --version; fi\n'
        'echo "llama: no such command: $1 (try: llama serve)" >&2\n'
        "exit 2\n"
    )
    script.chmod(0o755)
    return script, log


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("llama", ["serve"]),
        ("llama.exe", ["serve"]),
        ("llama-server", []),
        ("llama-server.exe", []),
        ("llamafile", []),
    ],
)
def test_server_command_adds_serve_for_the_unified_binary(
    tmp_path: Path, name: str, prefix: list[str]
) -> None:
    binary = tmp_path / "bin" / name
    assert server_command(binary) == [str(binary), *prefix]


def test_explicit_llama_binary_answers_a_real_chat(
    tmp_path: Path,
    llama_server_bin: Path,
    smol_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, log = _fake_llama(tmp_path / "installer", llama_server_bin)
    monkeypatch.setenv("LLAMA_PROC_SERVER_BIN", str(fake))
    settings = Settings.from_env()
    install = resolve_server(settings)
    assert install.server_binary == fake
    # --version is `llama --version` (the unified binary answers it itself).
    assert "version:" in smoke_check(fake)
    srv = LlamaServer(smol_model, settings=settings, ctx_size=512, start_timeout=120)
    with srv:
        reply = srv.chat(CAPITAL, temperature=0, max_tokens=24)
        flags = srv.flags
    assert "Paris" in reply["choices"][0]["message"]["content"]
    # The options were read from `llama serve --help`: llama-server's own list.
    assert flags is not None
    assert "--port" in flags
    calls = log.read_text().splitlines()
    assert "serve --help" in calls
    assert "--version" in calls
    starts = [c for c in calls if c.startswith("serve ") and "--port" in c]
    assert starts, calls
    assert not [c for c in calls if not c.startswith(("serve", "--version"))], calls
