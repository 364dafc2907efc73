"""Spatial distillation, the student side of the teachers' `grid` recipe (docs/design.md, Student).

A teacher's grid is its patch tokens pooled to k x k cells [k*k, C] (pipeline/grids.py); the student's
grid is its own patch tokens pooled the same way, on the same (view's) pixels, so cell j of both covers
the same pixels. Per teacher, a grid standardizer (PHI-S or z-score, fitted on a sample of cells) and
nested heads map the first m dims of each student cell token to the teacher's standardized cell.

Masked-token regression (the cache-compatible stand-in for iBOT's masked patch loss): the student sees
a share of the grid cells masked (every patch inside them replaced by its mask token) and the spatial
heads regress the teacher's cells there, which only the unmasked context can tell.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from distill.data import DistillData, Rows, target_sample
from distill.scores import HeldOutScores
from distill.standardize import Standardizer
from distill.student import NestedHeads
from pipeline.grids import pool_grid
from pipeline.precision import autocast

if TYPE_CHECKING:
    from distill.train import Distiller


class SpatialHeads(nn.Module):
    """The k x k grid, and per teacher its grid standardizer and nested heads [.., m] -> [.., C]."""

    def __init__(self, k: int, heads: NestedHeads, standardizers: Mapping[str, Standardizer]):
        super().__init__()
        if set(standardizers) != set(heads.teacher_widths):
            raise ValueError(f"grid standardizers for {sorted(standardizers)} but spatial heads for {sorted(heads.teacher_widths)}")
        self.k = k
        self.heads = heads
        self.standardizers = nn.ModuleDict(standardizers)

    def cells(self, tokens: Tensor) -> Tensor:
        """The student's grid [B, k*k, D] from its patch tokens [B, T, D]: the teachers' pooling."""
        return pool_grid(tokens, self.k)

    def targets(self, grids: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each teacher's grid [B, k*k, C] standardized cell by cell."""
        return {teacher: self.standardizers[teacher](grid) for teacher, grid in grids.items()}

    def state(self) -> dict:
        """What a checkpoint keeps to rebuild these heads exactly (see from_state)."""
        return {
            "k": self.k, "heads_record": self.heads.record(), "nested_dims": self.heads.nested_dims,
            "heads": self.heads.state_dict(), "standardizers": {t: s.state_dict() for t, s in self.standardizers.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> SpatialHeads:
        standardizers = {t: Standardizer.from_state(s) for t, s in state["standardizers"].items()}
        heads = NestedHeads({t: s.width for t, s in standardizers.items()}, state["nested_dims"], **state["heads_record"])
        heads.load_state_dict(state["heads"])
        return cls(state["k"], heads, standardizers)


def grid_sample(data: DistillData, teacher: str, size: int, seed: int) -> np.ndarray:
    """Grid cells [n, C] (float32) to fit a teacher's grid standardizer on: every view and cell of
    ceil(size / k*k) training rows drawn with `seed` (at least 2), as many samples as the summary
    standardizer's `size` rows give, so a wide teacher's sample stays as small."""
    return target_sample(data, teacher, max(2, math.ceil(size / data.grid**2)), seed, grid=True)


def draw_masked_cells(batch: int, k: int, ratio: float, device: torch.device) -> Tensor:
    """bool [batch, k*k]: per sample, round(ratio * k*k) cells (at least one) drawn uniformly without
    replacement, from torch's global generator (seeded and checkpointed with the run)."""
    count = max(1, round(ratio * k * k))
    order = torch.rand(batch, k * k).argsort(dim=1)
    masked = torch.zeros(batch, k * k, dtype=torch.bool)
    masked.scatter_(1, order[:, :count], True)
    return masked.to(device)


@torch.no_grad()
def validate_grid(model: Distiller, batches: Iterable[Rows], precision: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per teacher and nested dim, between each spatial head's cells and the standardized grid (the
    space the spatial loss works in), every cell of every row a sample (distill/scores.py):
    {teacher: {m: {"cos", "r2"}}}, the layout of train.validate's scores."""
    was_training = model.training
    model.eval()
    scores = HeldOutScores()
    for batch in batches:
        images, _ = model.inputs(batch)
        grids = model.grid_targets(batch)
        with autocast(images.device.type, precision):
            _, tokens = model.student.forward_tokens(images)
            predictions = model.spatial.heads(model.spatial.cells(tokens))
        scores.add({key: cells.flatten(0, 1) for key, cells in predictions.items()}, {t: grid.flatten(0, 1) for t, grid in grids.items()})
    model.train(was_training)  # fidelity measures an exported student in eval mode, and leaves it so
    return scores.result()
