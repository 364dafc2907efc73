"""Docstrings, comments and docs name only files that exist in the repository.

A reference is a path-like word: a file name ending in .md, .py, .yaml, .yml or .sbatch (with or
without folders in front), or a path with a slash that claims to be in this repository (it starts
with ``./`` or ``../``, or its first folder is a top-level folder of the repository). It must resolve
relative to the repository root or to the referencing file's folder, and stay inside the repository;
a bare file name (no slash) may also be any file of that name in the repository, since trees and
prose name modules by their base name. A trailing ``...`` is a placeholder for "something under".

Not references: URLs, ``hf-hub:org/name``, dotted module names, ``tiles/s``-style units and the
paths below that a run, the demo or a user creates (they are git-ignored or not there in a clone).
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import tokenize
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

CHECKED_SUFFIXES = (".md", ".py", ".yaml", ".yml", ".sbatch")

# Written by a run, the demo or the benchmark; never in a clone.
GENERATED_PREFIXES = ("RUN/", "runs/", "data/", "bench/results/")
# Files a run writes, cited by their base name: RUN/student/report.md, RUN/evaluate/evaluate.md,
# bench/results/latest.md.
GENERATED_NAMES = {"report.md", "evaluate.md", "latest.md"}
# Files the docs ask the user to write.
USER_FILES = {"configs/mine.yaml"}
# Other projects' files, cited with their project: NVlabs/RADIO's phi_s.py and hadamard.py.
EXTERNAL_NAMES = {"phi_s.py", "hadamard.py"}

# A path-like word: not glued to a URL (://), an hf-hub: or other prefix, a template ({run}/, $VAR/,
# <teacher>) or a glob (*.yaml). The word is classified by reference() below.
WORD = re.compile(r"(?<![\w./:@~$%{}<>*\\-])(?:\.{1,2}/)*[\w.-]+(?:/[\w.-]+)*/?")


class Violation(NamedTuple):
    file: str
    line: int
    reference: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reference!r} does not exist in the repository: {self.text.strip()[:120]}"


def ignored_dirs() -> tuple[set[str], set[str]]:
    """Directory patterns of .gitignore: (names matched at any depth, paths anchored at the root)."""
    names, anchored = {".git"}, set()
    gitignore = ROOT / ".gitignore"
    for line in gitignore.read_text().splitlines() if gitignore.exists() else []:
        line = line.strip()
        if line.endswith("/") and not line.startswith("#"):
            pattern = line.strip("/")
            (anchored if "/" in pattern else names).add(pattern)
    return names, anchored


def repository_paths() -> list[Path]:
    """Every file and folder of the repository, without what .gitignore ignores."""
    names, anchored = ignored_dirs()
    found, stack = [], [ROOT]
    while stack:
        for path in sorted(stack.pop().iterdir()):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_dir():
                if any(fnmatch.fnmatch(path.name, n) for n in names) or rel in anchored:
                    continue
                stack.append(path)
            found.append(path)
    return found


PATHS = repository_paths()
TOP_FOLDERS = {p.name for p in PATHS if p.is_dir() and p.parent == ROOT}
BASE_NAMES = {p.name for p in PATHS if p.is_file()}


def reference(word: str) -> str | None:
    """The word as a repository reference, or None when it is not one."""
    word = word.rstrip(".") if word.strip(".") else word  # sentence end, or a trailing ... placeholder
    if not word or "/" not in word and not word.endswith(CHECKED_SUFFIXES):
        return None
    if word.endswith(CHECKED_SUFFIXES) and word.rsplit("/", 1)[-1].startswith("."):
        return None  # ``.py`` as a suffix, not a file
    if word.endswith(CHECKED_SUFFIXES):
        return word
    first = word.split("/", 1)[0]
    return word if first in (".", "..") or first in TOP_FOLDERS else None


def resolves(ref: str, folder: Path) -> bool:
    if ref in USER_FILES or ref.startswith(GENERATED_PREFIXES):
        return True
    if "/" not in ref:
        if ref in GENERATED_NAMES or ref in EXTERNAL_NAMES or ref in BASE_NAMES:
            return True
    for base in (ROOT, folder):
        target = (base / ref).resolve()
        if target.is_relative_to(ROOT) and (target.is_dir() if ref.endswith("/") else target.exists()):
            return True
    return False


def check_lines(lines, rel_path: str) -> list[Violation]:
    """``lines`` are (line number, text) of the file at ``rel_path`` (relative to the root)."""
    folder = (ROOT / rel_path).parent
    violations = []
    for number, text in lines:
        for match in WORD.finditer(text):
            ref = reference(match.group(0))
            if ref is not None and not resolves(ref, folder):
                violations.append(Violation(rel_path, number, ref, text))
    return violations


def python_prose(source: str):
    """(line, text) of every comment and docstring (module, class, function) in Python source."""
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                for offset, text in enumerate(first.value.value.splitlines()):
                    yield first.lineno + offset, text


def check_file(rel_path: str, text: str) -> list[Violation]:
    if rel_path.endswith(".py"):
        return check_lines(python_prose(text), rel_path)
    return check_lines(enumerate(text.splitlines(), 1), rel_path)


def scanned_files() -> list[str]:
    files = [p for folder in ("pipeline", "distill", "bench", "tests") for p in (ROOT / folder).rglob("*.py")]
    files += [ROOT / "cli.py", ROOT / "README.md", ROOT / "clusters" / "README.md", ROOT / "bench" / "README.md"]
    files += [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "docs").glob("*.md")]
    return sorted(p.relative_to(ROOT).as_posix() for p in files if p.exists())


def test_references_exist():
    violations = [v for rel in scanned_files() for v in check_file(rel, (ROOT / rel).read_text())]
    assert not violations, "references to files that are not in the repository:\n" + "\n".join(map(str, violations))


def test_scans_what_it_should():
    files = scanned_files()
    assert {"README.md", "cli.py", "docs/design.md", "configs/demo.yaml", "pipeline/stores.py", "tests/test_layout.py"} <= set(files)
    assert {"pipeline", "distill", "tests", "clusters", "configs", "docs"} <= TOP_FOLDERS


def test_checker_reports_dangling_references():
    text = """\
Background in research/infra.md and DESIGN.md (see ../outside/DESIGN.md or ../outside/...).
The old module distill/demo_eval.py; the bottleneck (infra.md 3.2); papers.md section 5.1.
Rules in pipeline/nowhere/ and `clusters/nothing.sbatch`; see [the notes](research/notes.yaml).
"""
    found = [(v.line, v.reference) for v in check_file("README.md", text)]
    assert found == [
        (1, "research/infra.md"), (1, "DESIGN.md"), (1, "../outside/DESIGN.md"), (1, "../outside/"),
        (2, "distill/demo_eval.py"), (2, "infra.md"), (2, "papers.md"),
        (3, "pipeline/nowhere/"), (3, "clusters/nothing.sbatch"), (3, "research/notes.yaml"),
    ]


def test_checker_passes_what_is_not_a_dangling_reference():
    text = """\
https://github.com/NVlabs/RADIO/blob/main/radio/phi_s.py and http://example.org/a/DESIGN.md
hf-hub:MahmoodLab/UNI2-h, MahmoodLab/UNI2-h, pipeline.tiles.stage, tiles/s, um/px, ViT-B/14, NaN/Inf
RUN/tiles.zarr, RUN/slurm/STAGE.sbatch, runs/demo, runs/demo/student/report.md, data/demo/SOURCES.json
report.md evaluate.md latest.md, configs/mine.yaml, {run}/x.yaml, $HOME/y.py, configs/*.yaml, a .py file
pipeline/geometry.py, `pipeline/tiles/`, pipeline/..., ./cli.py, tests/test_layout.py. stage.py, README.md
bench/results/latest.json, docs/design.md#layout, clusters/k8s/
"""
    assert check_file("README.md", text) == []
    # relative to the referencing file's folder
    assert check_file("clusters/README.md", "`slurm/ray-stage.sbatch`, `k8s/raycluster.yaml`") == []
    assert [v.reference for v in check_file("README.md", "`slurm/ray-stage.sbatch`")] == ["slurm/ray-stage.sbatch"]


def test_checker_reads_comments_and_docstrings_only():
    source = '''"""Module docstring citing research/pipelines.md section 11."""

CONFIG = "missing_config.yaml"  # a comment citing DESIGN.md


def f():
    """Docstring citing infra.md 2.5."""
    return "also_missing.py"
'''
    found = [(v.line, v.reference) for v in check_file("pipeline/x.py", source)]
    assert sorted(found) == [(1, "research/pipelines.md"), (3, "DESIGN.md"), (7, "infra.md")]
