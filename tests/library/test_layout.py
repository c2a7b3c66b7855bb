"""The floor plan: names that would shadow Python's standard library: a script in scripts/ is imported before
the standard module of the same name by everything its process imports (scripts/queue.py
once broke `import torch` in the benchmark scripts), and a top-level `ast` package breaks
`import inspect`; no import cycle; a library that needs torch alone."""
import ast
import sys
from pathlib import Path

from conftest import ROOT


def test_no_script_or_package_shadows_a_standard_module():
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    names |= {p.stem for p in ROOT.glob("*.py")}
    assert not names & sys.stdlib_module_names, names & sys.stdlib_module_names


def _project_modules() -> dict[str, Path]:
    """adaptive_sparse's modules by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in (ROOT / "adaptive_sparse").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The modules a file imports (`from a.b import c` also counts a.b.c, in case c is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_the_project_has_no_import_cycle_and_no_deferred_import_of_its_own_code():
    """A module's top-level imports of project modules, plus the package each import loads first,
    form a graph without cycles; no function imports project code (a deferred import that dodges
    a cycle would hide one)."""
    modules = _project_modules()
    graph = {}
    for name, path in modules.items():
        targets = {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        graph[name] = (targets | parents) - {name} - {p for p in parents if name.startswith(p + ".")}
        deferred = {m for m in _imports(path, top_level_only=False) - _imports(path, top_level_only=True)
                    if m.startswith("adaptive_sparse")}
        assert not deferred, f"{name} imports {sorted(deferred)} inside a function"
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        assert node not in visiting, f"import cycle: {' -> '.join(trail + [node])}"
        if node in done:
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


# The library's modules that need one of its extras, and what each may import besides.
EXTRAS = {"adaptive_sparse.models.vit": {"timm"}, "adaptive_sparse.integrations.lightning": {"lightning"},
          "adaptive_sparse.integrations.hf": {"transformers", "datasets"}}  # datasets: only when given one


def test_the_library_imports_torch_and_numpy_alone():
    """adaptive_sparse outside training/ imports nothing but the standard library, torch, numpy
    and itself (`pip install .` is all it needs), besides its extras' modules, each importing
    only its own framework (EXTRAS), and only when imported by name."""
    allowed = {"torch", "numpy", "adaptive_sparse", *sys.stdlib_module_names}
    for name, path in _project_modules().items():
        if name.startswith("adaptive_sparse.training"):
            continue
        outside = {m for m in _imports(path, top_level_only=False)
                   if m.split(".")[0] not in allowed | EXTRAS.get(name, set())}
        assert not outside, f"{name} imports {sorted(outside)}"
