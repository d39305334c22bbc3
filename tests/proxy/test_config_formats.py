"""``serve --config`` beyond its TOML: llama.cpp presets, models folders, llama-swap YAML.

Each format must load the same models as the equivalent TOML, fail on a bad file with one line
naming the file, line and key, keep the server-wide caps, and hold against hostile files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llama_proc._cli import serve
from llama_proc.errors import ConfigError
from llama_proc.proxy.configs import (
    config_format,
    load_config,
    load_llama_swap,
    load_models,
    load_preset_ini,
    scan_models_dir,
)
from llama_proc.proxy.configs.text import MAX_CONFIG_BYTES
from llama_proc.proxy.flag_caps import FlagCaps
from llama_proc.proxy.models_config import load_models_config

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llama_proc.proxy.model_spec import ModelsConfig, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
QWEN = "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def specs(config: ModelsConfig) -> list[ModelSpec]:
    """The records, without where each came from (which names the file and differs)."""
    return sorted((dataclasses.replace(s, source="") for s in config), key=lambda s: s.id)


def one_line_error(load: Any, path: Path, line: int, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: "), text
    assert key in text, text
    return text


# -- llama.cpp presets -------------------------------------------------------------------------


TOML_EQUIVALENT = f"""
[defaults]
ctx_size = 4096
jinja = true

[models.smol]
path = "smol.gguf"
ctx_size = 2048
n_gpu_layers = 0
flash_attn = "off"
extra_args = ["--temp", "0.7", "--no-mmap"]

[models."{QWEN}"]
model = "{QWEN}"
parallel = 2
"""


def test_preset_ini_loads_what_the_equivalent_toml_does(tmp_path: Path) -> None:
    toml = write(tmp_path / "models.toml", TOML_EQUIVALENT)
    ini = write(
        tmp_path / "models.ini",
        f"""
; what llama-server --models-preset reads
[*]
LLAMA_ARG_CTX_SIZE = 4096
jinja = true
parallel = 1

[smol]
model = smol.gguf
c = 2048
ngl = 0
--flash-attn = off
temp = 0.7
no-mmap = true

[{QWEN}]
LLAMA_ARG_N_PARALLEL = 2
""",
    )
    expected = load_models_config(toml)
    got = load_preset_ini(ini)
    # parallel = 1 from [*] is the one key the TOML lacks: the model section's 2 wins for qwen.
    # A section named like a Hugging Face model (as the router's cache models are) is that model.
    smol = got.resolve("smol")
    assert smol is not None
    assert smol.options["parallel"] == 1
    assert specs(got)[0] == specs(expected)[0]  # qwen
    assert dataclasses.replace(
        specs(got)[1], options={k: v for k, v in smol.options.items() if k != "parallel"}
    ) == dataclasses.replace(specs(expected)[1], options=dict(specs(expected)[1].options))
    assert config_format(ini) == "ini"
    assert specs(load_config(ini)) == specs(got)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        pytest.param("c = 2048\n[m]\nmodel = a.gguf\n", 1, "'c = 2048'", id="key-before-section"),
        pytest.param("[m]\nmodel = a.gguf\nc = 1\nc = 2\n", 4, "c: given twice", id="duplicate"),
        pytest.param("[m]\nmodel = a.gguf\n\nc = abc\n", 4, "c: -c 'abc': not a whole number", id="not-a-number"),
        pytest.param("[m]\nmodel = a.gguf\njinja = maybe\n", 3, "jinja: --jinja is a switch",
                     id="switch-value"),
        pytest.param("[m]\nmodel = a.gguf\nLLAMA_ARG_NOPE = 1\n", 3, "LLAMA_ARG_NOPE",
                     id="unknown-env-name"),
        pytest.param("[m]\nmodel = a.gguf\nc&d = 1\n", 3, "c&d: not a llama-server flag",
                     id="bad-key"),
        pytest.param("[m]\nmodel = a.gguf\n[m]\nc = 1\n", 3, "[m]: a second section",
                     id="duplicate-section"),
        pytest.param("[m]\nmodel = a.gguf\ngarbage line\n", 3, "'garbage line'",
                     id="not-key-value"),
        pytest.param("[*]\nc = 1\n\n[m]\nc = 2\n", 4, "[m]: no model", id="no-model"),
        pytest.param("[m]\nmodel = a.gguf\nmodel = b.gguf\n", 3, "model: given twice",
                     id="model-twice"),
    ],
)  # fmt: skip
def test_bad_preset_fails_with_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    ini = write(tmp_path / "bad.ini", text)
    one_line_error(load_preset_ini, ini, line, key)


def test_preset_only_keys_and_pool_owned_flags_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ini = write(
        tmp_path / "p.ini",
        "[*]\nload-on-startup = true\n[m]\nmodel = a.gguf\nport = 9000\nstop-timeout = 5\n",
    )
    with caplog.at_level(logging.WARNING, logger="llama_proc"):
        config = load_preset_ini(ini)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for key in ("[m] stop-timeout", "[m] --port"):
        assert key in warnings[0]
    assert "load-on-startup" not in warnings[0]  # it has an equivalent: preload
    spec = config.resolve("m")
    assert spec is not None
    assert "port" not in spec.options
    assert spec.preload  # from [*]


def test_preset_load_on_startup_is_preload_and_a_section_overrides_it(tmp_path: Path) -> None:
    ini = write(
        tmp_path / "p.ini",
        "[*]\nload-on-startup = true\n[a]\nmodel = a.gguf\n"
        "[b]\nmodel = b.gguf\nload-on-startup = false\n",
    )
    config = load_preset_ini(ini)
    assert [(s.id, s.preload) for s in config] == [("a", True), ("b", False)]
    bad = write(tmp_path / "bad.ini", "[a]\nmodel = a.gguf\nload-on-startup = soon\n")
    with pytest.raises(ConfigError, match=r"bad\.ini:3: load-on-startup: 'soon' is not true"):
        load_preset_ini(bad)


# -- models folders ----------------------------------------------------------------------------


def test_models_dir_loads_what_the_equivalent_toml_does(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in (
        "Alpha.Q4_K_M.gguf",
        "big/Big-Q4_K_M-00001-of-00002.gguf",
        "big/Big-Q4_K_M-00002-of-00002.gguf",
        "vision/model.gguf",
        "vision/mmproj-model-f16.gguf",
        "many/one.gguf",
        "many/two.gguf",
        ".hidden/x.gguf",
    ):
        write(root / name, "x")
    toml = write(
        tmp_path / "equivalent.toml",
        f"""
[models."Alpha.Q4_K_M"]
path = "{root}/Alpha.Q4_K_M.gguf"
[models.big]
path = "{root}/big/Big-Q4_K_M-00001-of-00002.gguf"
aliases = ["big/Big-Q4_K_M"]
[models.vision]
path = "{root}/vision/model.gguf"
mmproj = "{root}/vision/mmproj-model-f16.gguf"
aliases = ["vision/model"]
[models."many/one"]
path = "{root}/many/one.gguf"
[models."many/two"]
path = "{root}/many/two.gguf"
""",
    )
    assert config_format(root) == "dir"
    assert specs(load_config(root)) == specs(load_models_config(toml))


def test_models_dir_refuses_links_out_and_survives_loops(tmp_path: Path) -> None:
    outside = write(tmp_path / "secret" / "other.gguf", "x")
    root = tmp_path / "models"
    write(root / "a.gguf", "x")
    (root / "loop").symlink_to(root)  # a folder linking back up must not recurse forever
    (root / "inside.gguf").symlink_to(root / "a.gguf")
    config = scan_models_dir(root)
    assert sorted(config.models) == ["a", "inside"]
    (root / "out.gguf").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"out\.gguf is a link to .*outside the folder"):
        scan_models_dir(root)
    (root / "out.gguf").unlink()
    (root / "away").symlink_to(outside.parent)
    with pytest.raises(ConfigError, match="away is a link"):
        scan_models_dir(root)


# -- llama-swap --------------------------------------------------------------------------------


SWAP = f"""
macros:
  server: llama-server --port ${{PORT}} --host 127.0.0.1
  ctx: 2048
models:
  smol:
    cmd: |
      ${{server}}
      # the model and its context
      -m smol.gguf \\
      -c ${{ctx}} -ngl 0 --flash-attn off --temp 0.7 --no-mmap
    aliases: [smollm]
    ttl: 300
    proxy: http://127.0.0.1:${{PORT}}
    checkEndpoint: /health
  qwen:
    cmd: /opt/llama/llama-server --port ${{PORT}} -hf {QWEN} -np 2 -c 4096 --jinja
groups:
  keep:
    members: [qwen]
    persistent: true
"""


def test_llama_swap_loads_what_the_equivalent_toml_does(tmp_path: Path) -> None:
    swap = write(tmp_path / "config.yaml", SWAP)
    toml = write(
        tmp_path / "models.toml",
        f"""
[models.smol]
path = "smol.gguf"
ctx_size = 2048
n_gpu_layers = 0
flash_attn = "off"
extra_args = ["--temp", "0.7", "--no-mmap"]
aliases = ["smollm"]
idle_ttl = 300

[models.qwen]
model = "{QWEN}"
parallel = 2
ctx_size = 4096
jinja = true
idle_ttl = 0   # persistent group
""",
    )
    assert specs(load_llama_swap(swap)) == specs(load_models_config(toml))
    assert config_format(swap) == "llama-swap"
    assert specs(load_models(swap, env={})) == specs(load_models_config(toml))


def test_llama_swap_unsupported_keys_are_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    swap = write(
        tmp_path / "c.yml",
        """
healthCheckTimeout: 60
peers: {other: {proxy: "http://10.0.0.2:8080"}}
models:
  m:
    cmd: llama-server --port ${PORT} -m a.gguf
    unlisted: true
    concurrencyLimit: 4
    filters: {stripParams: "temperature"}
groups:
  g: {members: [m], swap: true, exclusive: true}
""",
    )
    with caplog.at_level(logging.WARNING, logger="llama_proc"):
        load_llama_swap(swap)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for key in (
        "healthCheckTimeout",
        "peers",
        "models.m.unlisted",
        "models.m.concurrencyLimit",
        "models.m.filters",
        "groups.g.swap",
        "groups.g.exclusive",
    ):
        assert key in warnings[0]


def _swap_model(cmd: str, extra: str = "") -> str:
    return f"models:\n  m:\n    cmd: {cmd}\n{extra}"


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        pytest.param("models:\n  m: [oops\n", 3, "not valid YAML", id="syntax"),
        pytest.param(_swap_model("docker run llama --port ${PORT}"), 3, "models.m.cmd: runs 'docker'",
                     id="not-llama-server"),
        pytest.param(_swap_model("llama-server -m ${nope}.gguf"), 3, "${nope} is not a macro",
                     id="unknown-macro"),
        pytest.param(_swap_model("llama-server --port ${PORT} -m a.gguf",
                                 "    proxy: http://10.1.2.3:8080\n"), 4, "models.m.proxy",
                     id="foreign-proxy"),
        pytest.param(_swap_model("llama-server -m a.gguf --alias x${PORT}"), 3, "${PORT} only",
                     id="port-elsewhere"),
        pytest.param(_swap_model("llama-server -m a.gguf", "    ttl: -1\n"), 4, "models.m.ttl",
                     id="negative-ttl"),
        pytest.param(_swap_model("llama-server -m a.gguf") + "groups:\n  g:\n    members: [x]\n",
                     6, "groups.g.members: 'x'", id="unknown-member"),
        pytest.param("models:\n  m:\n    ttl: 5\n", 2, "models.m.cmd: missing", id="no-cmd"),
        pytest.param(_swap_model("llama-server -m a.gguf") + "  m:\n    cmd: llama-server\n", 4,
                     "models.m: given twice (also line 2)", id="duplicate-model"),
        pytest.param(_swap_model("llama-server -m a.gguf -c lots"), 3, "-c 'lots'",
                     id="not-a-number"),
        pytest.param(_swap_model("llama-server --port ${PORT} -c 5"), 3, "names no model",
                     id="no-model"),
        pytest.param(_swap_model("\"llama-server -m 'a.gguf\""), 3, "quoting", id="quotes"),
        pytest.param(_swap_model("llama-server -m a.gguf", "    aliases: a\n"), 4,
                     "models.m.aliases", id="aliases-not-list"),
    ],
)  # fmt: skip
def test_bad_llama_swap_fails_with_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    swap = write(tmp_path / "bad.yaml", text)
    one_line_error(load_llama_swap, swap, line, key)


def test_llama_swap_cmd_never_reaches_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    swap = write(
        tmp_path / "c.yaml",
        _swap_model(f'llama-server --port ${{PORT}} -m a.gguf --alias "$(touch {marker})"'),
    )
    spec = load_llama_swap(swap).resolve("m")
    assert spec is not None
    assert spec.options["alias"] == f"$(touch {marker})"  # one literal word
    assert not marker.exists()
    chained = write(tmp_path / "d.yaml", _swap_model("llama-server -m a.gguf ; rm -rf /"))
    with pytest.raises(ConfigError, match="unexpected word ';'"):
        load_llama_swap(chained)


def test_llama_swap_hostile_files_are_refused(tmp_path: Path) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        bomb.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join([f'*{prev}'] * 10)}]")
    path = write(tmp_path / "bomb.yaml", "\n".join(bomb) + "\nmodels: {}\n")
    with pytest.raises(ConfigError, match="expands to over"):
        load_llama_swap(path)
    big = write(tmp_path / "big.yaml", "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over 1024 KiB"):
        load_llama_swap(big)
    tagged = write(tmp_path / "tag.yaml", "models: !!python/object/apply:os.system [id]\n")
    with pytest.raises(ConfigError, match=r"tag\.yaml:1: not valid YAML"):
        load_llama_swap(tagged)
    deep = write(tmp_path / "deep.yaml", "models: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML \(RecursionError\)"):
        load_llama_swap(deep)
    long_macro = write(
        tmp_path / "macro.yaml",
        "macros:\n  a: " + "x" * 1000 + "\n  b: " + "${a}" * 100 + "\n" + _swap_model("${b}"),
    )
    with pytest.raises(ConfigError, match=r"macros\.b: over 65536 characters"):
        load_llama_swap(long_macro)


# -- caps apply to every format ----------------------------------------------------------------


def test_every_format_keeps_the_server_wide_caps(tmp_path: Path) -> None:
    caps = FlagCaps(max_threads=4, max_context_tokens=8192)
    toml = write(tmp_path / "m.toml", '[models.m]\npath = "a.gguf"\nthreads = 16\n')
    ini = write(tmp_path / "m.ini", "[m]\nmodel = a.gguf\n\nthreads = 16\n")
    swap = write(tmp_path / "m.yaml", _swap_model("llama-server -m a.gguf -t 16"))
    cap_text = r"threads=16 is above the server-wide cap of 4 \(serve --max-threads\)"
    for path, at in ((toml, None), (ini, "4: threads: "), (swap, "3: models.m.cmd: ")):
        with pytest.raises(ConfigError, match=cap_text) as info:
            load_config(path, caps=caps)
        if at is not None:
            assert str(info.value).startswith(f"{path}:{at}"), info.value
    # An unknown flag that is capped only through extra_args counts too (-np with -c).
    swap = write(tmp_path / "n.yaml", _swap_model("llama-server -m a.gguf -c 4096 -np 4"))
    with pytest.raises(ConfigError, match=r"4096 x 4 = 16384 tokens is above"):
        load_config(swap, caps=caps)
    ini = write(tmp_path / "n.ini", "[m]\nmodel = a.gguf\n--ubatch-size = 99999\n")
    with pytest.raises(ConfigError, match=r"ubatch_size=99999 is above"):
        load_config(ini, caps=caps)


# -- the CLI -----------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-proc")
    serve.register(parser.add_subparsers(dest="command"))
    return parser


def run_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(["serve", *argv])
    return int(args.handler(args))


def test_check_config_prints_each_model_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    swap = write(tmp_path / "config.yaml", SWAP)
    assert run_serve(["--check-config", str(swap)]) == 0
    out = capsys.readouterr().out
    assert "smol:\n  aliases: smollm\n" in out
    assert f"  model: -m {tmp_path / 'smol.gguf'}\n" in out
    assert (
        "  flags: --ctx-size 2048 --n-gpu-layers 0 --flash-attn off --temp 0.7 --no-mmap\n" in out
    )
    assert f"  model: -hf {QWEN}\n" in out
    assert "idle_ttl: 0s" in out


def test_check_config_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = write(tmp_path / "bad.ini", "[m]\nmodel = a.gguf\nthreads = 64\n")
    assert run_serve(["--check-config", str(ini), "--max-threads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"llama-proc: error: {ini}:3: threads: [models.m]: threads=64 is above")


def test_models_preset_flag_adds_to_the_config(tmp_path: Path) -> None:
    ini = write(tmp_path / "p.ini", "[m]\nmodel = a.gguf\n")
    toml = write(tmp_path / "c.toml", '[models.t]\npath = "t.gguf"\n')
    args = serve_parser().parse_args(["serve", "--config", str(toml), "--models-preset", str(ini)])
    config = load_models(args.config, args.models_dir, preset=args.models_preset, env={})
    assert sorted(config.models) == ["m", "t"]


# -- the real server ---------------------------------------------------------------------------


@contextlib.contextmanager
def serve_process(tmp_path: Path, config: Path, server_bin: Path) -> Iterator[str]:
    """Run ``python -m llama_proc serve --config CONFIG``; yields its base URL."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "LLAMA_PROC_SERVER_BIN": str(server_bin),
    }
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_proc", "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            pytest.fail(f"serve did not start: {line!r}\n{log.read_text()}")
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_from_a_llama_swap_config_answers_a_chat(
    tmp_path: Path, llama_server_bin: Path, smol_model: Path
) -> None:
    config = write(
        tmp_path / "config.yaml",
        "models:\n"
        "  smol:\n"
        f"    cmd: llama-server --port ${{PORT}} -m {json.dumps(str(smol_model))} -c 1024 -t 1 "
        "-np 1\n"
        "    aliases: [tiny]\n",
    )
    with serve_process(tmp_path, config, llama_server_bin) as base:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=180) as resp:
            reply = json.loads(resp.read())
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] > 0


def test_a_flag_missing_its_value_does_not_swallow_the_next_flag(tmp_path: Path) -> None:
    old_style = write(tmp_path / "a.yaml", _swap_model("llama-server -m a.gguf -fa -c 512"))
    spec = load_llama_swap(old_style).resolve("m")
    assert spec is not None
    # Builds before on|off|auto took a bare -fa for "on".
    assert dict(spec.options) == {"flash_attn": "on", "ctx_size": 512}
    missing = write(tmp_path / "b.yaml", _swap_model("llama-server -m a.gguf -c -t 2"))
    one_line_error(load_llama_swap, missing, 3, "-c needs a value")


def test_preset_files_are_read_as_data(tmp_path: Path) -> None:
    ini = write(tmp_path / "p.ini", "[m]\nmodel = a.gguf\nalias = 100%(home)s\n")
    spec = load_preset_ini(ini).resolve("m")
    assert spec is not None
    assert spec.options["alias"] == "100%(home)s"  # no interpolation
    # Flags per request stay off: only llama-proc's TOML can allow them.
    assert not spec.request_flags.enabled
    big = write(tmp_path / "big.ini", "[m]\n; " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over 1024 KiB"):
        load_preset_ini(big)
    binary = tmp_path / "bin.ini"
    binary.write_bytes(b"[m]\nmodel = a.gguf\nalias = \xff\xfe\n")
    one_line_error(load_preset_ini, binary, 3, "not UTF-8")


def test_llama_swap_cmd_may_run_the_official_llama_binary(tmp_path: Path) -> None:
    swap = write(
        tmp_path / "c.yaml", _swap_model("/usr/local/bin/llama serve --port ${PORT} -m a.gguf")
    )
    spec = load_llama_swap(swap).resolve("m")
    assert spec is not None
    assert spec.path == tmp_path / "a.gguf"


def test_every_llama_arg_variable_of_the_binary_names_its_own_flag(llama_server_bin: Path) -> None:
    """Each ``(env: LLAMA_ARG_X)`` in the real binary's --help maps to a flag of that option."""
    import re
    import subprocess

    from llama_proc.proxy.configs.server_flags import flag_for_key

    text = subprocess.run(
        [str(llama_server_bin), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    entries: list[list[str]] = []
    for line in (text.stdout + text.stderr).splitlines():
        if line.startswith("-"):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    checked = 0
    for entry in entries:
        found = re.search(r"\(env: (LLAMA_ARG_[A-Z0-9_]+)\)", " ".join(entry))
        if found is None:
            continue
        spellings = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w.-]*)", entry[0][:60]))
        assert flag_for_key(found.group(1)) in spellings, (found.group(1), entry[0])
        checked += 1
    assert checked > 100


def test_preset_and_models_dir_together_as_the_router_reads_them(tmp_path: Path) -> None:
    """A preset section named like a folder's model sets that model's flags (the router's
    --models-dir + --models-preset); [*] reaches the folder's other models too."""
    root = tmp_path / "models"
    write(root / "alpha.gguf", "x")
    write(root / "vision/model.gguf", "x")
    write(root / "vision/mmproj-model-f16.gguf", "x")
    preset = write(tmp_path / "preset.ini", "[*]\nc = 2048\n[alpha]\nc = 4096\nt = 2\n")
    models = load_models(models_dir=root, preset=preset, env={})
    alpha, vision = models.models.get("alpha"), models.models.get("vision")
    assert alpha is not None
    assert vision is not None
    assert alpha.path == root / "alpha.gguf"
    assert (alpha.options["ctx_size"], alpha.options["threads"]) == (4096, 2)
    assert vision.options["ctx_size"] == 2048
    assert vision.options["mmproj"] == str(root / "vision/mmproj-model-f16.gguf")
    assert "vision/model" in vision.aliases  # the folder's other name is kept
    # Without the folder the same preset names a model it cannot find: one line, with the fix.
    with pytest.raises(ConfigError, match=r"preset\.ini:3: \[alpha\]: no model.*--models-dir"):
        load_models(preset=preset, env={})
