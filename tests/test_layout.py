"""Names that would shadow Python's standard library: a script in scripts/ is imported before
the standard module of the same name by everything its process imports (scripts/queue.py
once broke `import torch` in the benchmark scripts), and a top-level `ast` package breaks
`import inspect`."""
import sys

from conftest import ROOT


def test_no_script_or_package_shadows_a_standard_module():
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    names |= {p.stem for p in ROOT.glob("*.py")}
    assert not names & sys.stdlib_module_names, names & sys.stdlib_module_names
