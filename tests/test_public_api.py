from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_proc
import llama_proc.provision
import llama_proc.runtime


def test_all_is_sorted():
    for module in (llama_proc, llama_proc.provision, llama_proc.runtime):
        names = list(module.__all__)
        assert names == sorted(names), module.__name__


def test_all_imports_are_exported():
    for module in (llama_proc, llama_proc.provision, llama_proc.runtime):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_public_errors_share_one_root():
    for name in llama_proc.__all__:
        if name.endswith("Error"):
            assert issubclass(getattr(llama_proc, name), llama_proc.LlamaProcError)


def test_import_is_cheap_and_side_effect_free(tmp_path):
    code = (
        "import sys, llama_proc, llama_proc.provision, llama_proc.runtime, llama_proc.cli\n"
        "heavy = [m for m in ('requests', 'tqdm', 'aiohttp', 'filelock', 'platformdirs', "
        "'urllib3') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == []


def test_cli_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llama_proc", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("fetch", "build", "which", "list", "doctor", "serve", "cache", "rpc-worker"):
        assert command in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "llama_proc.cli" in imported
    assert not imported & {"requests", "aiohttp", "tqdm", "urllib3"}


def test_proxy_exports_resolve_after_the_module_renames():
    import llama_proc.proxy

    names = list(llama_proc.proxy.__all__)
    assert names == sorted(names)
    for name in names:
        assert getattr(llama_proc.proxy, name) is not None, name


def test_no_two_library_modules_share_a_name():
    # llama_proc.config vs proxy.config, runtime.flags vs proxy.flags said two things at once.
    # Command modules (_cli) are named after their commands and stay out of this.
    # A module that moved keeps a deprecated alias at its old path for a release.
    root = Path(llama_proc.__file__).parent
    aliases = {root / "runtime" / "gguf_info.py"}
    seen: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or "_cli" in path.parts or path in aliases:
            continue
        assert path.name not in seen, f"{path} and {seen[path.name]} share a name"
        seen[path.name] = path


def test_import_installs_only_a_null_handler():
    code = (
        "import logging, llama_proc\n"
        "log = logging.getLogger('llama_proc')\n"
        "print([type(h).__name__ for h in log.handlers], logging.getLogger().handlers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['NullHandler'] []"
