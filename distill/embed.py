"""`embed`: an exported student's embeddings of a tile store, written as a feature store.

The output has the feature store schema (recipe `embedding`, one view), so everything that reads
teacher features (inspect-store, evaluation, another distillation) reads student embeddings too. It
runs through the teachers' own unit loop (``pipeline.embedding``): on Ray, resumable after any
interruption, and refused rows of NaN/Inf are never written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from distill.export import StudentError, load_student, read_student_json
from distill.student import Student
from pipeline.config import RayConfig, StoreConfig
from pipeline.embedding import ActorSettings, EmbedSummary, embed_pool
from pipeline.geometry import same_mpp
from pipeline.locks import exclusive
from pipeline.ray_runtime import ray_session
from pipeline.stores import StoreError, open_tile_store

IDENTITY = {"name": "identity"}
RECIPE = "embedding"


@dataclass(frozen=True)
class StudentAtWidth:
    """The exported student as an embedder: the first ``dim`` dims of its nested embedding."""

    student: Student
    record: dict  # student.json
    dim: int
    device: torch.device

    @property
    def widths(self) -> dict[str, int]:
        return {RECIPE: self.dim}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {RECIPE: (self.dim,)}

    @property
    def field_px(self) -> int:
        return self.record["input_px"]  # the tile it was trained on; embed_tile_store refuses stores of other tiles

    def embed(self, tiles_uint8_nhwc: Tensor) -> dict[str, Tensor]:
        with torch.inference_mode():
            return {RECIPE: self.student.embed(self.student.preprocess(tiles_uint8_nhwc), dim=self.dim)}

    def provenance(self) -> dict:
        record = self.record
        return {
            "name": f"student:{record['arch']}",
            "input_px": record["input_px"],
            "mean": record["mean"],
            "std": record["std"],
            "target_mpp": record["target_mpp"],
            "stand_in": False,
            "dim": self.dim,
            "widths": self.widths,
            "student": record,
        }


def load_student_at_width(student_dir: Path, dim: int, device: str) -> StudentAtWidth:
    _, record = read_student_json(student_dir)
    return StudentAtWidth(load_student(student_dir).to(device), record, dim, torch.device(device))


def embed_tile_store(
    student_dir: Path, tile_store: Path, out_store: Path, dim: int, batch_size: int = 64,
    ray: RayConfig | None = None, overwrite: bool = False,
) -> EmbedSummary:
    """Write the first `dim` dims of the student's embedding of every row of `tile_store` to `out_store`
    (float16 [N, 1, dim]); a rerun completes an interrupted store and leaves a finished one alone.
    Refuses tiles of another size or resolution than the student was trained on."""
    _, record = read_student_json(student_dir)
    width = record["width"]
    if not 1 <= dim <= width:
        raise StudentError(f"dim={dim} is outside the embedding of the student in {student_dir}: choose 1..{width} (trained nested dims {record['nested_dims']})")
    tiles = open_tile_store(tile_store)
    tiles.require_finished("tiles")
    tiling = tiles.attrs.tiling
    if tiling.tile_px != record["input_px"]:
        raise StoreError(f"{tile_store} holds {tiling.tile_px} px tiles, the student takes {record['input_px']} px: retile at its size")
    if not same_mpp(record["target_mpp"], tiling.target_mpp, tiling.mpp_tolerance):
        raise StoreError(
            f"{tile_store} is at {tiling.target_mpp} um/px, the student was distilled at {record['target_mpp']} um/px: "
            "retile at the student's resolution"
        )
    array = tiles["tiles"]
    store = StoreConfig(chunk_rows=array.chunks[0], shard_rows=array.shards[0])
    actors = ActorSettings(batch_size=batch_size, gpus_per_actor=1.0 if torch.cuda.is_available() else 0.0)
    name = f"student:{record['arch']}@{dim}"
    summary = EmbedSummary(tiles.attrs.n_rows, [name], units_total=len(tiles.units()))
    with exclusive(Path(f"{out_store}.lock")), ray_session(ray or RayConfig()):
        builder = functools.partial(load_student_at_width, Path(student_dir), dim)
        embed_pool(tiles, {name: builder}, {name: Path(out_store)}, [IDENTITY], actors, store, overwrite, summary)
    return summary
