"""The import graph, read from the source (ast, every import statement, function-level ones included):
app -> runtime and bench / train -> runtime, app only through runtime/__init__.py, no cycles in bench/
and runtime/, and no test module importing another (shared helpers live in non-test_ modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("runtime", "app", "bench", "train", "tests")


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, resolved to repository module names where they
    are ours: relative imports against the package, a script folder's bare `import tasks` (train/, tests/
    put themselves on sys.path) against the folder, `from pkg import sub` to pkg.sub when sub is a module."""
    here = path.parent
    script_dir = not (here / "__init__.py").is_file()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]

    def resolve(name: str) -> str:
        if script_dir and (here / f"{name.split('.')[0]}.py").is_file():
            return f"{_module_name(here)}.{name}"
        return name

    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(resolve(a.name), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = resolve(node.module)
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            out += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                out.append((target, node.lineno))
    return out


def _files(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


GRAPH = {top: {_module_name(p): (p, imports(p)) for p in _files(top)} for top in TOPS}


def _violations(top: str, bad) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for mod, (path, deps) in GRAPH[top].items()
            for name, line in deps if bad(name)]


def _top(name: str) -> str:
    return name.split(".")[0]


def test_runtime_imports_nothing_above_it():
    assert _violations("runtime", lambda n: _top(n) in ("app", "bench", "train", "tests")) == []


@pytest.mark.parametrize("top", ["bench", "train"])
def test_bench_and_train_import_the_runtime_only(top):
    others = {"app", "bench", "train", "tests"} - {top}
    assert _violations(top, lambda n: _top(n) in others) == []


def test_app_imports_the_runtime_only_through_its_package():
    """app -> runtime only, and only `import runtime` / `from runtime import X` (runtime/__init__.py's API,
    where a few whole modules are API too: runtime.MODULES)."""
    import runtime

    api = {"runtime"} | {f"runtime.{m}" for m in runtime.MODULES}
    assert _violations("app", lambda n: _top(n) in ("bench", "train", "tests")
                       or (_top(n) == "runtime" and n not in api)) == []


def test_no_test_module_imports_another():
    def is_test_module(n):
        return _top(n) == "tests" and n.rpartition(".")[2].startswith("test_")

    assert _violations("tests", is_test_module) == []


def _cycles(nodes: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the graphs here are a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in nodes[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in nodes[v]:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_bench_and_runtime():
    mods = {m: deps for top in ("bench", "runtime") for m, (_, deps) in GRAPH[top].items()}
    nodes = {m: {n for n, _ in deps if n in mods} for m, deps in mods.items()}
    assert _cycles(nodes) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("modules", ["app.inspector_view, app.errors", "app.analysis, app.render, app.views"])
def test_pure_app_modules_import_neither_gradio_nor_torch(modules):
    """The view-models test without gradio or a model: importing them pulls in neither, and of the runtime
    only its package and the pure figures."""
    import subprocess
    import sys

    code = (f"import sys; import {modules}; "
            "bad = {'gradio', 'torch'} & set(sys.modules); assert not bad, bad; "
            "rt = {m for m in sys.modules if m.split('.')[0] == 'runtime'}; "
            "assert rt <= {'runtime', 'runtime.figures', 'runtime.errors'}, rt")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
