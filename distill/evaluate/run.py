"""The ``evaluate`` stage: what a nested student keeps of its teachers, per embedding width.

For every labelled set, the student at each nested dim and each teacher at full width are probed
(logistic regression, kNN, eva's linear layer) and asked for same-class retrieval; all of them are
measured for robustness on pairs of the same tiles under different staining and scanning (PLISM's
metrics); and the student's fidelity to its teachers on its held-out slides is re-measured, over every
run it was trained on (distill.runs, or the runs its student.json records). Models
are built one at a time, and embeddings are cached per model and image set.

RUN/evaluate/
  evaluate.json  schema pathdistill.evaluate/1: models, datasets, classification, robustness, fidelity
  evaluate.md    the same as tables
  plots/         <dataset>.png, robustness.png, fidelity.png: scores against the student's dim
  cache/         <model>-<identity>/<image set>-<identity>.npz
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from distill.evaluate.datasets import EvaluateError, LabelledSet, StoreTiles, open_labelled
from distill.evaluate.demo_set import demo_dataset
from distill.evaluate.fidelity import fidelity
from distill.evaluate.models import (
    Embedder, Embeddings, StoredFeatures, StudentEmbedder, TeacherEmbedder, cached_embeddings, check_teacher_names,
)
from distill.evaluate.probes import ProbeData, retrieval_accuracy, run_probes
from distill.evaluate.report import classification_table, write_markdown, write_plots
from distill.evaluate.robustness import PairSet, paired_folder, proxy_pairs, robustness
from pipeline.config import Config, EvaluateConfig
from pipeline.console import results, table
from pipeline.files import write_text_atomically
from pipeline.geometry import same_mpp
from pipeline.run_report import append_stage_record
from pipeline.stores import RunDir, now

__all__ = ["EvaluateError", "print_summary", "run_evaluate"]

SCHEMA = "pathdistill.evaluate/1"


def run_evaluate(config: Config) -> dict:
    """Evaluate the student and the teachers; write RUN/evaluate/ and return what evaluate.json holds."""
    started = time.perf_counter()
    settings = config.evaluate
    run = RunDir.of(config)
    run_dir, out_dir = run.root, run.evaluate
    # Every input is checked before the first model runs.
    datasets = [open_labelled(entry) for entry in settings.datasets or [demo_dataset(run_dir)]]
    student_dir = settings.student or run.student
    student_dirs = [student_dir, *settings.students]
    students = [StudentEmbedder(path, settings.dims, label) for path, label in zip(student_dirs, student_labels(student_dirs))]
    student = students[0]
    teachers = settings.teachers if settings.teachers is not None else config.features.teachers
    check_teacher_names(teachers)
    stored = [StoredFeatures(path) for path in settings.feature_stores]
    if settings.pairs is not None:
        pairs = paired_folder(settings.pairs, settings.pairs_mpp, settings.pair_tiles)
    else:
        pairs = proxy_pairs(datasets[0].images, settings.pair_tiles)

    builders: list[Callable[[], Embedder]] = [
        *((lambda s=s: s) for s in students), *(partial(TeacherEmbedder, name, config.features.weights.get(name)) for name in teachers)
    ]
    models, classification, robust = [], [], []
    for build in builders:
        model = build()
        models.append(_describe(model, "student" if isinstance(model, StudentEmbedder) else "teacher"))
        for dataset in datasets:
            embeddings = cached_embeddings(model, dataset.images, out_dir / "cache", settings.batch_size)
            classification += _classify(model.name, model.widths, dataset, embeddings, model.mpp, settings)
        pair_embeddings = cached_embeddings(model, pairs.images, out_dir / "cache", settings.batch_size)
        robust += _robustness(model.name, model.widths, pairs, pair_embeddings, settings)
        del model  # before the next build, so two teachers are never held at once
    for features in stored:  # a feature store holds rows of one tile store: it is evaluated on that one only
        matching = [d for d in datasets if isinstance(d.images, StoreTiles) and d.images.store_id == features.tile_store_id]
        models.append({**_describe(features, "feature_store"), "evaluated_on": [d.name for d in matching]})
        for dataset in matching:
            classification += _classify(features.name, features.widths, dataset, features.rows(dataset.images), None, settings)

    result = {
        "schema": SCHEMA,
        "created": now(),
        "run": str(run_dir),
        "student": _describe_student(student, student_dir),
        "students": [_describe_student(s, path) for s, path in zip(students, student_dirs)],
        "models": models,
        "datasets": [dataset.describe() for dataset in datasets],
        "classification": classification,
        "robustness": {"source": pairs.source, "conditions": list(pairs.conditions), "tiles": pairs.n_tiles, "results": robust},
        "fidelity": fidelity(config.distill.runs or None, student_dir, settings.fidelity_rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "evaluate.json", json.dumps(result, indent=2) + "\n")
    write_text_atomically(out_dir / "evaluate.md", write_markdown(result))
    plots = write_plots(result, out_dir / "plots")
    append_stage_record(run_dir, {
        "stage": "evaluate",
        "finished": now(),
        "datasets": [dataset.name for dataset in datasets],
        "models": [model["name"] for model in models],
        "outputs": [str(out_dir / "evaluate.json"), str(out_dir / "evaluate.md"), *map(str, plots)],
        "wall_seconds": round(time.perf_counter() - started, 3),
    })
    return result


def print_summary(result: dict) -> None:
    """The classification table and where everything else is, for the terminal."""
    out_dir = RunDir(Path(result["run"])).evaluate
    results.print(table(f"evaluate: {', '.join(d['name'] for d in result['datasets'])} (test split)", *classification_table(result)))
    results.print(f"robustness, fidelity and every table: {out_dir / 'evaluate.md'}; JSON: {out_dir / 'evaluate.json'}; plots: {out_dir / 'plots'}")


def student_labels(directories: list[Path]) -> list[str]:
    """A student alone is "student"; side by side each is labelled by its directory's name, or by its
    run's name for a RUN/student directory. Two students of one label are refused."""
    if len(directories) == 1:
        return ["student"]
    resolved = [Path(path).resolve() for path in directories]
    labels = [path.parent.name if path.name == "student" else path.name for path in resolved]
    repeated = {label: [str(p) for p, other in zip(directories, labels) if other == label] for label in labels if labels.count(label) > 1}
    if repeated:
        raise EvaluateError(f"evaluate.student / students: students are labelled by their directory (their run's for RUN/student), and these share one: {repeated}; give them distinct names")
    return labels


def _describe_student(student: StudentEmbedder, path: Path) -> dict:
    return {
        "label": student.name, "path": str(path), "arch": student.record["arch"], "width": student.student.width,
        "nested_dims": student.record["nested_dims"], "dims": student.widths["z"], "teachers": list(student.record["teachers"]),
        "augment": student.record.get("distill", {}).get("augment"),
    }


def _describe(model: Embedder | StoredFeatures, kind: str) -> dict:
    described = {"name": model.name, "kind": kind, "identity": model.identity, "stand_in": model.stand_in, "outputs": model.widths}
    if kind != "feature_store":
        described.update(mpp=model.mpp, tile_px=model.tile_px)
    return described


def _classify(name: str, widths: dict[str, list[int]], dataset: LabelledSet, embeddings: Embeddings, model_mpp: float | None, settings: EvaluateConfig) -> list[dict]:
    """Probe and retrieval scores of each output of a model at each of its evaluated widths."""
    seen = [float(embeddings.seen_mpp.min()), float(embeddings.seen_mpp.max())]
    notes = []
    if model_mpp is not None and not all(same_mpp(model_mpp, mpp) for mpp in seen):
        notes.append(f"images smaller than the model's field of view: seen at {seen[0]:.3g}-{seen[1]:.3g} um/px, not {model_mpp}")
    records = []
    for output, dims in widths.items():
        for dim in dims:
            data = ProbeData.from_splits(embeddings.outputs[output][:, :dim], dataset.labels, dataset.splits, len(dataset.classes))
            records.append({
                "dataset": dataset.name, "model": name, "output": output, "dim": dim, "seen_mpp": seen, "notes": notes,
                "probes": run_probes(data, settings), "retrieval": retrieval_accuracy(data, settings.retrieval_k),
            })
    return records


def _robustness(name: str, widths: dict[str, list[int]], pairs: PairSet, embeddings: Embeddings, settings: EvaluateConfig) -> list[dict]:
    return [
        {"model": name, "output": output, "dim": dim, **robustness(embeddings.outputs[output][:, :dim], pairs, settings.pair_k)}
        for output, dims in widths.items()
        for dim in dims
    ]
