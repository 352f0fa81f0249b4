"""The layering, read from the imports: no two modules import each other, layers point down, bench/ and tests/ stay apart.

Every `import` and `from ... import` counts, wherever it is: at module level, inside a function,
under `if TYPE_CHECKING:`, relative or absolute. Importing a submodule is an edge to that module
only (not to the packages above it, which Python also runs).

The runtime's layers, low to high (a module may import its own layer and those below):
  0 top-level helpers: runtime/__init__, constants, errors, extras, utf8, yaml_schema, console
  1 runtime.audio
  2 runtime.core, runtime.network (the network endpoint: protocol, Ogg/Opus, jitter buffer)
  3 runtime.backends, runtime.update
  4 runtime.play, runtime.service
  5 runtime.cli
`export` (and any other package beside `runtime`) may import `runtime`; `runtime` imports none of
them. Nothing under src/ imports tests/ or bench/, and bench/ and tests/ do not import each other
by name (through sys.path); a test may load a bench script from its file to test it.
To see the edges yourself: `python tests/test_layering.py` prints them, `... pairs` the cycles.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TOP = "personaplex_edge"
RUNTIME = f"{TOP}.runtime"

# (rank, the modules it holds: each name and everything under it); the runtime package is rank 0
LAYERS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (0, tuple(f"{RUNTIME}.{m}" for m in ("constants", "errors", "extras", "utf8", "yaml_schema",
                                         "console"))),
    (1, (f"{RUNTIME}.audio",)),
    (2, (f"{RUNTIME}.core", f"{RUNTIME}.network")),
    (3, (f"{RUNTIME}.backends", f"{RUNTIME}.update")),
    (4, (f"{RUNTIME}.play", f"{RUNTIME}.service")),
    (5, (f"{RUNTIME}.cli",)),
)

# Imports that break a rule today and are known, each with why it is left: (importer, imported).
# Remove an entry once the import is gone (the tests below fail on an entry that no longer holds).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
KNOWN_PAIRS: dict[tuple[str, str], str] = {}


# -- reading the imports -------------------------------------------------------------------

def module_name(path: Path, base: Path = SRC) -> str:
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every dotted name an import in `tree` names, with its line: `a.b` for `import a.b` and for
    `from a import b` (b may be a submodule or a name in a; the longest known prefix decides).
    Relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            for alias in node.names:
                yield (base if alias.name == "*" else f"{base}.{alias.name}"), node.lineno


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def src_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / TOP).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` loads last (longest known prefix), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports: first line}, over everything under src/."""
    modules = src_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for dotted, line in imported_names(parse(path), name, path.name == "__init__.py"):
            target = _resolve(dotted, modules)
            if target is not None and target != name:
                edges[target] = min(line, edges.get(target, line))
        graph[name] = edges
    return graph


def _layer(module: str) -> int | None:
    if module == RUNTIME:
        return 0
    for rank, names in LAYERS:
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    return None


def _where(module: str, line: int) -> str:
    return f"{src_modules()[module].relative_to(ROOT)}:{line}"


# -- the rules -------------------------------------------------------------------------------

def test_the_walk_sees_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import a.b\n"
        "from . import sibling\n"
        "from ..up import thing\n"
        "if TYPE_CHECKING:\n"
        "    from c import D\n"
        "def f():\n"
        "    import e\n"
        "class K:\n"
        "    def m(self):\n"
        "        from f.g import h\n"
    )
    names = {n for n, _ in imported_names(ast.parse(source), "p.q.mod", is_package=False)}
    assert names == {"typing.TYPE_CHECKING", "a.b", "p.q.sibling", "p.up.thing",
                     "c.D", "e", "f.g.h"}
    graph = import_graph()
    assert len(graph) > 100
    # a function-level import is an edge like any other
    assert f"{RUNTIME}.backends.tensorrt.device" in graph[f"{RUNTIME}.service.check"]


def _pairs(graph: dict[str, dict[str, int]]) -> dict[tuple[str, str], str]:
    found = {}
    for a, edges in graph.items():
        for b, line in edges.items():
            if a < b and a in graph.get(b, {}):
                found[(a, b)] = f"{_where(a, line)} imports {b}, {_where(b, graph[b][a])} imports {a}"
    return found


def test_no_two_modules_import_each_other() -> None:
    pairs = _pairs(import_graph())
    unknown = [why for pair, why in pairs.items() if pair not in KNOWN_PAIRS]
    assert not unknown, "modules importing each other:\n" + "\n".join(unknown)
    stale = [pair for pair in KNOWN_PAIRS if pair not in pairs]
    assert not stale, f"KNOWN_PAIRS lists pairs that no longer import each other: {stale}"


def test_every_runtime_module_has_a_layer() -> None:
    loose = [m for m in src_modules() if m.startswith(RUNTIME) and _layer(m) is None]
    assert not loose, f"runtime modules in no layer (add them to LAYERS, or move them): {loose}"


def test_runtime_layers_point_down() -> None:
    graph = import_graph()
    upward = {}
    for a, edges in graph.items():
        if not a.startswith(RUNTIME) or _layer(a) is None:
            continue
        for b, line in edges.items():
            if not b.startswith(RUNTIME + ".") and b != RUNTIME:
                upward[(a, b)] = f"{_where(a, line)}: {a} imports {b}, outside the runtime"
            elif (_layer(b) or 0) > (_layer(a) or 0):
                upward[(a, b)] = (f"{_where(a, line)}: {a} (layer {_layer(a)}) imports {b} "
                                  f"(layer {_layer(b)})")
    unknown = [why for edge, why in upward.items() if edge not in KNOWN_UPWARD]
    assert not unknown, "imports pointing up:\n" + "\n".join(unknown)
    stale = [edge for edge in KNOWN_UPWARD if edge not in upward]
    assert not stale, f"KNOWN_UPWARD lists imports that are gone: {stale}"


def test_the_namespace_root_imports_nothing_of_ours() -> None:
    assert import_graph()[TOP] == {}


def _script_names(folder: Path) -> set[str]:
    """What a module in `folder` is imported as once the folder is on sys.path."""
    return {folder.name} | {p.stem for p in folder.glob("*.py")} | {
        p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def _imports_by_name(files: list[Path], names: set[str]) -> list[str]:
    found = []
    for path in files:
        for dotted, line in imported_names(parse(path), path.stem, is_package=False):
            if dotted.split(".")[0] in names:
                found.append(f"{path.relative_to(ROOT)}:{line}: {dotted}")
    return sorted(set(found))


def _sys_path_edits(files: list[Path], folder: str) -> list[str]:
    """Edits of sys.path (insert, append, extend, assignment) whose arguments name `folder`."""
    found = []
    for path in files:
        for node in ast.walk(parse(path)):
            touched: ast.AST | None = None
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and ast.unparse(node.func.value) == "sys.path"):
                touched = node
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(ast.unparse(t).startswith("sys.path") for t in targets):
                    touched = node
            if touched is not None and any(isinstance(c, ast.Constant) and c.value == folder
                                           for c in ast.walk(touched)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(touched)}")
    return found


def test_src_never_imports_tests_or_bench() -> None:
    names = _script_names(ROOT / "tests") | _script_names(ROOT / "bench") | {"conftest"}
    files = sorted((SRC / TOP).rglob("*.py"))
    assert not _imports_by_name(files, names)
    assert not _sys_path_edits(files, "tests") + _sys_path_edits(files, "bench")


def test_bench_and_tests_do_not_import_each_other_through_sys_path() -> None:
    bench, tests = sorted((ROOT / "bench").rglob("*.py")), sorted((ROOT / "tests").rglob("*.py"))
    found = (_imports_by_name(bench, _script_names(ROOT / "tests"))
             + _imports_by_name(tests, _script_names(ROOT / "bench"))
             + _sys_path_edits(bench, "tests") + _sys_path_edits(tests, "bench"))
    assert not found, "bench/ and tests/ import each other:\n" + "\n".join(found)


if __name__ == "__main__":  # the edges, or with `pairs` the modules importing each other
    g = import_graph()
    if sys.argv[1:] == ["pairs"]:
        print("\n".join(_pairs(g).values()) or "none")
    else:
        for a in sorted(g):
            for b, line in sorted(g[a].items()):
                print(f"{_where(a, line)}: {a} -> {b}")
    sys.exit(0)
