"""What ``evaluate`` shows: evaluate.md (tables) and plots/ (scores against the student's nested dim,
each teacher a horizontal line), both drawn from the evaluate.json record alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from distill.evaluate.robustness import GROUPS, LEADERBOARD_K  # noqa: E402

STAND_IN_MARK = "*"
PANELS_PER_ROW = 3


@dataclass
class Panel:
    """One plot: curves over the student's dims, and horizontal lines for full-width models."""

    title: str
    ylabel: str
    curves: dict[str, tuple[list[int], list[float], list[float] | None]] = field(default_factory=dict)
    lines: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Labels:
    """How models are named in tables and plots: stand-ins marked; a student is one model at many dims
    (a curve), any other model one row per output (recipe)."""

    names: dict[str, str]
    students: list[str]

    @classmethod
    def of(cls, result: dict) -> Labels:
        names = {model["name"]: model["name"] + (STAND_IN_MARK if model["stand_in"] else "") for model in result["models"]}
        return cls(names, [model["name"] for model in result["models"] if model["kind"] == "student"])

    def row(self, model: str, output: str) -> str:
        return self.names[model] if model in self.students else f"{self.names[model]} {output}"


def write_markdown(result: dict) -> str:
    student = result["student"]
    stand_ins = [model["name"] for model in result["models"] if model["stand_in"]]
    lines = [
        f"# Evaluation of {result['run']}",
        "",
        f"Student `{student['arch']}` (D = {student['width']}, nested dims {student['nested_dims']}) from {student['path']}, "
        f"distilled from {', '.join(student['teachers'])}; evaluated at dims {student['dims']}.",
    ]
    if len(result.get("students", [])) > 1:
        lines += ["", "Students side by side (each a curve in the plots; fidelity is measured for the first):", ""]
        lines += [f"- **{s['label']}**: {s['path']}, `{s['arch']}` (D = {s['width']}); augmentations: {augment_text(s['augment'])}." for s in result["students"]]
    if stand_ins:
        lines += ["", f"{STAND_IN_MARK} stand-in (random or demo-fitted weights), not a pathology model ({', '.join(stand_ins)}); a student distilled only from stand-ins is one too."]
    lines += ["", "## Datasets", ""]
    for dataset in result["datasets"]:
        counts = ", ".join(f"{split} {sum(per_class.values())}" for split, per_class in dataset["counts"].items())
        lines.append(f"- **{dataset['name']}** at {dataset['mpp']} um/px: classes {', '.join(dataset['classes'])}; {counts}.")
        lines += [f"  - {note}" for note in dataset["notes"]]
    seen_notes = sorted({f"{r['model']} on {r['dataset']}: {note}" for r in result["classification"] for note in r["notes"]})
    lines += [f"- {note}" for note in seen_notes]
    lines += [
        f"- {model['name']}: computed from a tile store that is none of these datasets, so not evaluated."
        for model in result["models"] if model.get("evaluated_on") == []
    ]
    lines += [
        "", "## Classification (test split)", "",
        "Probe cells: balanced accuracy (mean ± std over seeds) / macro F1 / AUROC (two classes). "
        "Retrieval: Acc@k, test queries among train items by cosine.", "",
        *markdown_table(*classification_table(result)),
        "", "## Robustness (PLISM metrics)", "", f"Pairs: {result['robustness']['source']}.", "",
        *markdown_table(*robustness_table(result)),
        "", "## Fidelity to the teachers (held-out slides)", "",
    ]
    fidelity = result["fidelity"]
    if "skipped" in fidelity:
        lines.append(f"Not measured: {fidelity['skipped']}.")
    else:
        lines += [
            f"Slides {held_out_text(fidelity['held_out_slides'])}, {fidelity['rows']} rows (each held-out row once per view). Cells: "
            "cosine / cosine in the teacher's raw space (after the inverse standardizer) / R^2, cosine and R^2 on standardized "
            "targets, re-computed here (the run's own final validation in brackets).", "",
            *markdown_table(*fidelity_table(fidelity)),
        ]
        if "grid" in fidelity:
            lines += [
                "", "Spatial targets, each grid cell of those rows a sample: cosine / - / R^2 on standardized grids (no raw-space cosine for grids).", "",
                *markdown_table(*fidelity_table(fidelity["grid"])),
            ]
    return "\n".join(lines) + "\n"


def augment_text(settings: dict | None) -> str:
    """The augmentations a student was trained with, from its recorded distill.augment."""
    if not settings:
        return "none"
    on = [f"{kind} p={block['p']}" for kind, block in settings.items() if block.get("p", 0) > 0]
    if settings.get("local_crops", {}).get("n", 0) > 0:
        crops = settings["local_crops"]
        on.append(f"{crops['n']} local crops of {crops['px']} px")
    return ", ".join(on) or "none"


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *(f"| {' | '.join(row)} |" for row in rows)]


def classification_table(result: dict) -> tuple[list[str], list[list[str]]]:
    records = result["classification"]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    probes = list(records[0]["probes"]) if records else []
    ks = list(records[0]["retrieval"]) if records else []
    columns = ["model", "dim", *(f"{d} {p}" for d in datasets for p in probes), *(f"{d} {k}" for d in datasets for k in ks)]
    by_row: dict[tuple[str, str, int], dict[str, dict]] = {}
    for record in records:
        by_row.setdefault((record["model"], record["output"], record["dim"]), {})[record["dataset"]] = record
    labels = Labels.of(result)
    rows = []
    for (model, output, dim), per_dataset in by_row.items():
        cells = [_probe_cell(per_dataset[d]["probes"][p]) if d in per_dataset else "" for d in datasets for p in probes]
        cells += [f"{per_dataset[d]['retrieval'][k]:.3f}" if d in per_dataset else "" for d in datasets for k in ks]
        rows.append([labels.row(model, output), str(dim), *cells])
    return columns, rows


def robustness_table(result: dict) -> tuple[list[str], list[list[str]]]:
    records = result["robustness"]["results"]
    if not records:
        return ["model"], []
    groups = list(records[0]["groups"])
    k = _top_metric(records[0]["groups"]["all"])
    columns = ["model", "dim", *(f"{g} {metric}" for g in groups for metric in ("cosine", k)), "score"]
    labels = Labels.of(result)
    rows = [
        [labels.row(r["model"], r["output"]), str(r["dim"]),
         *(f"{r['groups'][g][metric]:.3f}" for g in groups for metric in ("cosine", k)),
         "" if r["score"] is None else f"{r['score']:.3f}"]
        for r in records
    ]
    return columns, rows


def held_out_text(slides: list[dict]) -> str:
    """The held-out slides by run: slide names are only unique within a run."""
    names_of_run: dict[str, list[str]] = {}
    for slide in slides:
        names_of_run.setdefault(slide["run"], []).append(slide["name"])
    return "; ".join(f"{', '.join(names)} of {run}" for run, names in names_of_run.items())


def fidelity_table(fidelity: dict) -> tuple[list[str], list[list[str]]]:
    recomputed, run = fidelity["recomputed"], fidelity["run"]
    dims = list(next(iter(recomputed.values())))
    rows = [
        [dim, *(f"{_fidelity_cell(recomputed[t][dim])} ({_fidelity_cell(run.get(t, {}).get(dim))})" for t in recomputed)]
        for dim in dims
    ]
    return ["dim", *recomputed], rows


def write_plots(result: dict, directory: Path) -> list[Path]:
    """<dataset>.png (probes and retrieval), robustness.png and, when measured, fidelity.png."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = Labels.of(result)
    written = []
    for dataset in result["datasets"]:
        records = [r for r in result["classification"] if r["dataset"] == dataset["name"]]
        panels = [
            _panel(f"{dataset['name']}: {probe}", "balanced accuracy (test)", records, labels, lambda r, p=probe: r["probes"][p]["balanced_accuracy"])
            for probe in records[0]["probes"]
        ]
        panels += [
            _panel(f"{dataset['name']}: retrieval Acc@{k[3:]}", "share of test queries (among train)", records, labels, lambda r, k=k: {"mean": r["retrieval"][k]})
            for k in records[0]["retrieval"]
        ]
        written.append(draw(panels, directory / f"{dataset['name']}.png"))
    records = result["robustness"]["results"]
    k = _top_metric(records[0]["groups"]["all"])
    panels = [_panel("cosine, all pairs", "median cosine", records, labels, lambda r: {"mean": r["groups"]["all"]["cosine"]})]
    panels += [
        _panel(f"{k}, {group}", f"median {k}", records, labels, lambda r, g=group: {"mean": r["groups"][g][k]})
        for group in records[0]["groups"] if group in GROUPS
    ]
    if records[0]["score"] is not None:
        panels.append(_panel("PLISM leaderboard score", "mean of the four medians", records, labels, lambda r: {"mean": r["score"]}))
    written.append(draw(panels, directory / "robustness.png"))
    fidelity = result["fidelity"]
    if "skipped" not in fidelity:
        panels = [_fidelity_panel(f"fidelity to {teacher} (held-out slides)", "cosine, R^2 (standardized), raw-space cosine", by_dim) for teacher, by_dim in fidelity["recomputed"].items()]
        panels += [
            _fidelity_panel(f"grid fidelity to {teacher} (held-out slides)", "per grid cell, on standardized grids", by_dim)
            for teacher, by_dim in fidelity.get("grid", {}).get("recomputed", {}).items()
        ]
        written.append(draw(panels, directory / "fidelity.png"))
    return written


def draw(panels: list[Panel], path: Path) -> Path:
    columns = min(PANELS_PER_ROW, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels):
        for label, (dims, means, stds) in panel.curves.items():
            axis.errorbar(dims, means, yerr=stds, marker="o", capsize=3, label=label)
        for index, (label, value) in enumerate(panel.lines.items()):
            axis.axhline(value, linestyle="--", color=f"C{index + len(panel.curves)}", label=label)
        all_dims = sorted({d for dims, _, _ in panel.curves.values() for d in dims})
        if all_dims:
            axis.set_xscale("log", base=2)
            axis.set_xticks(all_dims, [str(d) for d in all_dims])
        axis.set(title=panel.title, xlabel="student embedding dim", ylabel=panel.ylabel)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _panel(title: str, ylabel: str, records: list[dict], labels: Labels, value_of) -> Panel:
    """Each student's records as a curve over dims; every other model's record as a line."""
    panel = Panel(title, ylabel)
    for name in labels.students:
        student = sorted((r for r in records if r["model"] == name), key=lambda r: r["dim"])
        if student:
            values = [value_of(r) for r in student]
            panel.curves[labels.names[name]] = ([r["dim"] for r in student], [v["mean"] for v in values], [v.get("std", 0.0) for v in values])
    for record in records:
        if record["model"] not in labels.students:
            panel.lines[labels.row(record["model"], record["output"])] = value_of(record)["mean"]
    return panel




def _probe_cell(scores: dict) -> str:
    accuracy = scores["balanced_accuracy"]
    cell = f"{accuracy['mean']:.3f}" + (f" ± {accuracy['std']:.3f}" if scores["runs"] > 1 else "")
    cell += f" / {scores['macro_f1']['mean']:.3f}"
    return cell + (f" / {scores['auroc']['mean']:.3f}" if scores["auroc"] else "")


def _fidelity_panel(title: str, ylabel: str, by_dim: dict[str, dict[str, float]]) -> Panel:
    """Cosine, raw-space cosine (where measured) and R^2 against the student's dim."""
    metrics = [(name, metric) for name, metric in (("cosine", "cos"), ("cosine, raw space", "cos_raw"), ("R^2", "r2")) if all(metric in scores for scores in by_dim.values())]
    return Panel(title, ylabel, {name: ([int(m) for m in by_dim], [scores[metric] for scores in by_dim.values()], None) for name, metric in metrics})


def _fidelity_cell(scores: dict | None) -> str:
    """cos / cos_raw / r2; "-" for what was not measured (a run validated before cos_raw existed has none)."""
    if not scores:
        return "-"
    return " / ".join(f"{scores[key]:.3f}" if key in scores else "-" for key in ("cos", "cos_raw", "r2"))


def _top_metric(metrics: dict) -> str:
    """PLISM's top-10 when measured, else the largest k."""
    tops = [name for name in metrics if name.startswith("top")]
    return f"top{LEADERBOARD_K}" if f"top{LEADERBOARD_K}" in tops else max(tops, key=lambda name: int(name[3:]))
