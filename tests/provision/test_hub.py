"""Model references and fetching through huggingface_hub, against a loopback fake hub.

The fake hub (tests/helpers/fake_hub.py) speaks the Hub's API shapes and serves the real
SmolLM2 GGUF. The split model is the real file's bytes cut into three ranges under llama.cpp's
``-0000N-of-00003`` names: it checks that every part is fetched, in order, byte for byte (the
parts are not separately loadable GGUF files).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from fake_hub import FakeHub, sha256_of

from llama_proc.config import Settings
from llama_proc.errors import DownloadError, ModelFileError, OfflineError, ProvisionError
from llama_proc.models.choose import choose_files
from llama_proc.models.hub import fetch_model
from llama_proc.models.model_ref import ModelFiles, ModelRef

REPO = "unsloth/SmolLM2-135M-Instruct-GGUF"
REAL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBPROCESS_TIMEOUT = 120
GOOD_TOKEN = "hf_good"
OTHER_TOKEN = "hf_other"


# -- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("org/repo", ModelRef("org/repo"), id="repo"),
        pytest.param("org/repo:q4_k_m", ModelRef("org/repo", quant="Q4_K_M"), id="quant-lower"),
        pytest.param("org/Repo-GGUF:Q8_0", ModelRef("org/Repo-GGUF", quant="Q8_0"), id="quant"),
        pytest.param(
            "org/repo:Q4_K_M@v1.0",
            ModelRef("org/repo", quant="Q4_K_M", revision="v1.0"),
            id="quant-then-rev",
        ),
        pytest.param(
            "org/repo@v1.0:Q4_K_M",
            ModelRef("org/repo", quant="Q4_K_M", revision="v1.0"),
            id="rev-then-quant",
        ),
        pytest.param(
            "org/repo@refs/pr/3", ModelRef("org/repo", revision="refs/pr/3"), id="pr-revision"
        ),
        pytest.param(
            "hf://org/repo/sub/m.Q4_1.gguf", ModelRef("org/repo", file="sub/m.Q4_1.gguf"), id="hf"
        ),
        pytest.param(
            "hf://org/repo/m.gguf@abc123",
            ModelRef("org/repo", file="m.gguf", revision="abc123"),
            id="hf-trailing-rev",
        ),
        pytest.param(
            "hf://org/repo@refs%2Fpr%2F1/m.gguf",
            ModelRef("org/repo", file="m.gguf", revision="refs/pr/1"),
            id="hf-uri-rev",
        ),
        pytest.param("hf://org/repo:Q4_0", ModelRef("org/repo", quant="Q4_0"), id="hf-repo"),
        pytest.param(
            "https://huggingface.co/org/repo/resolve/main/m.Q4_1.gguf?download=true",
            ModelRef("org/repo", file="m.Q4_1.gguf", revision="main"),
            id="resolve-link",
        ),
        pytest.param(
            "https://huggingface.co/org/repo/blob/v2/dir/m.gguf",
            ModelRef("org/repo", file="dir/m.gguf", revision="v2"),
            id="blob-link",
        ),
        pytest.param("https://huggingface.co/org/repo", ModelRef("org/repo"), id="page-link"),
        pytest.param("model.gguf", None, id="file"),
        pytest.param("models/m.Q4_1.gguf", None, id="relative-gguf"),
        pytest.param("/abs/org/repo", None, id="absolute"),
        pytest.param("./org/repo", None, id="dot-relative"),
        pytest.param("~/m", None, id="home"),
        pytest.param("C:\\models\\m.gguf", None, id="windows"),
        pytest.param("https://example.com/m.gguf", None, id="other-url"),
    ],
)
def test_parse(text: str, expected: ModelRef | None) -> None:
    assert ModelRef.parse(text) == expected


def test_an_existing_path_wins_over_a_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert ModelRef.parse("org/repo:Q4_0") == ModelRef("org/repo", quant="Q4_0")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo:Q4_0").write_bytes(b"GGUF")
    assert ModelRef.parse("org/repo:Q4_0") is None


@pytest.mark.parametrize(
    "text",
    [
        "org/repo",
        "org/repo:Q4_K_M",
        "org/repo:Q4_K_M@v1",
        "org/repo@refs/pr/1",
        "hf://org/repo/dir/m.gguf",
        "hf://org/repo/dir/m.gguf@refs/pr/1",
    ],
)
def test_str_parses_back(text: str) -> None:
    ref = ModelRef.parse(text)
    assert ref is not None
    assert ModelRef.parse(str(ref)) == ref


def test_a_name_too_long_for_the_os_is_not_a_path() -> None:
    assert ModelRef.parse("org/" + "r" * 5000) == ModelRef("org/" + "r" * 5000)


@pytest.mark.parametrize(
    "text",
    ["hf://org", "hf://org/repo/README.md", "https://huggingface.co/org", "org/repo@a:Q4@b"],
)
def test_malformed_references_are_one_line_errors(text: str) -> None:
    with pytest.raises(ModelFileError) as info:
        ModelRef.parse(text)
    assert "\n" not in str(info.value)


# -- choosing files -----------------------------------------------------------------------------

NAMES = [
    "README.md",
    "m-IQ4_XS.gguf",
    "m-Q2_K.gguf",
    "m-Q8_0.gguf",
    "m-Q4_K_M.gguf",
    "m-imatrix.gguf",
    "mmproj-BF16.gguf",
    "mmproj-F16.gguf",
    "mmproj-Q8_0.gguf",
    "big/m-Q6_K-00002-of-00002.gguf",
    "big/m-Q6_K-00001-of-00002.gguf",
]


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        pytest.param(None, ("m-Q4_K_M.gguf",), id="default-Q4_K_M"),
        pytest.param("q8_0", ("m-Q8_0.gguf",), id="case-insensitive"),
        pytest.param("Q6_K", ("big/m-Q6_K-00001-of-00002.gguf", "big/m-Q6_K-00002-of-00002.gguf")),
        pytest.param("IQ4_XS", ("m-IQ4_XS.gguf",)),
    ],
)
def test_choose_quant(quant: str | None, expected: tuple[str, ...]) -> None:
    parts, mmproj = choose_files(ModelRef("o/r", quant=quant), NAMES)
    assert parts == expected
    assert mmproj is None


def test_default_falls_back_to_q8_0_then_the_first_model() -> None:
    names = ["m-Q2_K.gguf", "m-Q8_0.gguf", "mmproj-F16.gguf"]
    assert choose_files(ModelRef("o/r"), names)[0] == ("m-Q8_0.gguf",)
    assert choose_files(ModelRef("o/r"), ["z-F16.gguf", "mmproj-F16.gguf", "a-Q2_K.gguf"])[0] == (
        "a-Q2_K.gguf",
    )


def test_quant_does_not_match_inside_another_tag() -> None:
    with pytest.raises(ModelFileError, match="has: IQ4_0"):
        choose_files(ModelRef("o/r", quant="Q4_0"), ["m-IQ4_0.gguf"])


def test_missing_quant_lists_what_the_repo_has() -> None:
    with pytest.raises(ModelFileError) as info:
        choose_files(ModelRef("o/r", quant="Q5_K_M"), NAMES)
    text = str(info.value)
    assert "Q5_K_M" in text
    assert "IQ4_XS, Q2_K, Q4_K_M, Q8_0" in text.replace("Q6_K, ", "")
    assert "o/r:" in text
    assert "\n" not in text


def test_a_repo_without_gguf_files_says_so() -> None:
    with pytest.raises(ModelFileError, match="no GGUF model files"):
        choose_files(ModelRef("o/r"), ["model.safetensors", "config.json"])


def test_incomplete_split_is_refused() -> None:
    with pytest.raises(ModelFileError, match="missing part 2 of 3"):
        choose_files(ModelRef("o/r"), ["m-Q4_0-00001-of-00003.gguf", "m-Q4_0-00003-of-00003.gguf"])


def test_a_named_part_fetches_the_whole_split_model() -> None:
    ref = ModelRef("o/r", file="big/m-Q6_K-00002-of-00002.gguf")
    assert choose_files(ref, NAMES)[0] == (
        "big/m-Q6_K-00001-of-00002.gguf",
        "big/m-Q6_K-00002-of-00002.gguf",
    )


@pytest.mark.parametrize(
    ("quant", "names", "expected"),
    [
        pytest.param(None, NAMES, "mmproj-F16.gguf", id="f16-over-closer-bits"),
        pytest.param("Q8_0", NAMES, "mmproj-Q8_0.gguf", id="same-quant"),
        pytest.param(
            "Q4_K_M",
            ["m-Q4_K_M.gguf", "mmproj-Q8_0.gguf", "mmproj-F32.gguf"],
            "mmproj-Q8_0.gguf",
            id="closest-bits",
        ),
        pytest.param(
            "Q4_0",
            ["a/m-Q4_0.gguf", "a/mmproj-F32.gguf", "b/mmproj-F16.gguf"],
            "a/mmproj-F32.gguf",
            id="own-folder",
        ),
        pytest.param("Q4_0", ["m-Q4_0.gguf"], None, id="none"),
    ],
)
def test_choose_mmproj(quant: str | None, names: list[str], expected: str | None) -> None:
    assert choose_files(ModelRef("o/r", quant=quant), names, with_mmproj=True)[1] == expected


# -- fetching against the fake hub --------------------------------------------------------------


def _fetch(hub: FakeHub, cache: Path, ref: str, **kwargs: Any) -> ModelFiles:
    kwargs.setdefault("progress", False)
    return fetch_model(ref, cache_dir=cache, endpoint=hub.url, **kwargs)


def _blob_gets(hub: FakeHub) -> list[str]:
    return [h.path for h in hub.storage.log if h.method == "GET"]


def test_quant_tag_fetches_the_real_model(hub: FakeHub, hf_cache: Path, smol_model: Path) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model, "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF-q8"})
    done: list[tuple[int, int]] = []

    files = _fetch(hub, hf_cache, f"{REPO}:q4_1", on_progress=lambda d, t: done.append((d, t)))

    assert files.model.name == REAL_NAME
    assert files.parts == (files.model,)
    assert files.mmproj is None
    assert files.model.is_relative_to(hf_cache)
    assert sha256_of(files.model) == sha256_of(smol_model)
    assert _blob_gets(hub) == [hub.blob_path(REPO, REAL_NAME)]
    size = smol_model.stat().st_size
    assert done[-1] == (size, size)


def test_a_second_fetch_is_a_cache_hit(hub: FakeHub, hf_cache: Path, smol_model: Path) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    first = _fetch(hub, hf_cache, REPO)
    again = _fetch(hub, hf_cache, f"{REPO}:Q4_1")
    assert again == first
    assert len(_blob_gets(hub)) == 1


def test_revision_fetches_that_revisions_files(hub: FakeHub, hf_cache: Path) -> None:
    old = hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF old"}, revision="v1")
    new = hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF new", "m-Q8_0.gguf": b"GGUF 8"})

    at_tag = _fetch(hub, hf_cache, "org/m:Q4_0@v1")
    at_main = _fetch(hub, hf_cache, "org/m:Q4_0")
    at_commit = _fetch(hub, hf_cache, f"hf://org/m/m-Q4_0.gguf@{old}")

    assert at_tag.model.read_bytes() == b"GGUF old"
    assert at_tag.model.parent.name == old
    assert at_main.model.read_bytes() == b"GGUF new"
    assert at_main.model.parent.name == new
    assert at_commit.model == at_tag.model
    with pytest.raises(
        ModelFileError, match="has no GGUF file for quantization Q8_0; it has: Q4_0"
    ):
        _fetch(hub, hf_cache, "org/m:Q8_0@v1")
    with pytest.raises(ModelFileError, match="no revision 'v9'"):
        _fetch(hub, hf_cache, "org/m@v9")


def test_split_model_parts_are_all_fetched_in_order(
    hub: FakeHub, hf_cache: Path, smol_model: Path
) -> None:
    data = smol_model.read_bytes()
    third = len(data) // 3
    pieces = [data[:third], data[third : 2 * third], data[2 * third :]]
    names = [f"Q4_1/SmolLM2-135M-Instruct-Q4_1-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    hub.add_repo(REPO, {names[2]: pieces[2], names[0]: pieces[0], names[1]: pieces[1]})

    files = _fetch(hub, hf_cache, f"{REPO}:Q4_1")

    assert [p.name for p in files.parts] == [PurePosixPath(n).name for n in names]
    assert files.model == files.parts[0]
    assert b"".join(p.read_bytes() for p in files.parts) == data


def test_mmproj_is_fetched_when_asked(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo(
        "org/vision",
        {"v-Q4_K_M.gguf": b"GGUF m", "mmproj-F16.gguf": b"GGUF p16", "mmproj-Q8_0.gguf": b"p8"},
    )
    plain = _fetch(hub, hf_cache, "org/vision")
    assert plain.mmproj is None
    files = _fetch(hub, hf_cache, "org/vision", with_mmproj=True)
    assert files.model.read_bytes() == b"GGUF m"
    assert files.mmproj is not None
    assert files.mmproj.read_bytes() == b"GGUF p16"


def test_resume_after_a_dropped_connection(hub: FakeHub, hf_cache: Path, smol_model: Path) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    size = smol_model.stat().st_size
    cut = size // 3
    route = hub.blob_route(REPO, REAL_NAME)
    route.drop_after, route.drop_times = cut, 1

    files = _fetch(hub, hf_cache, f"{REPO}:Q4_1")

    assert sha256_of(files.model) == sha256_of(smol_model)
    gets = hub.storage.requests_for(hub.blob_path(REPO, REAL_NAME))
    assert len(gets) == 2
    assert gets[0].bytes_sent == cut
    # The client resumes from what it had written (whole chunks), at most the bytes it got.
    match = re.fullmatch(r"bytes=(\d+)-", gets[1].header("Range") or "")
    assert match is not None
    resumed_at = int(match.group(1))
    assert 0 < resumed_at <= cut
    assert gets[1].status == 206
    assert gets[1].bytes_sent == size - resumed_at


def test_gated_repo_asks_for_a_token(
    hub: FakeHub, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("org/gated", {"g-Q4_0.gguf": b"GGUF gated"}, gated=True, tokens=[GOOD_TOKEN])

    with pytest.raises(DownloadError) as info:
        _fetch(hub, hf_cache, "org/gated")
    text = str(info.value)
    assert "gated" in text
    assert "HF_TOKEN" in text
    assert "\n" not in text
    assert hub.hits("HEAD", "/resolve/")[-1].authorization is None

    with pytest.raises(DownloadError, match="token in use has no access"):
        _fetch(hub, hf_cache, "org/gated", token=OTHER_TOKEN)

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    files = _fetch(hub, hf_cache, "org/gated")
    assert files.model.read_bytes() == b"GGUF gated"
    assert hub.hits("HEAD", "/resolve/")[-1].authorization == f"Bearer {GOOD_TOKEN}"
    assert len(_blob_gets(hub)) == 1


def test_missing_and_private_repos(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo("org/private", {"p-Q4_0.gguf": b"GGUF"}, private=True, tokens=[GOOD_TOKEN])
    for ref in ("org/nothing", "org/private"):
        with pytest.raises(ModelFileError) as info:
            _fetch(hub, hf_cache, ref)
        assert f"no model repository {ref}" in str(info.value)
        assert "HF_TOKEN" in str(info.value)
    assert _fetch(hub, hf_cache, "org/private", token=GOOD_TOKEN).model.read_bytes() == b"GGUF"


def test_missing_quant_lists_available_and_downloads_nothing(
    hub: FakeHub, hf_cache: Path, smol_model: Path
) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model, "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF"})
    with pytest.raises(ModelFileError) as info:
        _fetch(hub, hf_cache, f"{REPO}:Q5_K_M")
    assert "it has: Q4_1, Q8_0" in str(info.value)
    assert hub.hits("HEAD") == []
    assert hub.storage.log == []


def test_missing_file(hub: FakeHub, hf_cache: Path) -> None:
    hub.add_repo("org/m", {"m-Q4_0.gguf": b"GGUF"})
    with pytest.raises(ModelFileError, match=r"no file other\.gguf; its GGUF files: m-Q4_0\.gguf"):
        _fetch(hub, hf_cache, "hf://org/m/other.gguf")


def test_not_enough_disk_space_is_refused_before_downloading(
    hub: FakeHub, hf_cache: Path, smol_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    real_usage = shutil.disk_usage
    seen: list[str] = []

    def tiny_disk(path: str | Path) -> Any:
        seen.append(str(path))
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr("shutil.disk_usage", tiny_disk)
    with pytest.raises(ProvisionError) as info:
        _fetch(hub, hf_cache, REPO)
    text = str(info.value)
    assert text.startswith(f"not enough disk space for {REPO}: 93.8 MiB to download")
    assert "HF_HUB_CACHE" in text
    assert seen
    assert hub.storage.log == []


def test_offline_reuses_the_cache(hub: FakeHub, hf_cache: Path, smol_model: Path) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model, "x.Q8_0.gguf": b"GGUF"})
    online = _fetch(hub, hf_cache, f"{REPO}:Q4_1")
    before = len(hub.log) + len(hub.storage.log)

    assert _fetch(hub, hf_cache, f"{REPO}:Q4_1", offline=True) == online
    settings = Settings(cache_dir=hf_cache.parent / "lp", offline=True)
    assert _fetch(hub, hf_cache, REPO, settings=settings) == online  # the only cached GGUF

    assert len(hub.log) + len(hub.storage.log) == before
    with pytest.raises(OfflineError, match=rf"offline and {REPO}:Q8_0 is not in .*\(cached: "):
        _fetch(hub, hf_cache, f"{REPO}:Q8_0", offline=True)
    with pytest.raises(OfflineError, match="offline and org/other is not in the Hugging Face"):
        _fetch(hub, hf_cache, "org/other", offline=True)


def test_unreachable_hub_falls_back_to_the_cache(
    hub: FakeHub, hf_cache: Path, smol_model: Path
) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    online = _fetch(hub, hf_cache, REPO)
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    assert fetch_model(REPO, cache_dir=hf_cache, endpoint=dead, progress=False) == online
    with pytest.raises(DownloadError, match=re.escape(f"cannot reach {dead} ")):
        fetch_model("org/other", cache_dir=hf_cache, endpoint=dead, progress=False)


def test_plain_path_comes_back_unchanged(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    assert fetch_model(str(model)) == ModelFiles(model=model, parts=(model,))


# -- through the environment, in fresh processes -----------------------------------------------

_PULL = textwrap.dedent(
    """
    import sys
    from llama_proc.models.hub import fetch_model
    print(fetch_model(sys.argv[1], progress=False).model)
    """
)


def _pull(hub: FakeHub, tmp_path: Path, ref: str, **env: str) -> subprocess.Popen[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    child_env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-env"), **env)
    return subprocess.Popen(
        [sys.executable, "-c", _PULL, ref],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, err
    return out.strip()


def test_env_endpoint_home_and_offline_are_honoured(
    hub: FakeHub, tmp_path: Path, smol_model: Path
) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    online = Path(_result(_pull(hub, tmp_path, f"{REPO}:Q4_1")))
    assert online.is_relative_to(tmp_path / "hf-env" / "hub")
    before = len(hub.log) + len(hub.storage.log)

    offline = _result(_pull(hub, tmp_path, f"{REPO}:Q4_1", HF_HUB_OFFLINE="1"))

    assert Path(offline) == online
    assert len(hub.log) + len(hub.storage.log) == before


def test_two_processes_pulling_at_once_download_once(
    hub: FakeHub, tmp_path: Path, smol_model: Path
) -> None:
    hub.add_repo(REPO, {REAL_NAME: smol_model})
    route = hub.blob_route(REPO, REAL_NAME)
    # Slow until both processes have asked for the file, so the second one has to wait on
    # the first one's lock rather than find a finished download.
    route.chunk_size, route.delay = 8 << 20, 1.0

    procs = [_pull(hub, tmp_path, REPO) for _ in range(2)]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while len(hub.hits("HEAD", "/resolve/")) < 2 or not hub.storage.log:
        assert time.monotonic() < deadline
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    overlapped = len(hub.storage.log) == 1 and not hub.storage.log[0].done.is_set()
    route.delay = 0.0
    paths = {_result(p) for p in procs}

    assert overlapped
    assert len(paths) == 1
    assert _blob_gets(hub) == [hub.blob_path(REPO, REAL_NAME)]
    assert hashlib.sha256(Path(paths.pop()).read_bytes()).hexdigest() == sha256_of(smol_model)
