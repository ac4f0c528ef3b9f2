"""The package layout stays one-directional: no import cycles between autotiacc's modules
(imports inside functions count: they only postpone a cycle), and no private name
(leading underscore) imported from a module of another package."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import autotiacc

PKG = Path(autotiacc.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _package(mods: dict[str, Path], module: str) -> str:
    return module if mods[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(mods: dict[str, Path], module: str):
    """(target module, imported name or None, line) for every autotiacc import in `module`."""
    for node in ast.walk(ast.parse(mods[module].read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package(mods, module).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None, node.lineno) if sub in mods else (base, alias.name, node.lineno)


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = _modules()
    edges = {m: {t for t, _, _ in _imports(mods, m) if t in mods and t != m} for m in mods}
    return mods, edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle():
    # guards the guard: a graph with a cycle behind a leaf must be reported
    assert _cycles({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_cycles():
    mods, edges = _graph()
    assert len(mods) > 20 and any(edges.values())  # the walk found the package
    cycles = _cycles(edges)
    assert not cycles, "import cycles (move what the lower module needs down into it): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_packages():
    mods = _modules()
    bad = []
    for m in mods:
        for target, name, line in _imports(mods, m):
            if not target.startswith("autotiacc") or target not in mods:
                continue
            if _package(mods, m) == _package(mods, target):
                continue
            private = [p for p in target.split(".") + [name or ""] if p.startswith("_") and not p.startswith("__")]
            if private:
                bad.append(f"{mods[m].relative_to(PKG.parent)}:{line} imports {target}.{name or ''}")
    assert not bad, "private names used across packages (make them public with a clear name): " + "; ".join(bad)


# torch's private names (a leading underscore anywhere in the dotted path), in code, not comments
_TORCH_PRIVATE = re.compile(r"\btorch(\.[A-Za-z0-9]+)*\._[A-Za-z]")


def test_private_torch_api_lives_in_torch_compat_only():
    """torch.utils._pytree, torch._dynamo, torch._inductor, torch._C...: one module to change
    when a torch release moves them (as engine/optuna_compat.py is for Optuna)."""
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "torch_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute):
                names = [ast.unparse(node)]
            if any(_TORCH_PRIVATE.match(n) for n in names):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "private torch API outside autotiacc/torch_compat.py (add a function there): " + ", ".join(
        sorted(set(bad)))
