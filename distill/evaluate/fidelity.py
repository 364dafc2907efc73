"""Fidelity of a distilled student to its teachers on the slides held out from its training, per
teacher and nested dim: the run's own final validation (``final_val`` in student.json) next to the
same measure re-computed here by the distiller's own code (``train.validate`` on the run's split,
stores and settings), so that the two agree when the stores and student are the ones the run used.

Both are measured over every view of the held-out rows, where the loss works, on standardized targets
(the mean cosine between a head's output and the target, and R^2 = 1 - SSE / SST summed over all
dims), and in the teacher's own space (`cos_raw`: the cosine between the inverse-standardized output
and the stored target). A student distilled with spatial targets is measured on its grids too, every
cell a sample (``spatial.validate_grid``).
"""

from __future__ import annotations

from pathlib import Path

from distill.data import open_distill_data, validation_batches
from distill.export import load_heads, load_spatial_heads, load_student, read_student_json
from distill.spatial import validate_grid
from distill.train import Distiller, validate
from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import StoreError

RUN_KEYS = ("distill", "distilled_from", "split", "composition", "final_val")


def fidelity(runs: list[Path] | None, student_dir: Path, rows: int | None) -> dict:
    """{"held_out_slides": [{"run", "id", "name", "rows"}], "rows", "run": final_val, "recomputed":
    {teacher: {m: {"cos", "cos_raw", "r2"}}}}, measured over the held-out slides of every run of the training set
    (`runs`, or none: the runs the student records), and for a student with spatial heads "grid":
    {"run": final_grid_val, "recomputed": {teacher: {m: {"cos", "r2"}}}} over their grid cells; or
    {"skipped": reason} when the student or the runs' stores do not allow it."""
    _, record = read_student_json(student_dir)
    missing = [key for key in RUN_KEYS if key not in record]
    if missing:
        return {"skipped": f"student.json lacks {missing}: it was not exported by `distill`, so there is no held-out split to measure on"}
    held_out = record["split"]["val"]
    if not held_out:
        return {"skipped": "the run held out no slides (distill.val_slides = 0)"}
    trained_on = [Path(part["run"]) for part in record["composition"]]
    runs = runs or trained_on
    run_settings = DistillConfig.model_validate(record["distill"])
    settings = run_settings.model_copy(update={
        "teachers": list(record["distilled_from"]),
        "recipes": {teacher: source["recipe"] for teacher, source in record["distilled_from"].items()},
        "val_rows": rows or run_settings.val_rows,
    })
    try:
        data = open_distill_data(runs, settings)
    except (StoreError, ConfigError) as error:
        return {"skipped": f"the stores of {', '.join(map(str, runs))} cannot be read for the held-out slides: {error}"}
    if _held_out_by_store(data.composition()) != _held_out_by_store(record["composition"]):
        stores = [part["tile_store_id"] for part in record["composition"]]
        return {"skipped": (
            f"{', '.join(str(s.run) for s in data.sources)} are not the runs the student was distilled from ({', '.join(map(str, trained_on))}: "
            f"tile stores {stores}, held out {[(s['run'], s['name']) for s in held_out]}); list those runs in distill.runs (--runs)"
        )}
    heads, standardizers = load_heads(student_dir)
    spatial = load_spatial_heads(student_dir)
    model = Distiller(load_student(student_dir), heads, standardizers, settings, spatial)
    scores, measured_rows = validate(model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
    result = {"held_out_slides": held_out, "rows": measured_rows, "run": record["final_val"], "recomputed": scores}
    if spatial is not None:
        grid_scores = validate_grid(model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
        result["grid"] = {"run": record.get("final_grid_val", {}), "recomputed": grid_scores}
    return result


def _held_out_by_store(composition: list[dict]) -> list[tuple[str, list[int]]]:
    """(tile store id, ids of its held-out slides) per run: what must match for the split to be the student's."""
    return [(part["tile_store_id"], [slide["id"] for slide in part["slides"]["val"]]) for part in composition]
