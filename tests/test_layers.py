"""The package's shape: imports point one way, and every module is short enough to read top to bottom.

Each module of ijepa_viz/ is parsed with `ast` (nothing is imported, so this runs in a second). Every import of
another ijepa_viz module is an edge of a graph: module-level and function-level imports alike, absolute and
relative ones, those under `if TYPE_CHECKING:`, and `importlib.import_module("ijepa_viz....")` with a literal
name. `from ijepa_viz.data import load_uint8` is an edge to `ijepa_viz.data`; `from ijepa_viz.viz import plots`
an edge to `ijepa_viz.viz.plots`. Importing `a.b.c` also runs the `__init__` of `a.b`; that implicit edge is not
counted, because a package's `__init__` only re-exports its own submodules (`ijepa_viz.data`) or loads them on
first use (`ijepa_viz`, `ijepa_viz.viz`).

The layers, bottom up (`LAYERS`; a package's name covers its submodules):

    0  config, allocator                       the dataclasses and presets, the CPU allocator setting:
                                               know no other module
    1  masks, model, schedules, data           the method's parts: masks, networks, schedules, images
    2  train, evaluate, feature_cache,         what runs the method: training, evaluation, saving and
       probes, checkpoint, official,           loading weights (ours, the official ones, the shipped ones)
       pretrained
    3  viz, bench, demo                        what shows it: the notebooks' plots and widgets, the
                                               benchmark, the demo report
    4  cli, __main__, ijepa_viz                the front doors: the command line and `import ijepa_viz as ij`

A module may import from its own layer and the ones below, never from a higher one, and there are no cycles
(which also orders the imports inside a layer: evaluate uses train's device helpers, train never evaluate).
Within viz, the compute and draw modules (`VIZ_COMPUTE_AND_DRAW`) stay below layer 2 as well: they draw what
they are given, and only the widgets (the wire layer) start training or evaluation. A new module must be given
a layer here, which is the point: where it sits is a decision, not an accident.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "ijepa_viz"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 600
LONG_FILE_REASON = "stays one file because"  # the sentence a longer module's docstring must hold

LAYERS = {
    "config": 0, "allocator": 0,
    "masks": 1, "model": 1, "schedules": 1, "data": 1,
    "train": 2, "evaluate": 2, "feature_cache": 2, "probes": 2, "checkpoint": 2, "official": 2, "pretrained": 2,
    "viz": 3, "bench": 3, "demo": 3,
    "cli": 4, "__main__": 4, PACKAGE: 4,
}
VIZ_COMPUTE_AND_DRAW = ("viz.features", "viz.plots", "viz.feature_plots", "viz.verdicts")


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the package; a package is its __init__.py."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _target(name: str) -> str | None:
    """The package module that an imported dotted name refers to: itself, or its longest known prefix
    (`ijepa_viz.data.load_uint8` -> `ijepa_viz.data`); None outside the package."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _literal_import(node: ast.AST) -> str | None:
    """The name in `importlib.import_module("...")` or `__import__("...")` when it is a literal string."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return None
    func = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
    name = node.args[0].value
    return name if func in ("import_module", "__import__") and isinstance(name, str) else None


def _imports(name: str) -> set[str]:
    """The package modules that module `name` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..data import y
                package = name if _is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module
            for alias in node.names:  # `from a import b` names the submodule a.b when there is one
                found.add(_target(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _target(base))
        elif (literal := _literal_import(node)) is not None:
            found.add(_target(literal))
    found.discard(None)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _short(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name != PACKAGE else PACKAGE


def _layer(name: str) -> int:
    short = _short(name)
    while short:
        if short in LAYERS:
            return LAYERS[short]
        short = short.rpartition(".")[0]
    raise KeyError(name)


def test_the_parser_sees_every_kind_of_import():
    """The graph holds a function-level import and a package re-export, so a missed edge would show here."""
    assert f"{PACKAGE}.data.loaders" in GRAPH[f"{PACKAGE}.data"]  # the package re-exports its submodules
    assert f"{PACKAGE}.train" in GRAPH[f"{PACKAGE}.cli"]  # inside cmd_train
    assert f"{PACKAGE}.config" in GRAPH[PACKAGE]  # the one eager import of `import ijepa_viz`


def test_every_module_has_a_layer():
    missing = [name for name in MODULES if not any(_short(name) == k or _short(name).startswith(k + ".")
                                                   for k in LAYERS)]
    assert not missing, f"give these modules a layer in LAYERS (tests/test_layers.py): {missing}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
              for name, deps in sorted(GRAPH.items()) for dep in sorted(deps) if _layer(dep) > _layer(name)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_viz_compute_and_draw_do_not_reach_training_or_evaluation():
    draw = {f"{PACKAGE}.{m}" for m in VIZ_COMPUTE_AND_DRAW}
    bad = [f"{name} imports {dep}" for name in sorted(draw) for dep in sorted(GRAPH[name])
           if dep not in draw and _layer(dep) > 1]
    assert not bad, "compute and draw modules of viz should need only layers 0-1:\n" + "\n".join(bad)


def test_long_modules_say_why_they_stay_one_file():
    long = []
    for name, path in sorted(MODULES.items()):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and LONG_FILE_REASON not in " ".join(doc.split()):
            long.append(f"{path.relative_to(ROOT.parent)}: {lines} lines")
    assert not long, (f"modules over {MAX_LINES} lines: split them along a seam, or say in the module docstring "
                      f"why each '{LONG_FILE_REASON} ...':\n" + "\n".join(long))


def test_the_public_namespace_names_real_attributes():
    """Every `ij.NAME` in `ijepa_viz._LAZY` points at a module that exists and defines (or imports) NAME."""
    init = ast.parse(MODULES[PACKAGE].read_text())
    lazy = next(ast.literal_eval(node.value) for node in init.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_LAZY")
    wrong = []
    for public, (module, attr) in lazy.items():
        if module not in MODULES:
            wrong.append(f"{public}: no module {module}")
            continue
        if attr is None:
            continue
        body = ast.parse(MODULES[module].read_text()).body
        defined = set()
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        if attr not in defined:
            wrong.append(f"{public}: {module} has no {attr}")
    assert not wrong, "\n".join(wrong)
