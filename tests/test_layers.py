"""The layers take what they read: only the entry points take the whole ``Settings``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llama_proc.config import Settings
from llama_proc.provision.cache.locking import STAGING_MARK
from llama_proc.provision.cache.store import Cache

PACKAGE = Path(__file__).resolve().parents[1] / "llama_proc"

# The ladder (resolve.py) and these functions are where a command's settings come in; the cache
# memo keys on every setting by design. Everything else declares a view (provision.views).
ENTRY_MODULES = {"provision/resolve.py", "provision/cache/memo.py"}
ENTRY_FUNCTIONS = {
    "build_variant",
    "fetch_for_platform",
    "fetch_model",
    "obtain_source",
    "pin_release",
    "prune",
    "_default_source",
}


def _takers() -> list[str]:
    found = []
    for path in sorted((PACKAGE / "provision").rglob("*.py")) + sorted(
        (PACKAGE / "models").rglob("*.py")
    ):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ENTRY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for arg in node.args.args + node.args.kwonlyargs:
                shown = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if "Settings" in shown.split(" | ") and node.name not in ENTRY_FUNCTIONS:
                    found.append(f"{rel}:{node.lineno} {node.name}({arg.arg}: {shown})")
    return found


def test_only_entry_points_take_the_whole_settings() -> None:
    assert _takers() == []


def test_cache_object_names_every_folder_and_finds_leftovers(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", lock_timeout=5)
    cache = Cache.of(settings)
    assert (cache.cache_dir, cache.lock_timeout) == (settings.cache_dir, 5)
    assert cache.install_dir("b1", "linux-x86_64-cpu").parent == cache.servers / "b1"
    assert cache.folder("toolkits") == settings.cache_dir / "toolkits"
    with pytest.raises(ValueError, match="no cache folder"):
        cache.folder("../etc")
    staging = cache.servers / "b1" / f".linux-x86_64-cpu{STAGING_MARK}x"
    staging.mkdir(parents=True)
    part = cache.downloads / "a.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"12345")
    target = cache.install_dir("b1", "linux-x86_64-cpu")
    with cache.lock(target):
        left = cache.leftovers()
    assert left.staging == (staging,)
    assert left.parts == (part,)
    assert [p.name for p in left.locks] == ["linux-x86_64-cpu.lock"]
    sizes = {u.kind: u.size for u in cache.usage()}
    assert sizes["downloads"] == 5


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, type-only and function-level imports included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != module}


def test_no_import_cycle_type_only_imports_included() -> None:
    paths = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        paths[name.removesuffix(".__init__")] = path
    graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
    # A package's __init__ names its members for lazy loading; an edge into it is not a cycle.
    packages = {m for m, p in paths.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node] - packages):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
