"""What a distillation run records in RUN/student/: metrics.jsonl, plots/ and report.md.

metrics.jsonl holds one JSON record per line:
  {"kind": "train", "step", "loss", "lr", "samples_per_s", "slides", "loss_by_dim": {teacher: {m: loss}}}
    (+ "augment_loss": {term: loss} with distill.augment: each augmentation's term, distill/augment.py)
  {"kind": "eval", "step", "rows", "val": {teacher: {m: {"cos": .., "r2": ..}}}}
Validation is measured on standardized targets (the space the loss works in), see train.validate.
`slides` is how many distinct slides the step's batch held (rank 0's share under DDP); `samples_per_s`
is measured over the stretch of steps since the losses were last read from the device (log_every).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

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


def plot_metrics(records: list[dict], directory: Path) -> list[Path]:
    """loss.png (total, and per teacher per nested dim) and val_cosine.png (per teacher per nested dim)."""
    directory.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    teachers = list(train[-1]["loss_by_dim"]) if train else []
    loss_panels = [("total", {"loss": ([r["step"] for r in train], [r["loss"] for r in train])})]
    loss_panels += [(teacher, _by_dim(train, lambda r, t=teacher: r["loss_by_dim"][t])) for teacher in teachers]
    cosine_panels = [(teacher, _by_dim(evals, lambda r, t=teacher: {m: v["cos"] for m, v in r["val"][t].items()})) for teacher in teachers]
    plots = [_draw(loss_panels, "training loss", directory / "loss.png")]
    if evals:  # no held-out slides, no validation curves
        plots.append(_draw(cosine_panels, "validation cosine (standardized targets)", directory / "val_cosine.png"))
    return plots


def _by_dim(records: list[dict], values_of) -> dict[str, tuple[list[int], list[float]]]:
    dims = list(values_of(records[-1])) if records else []
    return {f"m={m}": ([r["step"] for r in records], [values_of(r)[m] for r in records]) for m in dims}


def _draw(panels: list[tuple[str, dict]], ylabel: str, path: Path) -> Path:
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.5), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for label, (steps, values) in lines.items():
            axis.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        axis.set(title=title, xlabel="step", ylabel=ylabel)
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
        "## Final validation (held-out slides; cosine / R^2 on standardized targets)",
        "",
    ]
    final = summary["final_val"]
    if final:
        dims = list(next(iter(final.values())))
        lines += [f"| teacher | {' | '.join(f'm={m}' for m in dims)} |", f"|---|{'---|' * len(dims)}"]
        lines += [f"| {t} | {' | '.join(_cell(by_dim[m]) for m in dims)} |" for t, by_dim in final.items()]
    else:
        lines.append("No validation slides (distill.val_slides = 0).")
    lines += [
        "",
        "## Speed (samples/s)",
        "",
        f"- loader alone ({speed['loader_workers']} worker threads): {speed['loader']:.1f}",
        f"- training step alone, on an in-memory batch: {speed['step']:.1f}",
        f"- training as run (loader and step together, {summary['wall_seconds']:.0f} s wall): {speed['training']:.1f}",
        "",
        "Files: metrics.jsonl, plots/loss.png, plots/val_cosine.png, checkpoints/, student.safetensors, student.json, heads.safetensors.",
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


def _cell(scores: dict[str, float]) -> str:
    return f"{scores['cos']:.3f} / {scores['r2']:.3f}"


def print_summary(summary: dict) -> None:
    """The final validation table and the speeds, on the terminal; report.md has the rest."""
    final, speed = summary["final_val"], summary["speed"]
    if final:
        dims = list(next(iter(final.values())))
        results.print(table(
            f"{summary['student_dir']}: held-out validation, cosine / R^2 per nested dim",
            ["teacher", *(f"m={m}" for m in dims)],
            [[teacher, *(_cell(by_dim[m]) for m in dims)] for teacher, by_dim in final.items()],
        ))
    results.print(
        f"{summary['steps']} steps in {summary['wall_seconds']:.0f} s; samples/s: loader {speed['loader']:.0f}, "
        f"step {speed['step']:.1f}, training {speed['training']:.1f}; {describe_mix(summary['loader'])}; report: {summary['student_dir']}/report.md"
    )
