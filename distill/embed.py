"""`embed`: an exported student's embeddings of a tile store, written as a feature store.

The output has the feature store schema (recipe `embedding`, one view), so everything that reads
teacher features (inspect-store, evaluation, another distillation) reads student embeddings too.
Tiles are embedded one shard of rows at a time, each shard written whole and then marked done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill.data import student_pixels
from distill.export import StudentError, load_student, read_student_json
from pipeline.config import StoreConfig
from pipeline.console import progress_bar
from pipeline.stores import TILES_SCHEMA, StoreError, UnitMarkers, create_feature_store, open_store, unit_ranges, write_rows
from pipeline.views import apply_view

IDENTITY = {"name": "identity"}


def embed_tile_store(student_dir: Path, tile_store: Path, out_store: Path, dim: int, batch_size: int = 64) -> Path:
    """Write the first `dim` dims of the student's embedding of every row of `tile_store` to `out_store`
    (float16 [N, 1, dim]). Refuses tiles of another size or resolution than the student was trained on."""
    student = load_student(student_dir)
    _, record = read_student_json(student_dir)
    if not 1 <= dim <= student.width:
        raise StudentError(f"dim={dim} is outside the embedding of the student in {student_dir}: choose 1..{student.width} (trained nested dims {student.nested_dims})")
    tiles = open_store(tile_store, TILES_SCHEMA)
    tiling = tiles.attrs["tiling"]
    if tiling["tile_px"] != record["input_px"]:
        raise StoreError(f"{tile_store} holds {tiling['tile_px']} px tiles, the student takes {record['input_px']} px: retile at its size")
    if abs(tiling["target_mpp"] - record["target_mpp"]) > tiling["mpp_tolerance"] * record["target_mpp"]:
        raise StoreError(
            f"{tile_store} is at {tiling['target_mpp']} um/px, the student was distilled at {record['target_mpp']} um/px: "
            "retile at the student's resolution"
        )
    if Path(out_store).exists():
        raise StoreError(f"{out_store} already exists: remove it or choose another output path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = student.to(device)
    array = tiles["tiles"]
    shard_rows = array.shards[0]
    describing = {
        "name": f"student:{record['arch']}",
        "input_px": record["input_px"],
        "mean": record["mean"],
        "std": record["std"],
        "target_mpp": record["target_mpp"],
        "stand_in": False,
        "dim": dim,
        "student": record,
    }
    group = create_feature_store(
        out_store, dict(tiles.attrs), array.chunks[0], shard_rows, StoreConfig(chunk_rows=array.chunks[0], shard_rows=shard_rows),
        describing, {"embedding": dim}, [IDENTITY],
    )
    markers = UnitMarkers(out_store, group.attrs["store_id"])
    with progress_bar() as bar:
        task = bar.add_task(f"embed d={dim}", total=tiles.attrs["n_rows"], rate="")
        for unit, (start, end) in enumerate(unit_ranges(tiles.attrs["n_rows"], shard_rows)):
            stored = array[start:end]
            embeddings = np.empty((end - start, 1, dim), np.float16)
            for first in range(0, end - start, batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(apply_view(stored[first : first + batch_size], IDENTITY, record["input_px"])))
                with torch.inference_mode():
                    z = student.embed(student_pixels(batch.to(device), record["mean"], record["std"]), dim=dim)
                embeddings[first : first + len(batch), 0] = z.float().cpu().numpy()
            write_rows(out_store, start, {"embedding": embeddings})
            markers.mark(unit, {"start": start, "end": end})
            bar.update(task, advance=end - start)
    return Path(out_store)
