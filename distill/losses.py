"""The nested multi-teacher distillation loss (AM-RADIO's cosine + smooth-L1 over MRL's dims), the
weighted mean over (teacher, nested dim):

    L_tm = alpha (1 - cos(h_tm(z[:m]), y_t)) + beta smooth_l1(h_tm(z[:m]), y_t)
    L = sum_t sum_m w_t c_m L_tm / sum_t sum_m w_t c_m

with y_t the standardized target of teacher t and batch means inside. MRL sums over m; the mean keeps
the loss (and its gradient, which distill.grad_clip bounds) on one scale however many teachers and
dims there are, and changes nothing else: the weights' ratios are the same. spatial_distill_loss is
the same loss per grid cell of the spatial targets (docs/design.md, Student).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.student import NestedHeads

Parts = dict[tuple[str, int], dict[str, Tensor]]


def nested_distill_loss(
    z: Tensor,
    heads: NestedHeads,
    targets: Mapping[str, Tensor],
    teacher_weights: Mapping[str, float] | None = None,
    dim_weights: Mapping[int, float] | None = None,
    alpha: float = 0.9,
    beta: float = 0.1,
) -> tuple[Tensor, Parts]:
    """Total loss (the weighted mean of the parts' "loss") and, per (teacher, m), detached "cos" (mean
    cosine similarity), "smooth_l1" and "loss" (unweighted by w_t, c_m) for logging; kept as tensors so
    logging does not sync every step. Missing weights default to 1."""
    return _weighted_mean(heads(z), targets, heads, teacher_weights or {}, dim_weights or {}, alpha, beta)


def spatial_distill_loss(
    cells: Tensor,
    heads: NestedHeads,
    grids: Mapping[str, Tensor],
    teacher_weights: Mapping[str, float] | None = None,
    dim_weights: Mapping[int, float] | None = None,
    alpha: float = 0.9,
    beta: float = 0.1,
    where: Tensor | None = None,
) -> tuple[Tensor, Parts]:
    """The spatial term: the summary loss's cosine + smooth-L1 per grid cell,

        L = sum_t,m w_t c_m l_tm / sum_t,m w_t c_m,
        l_tm = mean over cells (b, j) [alpha (1 - cos(h_tm(g_bj[:m]), Y_tbj)) + beta smooth_l1(h_tm(g_bj[:m]), Y_tbj)]

    with g [B, k*k, D] the student's grid cell tokens and Y_t [B, k*k, C] teacher t's standardized grid.
    `where` bool [B, k*k] restricts the mean to those cells (the masked cells of masked-token
    regression); every cell when None. Parts as nested_distill_loss's, per (teacher, m)."""
    chosen = torch.ones(cells.shape[:2], dtype=torch.bool, device=cells.device) if where is None else where
    predictions = {key: prediction[chosen] for key, prediction in heads(cells).items()}  # [cells chosen, C]
    return _weighted_mean(predictions, {t: grid[chosen] for t, grid in grids.items()}, heads, teacher_weights or {}, dim_weights or {}, alpha, beta)


def _weighted_mean(
    predictions: Mapping[tuple[str, int], Tensor], targets: Mapping[str, Tensor], heads: NestedHeads,
    teacher_weights: Mapping[str, float], dim_weights: Mapping[int, float], alpha: float, beta: float,
) -> tuple[Tensor, Parts]:
    """sum_t,m w_t c_m l_tm / sum_t,m w_t c_m over predictions [n, C] of each (teacher, m) against the
    teacher's targets [n, C], in fp32 under autocast too; each sample's C values are one smooth-L1 mean."""
    if set(targets) != set(heads.teacher_widths):
        raise ValueError(f"targets are for teachers {sorted(targets)}, heads for {sorted(heads.teacher_widths)}")
    if not set(teacher_weights) <= set(targets) or not set(dim_weights) <= set(heads.nested_dims):
        raise ValueError(
            f"weights name teachers {sorted(teacher_weights)} and dims {sorted(dim_weights)}; "
            f"this student has teachers {sorted(targets)} and nested dims {heads.nested_dims}"
        )
    total = next(iter(targets.values())).new_zeros((), dtype=torch.float32)
    weight_sum = 0.0
    parts: Parts = {}
    for (teacher, m), prediction in predictions.items():
        prediction, target = prediction.float(), targets[teacher].float()
        cos = F.cosine_similarity(prediction, target, dim=-1).mean()
        smooth_l1 = F.smooth_l1_loss(prediction, target)
        loss = alpha * (1 - cos) + beta * smooth_l1
        weight = teacher_weights.get(teacher, 1.0) * dim_weights.get(m, 1.0)
        total, weight_sum = total + weight * loss, weight_sum + weight
        parts[teacher, m] = {"cos": cos.detach(), "smooth_l1": smooth_l1.detach(), "loss": loss.detach()}
    if weight_sum <= 0:
        raise ValueError(f"the teacher weights {dict(teacher_weights)} and dim weights {dict(dim_weights)} leave nothing to train: give one a positive weight")
    return total / weight_sum, parts
