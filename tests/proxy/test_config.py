"""Models config file, directory scan, and the serve command's argument checks."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_proc._cli import serve
from llama_proc._cli.serve import is_loopback, read_api_keys
from llama_proc.errors import ConfigError
from llama_proc.proxy.configs import load_models, scan_models_dir
from llama_proc.proxy.flag_caps import FlagCaps
from llama_proc.proxy.flag_checker import FlagChecker
from llama_proc.proxy.flag_names import Bounds
from llama_proc.proxy.flag_policy import FlagRule
from llama_proc.proxy.models_config import load_models_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_file(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "models.toml",
        """
[defaults]
ctx_size = 1024
threads = 2
idle_ttl = 30
extra_args = ["--no-warmup"]

[models.small]
path = "gguf/small.gguf"
ctx_size = 512
aliases = ["tiny"]
extra_args = ["--temp", "0.5"]

[models."org/big"]
path = "/abs/big.gguf"
idle_ttl = 0
""",
    )
    config = load_models_config(cfg)
    small = config.resolve("tiny")
    assert small is not None
    assert small is config.resolve("small")
    assert small.path == tmp_path / "gguf" / "small.gguf"
    assert dict(small.options) == {"ctx_size": 512, "threads": 2}
    assert small.extra_args == ("--no-warmup", "--temp", "0.5")
    assert small.idle_ttl == 30
    big = config.resolve("org/big")
    assert big is not None
    assert big.path == Path("/abs/big.gguf")
    assert big.idle_ttl == 0
    assert dict(big.options) == {"ctx_size": 1024, "threads": 2}
    assert config.resolve("nope") is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("[models.a]\nctx_size = 1\n", "path is required", id="no-path"),
        pytest.param('[models.a]\npath = "a.gguf"\nport = 1\n', "port cannot be set", id="port"),
        pytest.param('[models.a]\npath = "a.gguf"\nhost = "0.0.0.0"\n', "host", id="host"),
        pytest.param(
            '[models.a]\npath = "a.gguf"\nbogus = 1\n', "unknown llama-server", id="unknown"
        ),
        pytest.param('[models.a]\npath = "a.gguf"\nctx_size = -5\n', "ctx_size", id="bad-value"),
        pytest.param(
            '[models.a]\npath = "a.gguf"\nextra_args = ["--port", "1"]\n', "owns", id="owned-extra"
        ),
        pytest.param('[defaults]\nthreads = "x"\n[models.a]\npath = "a"\n', "threads", id="dflt"),
        pytest.param('[models.a]\npath = "a.gguf"\nextra_args = "-c 1"\n', "list of", id="extra"),
        pytest.param('[models.a]\npath = "a.gguf"\nidle_ttl = -1\n', "idle_ttl", id="ttl"),
        pytest.param("[server]\nx = 1\n", "unknown top-level", id="top"),
        pytest.param("[models\n", "not valid TOML", id="toml"),
        pytest.param(
            '[models.a]\npath = "a.gguf"\n[models.b]\npath = "b.gguf"\naliases = ["a"]\n',
            "already used",
            id="alias-clash",
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    cfg = write(tmp_path / "m.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_models_config(cfg)
    assert str(cfg) in str(info.value)


CAPS = FlagCaps(
    max_threads=8, max_threads_http=8, max_parallel=8, max_batch=4096, max_context_tokens=32768
)


def test_request_flags_tables(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write(root / "scanned.gguf", "x")
    cfg = write(
        tmp_path / "m.toml",
        """
[defaults.request_flags]
"--temp" = true

[models.open]
path = "a.gguf"
[models.open.request_flags]
"--ctx-size" = { min = 512, max = 4096 }
"-ngl" = true

[models.inherits]
path = "b.gguf"

[models.closed]
path = "c.gguf"
request_flags = {}
""",
    )
    config = load_models(cfg, root, env={}, caps=CAPS)
    specs = {spec.id: spec for spec in config}
    assert specs["open"].request_flags.rules == (
        FlagRule("--ctx-size", Bounds(512, 4096)),
        FlagRule("-ngl"),
    )
    assert specs["inherits"].request_flags.rules == (FlagRule("--temp"),)
    assert specs["scanned"].request_flags.rules == (FlagRule("--temp"),)
    assert not specs["closed"].request_flags.enabled
    checker = FlagChecker(CAPS)
    assert checker.check_request("--ctx-size 1024", specs["open"]) == ("-c", "1024")
    assert checker.check_request("--temperature 0.5", specs["scanned"]) == ("--temp", "0.5")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param('[models.a]\npath = "a"\nthreads = 3000\n', "--max-threads", id="threads"),
        pytest.param(
            '[models.a]\npath = "a"\nextra_args = ["-t", "3000"]\n', "--max-threads", id="-t"
        ),
        pytest.param(
            '[models.a]\npath = "a"\nextra_args = ["--threads-http=2000"]\n',
            "--max-threads-http",
            id="http-equals",
        ),
        pytest.param('[models.a]\npath = "a"\nparallel = 10000\n', "--max-parallel", id="np"),
        pytest.param('[models.a]\npath = "a"\nbatch_size = 100000\n', "--max-batch", id="b"),
        pytest.param(
            '[models.a]\npath = "a"\nctx_size = 999999999\n', "--max-context-tokens", id="ctx"
        ),
        pytest.param(
            '[defaults]\nctx_size = 8192\n[models.a]\npath = "a"\nparallel = 8\n',
            "8192 x 8",
            id="ctx-times-slots",
        ),
        pytest.param("[defaults]\nthreads = 64\n", r"\[defaults\].*--max-threads", id="dflt"),
        pytest.param(
            '[models.a]\npath = "a"\nextra_args = ["-np", "\uff18"]\n',
            "whole number",
            id="non-ascii",
        ),
        pytest.param(
            '[models.a]\npath = "a"\n[models.a.request_flags]\n"-t" = { max = 64 }\n',
            "request_flags: -t max 64 is above the server-wide cap",
            id="policy-over-cap",
        ),
        pytest.param(
            '[models.a]\npath = "a"\n[models.a.request_flags]\n"--model" = true\n',
            "cannot be allowed per request",
            id="policy-file-flag",
        ),
        pytest.param(
            '[models.a]\npath = "a"\nrequest_flags = ["-c"]\n',
            "request_flags must be a table",
            id="policy-not-a-table",
        ),
    ],
)
def test_config_beyond_the_caps_is_refused_at_load(tmp_path: Path, text: str, match: str) -> None:
    cfg = write(tmp_path / "m.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_models_config(cfg, caps=CAPS)
    message = str(info.value)
    assert str(cfg) in message
    assert "\n" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read models config"):
        load_models_config(tmp_path / "absent.toml")


def test_models_dir_scan(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in (
        "Alpha.Q4_K_M.gguf",
        "sub/beta.gguf",
        "split/big-00001-of-00002.gguf",
        "split/big-00002-of-00002.gguf",
        "mmproj-alpha.gguf",
        ".hidden/x.gguf",
        "notes.txt",
    ):
        write(root / name, "x")
    config = scan_models_dir(root, defaults={"ctx_size": 256})
    # A folder holding one model is that model, named by the folder (llama.cpp's router
    # layout); the name it had before stays an alias.
    assert sorted(config.models) == ["Alpha.Q4_K_M", "split", "sub"]
    big = config.resolve("split/big")
    assert big is not None
    assert big.id == "split"
    assert big.path == root / "split" / "big-00001-of-00002.gguf"
    assert dict(big.options) == {"ctx_size": 256}


def test_load_models_merges_config_over_dir_and_reads_env(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write(root / "a.gguf", "x")
    write(root / "b.gguf", "x")
    cfg = write(
        tmp_path / "m.toml",
        '[defaults]\nthreads = 3\n[models.a]\npath = "elsewhere.gguf"\n',
    )
    config = load_models(None, root, env={"LLAMA_PROC_CONFIG": str(cfg)})
    a, b = config.resolve("a"), config.resolve("b")
    assert a is not None
    assert b is not None
    assert a.path == tmp_path / "elsewhere.gguf"
    assert b.path == root / "b.gguf"
    assert dict(b.options) == {"threads": 3}
    with pytest.raises(ConfigError, match="--config FILE"):
        load_models(None, None, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_models(None, tmp_path / "absent", env={})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, expected: Any) -> None:
    assert is_loopback(host) is expected


def test_read_api_keys(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", "# proxy keys\nk1\n\n  k2  \nk1\n")
    assert read_api_keys(keys, "k3, k4,,") == ("k1", "k2", "k3", "k4")
    assert read_api_keys(None, None) == ()
    with pytest.raises(ConfigError, match="cannot read --api-key-file"):
        read_api_keys(tmp_path / "absent", None)


def serve_parser() -> argparse.ArgumentParser:
    # Only the serve command: these tests must not depend on the other commands' modules.
    parser = argparse.ArgumentParser(prog="llama-proc")
    serve.register(parser.add_subparsers(dest="command"))
    return parser


def run_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(["serve", *argv])
    return int(args.handler(args))


def test_serve_refuses_remote_bind_without_flag(tmp_path: Path) -> None:
    cfg = write(tmp_path / "m.toml", '[models.a]\npath = "a.gguf"\n')
    with pytest.raises(ConfigError, match=r"refusing to bind 0\.0\.0\.0.*--allow-remote"):
        run_serve(["--config", str(cfg), "--host", "0.0.0.0"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--max-servers", "0"], "--max-servers"),
        (["--stall-timeout", "0"], "--stall-timeout"),
        (["--idle-ttl", "-1"], "--idle-ttl"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_validates_numbers(tmp_path: Path, extra: list[str], match: str) -> None:
    cfg = write(tmp_path / "m.toml", '[models.a]\npath = "a.gguf"\n')
    with pytest.raises(ConfigError, match=match):
        run_serve(["--config", str(cfg), *extra])


def test_serve_caps_config_flags_before_provisioning(tmp_path: Path) -> None:
    cfg = write(tmp_path / "m.toml", '[models.a]\npath = "a.gguf"\nthreads = 16\n')
    with pytest.raises(ConfigError, match=r"threads=16 is above .* of 4 \(serve --max-threads\)"):
        run_serve(["--config", str(cfg), "--max-threads", "4"])
    with pytest.raises(ConfigError, match="--max-parallel must be at least 1"):
        run_serve(["--config", str(cfg), "--max-parallel", "0"])


def test_serve_cap_flags_fill_the_caps() -> None:
    args = serve_parser().parse_args(
        ["serve", "--max-threads", "3", "--max-context-tokens", "4096", "--max-batch", "512"]
    )
    caps = serve.flag_caps(args)
    assert (caps.max_threads, caps.max_context_tokens, caps.max_batch) == (3, 4096, 512)
    assert caps.max_parallel == FlagCaps().max_parallel


def test_serve_without_models_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="--models-dir"):
        run_serve([])


def test_serve_help_documents_every_flag() -> None:
    parser = serve_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = sub.choices["serve"].format_help()
    actions = [a for a in sub.choices["serve"]._actions if a.option_strings]
    assert all(a.help for a in actions)
    for flag in (
        "--config",
        "--models-dir",
        "--host",
        "--port",
        "--max-servers",
        "--idle-ttl",
        "--api-key-file",
        "--allow-remote",
        "--max-body-bytes",
        "--first-byte-timeout",
        "--stall-timeout",
        "--max-threads",
        "--max-threads-http",
        "--max-parallel",
        "--max-batch",
        "--max-context-tokens",
        "LLAMA_PROC_PROXY_API_KEYS",
    ):
        assert flag in out


def test_importing_the_proxy_package_does_not_import_aiohttp() -> None:
    code = (
        "import sys, llama_proc.proxy, llama_proc.proxy.pool, llama_proc.proxy.models_config\n"
        "import llama_proc._cli.serve\n"
        "print('aiohttp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _proxy_imports(module: str) -> set[str]:
    """The llama_proc.proxy modules ``module`` imports, type-only imports included."""
    import ast

    path = Path(__file__).parents[2] / "llama_proc" / "proxy" / f"{module}.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_proc.proxy."):
            found.add((node.module or "").removeprefix("llama_proc.proxy."))
    return found


def test_flag_modules_and_model_records_form_no_import_cycle() -> None:
    modules = ("flag_caps", "flag_names", "flag_policy", "flag_checker", "model_spec")
    graph = {m: _proxy_imports(m) for m in modules}
    for module in modules:
        # Every module below the models config is a leaf for it: none reaches back up.
        assert "models_config" not in graph[module], module
        seen, todo = set(), list(graph[module])
        while todo:
            other = todo.pop()
            assert other != module, f"{module} imports itself through {other}"
            if other in graph and other not in seen:
                seen.add(other)
                todo += graph[other]
