"""The package's layering: every module imports on its own, library code never imports the command line
(`jlora.cli`), ``import jlora`` does not pull in torch, and module-level imports among jlora modules form no
cycle.

Imports are checked in one fresh interpreter that imports ``jlora`` once and then forks a child per module
(no thread is running at that point, and no JAX backend is initialized), so each module is imported exactly as
``python -c "import jlora.X"`` would: the package ``__init__`` first, then the module, with nothing else
loaded. Where ``fork`` is unavailable or unsafe, every module gets its own ``python -c`` instead (slower).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "jlora"
# The modules allowed to import jlora.cli: the command itself (and ``python -m jlora``, should it appear).
CLI_MODULES = {"jlora.cli", "jlora.__main__"}


def _discover() -> Dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the package (packages as their ``__init__``)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        out[".".join(parts)] = path
    return out


MODULES = _discover()


# ---------------------------------------------------------------------------------------------------------------
# Static: the import graph from each file's AST
# ---------------------------------------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, module_level: bool) -> List[ast.stmt]:
    """The import statements of a file. ``module_level``: only those that run when the module is imported
    (not inside a function body, not under ``if TYPE_CHECKING:``); class bodies do run, so they count."""
    out: List[ast.stmt] = []

    def visit(nodes):
        for n in nodes:
            if module_level and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.append(n)
                continue
            if module_level and isinstance(n, ast.If) and _is_type_checking(n.test):
                visit(n.orelse)
                continue
            visit(list(ast.iter_child_nodes(n)))

    visit(tree.body)
    return out


def _targets(node: ast.stmt, module: str) -> Set[str]:
    """The jlora modules an import statement names (``from jlora import tree`` -> ``jlora.tree``; a name that is
    not a module -> the module it comes from). Parent packages imported implicitly are not counted."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph(module_level: bool = True) -> Dict[str, Set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = set().union(*(_targets(n, module) for n in _import_nodes(tree, module_level))) - {module}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    sccs: List[Set[str]] = []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sccs:  # a shortest cycle through the component's first member, by breadth-first search
        start = min(comp)
        prev = {start: None}
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & comp):
                if w == start:
                    found = v
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return cycles


def test_graph_helpers_find_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    tree = ast.parse("import jlora.tree\nfrom jlora import kernels\ndef f():\n    import jlora.cli\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jlora import train\n")
    assert [_targets(n, "jlora.model") for n in _import_nodes(tree, True)] == [{"jlora.tree"}, {"jlora.kernels"},
                                                                                  set()]
    assert {"jlora.cli", "jlora.train"} <= set().union(*(_targets(n, "jlora.model")
                                                         for n in _import_nodes(tree, False)))


def test_no_import_cycles_at_module_level():
    cycles = find_cycles(import_graph(module_level=True))
    assert not cycles, "module-level import cycles among jlora modules:\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_library_never_imports_cli():
    """Not even inside a function: the library raises ordinary errors and the command formats them."""
    graph = import_graph(module_level=False)
    offenders = sorted(m for m, deps in graph.items() if m not in CLI_MODULES and deps & CLI_MODULES)
    assert not offenders, f"library modules importing jlora.cli: {offenders}"


# ---------------------------------------------------------------------------------------------------------------
# Dynamic: import each module alone
# ---------------------------------------------------------------------------------------------------------------

_PROBE = r"""
import importlib, json, os, signal, sys, threading, time, traceback


def probe(name):
    t0 = time.perf_counter()
    try:
        importlib.import_module(name)
        out = {"ok": True}
    except BaseException:
        out = {"ok": False, "error": traceback.format_exc()}
    out.update(cli=sorted(m for m in ("jlora.cli", "jlora.__main__") if m in sys.modules and m != name),
               torch="torch" in sys.modules, seconds=round(time.perf_counter() - t0, 2))
    return out


results = {"jlora": probe("jlora")}
can_fork = results["jlora"]["ok"] and hasattr(os, "fork") and threading.active_count() == 1
results["_mode"] = "fork" if can_fork else "none"
for name in json.loads(sys.argv[1]) if can_fork else ():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import one module, report through the pipe, exit without any cleanup
        os.close(r)
        signal.alarm(300)
        try:
            os.write(w, json.dumps(probe(name)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    results[name] = json.loads(data) if data else {"ok": False, "error": f"the child died (wait status {status})"}
print(json.dumps(results))
"""


def _fresh_import(name: str) -> dict:
    """The fallback: ``import name`` in its own interpreter."""
    code = _PROBE.replace('results = {"jlora": probe("jlora")}', f'results = {{"jlora": probe({name!r})}}')
    code = code.replace("can_fork = results", "can_fork = False and results")
    p = subprocess.run([sys.executable, "-c", code, "[]"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1])["jlora"] if lines else {"ok": False, "error": p.stderr[-4000:], "cli": []}


@pytest.fixture(scope="module")
def imports() -> dict:
    """``{module: {"ok", "error", "cli", "torch", "seconds"}}`` for ``jlora`` and every module, each imported
    alone."""
    names = [m for m in MODULES if m != "jlora"]
    p = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        pytest.fail(f"the import probe failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    results = json.loads(lines[-1])
    if results["_mode"] != "fork":  # no fork here, or a thread was already running: one interpreter per module
        results.update({name: _fresh_import(name) for name in names})
    return results


def test_import_jlora_alone(imports):
    r = imports["jlora"]
    assert r["ok"], r.get("error")
    assert not r["torch"], "import jlora imports torch"
    assert not r["cli"], f"import jlora imports {r['cli']}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "jlora"])
def test_module_imports_alone(imports, module):
    r = imports[module]
    assert r["ok"], f"import {module} fails on its own:\n{r.get('error')}"
    if module not in CLI_MODULES:
        assert not r["cli"], f"import {module} imports {r['cli']}"
