"""What every figure returns, and how the results are printed and written."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.console import results, table

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One measured figure: ``value`` in ``unit``, and its ratio to a baseline measured in the same run."""

    figure: str
    name: str
    value: float
    unit: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""  # e.g. ">= 2.0"; empty when the row is information, not a goal
    note: str = ""

    @property
    def met(self) -> bool | None:
        if not self.target or self.ratio is None:
            return None
        operator, bound = self.target.split()
        return self.ratio >= float(bound) if operator == ">=" else self.ratio <= float(bound)


def timed(work: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs: the least disturbed by other load on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


def interleaved(works: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best wall time of each work, the works run in turn ``repeat`` times: load on the shared machine
    then falls on candidate and baseline alike instead of on whichever ran during it."""
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeat):
        for name, work in works.items():
            began = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - began)
    return best


def write_results(rows: list[Row], out_dir: Path = RESULTS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**asdict(row), "met": row.met} for row in rows]
    (out_dir / "latest.json").write_text(json.dumps(records, indent=2))
    header = "| figure | measurement | value | baseline | ratio | target | met | note |\n|---|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {r.figure} | {r.name} | {r.value:,.4g} {r.unit} | {r.baseline} | {'' if r.ratio is None else f'{r.ratio:.3g}'} | {r.target} | "
        f"{'' if r.met is None else ('yes' if r.met else 'NO')} | {r.note} |"
        for r in rows
    ]
    (out_dir / "latest.md").write_text(header + "\n".join(lines) + "\n")
    results.print(table("benchmarks (ratios against baselines measured in this run)", ["figure", "measurement", "value", "baseline", "ratio", "target", "met", "note"], [
        [r.figure, r.name, f"{r.value:,.4g} {r.unit}", r.baseline, "" if r.ratio is None else f"{r.ratio:.3g}", r.target,
         "" if r.met is None else ("[green]yes[/green]" if r.met else "[red]NO[/red]"), r.note]
        for r in rows
    ]))
