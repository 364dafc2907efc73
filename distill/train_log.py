"""What a distillation run records in RUN/student/: metrics.jsonl, plots/ and report.md.

metrics.jsonl holds one JSON record per line:
  {"kind": "train", "step", "loss", "lr", "samples_per_s", "slides", "loss_by_dim": {teacher: {m: loss}},
   "grad_norm", "koleo" when distill.koleo_weight > 0, and "augment_loss": {term: loss} with distill.augment
   (each augmentation's term, distill/augment.py)}
  {"kind": "eval", "step", "rows", "val": {teacher: {m: {"cos": .., "cos_raw": .., "r2": ..}}}, and "ema" (the
   same scores of the EMA student) when distill.ema is on}
With spatial distillation, train records add "grid_loss_by_dim" (and "masked_loss_by_dim" with masked
cells) and eval records "grid_val", in the same layouts (the per-(teacher, m) term before weighting).
`grad_norm` is the gradient's norm before clipping to distill.grad_clip. Validation measures "cos" and
"r2" on standardized targets (the space the loss works in) and "cos_raw" in the teacher's own space,
over every view of the held-out rows (`rows` counts each row once per view), see train.validate and
spatial.validate_grid.
`slides` is how many distinct slides the step's batch held (rank 0's share under DDP); `samples_per_s`
is measured over the stretch of steps since the losses were last read from the device (log_every).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from pipeline.files import write_text_atomically  # noqa: E402
from pipeline.console import results, table  # noqa: E402


class MetricsLog:
    """Appends records to metrics.jsonl, flushed per line, so a killed run loses at most one record."""

    def __init__(self, path: Path, keep_through: int):
        """Keep the records up to step `keep_through` (the checkpoint resumed from; -1 for a new run) and
        drop later ones, which a killed run wrote after its last checkpoint and the resumed run rewrites."""
        self.path = path
        kept = [record for record in self.read() if record["step"] <= keep_through]
        write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], directory: Path, grad_clip: float) -> list[Path]:
    """loss.png (total, and per teacher per nested dim; spatial terms too), grad_norm.png (the pre-clip
    norm against grad_clip) and val_cosine.png (per teacher per nested dim: standardized, raw teacher
    space, and grid cosine with spatial targets)."""
    directory.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    teachers = list(train[-1]["loss_by_dim"]) if train else []
    loss_panels = [("total", {"loss": ([r["step"] for r in train], [r["loss"] for r in train])})]
    for key, label in (("loss_by_dim", "{}"), ("grid_loss_by_dim", "{} grid"), ("masked_loss_by_dim", "{} masked cells")):
        if train and key in train[-1]:
            loss_panels += [(label.format(teacher), _by_dim(train, lambda r, t=teacher, k=key: r[k][t])) for teacher in teachers]
    normed = [r for r in train if "grad_norm" in r]  # records of an older run resumed here have none (nor cos_raw: nan)
    norm_panel = ("pre-clip gradient norm", {
        "norm": ([r["step"] for r in normed], [r["grad_norm"] for r in normed]),
        f"grad_clip {grad_clip}": ([r["step"] for r in normed], [grad_clip] * len(normed)),
    })
    cosine_panels = [
        (f"{teacher}{title}", _by_dim(evals, lambda r, t=teacher, k=key: {m: v.get(k, math.nan) for m, v in r["val"][t].items()}))
        for teacher in teachers for title, key in (("", "cos"), (" (raw space)", "cos_raw"))
    ]
    if evals and "grid_val" in evals[-1]:
        cosine_panels += [(f"{teacher} grid", _by_dim(evals, lambda r, t=teacher: {m: v["cos"] for m, v in r["grid_val"][t].items()})) for teacher in teachers]
    plots = [_draw(loss_panels, "training loss", directory / "loss.png"), _draw([norm_panel], "gradient norm", directory / "grad_norm.png", log=True)]
    if evals:  # no held-out slides, no validation curves
        plots.append(_draw(cosine_panels, "validation cosine", directory / "val_cosine.png"))
    return plots


def grad_norm_summary(records: list[dict], grad_clip: float) -> dict:
    """The pre-clip gradient norms of the logged steps: min, median, max and the share of steps clipped."""
    norms = np.array([r["grad_norm"] for r in records if r["kind"] == "train" and "grad_norm" in r])
    if not len(norms):
        return {}
    return {
        "steps": len(norms), "min": float(norms.min()), "median": float(np.median(norms)), "max": float(norms.max()),
        "clipped_share": float((norms > grad_clip).mean()), "grad_clip": grad_clip,
    }


def _by_dim(records: list[dict], values_of) -> dict[str, tuple[list[int], list[float]]]:
    dims = list(values_of(records[-1])) if records else []
    return {f"m={m}": ([r["step"] for r in records], [values_of(r)[m] for r in records]) for m in dims}


def _draw(panels: list[tuple[str, dict]], ylabel: str, path: Path, log: bool = False) -> Path:
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.5), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for label, (steps, values) in lines.items():
            axis.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        axis.set(title=title, xlabel="step", ylabel=ylabel, yscale="log" if log else "linear")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(path: Path, summary: dict) -> None:
    """report.md: what was trained on what, the split, the final validation table and the speeds."""
    student, speed = summary["student"], summary["speed"]
    teachers = summary["teachers"]
    lines = [
        "# Distillation report",
        "",
        f"Student `{student['arch']}` {student['timm_kwargs']}, {student['params'] / 1e6:.2f} M parameters, "
        f"embedding D = {student['width']}, nested dims {student['nested_dims']}, input {summary['input_px']} px "
        f"at {summary['target_mpp']} um/px. {summary['steps']} steps of {summary['settings']['batch_size']} x "
        f"{summary['settings']['accumulation']} samples, lr {summary['settings']['lr']}, {summary['settings']['precision']}, "
        f"{summary['settings']['standardize']} targets, {summary['views']} view(s) per tile, {summary['world_size']} process(es).",
        *(f"Resumed with changed settings from step {stretch['from_step']}: {describe_changes(stretch['changed'])}." for stretch in summary["settings_history"][1:]),
        "",
        "| teacher | recipe | width | stand-in |",
        "|---|---|---|---|",
        *(f"| {t} | {v['recipe']} | {v['width']} | {v['stand_in']} |" for t, v in teachers.items()),
        "",
        "## Data",
        "",
        *(
            f"- run {part['run']} (tile store {part['tile_store_id']}): {part['rows']['train']} train rows of "
            f"{len(part['slides']['train'])} slides, {part['rows']['val']} validation rows of {len(part['slides']['val'])} slides"
            for part in summary["composition"]
        ),
        *(f"- {line}" for line in summary["data"]),
        f"- train: {summary['rows']['train']} rows of {', '.join(s['name'] for s in summary['split']['train'])}",
        f"- validation: {summary['rows']['val']} rows of {', '.join(s['name'] for s in summary['split']['val']) or 'no slide'}",
        f"- batch mix: {describe_mix(summary['loader'])}",
        "",
        "## Final validation",
        "",
        f"Held-out slides, every view; cells: {CELL}.",
    ]
    by_weights = summary["final_val_by_weights"]
    for weights, final in by_weights.items():
        exported = " (exported)" if weights == summary["exported_weights"] else ""
        lines += ["", *([f"{weights} weights{exported}:", ""] if len(by_weights) > 1 else []), *_scores_table(final)]
    if not by_weights:
        lines += ["", "No validation slides (distill.val_slides = 0)."]
    if summary.get("final_grid_val"):
        lines += ["", "Spatial targets (each grid cell of those rows a sample; cosine / - / R^2 on standardized grids):", "", *_scores_table(summary["final_grid_val"])]
    lines += [
        "",
        "## Gradient",
        "",
        describe_grad_norm(summary["grad_norm"]),
        "",
        "## Speed (samples/s)",
        "",
        f"- loader alone ({speed['loader_workers']} worker threads): {speed['loader']:.1f}",
        f"- training step alone, on an in-memory batch: {speed['step']:.1f}",
        f"- training as run (loader and step together, {summary['wall_seconds']:.0f} s wall): {speed['training']:.1f}",
        "",
        "Files: metrics.jsonl, plots/loss.png, plots/grad_norm.png, plots/val_cosine.png, checkpoints/, student.safetensors, student.json, heads.safetensors.",
        "",
    ]
    path.write_text("\n".join(lines))


def describe_mix(loader: dict) -> str:
    """How many distinct slides the training batches held, and the pool size that bought it."""
    mix = loader["slides_per_batch"]
    return f"{mix['mean']:.1f} distinct slides per batch on average, {mix['min']} at least (pools of {loader['pool_chunks']} chunks, {mix['batches']} batches)"


def describe_changes(changed: dict[str, list]) -> str:
    """A settings-history stretch's changes, as `key before -> now, ...`."""
    return ", ".join(f"{key} {before!r} -> {value!r}" for key, (before, value) in changed.items())


def _scores_table(scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    dims = list(next(iter(scores.values())))
    return [
        f"| teacher | {' | '.join(f'm={m}' for m in dims)} |", f"|---|{'---|' * len(dims)}",
        *(f"| {t} | {' | '.join(_cell(by_dim[m]) for m in dims)} |" for t, by_dim in scores.items()),
    ]


def describe_grad_norm(norms: dict) -> str:
    """The pre-clip gradient norms of grad_norm_summary, in a sentence."""
    if not norms:
        return "No pre-clip gradient norm was logged."
    return (
        f"Pre-clip gradient norm over {norms['steps']} steps: {norms['min']:.3g} to {norms['max']:.3g}, median {norms['median']:.3g}; "
        f"clipped to {norms['grad_clip']} on {100 * norms['clipped_share']:.0f}% of steps."
    )


CELL = "cosine / cosine in the teacher's raw space / R^2 (cosine and R^2 on standardized targets)"


def _cell(scores: dict[str, float]) -> str:
    raw = f"{scores['cos_raw']:.3f}" if "cos_raw" in scores else "-"  # a summary written before cos_raw was measured
    return f"{scores['cos']:.3f} / {raw} / {scores['r2']:.3f}"


def print_summary(summary: dict) -> None:
    """The final validation table and the speeds, on the terminal; report.md has the rest."""
    speed = summary["speed"]
    for scores, what in ((summary["final_val"], f"held-out validation ({summary.get('exported_weights', 'trained')} weights)"), (summary.get("final_grid_val"), "held-out grid cells")):
        if scores:
            dims = list(next(iter(scores.values())))
            results.print(table(
                f"{summary['student_dir']}: {what}, {CELL}, per nested dim",
                ["teacher", *(f"m={m}" for m in dims)],
                [[teacher, *(_cell(by_dim[m]) for m in dims)] for teacher, by_dim in scores.items()],
            ))
    results.print(
        f"{summary['steps']} steps in {summary['wall_seconds']:.0f} s; samples/s: loader {speed['loader']:.0f}, "
        f"step {speed['step']:.1f}, training {speed['training']:.1f}; {describe_mix(summary['loader'])}; report: {summary['student_dir']}/report.md"
    )
