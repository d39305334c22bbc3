"""ServerArgs -> argv (table-driven, gated on --help) and the untrusted-flag allowlist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llama_proc.errors import InvalidArgumentError
from llama_proc.runtime.args import ServerArgs
from llama_proc.runtime.extra_args import OWNED_FLAGS, allowed_untrusted_flags, validate_extra_args
from llama_proc.runtime.flags import BinaryFlags, clear_flags_cache, parse_help, probe_flags

# Excerpts of real --help output: b11434 (this project's pin) and an older 2025 build whose
# flash attention was a bare switch and whose web UI flag was --no-webui.
NEW_HELP = """\
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
                                        (env: LLAMA_ARG_FLASH_ATTN)
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact number,
--ui,  --webui, --no-ui, --no-webui     whether to enable the Web UI (default: enabled)
--jinja, --no-jinja                     whether to use jinja template engine for chat (default: enabled)
-kvo,  --kv-offload, -nkvo, --no-kv-offload
                                        whether to enable KV cache offloading (default: enabled)
--host HOST                             IP addresses to listen on
--port PORT                             port to listen (default: 8080)
-m,    --model FNAME                    model path to load
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
--slots, --no-slots                     expose slots monitoring endpoint (default: enabled)
--rpc SERVERS                           comma-separated list of RPC servers (host:port)
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type

----- sampling params -----

--api-key KEY                           API key to use for authentication
                                        (env: LLAMA_API_KEY)
"""
OLD_HELP = """\
-c,    --ctx-size N                     size of the prompt context (default: 4096)
-fa,   --flash-attn                     enable Flash Attention (default: disabled)
-ngl,  --gpu-layers, --n-gpu-layers N   number of layers to store in VRAM
--no-webui                              Disable the Web UI (default: enabled)
--jinja                                 use jinja template for chat (default: disabled)
--host HOST                             ip address to listen (default: 127.0.0.1)
--port PORT                             port to listen (default: 8080)
-m,    --model FNAME                    model path (default: `models/$filename`)
"""


def test_parse_help_reads_flags_hints_and_env() -> None:
    flags = parse_help(NEW_HELP, "new")
    assert flags.hints["-c"] == "N"
    assert flags.hints["--ctx-size"] == "N"
    assert flags.hints["--flash-attn"] == "[on|off|auto]"
    assert flags.hints["-ot"] == "<tensor name pattern>=<buffer type>,..."
    assert flags.hints["--no-kv-offload"] == ""
    assert flags.envs["--ctx-size"] == "LLAMA_ARG_CTX_SIZE"
    assert flags.envs["--api-key"] == "LLAMA_API_KEY"
    assert "--no-ui" in flags
    assert "--api_key" in flags  # llama.cpp maps _ to - in long flags
    assert "-----" not in flags.hints
    assert flags.takes_value("-fa")
    assert not flags.takes_value("--jinja")


def test_parse_real_help(llama_server_bin: Path) -> None:
    clear_flags_cache()
    flags = probe_flags(llama_server_bin)
    assert flags is not None
    assert flags.source == str(llama_server_bin)
    for flag in ("--ctx-size", "--n-gpu-layers", "--flash-attn", "--metrics", "--api-key-file"):
        assert flag in flags, flag
    assert probe_flags(llama_server_bin) is flags  # cached per path + mtime + size
    # every flag ServerArgs can emit exists in the pinned build under some spelling
    for f in dataclasses.fields(ServerArgs):
        spellings = f.metadata.get("flags", ())
        if spellings:
            assert flags.first_known(spellings), f.name
    # every allowlisted untrusted flag is real (a typo would silently never match)
    unknown = sorted(
        f for f in allowed_untrusted_flags() if f not in flags and f not in ("--mlock", "--no-mmap")
    )
    assert unknown == []


def test_probe_flags_on_a_non_llama_binary_returns_none(tmp_path: Path) -> None:
    script = tmp_path / "not-llama"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    assert probe_flags(script) is None
    assert probe_flags(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({}, ["--host", "127.0.0.1"], id="defaults-only-host"),
        pytest.param(
            {"model": "m.gguf", "port": 8081, "ctx_size": 2048},
            ["--model", "m.gguf", "--host", "127.0.0.1", "--port", "8081", "--ctx-size", "2048"],
            id="model-port-ctx",
        ),
        pytest.param({"flash_attn": True}, ["--host", "127.0.0.1", "--flash-attn", "on"], id="fa-bool"),
        pytest.param({"flash_attn": "AUTO"}, ["--host", "127.0.0.1", "--flash-attn", "auto"], id="fa-str"),
        pytest.param({"jinja": False}, ["--host", "127.0.0.1", "--no-jinja"], id="bool-neg"),
        pytest.param({"jinja": True}, ["--host", "127.0.0.1", "--jinja"], id="bool-pos"),
        pytest.param({"metrics": False}, ["--host", "127.0.0.1"], id="switch-false-omitted"),
        pytest.param({"metrics": True, "embeddings": True},
                     ["--host", "127.0.0.1", "--embeddings", "--metrics"], id="switches"),
        pytest.param({"n_gpu_layers": "all"}, ["--host", "127.0.0.1", "--n-gpu-layers", "all"], id="ngl-all"),
        pytest.param({"n_gpu_layers": "99"}, ["--host", "127.0.0.1", "--n-gpu-layers", "99"], id="ngl-str-int"),
        pytest.param({"rpc": ["10.0.0.2:50052", "10.0.0.3:50052"]},
                     ["--host", "127.0.0.1", "--rpc", "10.0.0.2:50052,10.0.0.3:50052"], id="rpc-list"),
        pytest.param({"tensor_split": (3, 1)}, ["--host", "127.0.0.1", "--tensor-split", "3,1"], id="ts"),
        pytest.param({"webui": False}, ["--host", "127.0.0.1", "--no-webui"], id="webui-off"),
        pytest.param({"extra_args": ["--top-k", "5"]}, ["--host", "127.0.0.1", "--top-k", "5"], id="extra"),
    ],
)  # fmt: skip
def test_to_argv_without_gating(options: dict[str, object], expected: list[str]) -> None:
    assert ServerArgs(**options).to_argv() == expected  # type: ignore[arg-type]


def test_to_argv_uses_the_spelling_the_binary_knows() -> None:
    args = ServerArgs(ctx_size=512, flash_attn="on", webui=False, jinja=True, port=1)
    new = args.to_argv(parse_help(NEW_HELP))
    old = args.to_argv(parse_help(OLD_HELP))
    assert new == ["--host", "127.0.0.1", "--port", "1", "--ctx-size", "512",
                   "--flash-attn", "on", "--jinja", "--no-webui"]  # fmt: skip
    # old build: -fa is a bare switch
    assert old == ["--host", "127.0.0.1", "--port", "1", "--ctx-size", "512",
                   "--flash-attn", "--jinja", "--no-webui"]  # fmt: skip
    assert "--flash-attn" not in ServerArgs(flash_attn="auto").to_argv(parse_help(OLD_HELP))


def test_to_argv_refuses_an_option_the_binary_lacks() -> None:
    with pytest.raises(InvalidArgumentError, match=r"--no-jinja.*renamed or removed"):
        ServerArgs(jinja=False).to_argv(parse_help(OLD_HELP, "old-build"))
    with pytest.raises(InvalidArgumentError, match="--metrics"):
        ServerArgs(metrics=True).to_argv(parse_help(OLD_HELP))


def test_api_key_never_reaches_argv() -> None:
    args = ServerArgs(api_key="s3cret-key", model="m.gguf")
    assert "s3cret-key" not in " ".join(args.to_argv())
    assert "s3cret-key" not in repr(args)
    assert args.to_env() == {"LLAMA_API_KEY": "s3cret-key"}
    assert ServerArgs().to_env() == {}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"port": 70000}, "between 0 and 65535", id="port-range"),
        pytest.param({"port": True}, "integer", id="port-bool"),
        pytest.param({"ctx_size": -1}, "at least 0", id="ctx-negative"),
        pytest.param({"parallel": 0}, "positive", id="parallel-zero"),
        pytest.param({"flash_attn": "maybe"}, "'on', 'off', 'auto'", id="fa-value"),
        pytest.param({"n_gpu_layers": "lots"}, "integer", id="ngl-word"),
        pytest.param({"host": "127.0.0.1,0.0.0.0"}, "one TCP address", id="two-hosts"),
        pytest.param({"host": "/tmp/x.sock"}, "UNIX sockets", id="unix-socket"),
        pytest.param({"alias": "a\nb"}, "control characters", id="alias-newline"),
        pytest.param({"api_key": "k\x00"}, "control characters", id="key-nul"),
        pytest.param({"api_key": "half,other"}, "commas", id="key-comma-splits"),
        pytest.param({"api_key": ' k"'}, "commas", id="key-quote-space"),
        pytest.param({"rpc": "10.0.0.1:1"}, "list of strings", id="rpc-str"),
        pytest.param({"rpc": ["nohost"]}, "host:port", id="rpc-no-port"),
        pytest.param({"metrics": "yes"}, "True, False or None", id="bool-str"),
        pytest.param(
            {"extra_args": ["--port", "9"]}, "overrides what the runtime owns", id="own-port"
        ),
        pytest.param({"extra_args": ["--api_key", "x"]}, "overrides", id="own-key-underscore"),
        pytest.param({"extra_args": ["-m", "x.gguf"]}, "overrides", id="own-model"),
        pytest.param({"extra_args": ["--top-k", "5\n"]}, "control character", id="extra-newline"),
        pytest.param({"extra_args": [""]}, "empty", id="extra-empty"),
    ],
)
def test_invalid_options_are_refused(options: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        ServerArgs(**options)  # type: ignore[arg-type]


def test_from_options_and_replace() -> None:
    with pytest.raises(InvalidArgumentError, match=r"unknown llama-server option.*ctx"):
        ServerArgs.from_options(ctx=4)
    args = ServerArgs.from_options(ctx_size=4, model="~/m.gguf")
    assert isinstance(args.model, Path)
    assert not str(args.model).startswith("~")
    changed = args.replace(port=5, extra_args=["--top-k", "1"])
    assert (changed.port, changed.ctx_size, changed.extra_args) == (5, 4, ("--top-k", "1"))
    assert args.port is None
    multiline = ServerArgs(chat_template="{% for m in messages %}\n{{ m.content }}{% endfor %}")
    assert multiline.chat_template is not None


# -- untrusted flags --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param(["-c", "4096"], id="ctx"),
        pytest.param(["--ctx_size", "4096"], id="underscore-spelling"),
        pytest.param(["-ngl", "99", "-fa", "on", "-np", "2"], id="gpu-fa-parallel"),
        pytest.param(["-ngl", "auto", "--n-gpu-layers", "all"], id="ngl-words"),
        pytest.param(["-ctk", "q8_0", "-ctv", "q4_0"], id="cache-types"),
        pytest.param(["--temp", "0.7", "--seed", "-1", "--top-p", "1e-1"], id="sampling"),
        pytest.param(["--jinja", "--metrics", "--no-cont-batching"], id="switches"),
        pytest.param(["--chat-template", "chatml"], id="template-name"),
        pytest.param(["-ts", "3,1", "-dev", "CUDA0,CUDA1"], id="split"),
        pytest.param([], id="nothing"),
    ],
)
def test_untrusted_flags_allowed(tokens: list[str]) -> None:
    assert validate_extra_args(tokens) == tuple(tokens)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        pytest.param(["--host", "0.0.0.0"], "not allowed", id="host"),
        pytest.param(["--port", "80"], "not allowed", id="port"),
        pytest.param(["--reuse-port"], "not allowed", id="reuse-port"),
        pytest.param(["-m", "/etc/passwd"], "not allowed", id="model-path"),
        pytest.param(["--model", "x.gguf"], "not allowed", id="model-long"),
        pytest.param(["--lora", "a.gguf"], "not allowed", id="lora-file"),
        pytest.param(["--mmproj", "p.gguf"], "not allowed", id="mmproj-file"),
        pytest.param(["--log-file", "/tmp/x"], "not allowed", id="log-file"),
        pytest.param(["--slot-save-path", "/tmp"], "not allowed", id="slot-save"),
        pytest.param(["--chat-template-file", "/etc/shadow"], "not allowed", id="template-file"),
        pytest.param(["--grammar-file", "g"], "not allowed", id="grammar-file"),
        pytest.param(["-hf", "user/model"], "not allowed", id="hf-download"),
        pytest.param(["--hf-repo", "user/model"], "not allowed", id="hf-repo"),
        pytest.param(["-mu", "http://x/m.gguf"], "not allowed", id="model-url"),
        pytest.param(["--gpt-oss-20b-default"], "not allowed", id="preset-download"),
        pytest.param(["--rpc", "1.2.3.4:50052"], "not allowed", id="rpc"),
        pytest.param(["--api-key", "k"], "not allowed", id="api-key"),
        pytest.param(["--api_key_file", "k"], "not allowed", id="api-key-file-underscore"),
        pytest.param(["--path", "/"], "not allowed", id="static-path"),
        pytest.param(["--tools", "all"], "not allowed", id="tools"),
        pytest.param(["--media-path", "/"], "not allowed", id="media-path"),
        pytest.param(["--ctx-size=4096"], "--flag=value", id="equals-trick"),
        pytest.param(["-c=1", "--host"], "--flag=value", id="equals-short"),
        pytest.param(["-c", "4096", "extra"], "positional", id="positional"),
        pytest.param(["4096"], "positional", id="bare-value"),
        pytest.param(["-"], "positional", id="dash"),
        pytest.param(["-c"], "needs a value", id="missing-value"),
        pytest.param(["-c", "--host"], "not valid", id="flag-as-value"),
        pytest.param(["-c", "4k"], "not valid", id="bad-int"),
        pytest.param(["-fa", "yes"], "not valid", id="bad-choice"),
        pytest.param(["--chat-template", "{% evil %}"], "not valid", id="template-string"),
        pytest.param(["-c", "40\n96"], "control character", id="newline-in-value"),
        pytest.param(["--jinja\x00"], "control character", id="nul"),
        pytest.param([""], "empty", id="empty"),
    ],
)
def test_untrusted_flags_refused(tokens: list[str], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        validate_extra_args(tokens)


def test_untrusted_flags_gated_on_the_binary() -> None:
    old = parse_help(OLD_HELP, "old-build")
    assert validate_extra_args(["-c", "8"], supported=old) == ("-c", "8")
    with pytest.raises(InvalidArgumentError, match="not accepted by this llama-server build"):
        validate_extra_args(["--metrics"], supported=old)


def test_allowlist_excludes_every_owned_flag() -> None:
    assert not (allowed_untrusted_flags() & OWNED_FLAGS)


def test_binary_flags_first_known() -> None:
    flags = BinaryFlags({"--no-webui": ""})
    assert flags.first_known(("--no-ui", "--no-webui")) == "--no-webui"
    assert flags.first_known(("--x",)) is None
