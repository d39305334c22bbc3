"""Settings: env table tests, precedence, config-settings, and documentation completeness."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from llama_proc import config
from llama_proc.config import ENV_PREFIX, Settings, default_cache_dir, parse_bool
from llama_proc.errors import ConfigError

BASE = {"LLAMA_PROC_CACHE_DIR": "/tmp/llama-proc-test-cache"}


def _env(**values: str) -> dict[str, str]:
    return {**BASE, **{ENV_PREFIX + k: v for k, v in values.items()}}


def test_defaults() -> None:
    s = Settings.from_env(env={})
    assert s.cache_dir == default_cache_dir()
    assert (s.variant, s.build, s.prefer) == ("auto", None, "prebuilt")
    assert (s.no_build, s.no_prebuilt, s.offline) == (False, False, False)
    assert (s.server_binary, s.mirror, s.build_source, s.cuda_arch, s.jobs) == (None,) * 5
    assert s.index_url == "https://pypi.org/simple"
    assert (s.download_timeout, s.lock_timeout) == (60.0, 3600.0)
    assert s.progress is None
    assert s.github_token is None


@pytest.mark.parametrize(
    ("var", "raw", "field", "expected"),
    [
        pytest.param("CACHE_DIR", "/srv/cache", "cache_dir", Path("/srv/cache"), id="cache-dir"),
        pytest.param("VARIANT", " CUDA ", "variant", "cuda", id="variant-normalised"),
        pytest.param("VARIANT", "rpc", "variant", "rpc", id="variant-rpc"),
        pytest.param("BUILD", "11434", "build", "b11434", id="build-bare-number"),
        pytest.param("BUILD", "b0042", "build", "b42", id="build-leading-zeros"),
        pytest.param("PREFER", "Source", "prefer", "source", id="prefer"),
        pytest.param("NO_BUILD", "yes", "no_build", True, id="no-build-yes"),
        pytest.param("NO_PREBUILT", "ON", "no_prebuilt", True, id="no-prebuilt-on"),
        pytest.param("SERVER_BIN", "/opt/llama/llama-server", "server_binary",
                     Path("/opt/llama/llama-server"), id="server-bin"),
        pytest.param("OFFLINE", "1", "offline", True, id="offline-1"),
        pytest.param("OFFLINE", "false", "offline", False, id="offline-false"),
        pytest.param("MIRROR", "https://mirror.example/gh/", "mirror",
                     "https://mirror.example/gh", id="mirror-trailing-slash"),
        pytest.param("MIRROR", "file:///srv/mirror", "mirror", "file:///srv/mirror", id="mirror-file"),
        pytest.param("INDEX_URL", "http://127.0.0.1:8080/simple/", "index_url",
                     "http://127.0.0.1:8080/simple", id="index-url"),
        pytest.param("BUILD_SOURCE", " index ", "build_source", "index", id="build-source"),
        pytest.param("CUDA_ARCH", "86;90", "cuda_arch", "86;90", id="cuda-arch"),
        pytest.param("JOBS", "4", "jobs", 4, id="jobs"),
        pytest.param("DOWNLOAD_TIMEOUT", "2.5", "download_timeout", 2.5, id="download-timeout"),
        pytest.param("LOCK_TIMEOUT", "10", "lock_timeout", 10.0, id="lock-timeout"),
        pytest.param("PROGRESS", "off", "progress", False, id="progress-off"),
        pytest.param("PROGRESS", "t", "progress", True, id="progress-t"),
        pytest.param("GITHUB_TOKEN", "ghp_secret", "github_token", "ghp_secret", id="token"),
    ],
)  # fmt: skip
def test_env_table(var: str, raw: str, field: str, expected: object) -> None:
    assert getattr(Settings.from_env(env=_env(**{var: raw})), field) == expected


def test_home_is_expanded() -> None:
    s = Settings.from_env(env={"LLAMA_PROC_CACHE_DIR": "~/c", "LLAMA_PROC_SERVER_BIN": "~/b"})
    assert s.cache_dir == Path.home() / "c"
    assert s.server_binary == Path.home() / "b"


def test_empty_values_mean_unset() -> None:
    s = Settings.from_env(env=_env(VARIANT="", JOBS="  ", MIRROR=""))
    assert (s.variant, s.jobs, s.mirror) == ("auto", None, None)


def test_token_is_not_in_repr() -> None:
    settings = Settings.from_env(env=_env(GITHUB_TOKEN="ghp_secret"))  # noqa: S106
    assert "ghp_secret" not in repr(settings)


@pytest.mark.parametrize(
    ("var", "raw", "mentions"),
    [
        pytest.param("VARIANT", "tpu", ["LLAMA_PROC_VARIANT", "cuda"], id="variant"),
        pytest.param("BUILD", "newest", ["LLAMA_PROC_BUILD", "b1234"], id="build"),
        pytest.param("PREFER", "wheel", ["LLAMA_PROC_PREFER", "prebuilt"], id="prefer"),
        pytest.param("NO_BUILD", "maybe", ["LLAMA_PROC_NO_BUILD", "true/false"], id="bool"),
        pytest.param("JOBS", "many", ["LLAMA_PROC_JOBS", "integer"], id="jobs-text"),
        pytest.param("JOBS", "0", ["jobs", "at least 1"], id="jobs-zero"),
        pytest.param("DOWNLOAD_TIMEOUT", "soon", ["LLAMA_PROC_DOWNLOAD_TIMEOUT"], id="timeout-text"),
        pytest.param("LOCK_TIMEOUT", "-1", ["lock_timeout", "positive"], id="timeout-negative"),
        pytest.param("MIRROR", "ftp://x", ["LLAMA_PROC_MIRROR", "http"], id="mirror-scheme"),
        pytest.param("INDEX_URL", "pypi.org/simple", ["LLAMA_PROC_INDEX_URL"], id="index-scheme"),
    ],
)  # fmt: skip
def test_invalid_values_say_what_is_wrong(var: str, raw: str, mentions: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env=_env(**{var: raw}))
    for text in mentions:
        assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_no_build_and_no_prebuilt_conflict() -> None:
    with pytest.raises(ConfigError, match="no way to provision"):
        Settings.from_env(env=_env(NO_BUILD="1", NO_PREBUILT="1"))


def test_overrides_win_and_none_is_ignored() -> None:
    env = _env(VARIANT="cuda", JOBS="8", OFFLINE="1")
    s = Settings.from_env(env=env, variant="cpu", jobs=None, offline=False)
    assert (s.variant, s.jobs, s.offline) == ("cpu", 8, False)
    assert Settings.from_env(env=env, cache_dir="/x").cache_dir == Path("/x")


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="colour"):
        Settings.from_env(env=BASE, colour="blue")


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_PROC_VARIANT", "vulkan")
    assert Settings.from_env().variant == "vulkan"


def test_replace_validates_again() -> None:
    s = Settings.from_env(env=BASE)
    assert s.replace(jobs=2).jobs == 2
    with pytest.raises(ConfigError):
        s.replace(jobs=0)
    with pytest.raises(ConfigError):
        s.replace(variant="tpu")


def test_settings_are_frozen() -> None:
    s = Settings.from_env(env=BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.variant = "cpu"  # type: ignore[misc]


def test_from_config_settings() -> None:
    s = Settings.from_config_settings(
        {
            "llama-proc.variant": "cuda",
            "llama-proc.cuda-arch": "90",
            "llama-proc.no-build": "1",
            "llama-proc.build": ["b1", "b11434"],  # repeated -C: the last one wins
            "llama-proc.source": "prebuilt",  # backend-only key, read by the backend
            "wheel.py-api": "py3",  # another tool's key
        },
        env=_env(VARIANT="cpu", JOBS="3"),
    )
    assert (s.variant, s.cuda_arch, s.no_build, s.build, s.jobs) == (
        "cuda",
        "90",
        True,
        "b11434",
        3,
    )


def test_unknown_config_setting_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_config_settings({"llama-proc.varaint": "cuda"}, env=BASE)
    assert "llama-proc.varaint" in str(info.value)
    assert "variant" in str(info.value)
    assert "cuda-arch" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("y", True), ("t", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False), ("n", False)],
)  # fmt: skip
def test_parse_bool(raw: str, expected: bool) -> None:
    assert parse_bool("X", raw) is expected


def test_parse_bool_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match="X='2'"):
        parse_bool("X", "2")


# ----------------------------------------------------------------------------- documentation
def _field_docstrings() -> dict[str, str]:
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    docs: dict[str, str] = {}
    for node, following in zip(cls.body, [*cls.body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                doc = following.value.value
            docs[node.target.id] = doc
    return docs


def test_every_field_is_documented_with_its_env_var() -> None:
    docs = _field_docstrings()
    table = config.__doc__ or ""
    fields = dataclasses.fields(Settings)
    assert set(docs) == {f.name for f in fields}
    for f in fields:
        var = ENV_PREFIX + f.metadata["env"]
        assert docs[f.name].strip(), f"Settings.{f.name} has no docstring"
        assert var in docs[f.name], f"Settings.{f.name}'s docstring does not name {var}"
        assert var in table, f"{var} is missing from the config module's table"


def test_every_field_can_be_set_from_the_environment() -> None:
    samples: dict[str, tuple[str, Any]] = {
        "path": ("/p", Path("/p")),
        "str": ("s", "s"),
        "bool": ("1", True),
        "int": ("2", 2),
        "float": ("3", 3.0),
        "url": ("http://u", "http://u"),
        "backend": ("metal", "metal"),
        "prefer": ("source", "source"),
        "build": ("b7", "b7"),
        "cpu_groups": ("AMX, avx2", ("amx", "avx2")),
    }
    for f in dataclasses.fields(Settings):
        raw, value = samples[f.metadata["parse"]]
        env = {**BASE, ENV_PREFIX + f.metadata["env"]: raw}
        assert getattr(Settings.from_env(env=env), f.name) == value, f.name


def test_table_names_no_variable_that_does_not_exist() -> None:
    known = {ENV_PREFIX + f.metadata["env"] for f in dataclasses.fields(Settings)}
    known |= set(config.BACKEND_ENV_VARS)
    table = config.__doc__ or ""
    named = {w for w in table.split() if w.startswith(ENV_PREFIX)}
    assert named <= known, named - known


def test_backend_is_the_deprecated_name_of_variant(tmp_path: Path) -> None:
    """`--variant` is the user's word, so the setting is `variant`; the old name still works."""
    with pytest.warns(DeprecationWarning, match="Settings.variant"):
        s = Settings(cache_dir=tmp_path, backend="cpu")  # type: ignore[call-arg]
    assert s.variant == "cpu"
    with pytest.warns(DeprecationWarning, match="Settings.variant"):
        assert s.backend == "cpu"  # type: ignore[attr-defined]
    with pytest.warns(DeprecationWarning, match="Settings.variant"):
        assert s.replace(backend="vulkan").variant == "vulkan"
    with pytest.warns(DeprecationWarning, match="Settings.variant"):
        assert Settings.from_env(env={}, cache_dir=tmp_path, backend="rocm").variant == "rocm"
    assert (
        Settings.from_env(env={"LLAMA_PROC_VARIANT": "metal"}, cache_dir=tmp_path).variant
        == "metal"
    )
