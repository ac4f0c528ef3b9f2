"""The package layout stays one-directional: imports go down the layer order below, never up and
never sideways between the two tasks; no import cycles between autotiacc's modules (imports
inside functions count: they only postpone a cycle); and no private name (leading underscore)
imported from a module of another package."""
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


# The layer order, lowest first: a module may import its own layer and the layers below it.
# A layer's groups never import each other (inference and training share what they need through
# the layers below). Inside a group in a set, packages import each other freely; inside a group
# in a tuple, a package imports only those after it (profiling -> knobs: the sensitivity pass
# lowers groups as the precision knob does; knobs -> engines: the knobs build candidates with the
# engines, and an engine's options are config classes of its own package).
LAYERS: list[tuple[str, list[set[str] | tuple[str, ...]]]] = [
    ("core", [{"errors", "device", "hardware", "measure", "durations", "version", "machine_load",
               "native_precision", "outputs", "progress", "config_io", "plan_file", "torch_compat"}]),
    ("knobs, engines, profiling", [("profiling", "knobs", "engines")]),
    ("engine", [{"engine", "strategy"}]),
    ("tasks", [{"inference"}, {"training"}]),
    ("report", [{"report"}]),
    ("entry points", [{"cli", "api", "result_lines", ""}]),  # "": autotiacc/__init__.py
]


def _top(module: str) -> str:
    """The package (or top-level module) of autotiacc that `module` belongs to."""
    return module.split(".")[1] if "." in module else ""


def _place(module: str) -> tuple[int, int]:
    for layer, (_, groups) in enumerate(LAYERS):
        for group, names in enumerate(groups):
            if _top(module) in names:
                return layer, group
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS: add it where it belongs")


def _against_order(importer: str, target: str) -> str | None:
    """The rule that `importer` importing `target` breaks, or None when the import goes down."""
    (layer, group), (t_layer, t_group) = _place(importer), _place(target)
    top, t_top, names = _top(importer), _top(target), LAYERS[layer][1][group]
    if t_layer > layer:
        return f"layer {LAYERS[layer][0]!r} may not import the higher layer {LAYERS[t_layer][0]!r}"
    if t_layer < layer or top == t_top:
        return None
    if t_group != group:
        return f"{top} and {t_top} are separate groups of layer {LAYERS[layer][0]!r}: neither imports the other"
    if isinstance(names, tuple) and names.index(t_top) < names.index(top):
        return f"in the group {' -> '.join(names)}, {top} may not import {t_top}"
    return None


def _violations() -> list[str]:
    mods = _modules()
    bad = []
    for m in sorted(mods):
        for target, name, line in _imports(mods, m):
            rule = _against_order(m, target) if target in mods and target != m else None
            if rule:
                bad.append(f"{mods[m].relative_to(PKG.parent)}:{line} imports {target}{'.' + name if name else ''} "
                           f"({rule})")
    return bad


def test_the_order_check_names_upward_and_sideways_imports():
    # guards the guard: each kind of import against the order is named, and downward ones are not
    assert "higher layer 'tasks'" in _against_order("autotiacc.engine.bench", "autotiacc.inference.evaluate")
    assert "separate groups" in _against_order("autotiacc.training.plan", "autotiacc.inference.plan")
    assert "knobs -> engines" in _against_order("autotiacc.engines.openvino", "autotiacc.knobs.base")
    assert "profiling -> knobs" in _against_order("autotiacc.knobs.precision", "autotiacc.profiling.sensitivity")
    assert _against_order("autotiacc.device", "autotiacc.knobs")
    assert _against_order("autotiacc.knobs.execution", "autotiacc.engines") is None
    assert _against_order("autotiacc.inference.task", "autotiacc.engine.task") is None
    assert _against_order("autotiacc.engine.space", "autotiacc.strategy") is None
    assert _against_order("autotiacc.cli", "autotiacc.report") is None


def test_imports_follow_the_layer_order():
    bad = _violations()
    assert not bad, "imports against the layer order (move what the lower module needs down): " + "; ".join(bad)


def test_a_training_strategy_loads_once_the_training_package_registered_its_knobs():
    # strategy.py no longer imports autotiacc.training for its knobs' side effect: loading a training
    # strategy in a process that never loaded the training package says so, and how to load it
    import subprocess
    import sys

    code = ("from autotiacc.errors import StrategyError\nfrom autotiacc.strategy import load_strategy\n"
            "try:\n    load_strategy('training')\nexcept StrategyError as exc:\n    print('refused:', exc)\n"
            "import autotiacc.training.config\nprint('loaded:', load_strategy('training').name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    refused, loaded = out.stdout.strip().splitlines()
    assert refused.startswith("refused:") and "no knobs of task 'training'" in refused
    assert "autotiacc.training" in refused  # the fix
    assert loaded == "loaded: training"


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
