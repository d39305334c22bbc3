"""``llama-proc fetch / which / list / cache / doctor``, in-process against a local mirror.

These run the real host detection and the shipped manifest; the mirror serves fake archives of
the pinned build in this host's flavor, so nothing is downloaded from the internet and, with
the build step replaced, nothing is ever compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from http_server import FileServer
from release_fixtures import ReleaseFixture, make_release, serve_release, shim_script

import llama_proc
from llama_proc import cli
from llama_proc.config import Settings
from llama_proc.provision import bundle
from llama_proc.provision.cache.installer import install_atomically
from llama_proc.provision.cache.layout import install_dir
from llama_proc.provision.compile import build as build_module
from llama_proc.provision.fetch import download
from llama_proc.provision.host.platform import detect_host
from llama_proc.provision.host.selection import select_variant
from llama_proc.provision.manifest import load_manifest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell shims")

REPO_ROOT = Path(llama_proc.__file__).resolve().parents[1]
COMMANDS = ("fetch", "which", "list", "cache", "doctor")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _s: None)
    monkeypatch.setattr(bundle, "find_bundled", lambda root=None: None)

    def no_builds(*_a: Any, **_k: Any) -> Any:
        pytest.fail("the CLI tests must never compile llama.cpp")

    monkeypatch.setattr(build_module, "build_variant", no_builds)


@pytest.fixture(scope="module")
def cpu_variant() -> str:
    manifest = load_manifest()
    host = detect_host(gpu_details=False)
    try:
        selection = select_variant(manifest, host, "cpu")
    except llama_proc.NoMatchingVariantError:
        pytest.skip(f"the manifest has no cpu variant for {host.platform}")
    if selection.blockers:
        pytest.skip(f"the cpu prebuilt does not fit this host: {selection.blockers}")
    return selection.variant.id


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture
def release(tmp_path: Path, server: FileServer) -> ReleaseFixture:
    fixture = make_release(tmp_path, load_manifest().build)
    serve_release(server, fixture)
    return fixture


@pytest.fixture
def cache_dir() -> Path:
    return Path(os.environ["LLAMA_PROC_CACHE_DIR"])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fetch_which_list_cache_doctor(
    capsys: pytest.CaptureFixture[str],
    server: FileServer,
    release: ReleaseFixture,
    cache_dir: Path,
    cpu_variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build = release.tag
    expected = install_dir(Settings(cache_dir=cache_dir), build, cpu_variant) / "llama-server"

    code, out, err = run(capsys, "fetch", "--variant", "cpu", "--mirror", server.url)
    assert code == 0, err
    assert out == f"{expected}\n"
    assert "  cache: miss" in err
    assert f"  prebuilt: installed {build}/{cpu_variant}" in err
    assert server.hits(release.download_path(release.main_asset)) == 1

    code, out, err = run(capsys, "which", "--variant", "cpu")
    assert (code, out, err) == (0, f"{expected}\n", "")
    code, out, err = run(capsys, "which", "-v", "--variant", "cpu")
    assert out == f"{expected}\n"
    assert f"  cache: hit {build}/{cpu_variant} (prebuilt, version: " in err

    code, out, _ = run(capsys, "list", "--variant", "cpu")
    assert code == 0
    assert f"* {cpu_variant}" in out
    assert f"installed: {build}/{cpu_variant} (prebuilt" in out

    code, out, _ = run(capsys, "cache", "path")
    assert out == f"{cache_dir}\n"
    code, out, _ = run(capsys, "cache", "ls")
    [line] = out.splitlines()
    assert line.startswith(f"{build}/{cpu_variant}  prebuilt")
    assert line.endswith(f"version: {build.removeprefix('b')} (abcdef0)")

    code, out, _ = run(capsys, "doctor", "--variant", "cpu")
    assert code == 0
    assert out.startswith(f"llama-proc {llama_proc.__version__} (Python ")
    assert f"host: {detect_host().summary()}" in out
    assert f"  => {expected}" in out
    assert f"cache: {cache_dir} (1 installs" in out

    seen: list[argparse.Namespace] = []

    def fake_smoke(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    from llama_proc._cli.handlers import smoke

    monkeypatch.setattr(smoke, "run_smoke", fake_smoke)
    code, _, _ = run(capsys, "doctor", "--smoke", "--variant", "cpu")
    assert code == 0
    assert len(seen) == 1
    assert seen[0].smoke is True

    code, out, _ = run(capsys, "cache", "rm", f"{build}/{cpu_variant}")
    assert out == f"removed {expected.parent}\n"
    code, out, err = run(capsys, "which", "--variant", "cpu")
    assert code == 1
    assert out == ""
    assert err.startswith("llama-proc: error: no ")
    assert "llama-proc fetch" in err
    assert len(err.strip().splitlines()) == 1


def test_fetch_force_and_quiet(
    capsys: pytest.CaptureFixture[str],
    server: FileServer,
    release: ReleaseFixture,
    cpu_variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMA_PROC_MIRROR", server.url)
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "cpu")
    code, first, _ = run(capsys, "-q", "fetch")
    assert code == 0
    code, again, err = run(capsys, "-q", "fetch")
    assert (again, err) == (first, "")
    assert server.hits(release.download_path(release.main_asset)) == 1
    code, forced, err = run(capsys, "fetch", "--force")
    assert forced == first
    assert "cache: skipped (--force)" in err
    assert server.hits(release.download_path(release.main_asset)) == 2


def test_fetch_offline_without_cache_is_one_line(
    capsys: pytest.CaptureFixture[str], server: FileServer, cpu_variant: str
) -> None:
    code, out, err = run(capsys, "-q", "fetch", "--offline", "--variant", "cpu")
    assert code == 1
    assert out == ""
    assert err.startswith("llama-proc: error: offline mode")
    assert len(err.strip().splitlines()) == 1
    assert server.hits() == 0


def test_fetch_no_build_reports_why(
    capsys: pytest.CaptureFixture[str], server: FileServer, cpu_variant: str, tmp_path: Path
) -> None:
    # A release without this host's asset: the prebuilt fails and builds are off.
    tag = load_manifest().build
    fixture = make_release(tmp_path, tag, ["win-cpu-x64"])
    serve_release(server, fixture)
    code, _, err = run(capsys, "fetch", "--no-build", "--variant", "cpu", "--mirror", server.url)
    assert code == 1
    assert "llama-proc: error: no asset of release" in err
    assert "prebuilt: failed" in err


def test_cache_prune_and_rm_errors(capsys: pytest.CaptureFixture[str], cache_dir: Path) -> None:
    settings = Settings(cache_dir=cache_dir)

    def populate(staging: Path) -> dict[str, Any]:
        (staging / "llama-server").write_text(shim_script("b100"))
        (staging / "llama-server").chmod(0o755)
        return {"variant_id": "linux-x86_64-cpu", "build": "b100", "source": "prebuilt"}

    old = install_atomically(
        install_dir(settings, "b100", "linux-x86_64-cpu"),
        populate,
        settings=settings,
        binaries=["llama-server"],
        os_name="linux" if sys.platform.startswith("linux") else "other",
    )
    code, out, _ = run(capsys, "cache", "prune", "--dry-run")
    assert f"would remove {old.path}" in out.splitlines()
    assert old.path.exists()
    code, out, _ = run(capsys, "cache", "prune", "--keep", "b100")
    assert old.path.exists()
    code, out, _ = run(capsys, "cache", "prune")
    assert f"removed {old.path}" in out.splitlines()
    assert not old.path.exists()
    code, out, err = run(capsys, "cache", "prune")
    assert (code, out, err) == (0, "", "nothing to prune\n")
    code, _, err = run(capsys, "cache", "rm", "b100/linux-x86_64-cpu")
    assert code == 1
    assert err.startswith("llama-proc: error: ")
    code, out, err = run(capsys, "cache", "ls")
    assert (code, out) == (0, "")
    assert err.startswith("no installs in ")


@pytest.mark.parametrize(
    "argv",
    [
        ["fetch", "--build", "newest"],  # latest and v1.0.0 are builds (nightly-tag.txt)
        ["fetch", "--mirror", "ftp://example"],
        ["fetch", "--variant", "tpu"],  # rocm is a backend now (vocab.BACKENDS)
        ["fetch", "--prefer", "wheel"],
        ["cache"],
        ["cache", "prune", "--keep", "x1"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_build_flag_is_normalised(
    capsys: pytest.CaptureFixture[str], cache_dir: Path, cpu_variant: str
) -> None:
    code, _, err = run(capsys, "which", "-v", "--build", "123", "--variant", "cpu")
    assert code == 1
    assert "for build b123 is installed" in err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_has_help() -> None:
    commands = _subparsers(cli.build_parser())
    parsers = [commands[name] for name in COMMANDS]
    parsers.extend(_subparsers(commands["cache"]).values())
    checked = 0
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{parser.prog} {choice.dest} has no help"
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
            checked += 1
    assert checked >= 20


def test_command_module_imports_only_argparse() -> None:
    code = (
        "import sys, json; import llama_proc._cli.provision; "
        "heavy = ['requests', 'filelock', 'tqdm', 'platformdirs', 'aiohttp', 'packaging', "
        "'llama_proc.config', 'llama_proc.provision', 'ctypes']; "
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert json.loads(out) == []


# ----------------------------------------------------------------------------- one route to Settings
RESOLVING_COMMANDS = ("fetch", "which", "list", "doctor", "build", "serve", "rpc-worker")


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", RESOLVING_COMMANDS)
def test_every_command_fills_settings_from_the_same_flags(command: str, tmp_path: Path) -> None:
    from llama_proc._cli.common import settings_from_args

    args = _parse(
        "-q", command, "--cache-dir", str(tmp_path), "--variant", "cpu", "--build", "42",
        "--offline", "--mirror", "file:///srv/mirror/",
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.cache_dir == tmp_path
    assert (settings.variant, settings.build, settings.offline) == ("cpu", "b42", True)
    assert settings.mirror == "file:///srv/mirror"
    assert settings.progress is False


@pytest.mark.parametrize("command", RESOLVING_COMMANDS)
def test_an_absent_flag_leaves_the_environment_alone(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_proc._cli.common import settings_from_args

    monkeypatch.setenv("LLAMA_PROC_OFFLINE", "1")
    monkeypatch.setenv("LLAMA_PROC_BUILD", "b7")
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "vulkan")
    settings = settings_from_args(_parse(command))
    assert (settings.offline, settings.build) == (True, "b7")
    # rpc-worker picks the rpc build unless told otherwise; the others follow the environment.
    assert settings.variant == ("rpc" if command == "rpc-worker" else "vulkan")
    assert settings.progress is None


def test_build_options_travel_in_settings(tmp_path: Path) -> None:
    from llama_proc._cli.common import settings_from_args

    args = _parse("build", "--source", str(tmp_path), "--cuda-arch", "86;90", "-j", "3")
    settings = settings_from_args(args)
    assert (settings.build_source, settings.cuda_arch, settings.jobs) == (str(tmp_path), "86;90", 3)


def test_serve_server_bin_is_the_settings_field(tmp_path: Path) -> None:
    from llama_proc._cli.common import settings_from_args

    args = _parse("serve", "--server-bin", str(tmp_path / "llama-server"))
    assert settings_from_args(args).server_binary == tmp_path / "llama-server"


def test_choices_come_from_the_vocabulary() -> None:
    from llama_proc.vocab import BACKEND_CHOICES, BACKENDS, PREFER_CHOICES

    commands = _subparsers(cli.build_parser())
    for name in RESOLVING_COMMANDS:
        [variant] = [a for a in commands[name]._actions if "--variant" in a.option_strings]
        expected = BACKENDS if name == "rpc-worker" else BACKEND_CHOICES
        assert tuple(variant.choices or ()) == expected, name
    [prefer] = [a for a in commands["fetch"]._actions if "--prefer" in a.option_strings]
    assert tuple(prefer.choices or ()) == PREFER_CHOICES


def test_cli_modules_import_each_other_without_cycles() -> None:
    import ast

    package = REPO_ROOT / "llama_proc" / "_cli"
    names = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        graph[name] = {
            module.removeprefix("llama_proc._cli.")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (module := node.module or "")
            if module.startswith("llama_proc._cli.")
        }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, set()) - seen:
            if nxt == goal or reaches(nxt, goal, seen | {nxt}):
                return True
        return False

    assert [n for n in sorted(names) if reaches(n, n, set())] == []


def test_doctor_shows_the_selection_once(
    capsys: pytest.CaptureFixture[str], cpu_variant: str
) -> None:
    # The resolver's select steps repeat the selection block; doctor leaves them out by their
    # step field (provision.explain.Step), not by the wording of the line.
    code, out, _ = run(capsys, "doctor", "--variant", "cpu", "--offline")
    assert code == 0
    selection = out.split("selection:\n", 1)[1].split("resolution", 1)[0]
    assert selection.strip()
    assert "select: " not in out


def test_explanations_are_filtered_by_step_field(capsys: pytest.CaptureFixture[str]) -> None:
    from llama_proc._cli.handlers.output import print_steps as _explain
    from llama_proc.provision.explain import Outcome, Step, StepName

    lines = [
        Step(StepName.SELECT, Outcome.NOTE, "cpu: no NVIDIA driver"),
        Step(StepName.CACHE, Outcome.USED, "hit b1/linux-x86_64-cpu"),
        "select: a plain line from another producer is printed as it is",
    ]
    _explain(lines, skip=(StepName.SELECT,))
    assert capsys.readouterr().err.splitlines() == [
        "  cache: hit b1/linux-x86_64-cpu",
        "  select: a plain line from another producer is printed as it is",
    ]


# ----------------------------------------------------------------------------- the auto chain
def _fabricated_selection(requested: str = "auto") -> Any:
    """A selection whose reasons exist only as structured data: its ``why`` says nothing."""
    from llama_proc.provision.host.selection import Blocker, BlockerKind, Candidate, Selection

    host = detect_host(gpu_details=False)
    variants = load_manifest().for_platform(host.os, host.arch)
    if len(variants) < 3:
        pytest.skip(f"fewer than three variants for {host.platform}")
    first, second, chosen = variants[0], variants[1], variants[-1]
    candidates = (
        Candidate(first, (Blocker(BlockerKind.DRIVER_TOO_OLD, "driver 470 is older than 580"),)),
        Candidate(
            second,
            (
                Blocker(BlockerKind.NO_VULKAN_DRIVER, "only the llvmpipe ICD"),
                Blocker(BlockerKind.NO_HIP_RUNTIME, "no libamdhip64"),
            ),
        ),
        Candidate(chosen),
    )
    return Selection(
        chosen,
        ("host: fabricated", "nothing to read here"),
        ("the prebuilt needs glibc >= 9.99",),
        candidates,
        (Blocker(BlockerKind.GLIBC_TOO_OLD, "the prebuilt needs glibc >= 9.99"),),
    )


def _patch_selection(monkeypatch: pytest.MonkeyPatch) -> Any:
    from llama_proc.provision.host import selection as selection_module

    fabricated = _fabricated_selection()
    monkeypatch.setattr(selection_module, "select_variant", lambda *_a, **_k: fabricated)
    return fabricated


def test_doctor_prints_the_chain_from_candidates(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fabricated = _patch_selection(monkeypatch)
    first, second, chosen = (c.variant.id for c in fabricated.candidates)
    code, out, _ = run(capsys, "doctor", "--offline")
    assert code == 0
    block = out.split("selection:\n", 1)[1].split("resolution", 1)[0]
    lines = block.splitlines()
    assert lines[0] == "  auto chain: cuda -> rocm -> metal -> vulkan -> cpu"
    assert f"  skip {first}: driver 470 is older than 580 [driver_too_old]" in lines
    assert (
        f"  skip {second}: only the llvmpipe ICD [no_vulkan_driver]; no libamdhip64 "
        "[no_hip_runtime]" in lines
    )
    assert f"  use {chosen}: the first in the chain with nothing against it" in lines
    assert (
        "  prebuilt: blocked (the prebuilt needs glibc >= 9.99 [glibc_too_old]); a source "
        "build is needed" in lines
    )
    # The reasoning lines are not what doctor reads.
    assert "fabricated" not in out
    assert "nothing to read here" not in out


def test_which_verbose_prints_the_chain_between_the_ladder_steps(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fabricated = _patch_selection(monkeypatch)
    first, _, chosen = (c.variant.id for c in fabricated.candidates)
    code, out, err = run(capsys, "which", "-v", "--offline")
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == "  explicit: not set (LLAMA_PROC_SERVER_BIN)"
    assert lines[1] == "  select: auto chain: cuda -> rocm -> metal -> vulkan -> cpu"
    assert lines[2] == f"  select: skip {first}: driver 470 is older than 580 [driver_too_old]"
    assert lines[4] == f"  select: use {chosen}: the first in the chain with nothing against it"
    assert lines[5].startswith("  bundled: ")
    assert any(line.startswith("  cache: miss") for line in lines)
    assert "fabricated" not in err
    assert err.rstrip().splitlines()[-1].startswith("llama-proc: error: no ")


def test_doctor_names_a_requested_backends_warnings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_proc.provision.host import selection as selection_module
    from llama_proc.provision.host.selection import Blocker, BlockerKind, Candidate

    fabricated = _fabricated_selection()
    blocked = Candidate(
        fabricated.variant, (Blocker(BlockerKind.NO_NVIDIA_DRIVER, "no NVIDIA driver found"),)
    )
    requested = type(fabricated)(
        fabricated.variant, fabricated.why, (), (*fabricated.candidates[:2], blocked), ()
    )
    monkeypatch.setattr(selection_module, "select_variant", lambda *_a, **_k: requested)
    code, out, _ = run(capsys, "doctor", "--offline", "--variant", "cuda")
    assert code == 0
    assert "selection:\n  requested: cuda\n" in out
    assert f"  use {fabricated.variant.id}: requested with --variant cuda" in out
    assert "  warning: no NVIDIA driver found [no_nvidia_driver]" in out
    assert "  prebuilt: fits this host" in out


def test_doctor_says_which_cuda_toolkit_a_build_would_use(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_proc.provision.compile import toolchain

    seen: list[object] = []
    real = toolchain.choose_cuda_toolkit

    def spy(*args: object, **kwargs: object) -> toolchain.ToolkitChoice:
        seen.append(args[1])  # the manifest's pinned wheel toolkits reach the choice
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(toolchain, "choose_cuda_toolkit", spy)
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    [line] = [ln for ln in out.splitlines() if ln.startswith("CUDA toolkit for source builds: ")]
    source = line.split(": ", 1)[1].split()[0]
    assert source in {"system", "wheels", "none"}
    assert line.endswith(")")  # the reason is printed
    assert "(" in line
    assert len(seen) == 1
    assert len(seen[0]) >= 1  # type: ignore[arg-type]


def test_cache_ls_and_prune_count_every_kind_in_bytes(
    capsys: pytest.CaptureFixture[str], cache_dir: Path
) -> None:
    """`cache ls` sizes each kind of folder; `prune` says what it freed (or would)."""
    for kind, name, size in (
        ("build", "0123abcd", 3 << 20),
        ("toolkits", "cuda-13.0-x86_64-0123abcd", 5 << 20),
        ("releases", "ggml-org_llama.cpp", 10_000),
    ):
        folder = cache_dir / kind / name
        folder.mkdir(parents=True)
        (folder / "payload").write_bytes(b"x" * size)
    code, _, err = run(capsys, "cache", "ls")
    assert code == 0
    lines = {line.split()[0]: line for line in err.splitlines() if line.startswith("  ")}
    assert "3.0 MB" in lines["build/"]
    assert "5.0 MB" in lines["toolkits/"]
    assert "0.0 MB" in lines["servers/"]
    assert set(lines) >= {"servers/", "downloads/", "models/", "sources/", "flags/"}
    code, out, _ = run(capsys, "cache", "prune", "--dry-run")
    assert out.splitlines()[-1] == "would free 8.0 MB"
    assert (cache_dir / "build" / "0123abcd").is_dir()
    code, out, _ = run(capsys, "cache", "prune")
    assert out.splitlines()[-1] == "freed 8.0 MB"
    assert not (cache_dir / "toolkits" / "cuda-13.0-x86_64-0123abcd").exists()


def test_build_source_flag_and_its_deprecated_spelling(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--build-source names what it sets (Settings.build_source, LLAMA_PROC_BUILD_SOURCE);
    the old --source still works and says once that it is deprecated."""
    from llama_proc._cli.common import settings_from_args

    args = _parse("build", "--build-source", str(tmp_path))
    assert settings_from_args(args).build_source == str(tmp_path)
    assert capsys.readouterr().err == ""
    args = _parse("build", "--source", str(tmp_path))
    assert settings_from_args(args).build_source == str(tmp_path)
    err = capsys.readouterr().err
    assert err == "llama-proc build: warning: --source is deprecated; use --build-source\n"
