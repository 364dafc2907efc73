"""The layering rule, read from the source with ``ast`` (nothing is imported).

- ``distill/`` imports only the shared modules at the top of ``pipeline/``, never a stage's internals
  (anything under ``pipeline.tiles``, ``pipeline.features``, ``pipeline.demo``).
- ``pipeline/`` never imports ``distill``.
- A stage's internals are imported only by that stage: not by another stage, and not by the shared
  top-level modules (which both halves import, so they must not pull a stage in).

Every import counts: ``import a.b``, ``from a.b import c``, ``from a import b`` (``a.b`` may be a
subpackage), relative imports, imports inside functions and ``importlib.import_module("a.b")``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

# The stage packages under pipeline/. A new subpackage of pipeline/ must be added here (or the test
# below fails), so that every place is either a stage or a shared top-level module.
STAGES = ("tiles", "features", "demo")

class Violation(NamedTuple):
    file: str  # relative to the repository root, with /
    line: int
    module: str  # the imported module that breaks the rule
    statement: str  # the import as written (unparsed)
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.statement!r} imports {self.module}: {self.rule}"


def module_of(rel_path: str) -> tuple[str, bool]:
    """``pipeline/tiles/stage.py`` -> (``pipeline.tiles.stage``, False); ``__init__.py`` -> its package, True."""
    parts = rel_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imports(source: str, rel_path: str) -> list[tuple[ast.AST, list[str]]]:
    """Every import in the source (at any depth) with the module names it may load."""
    module, is_package = module_of(rel_path)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source, filename=rel_path)):
        if isinstance(node, ast.Import):
            found.append((node, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # ``from a import b`` loads a.b when b is a submodule; counting it either way is safe,
            # since a name inside a shared module never falls under a stage or distill.
            found.append((node, [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node, [node.args[0].value]))
    return found


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def check_source(source: str, rel_path: str) -> list[Violation]:
    """The layering violations of one file, given its path relative to the repository root."""
    parts = rel_path.split("/")
    half = parts[0]
    own_stage = parts[1] if half == "pipeline" and len(parts) > 2 else None
    violations = []
    for node, names in imports(source, rel_path):
        statement = ast.unparse(node)
        seen_rules = set()
        for name in names:
            rule = None
            stage = next((s for s in STAGES if under(name, f"pipeline.{s}")), None)
            if half == "distill" and stage:
                rule = f"distill imports a stage's internals (pipeline.{stage}); import only the shared top-level pipeline modules"
            elif half == "pipeline" and under(name, "distill"):
                rule = "pipeline imports distill; the pipeline half must not depend on the training half"
            elif half == "pipeline" and stage and stage != own_stage:
                where = f"stage {own_stage}" if own_stage else "a shared top-level module"
                rule = f"{where} imports the internals of stage {stage}; only pipeline/{stage}/ may"
            if rule and rule not in seen_rules:
                seen_rules.add(rule)
                violations.append(Violation(rel_path, node.lineno, name, statement, rule))
    return violations


def python_files() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for half in ("distill", "pipeline") for p in (ROOT / half).rglob("*.py"))


def all_violations() -> list[Violation]:
    return [v for rel in python_files() for v in check_source((ROOT / rel).read_text(), rel)]


def test_layering_rule():
    violations = all_violations()
    assert not violations, "imports that break the layering rule (docs/design.md, Layout):\n" + "\n".join(map(str, violations))


def test_every_pipeline_subpackage_is_a_known_stage():
    subpackages = sorted(p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py"))
    assert subpackages == sorted(STAGES), f"pipeline/ subpackages {subpackages} != STAGES {sorted(STAGES)}: update STAGES"
    assert python_files(), "no source found"


def test_checker_reports_violations():
    source = '''
import pipeline.tiles.slide_tiles
from pipeline.features.stage import run_features
from pipeline import demo, stores
from pipeline.stores import open_store
import pipeline.views as views

def lazy():
    from pipeline.tiles import slides
    import importlib
    importlib.import_module("pipeline.demo.slides")
'''
    found = {(v.line, v.module) for v in check_source(source, "distill/evaluate/x.py")}
    assert found == {
        (2, "pipeline.tiles.slide_tiles"),
        (3, "pipeline.features.stage"),
        (4, "pipeline.demo"),
        (9, "pipeline.tiles"),
        (11, "pipeline.demo.slides"),
    }
    message = str(check_source(source, "distill/evaluate/x.py")[0])
    assert message.startswith("distill/evaluate/x.py:2: 'import pipeline.tiles.slide_tiles' imports pipeline.tiles.slide_tiles")

    assert [v.line for v in check_source("import distill\nfrom distill.export import load_student\n", "pipeline/stores.py")] == [1, 2]
    assert [v.line for v in check_source("def f():\n    from distill import train\n", "pipeline/tiles/stage.py")] == [2]

    # stages: their own internals (absolute or relative) are fine, another stage's are not
    stage_source = "from pipeline.tiles.slides import SlideReader\nfrom .slides import x\nfrom . import tissue\nfrom ..features import stage\n"
    assert [(v.line, v.module) for v in check_source(stage_source, "pipeline/tiles/stage.py")] == [(4, "pipeline.features")]
    assert [v.line for v in check_source(stage_source, "pipeline/features/stage.py")] == [1]
    assert [v.line for v in check_source("from pipeline.tiles.slide_tiles import FLAG_PADDED\n", "pipeline/inspect_store.py")] == [1]
    assert check_source("from pipeline.stores import open_store\nfrom pipeline import stores, views\n", "pipeline/features/stage.py") == []

