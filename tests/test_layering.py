"""Layering of the package, read from the source with ``ast`` (nothing is imported).

Two rules, counting every import (module level, function-local, under ``TYPE_CHECKING``):

- no import cycle between ``chestxray`` modules (a function-local import only hides a cycle);
- a run-time module (what the app and ``Predictor`` need) never imports an offline one (training,
  evaluation, release, fitting): the app must not pull in the training stack, and the offline
  code may change without touching what runs in production.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "chestxray"

RUNTIME = {"__init__", "imaging", "labels", "transforms", "models", "cam", "cam_methods", "boxes", "layout", "ckpt_config",
           "checkpoint", "hub", "windowing", "report", "predictor", "gate", "registry", "pretrained",
           "sources", "serve", "ensemble"}
OFFLINE = {"__main__", "data", "cache", "training", "evaluate", "release", "modelcard", "metrics", "calibration",
           "plots", "gate_fit", "distill", "localization", "cli", "train_cli", "recipes", "cv", "prevalence", "batch",
           "ensemble_release", "ensemble_cv", "ensemble_card", "release_cv", "card_calibration", "compare"}


def _files() -> dict[str, ast.Module]:
    """The package's own top-level modules."""
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PKG.glob("*.py"))}


def _subpackages() -> dict[str, ast.Module]:
    """Each sub-package (``chestxray/serve/``) as one module: the imports of all its files together."""
    return {d.name: ast.Module(body=[node for p in sorted(d.glob("*.py")) for node in ast.parse(p.read_text()).body],
                               type_ignores=[])
            for d in sorted(PKG.iterdir()) if (d / "__init__.py").is_file()}


def _modules() -> dict[str, ast.Module]:
    return {**_files(), **_subpackages()}


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The chestxray modules one import statement names (``__init__`` for names from the package)."""
    out = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "chestxray":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    elif isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level:  # relative: the package itself (sub-packages use absolute imports)
            module = "chestxray" + ("." + module if module else "")
        parts = module.split(".")
        if parts[0] == "chestxray" and len(parts) > 1:
            out.add(parts[1])
        elif parts[0] == "chestxray":  # from chestxray import gate / Predictor
            out |= {a.name if a.name in modules else "__init__" for a in node.names}
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: chestxray modules it imports anywhere in its source}``."""
    trees = _modules()
    names = set(trees)
    return {name: {m for node in ast.walk(tree) for m in _imported(node, names)} - {name}
            for name, tree in trees.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_classified():
    """A new module must be put on one side, so that the rules below cover it."""
    modules = set(_modules())
    assert not RUNTIME & OFFLINE
    assert modules - RUNTIME - OFFLINE == set(), "classify these in tests/test_layering.py"
    assert (RUNTIME | OFFLINE) - modules == set(), "these modules no longer exist"


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert cycles == [], f"import cycles between chestxray modules: {cycles}"


def test_runtime_modules_never_import_offline_ones():
    graph = import_graph()
    bad = sorted((a, b) for a in RUNTIME for b in graph.get(a, ()) if b in OFFLINE)
    assert bad == [], f"run-time modules importing offline ones (move the piece they need): {bad}"


def test_the_app_imports_only_runtime_modules():
    tree, names = ast.parse((PKG.parent / "app.py").read_text()), set(_modules())
    used = {m for node in ast.walk(tree) for m in _imported(node, names)}
    assert used and used <= RUNTIME, f"app.py imports offline modules: {sorted(used - RUNTIME)}"


def test_the_checker_sees_hidden_imports():
    """Function-local and package-level imports count (the cycles this test exists for were hidden so)."""
    tree = ast.parse("def f():\n    from chestxray import gate, Predictor\n    import chestxray.hub as h\n"
                     "    from . import cam\n")
    names = {"gate", "hub", "cam", "__init__"}
    found = {m for node in ast.walk(tree) for m in _imported(node, names)}
    assert found == {"gate", "__init__", "hub", "cam"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_readme_module_table_lists_every_module():
    """README's "How it is built" names each module once (as `chestxray/x.py` or, in a row, `x.py`)."""
    readme = (PKG.parent / "README.md").read_text()
    table = readme[readme.index("## How it is built"):readme.index("Why the all-label CAM is exact")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name.removeprefix("chestxray/") for row in rows for name in row.split(" | ")[0].strip("| ").replace(
        "`", "").split(", ")}
    assert set(f"{m}.py" for m in _files()) <= named, "add these modules to README's table"
    assert not {n for n in named if n.endswith(".py") and "/" not in n} - {f"{m}.py" for m in _files()} - {
        "app.py", "setup.py"}, "README's table names modules that no longer exist"


def test_the_service_imports_only_runtime_modules_and_never_gradio():
    """``chestxray.serve`` is the app's service for every front end: run-time modules only, and no module of the
    library imports gradio (the Gradio page is ``app.py``'s alone)."""
    assert import_graph()["serve"] <= RUNTIME
    gradio = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
              if isinstance(node, (ast.Import, ast.ImportFrom))
              and any(n.split(".")[0] == "gradio" for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                                            else [node.module or ""]))}
    assert gradio == set(), f"library modules importing gradio: {sorted(gradio)}"


def test_the_app_page_stays_small():
    """``app.py`` holds the page and its events only (issue 23): everything else belongs to ``chestxray.serve``."""
    assert len((PKG.parent / "app.py").read_text().splitlines()) < 400


def test_no_module_is_over_500_lines():
    long = {p.name: n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, f"split these modules: {long}"
