"""Fidelity of a distilled student to its teachers on the slides held out from its training, per
teacher and nested dim: the run's own final validation (``final_val`` in student.json) next to the
same measure re-computed here by the distiller's own code (``train.validate`` on the run's split,
stores and settings), so that the two agree when the stores and student are the ones the run used.

Both are measured where the loss works, on standardized targets: the mean cosine between a head's
output and the target, and R^2 = 1 - SSE / SST summed over all dims.
"""

from __future__ import annotations

from pathlib import Path

from distill.data import open_distill_data, validation_batches
from distill.export import load_heads, load_student, read_student_json
from distill.train import Distiller, validate
from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import StoreError

RUN_KEYS = ("distill", "distilled_from", "split", "tile_store_id", "final_val")


def fidelity(run_dir: Path, student_dir: Path, rows: int | None) -> dict:
    """{"held_out_slides", "rows", "run": final_val, "recomputed": {teacher: {m: {"cos", "r2"}}}};
    or {"skipped": reason} when the student or the run's stores do not allow it."""
    _, record = read_student_json(student_dir)
    missing = [key for key in RUN_KEYS if key not in record]
    if missing:
        return {"skipped": f"student.json lacks {missing}: it was not exported by `distill`, so there is no held-out split to measure on"}
    held_out = [slide["name"] for slide in record["split"]["val"]]
    if not held_out:
        return {"skipped": "the run held out no slides (distill.val_slides = 0)"}
    run_settings = DistillConfig.model_validate(record["distill"])
    settings = run_settings.model_copy(update={
        "teachers": list(record["distilled_from"]),
        "recipes": {teacher: source["recipe"] for teacher, source in record["distilled_from"].items()},
        "val_rows": rows or run_settings.val_rows,
    })
    try:
        data = open_distill_data(run_dir, settings)
    except (StoreError, ConfigError) as error:
        return {"skipped": f"the run's stores cannot be read for the held-out slides: {error}"}
    if data.tile_store_id != record["tile_store_id"] or [slide.name for slide in data.split.val] != held_out:
        return {"skipped": f"{data.tile_path} is not the tile store the student was distilled from (store {record['tile_store_id']}, held out {held_out})"}
    heads, standardizers = load_heads(student_dir)
    model = Distiller(load_student(student_dir), heads, standardizers, settings)
    scores, measured_rows = validate(model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
    return {"held_out_slides": held_out, "rows": measured_rows, "run": record["final_val"], "recomputed": scores}
