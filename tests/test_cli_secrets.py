"""Keys and tokens never show: not on argv, not in an error, a log line or a repr.

A recognizable key is planted in each way one enters the program (a key file, the
environment, a library argument) and every output is searched for it, failure paths included.
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
from typing import TYPE_CHECKING

import pytest

from llama_proc import cli
from llama_proc._cli.common import SECRET_FLAGS
from llama_proc.config import Settings
from llama_proc.errors import LlamaProcError
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.servers import LlamaServerFactory
from llama_proc.runtime import LlamaClient, ServerArgs
from llama_proc.server import LlamaServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

KEY = "sk-planted-7f3a9c1e5b"
TOKEN = "ghp_planted5d2b8e4a91"


@pytest.fixture
def output(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Iterator[list[str]]:
    """Everything printed or logged during the test, for the final leak check."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    yield seen
    out, err = capsys.readouterr()
    text = "\n".join([*seen, out, err, caplog.text])
    assert KEY not in text
    assert TOKEN not in text


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stdout + stderr) with usage exits caught."""
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


# ----------------------------------------------------------------------------- argv
COMMANDS = [
    pytest.param([], id="top-level"),
    pytest.param(["serve", "--config", "models.toml"], id="serve"),
    pytest.param(["fetch"], id="fetch"),
    pytest.param(["build"], id="build"),
    pytest.param(["rpc-worker"], id="rpc-worker"),
    pytest.param(["cache", "prune"], id="cache-prune"),
]


@pytest.mark.parametrize("flag", sorted(SECRET_FLAGS))
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("joined", [False, True], ids=["separate", "equals"])
def test_secret_flags_are_refused_without_echo(
    capsys: pytest.CaptureFixture[str], flag: str, command: list[str], *, joined: bool
) -> None:
    words = [f"{flag}={KEY}"] if joined else [flag, KEY]
    argv = [*words, *command] if not command else [*command, *words]
    code, text = _main(capsys, *argv)
    assert code == 2
    assert KEY not in text
    [line] = text.strip().splitlines()
    assert line.startswith("llama-proc")
    assert f"{flag} is refused" in line
    assert "(ps)" in line
    assert "LLAMA_PROC_" in line or "HF_TOKEN" in line


def test_the_issue_example_names_the_key_file_not_the_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, text = _main(capsys, "serve", "--config", "models.toml", "--api-key", KEY)
    assert code == 2
    assert KEY not in text
    assert "--api-key-file" in text
    assert "cannot read" not in text


@pytest.mark.parametrize(
    "words",
    [
        pytest.param(["--apikey", KEY], id="misspelled"),
        pytest.param([f"--api-keys={KEY}"], id="misspelled-equals"),
        pytest.param(["--github_token", KEY, "--offline"], id="underscore"),
    ],
)
def test_unknown_flags_never_echo_what_follows(
    capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    code, text = _main(capsys, "serve", "--config", "models.toml", *words)
    assert code == 2
    assert KEY not in text
    assert "unrecognized option" in text


# ----------------------------------------------------------------------------- abbreviations
def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict(action.choices).values():
                yield from _parsers(sub)


def test_no_parser_accepts_abbreviations() -> None:
    parsers = list(_parsers(cli.build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        assert parser.allow_abbrev is False, parser.prog


@pytest.mark.parametrize(
    ("argv", "real"),
    [
        pytest.param(["serve", "--api-key-f", "keys.txt"], "--api-key-file", id="serve"),
        pytest.param(["fetch", "--cache", "/tmp/c"], "--cache-dir", id="fetch"),
        pytest.param(["cache", "prune", "--dry"], "--dry-run", id="cache-prune"),
    ],
)
def test_a_shortened_flag_is_an_error_naming_the_real_one(
    capsys: pytest.CaptureFixture[str], argv: list[str], real: str
) -> None:
    code, text = _main(capsys, *argv)
    assert code == 2
    assert f"did you mean {real}?" in text


# ----------------------------------------------------------------------------- key file
def _serve_without_models(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    # No models: serve fails after reading the keys, before anything starts.
    return _main(capsys, "--log-level", "DEBUG", "serve", *argv)


def test_keys_from_a_file_stay_hidden(
    output: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# proxy keys\n{KEY}\n")
    code, text = _serve_without_models(capsys, "--api-key-file", str(keys))
    output.append(text)
    assert code == 1
    assert "--models-dir" in text


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_a_bad_key_file_is_one_line_without_its_content(
    output: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "keys"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(KEY.encode() + b"\n\xff\xfe" + KEY.encode() + b"\n")
    code, text = _serve_without_models(capsys, "--api-key-file", str(path))
    output.append(text)
    assert code == 1
    [line] = text.strip().splitlines()
    assert line.startswith("llama-proc: error: ")
    assert str(path) in line


# ----------------------------------------------------------------------------- environment
def test_keys_and_tokens_from_the_environment_stay_hidden(
    output: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_PROC_PROXY_API_KEYS", f"{KEY},other-key")
    monkeypatch.setenv("LLAMA_PROC_GITHUB_TOKEN", TOKEN)
    code, text = _serve_without_models(capsys)
    output.append(text)
    assert code == 1
    for argv in (["doctor"], ["fetch", "--offline"], ["which", "-v"], ["cache", "ls"]):
        code, text = _main(capsys, "--log-level", "DEBUG", *argv)
        output.append(text)
        assert code in (0, 1), argv


# ----------------------------------------------------------------------------- library
def test_reprs_hide_keys(output: list[str], tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, github_token=TOKEN)
    objects: list[object] = [
        settings,
        settings.replace(jobs=2),
        Settings.from_env({"LLAMA_PROC_GITHUB_TOKEN": TOKEN}, cache_dir=tmp_path),
        ServerArgs(model=tmp_path / "m.gguf", api_key=KEY),
        LlamaServer(tmp_path / "m.gguf", api_key=KEY),
        LlamaClient("http://127.0.0.1:1", api_key=KEY),
        ProxyOptions(api_keys=(KEY, "other")),
        LlamaServerFactory(api_key=KEY),
    ]
    output.extend(repr(o) for o in objects)
    output.extend(str(o) for o in objects)


@pytest.mark.parametrize(
    "bad",
    [KEY + "\x07", " " + KEY, KEY + ",second", KEY + '"'],
    ids=["control", "space", "comma", "quote"],
)
def test_a_refused_key_is_not_quoted(output: list[str], tmp_path: Path, bad: str) -> None:
    with pytest.raises(LlamaProcError) as info:
        LlamaServer(tmp_path / "m.gguf", api_key=bad)
    output.append(str(info.value))
    output.append(repr(info.value.args))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shim")
def test_a_server_failing_to_start_does_not_show_its_key(output: list[str], tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    binary = tmp_path / "llama-server"
    binary.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--help" ]; then printf -- "--host HOST\\n--port PORT\\n-m FNAME\\n"; exit 0; fi\n'
        'echo "0.00.001.000 E main: failed to load model" >&2\n'
        "exit 1\n"
    )
    binary.chmod(0o755)
    server = LlamaServer(model, binary=binary, api_key=KEY, start_timeout=30)
    with pytest.raises(LlamaProcError) as info:
        server.start()
    output.append(str(info.value))
    output.append(repr(info.value.args))
    output.extend(server.logs())
    output.append(repr(server))
