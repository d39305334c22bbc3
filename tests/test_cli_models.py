"""``llama-proc pull`` and ``inspect``, in-process against a loopback Hugging Face Hub.

The hub (tests/helpers/fake_hub.py) speaks the real API shapes; huggingface_hub is pointed at it
through the values it read at import (tests/helpers/hub_env.py), and one subprocess test checks
the ``HF_ENDPOINT`` route a user takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fake_hub import FakeHub, sha256_of
from hub_env import use_fake_hub
from tiny_gguf import write_model

from llama_proc import cli
from llama_proc.models import hub as hub_module

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = "org/tiny-GGUF"
SUBPROCESS_TIMEOUT = 120


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


@pytest.fixture
def hf_cache(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return use_fake_hub(monkeypatch, hub, tmp_path / "hf-home")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_model(tmp_path / "src" / "tiny.gguf", layers=3, heads=8, kv_heads=2)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    [line] = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("llama-proc: error: ")
    return line


# ----------------------------------------------------------------------------- pull
def test_pull_prints_the_local_path(
    capsys: pytest.CaptureFixture[str], hub: FakeHub, hf_cache: Path, tiny: Path
) -> None:
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny, "tiny-Q8_0.gguf": b"GGUF q8"})
    code, out, err = run(capsys, "pull", REPO)
    assert code == 0, err
    [line] = out.splitlines()
    path = Path(line)
    assert path.name == "tiny-Q4_K_M.gguf"
    assert path.is_relative_to(hf_cache)
    assert sha256_of(path) == sha256_of(tiny)
    code, again, err = run(capsys, "pull", "--quiet", f"{REPO}:q4_k_m")
    assert (code, again, err) == (0, out, "")
    storage_gets = [h for h in hub.storage.log if h.method == "GET"]
    assert len(storage_gets) == 1


def test_pull_quiet_turns_the_progress_bar_off(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Any] = []

    def spy(ref: Any, *, settings: Any, with_mmproj: bool) -> hub_module.ModelFiles:
        seen.append(settings.progress)
        return hub_module.ModelFiles(model=tmp_path / "m.gguf")

    monkeypatch.setattr(hub_module, "fetch_model", spy)
    run(capsys, "pull", REPO)
    run(capsys, "pull", "--quiet", REPO)
    run(capsys, "-q", "pull", REPO)
    # None: huggingface_hub's own rule, a bar only on a terminal.
    assert seen == [None, False, False]


def test_pull_revision_split_and_mmproj(
    capsys: pytest.CaptureFixture[str], hub: FakeHub, hf_cache: Path
) -> None:
    hub.add_repo(REPO, {"m-Q4_0.gguf": b"GGUF old"}, revision="v1")
    names = [f"Q4_0/m-Q4_0-0000{i}-of-00002.gguf" for i in (1, 2)]
    hub.add_repo(
        REPO, {names[0]: b"GGUF part1", names[1]: b"part2", "mmproj-F16.gguf": b"GGUF proj"}
    )

    code, out, _ = run(capsys, "pull", "--revision", "v1", f"{REPO}:Q4_0")
    assert code == 0
    assert Path(out.strip()).read_bytes() == b"GGUF old"

    code, out, err = run(capsys, "pull", "--mmproj", f"{REPO}:Q4_0")
    assert code == 0, err
    model, proj = (Path(line) for line in out.splitlines())
    assert model.name == "m-Q4_0-00001-of-00002.gguf"
    assert (model.parent / "m-Q4_0-00002-of-00002.gguf").read_bytes() == b"part2"
    assert proj.read_bytes() == b"GGUF proj"
    assert "split model: 2 parts" in err


def test_pull_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], hub: FakeHub, hf_cache: Path, tmp_path: Path
) -> None:
    hub.add_repo(REPO, {"m-Q4_0.gguf": b"GGUF", "m-Q8_0.gguf": b"GGUF"})
    code, out, err = run(capsys, "pull", f"{REPO}:Q5_K_M")
    assert (code, out) == (1, "")
    assert "it has: Q4_0, Q8_0" in _one_error_line(err)

    code, _, err = run(capsys, "pull", "org/no-such-repo")
    assert code == 1
    _one_error_line(err)

    code, _, err = run(capsys, "pull", "--offline", "org/never-fetched:Q4_0")
    assert code == 1
    assert "offline" in _one_error_line(err)

    code, _, err = run(capsys, "pull", str(tmp_path / "nothing-here.gguf"))
    assert code == 1
    assert "neither a model file nor a Hugging Face reference" in _one_error_line(err)

    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF")
    code, out, _ = run(capsys, "pull", str(local))
    assert (code, out) == (0, f"{local.resolve()}\n")
    code, _, err = run(capsys, "pull", "--revision", "v1", str(local))
    assert code == 1
    assert "--revision needs org/repo" in _one_error_line(err)


def test_pull_through_hf_endpoint_in_a_subprocess(hub: FakeHub, tmp_path: Path) -> None:
    tiny = write_model(tmp_path / "tiny.gguf")
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"))
    out = subprocess.run(
        [sys.executable, "-m", "llama_proc", "pull", "--quiet", f"{REPO}:Q4_K_M"],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_relative_to(tmp_path / "home" / "hub")
    assert sha256_of(path) == sha256_of(tiny)
    assert out.stderr == ""


def test_pull_from_a_hub_with_a_hostile_etag_writes_nothing_outside_the_cache(
    capsys: pytest.CaptureFixture[str], hub: FakeHub, hf_cache: Path, tmp_path: Path
) -> None:
    # The upstream bug: huggingface_hub names the cached blob after the hub's ETag, unchecked;
    # this one climbs from the blobs folder to a stand-in for site-packages beside the cache.
    site = tmp_path / "site"
    site.mkdir()
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": b"import os; os.system('id')\n"})
    hub.resolve_headers["X-Linked-Etag"] = '"../../../../site/evil.pth"'

    code, out, err = run(capsys, "pull", f"{REPO}:Q8_0")

    assert (code, out) == (1, "")
    assert "X-Linked-Etag" in _one_error_line(err)
    assert list(site.iterdir()) == []
    assert not hub.storage.log


# ----------------------------------------------------------------------------- inspect
def test_inspect_prints_the_header_and_the_estimate(
    capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, _ = run(capsys, "inspect", str(tiny), "--ctx-size", "512")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"model: {tiny}"
    for expected in (
        "  architecture: llama",
        "  layers: 3",
        "  trained context: 1024",
        "  attention heads: 8; KV heads: 2",
        "  head size: key 8, value 8",
        "  quantization: F16",
    ):
        assert expected in lines
    assert any(
        line.startswith("memory to serve it (CPU llama-server, ctx 512, 1 slot(s)")
        for line in lines
    )


def test_inspect_json(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    from llama_proc.models.gguf_info import estimate_memory, read_model_info

    code, out, _ = run(capsys, "inspect", "--json", str(tiny), "--parallel", "2")
    assert code == 0
    data = json.loads(out)
    assert (data["architecture"], data["n_layer"], data["n_head_kv"]) == ("llama", 3, [2, 2, 2])
    assert data["file_size"] == tiny.stat().st_size
    expected = estimate_memory(read_model_info(tiny), None, 2)
    assert data["memory"]["total"] == expected.total
    assert data["memory"]["ctx_size"] == 1024


def test_inspect_fetches_a_hub_reference_first(
    capsys: pytest.CaptureFixture[str], hub: FakeHub, hf_cache: Path, tiny: Path
) -> None:
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny})
    code, out, err = run(capsys, "inspect", "--json", f"{REPO}:Q8_0")
    assert code == 0, err
    data = json.loads(out)
    assert Path(data["path"]).is_relative_to(hf_cache)
    assert data["n_layer"] == 3


def test_inspect_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    code, out, err = run(capsys, "inspect", str(bad))
    assert (code, out) == (1, "")
    assert "not a GGUF model file" in _one_error_line(err)
    good = write_model(tmp_path / "g.gguf")
    code, _, err = run(capsys, "inspect", str(good), "--cache-type", "q3_k")
    assert code == 1
    assert "unknown KV cache type" in _one_error_line(err)


HOSTILE = "\x1b]0;owned\x07\x1b[2J\u202etxt.exe\u2066\u200b"
"""Terminal escapes (title, clear screen) and bidi / zero-width characters."""


def _raw_controls(text: str) -> list[str]:
    return [c for c in text if not c.isprintable() and c != "\n"]


def test_inspect_escapes_control_and_bidi_characters(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = write_model(tmp_path / f"m{HOSTILE}.gguf", name=f"model{HOSTILE}")
    code, out, err = run(capsys, "inspect", str(model))
    assert code == 0, err
    assert _raw_controls(out) == []
    assert "\\x1b]0;owned\\x07" in out
    assert "\\u202etxt.exe" in out

    bad = tmp_path / f"bad{HOSTILE}.gguf"
    bad.write_bytes(b"not a model at all")
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 1
    assert _raw_controls(err) == []
    assert "not a GGUF model file" in _one_error_line(err)


def test_models_module_imports_only_argparse() -> None:
    code = (
        "import sys, json; import llama_proc._cli.models, llama_proc._cli.maintain; "
        "heavy = ['huggingface_hub', 'gguf', 'numpy', 'requests', 'llama_proc.provision', "
        "'llama_proc.config']; print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
