"""Held-out fidelity of head predictions to standardized targets, accumulated batch by batch: per
teacher and nested dim, the mean cosine over samples and R^2 = 1 - SSE / SST summed over all dims, SST
around the held-out mean; given raw (inverse-standardized) predictions and the stored targets, also
the mean cosine in the teacher's own space, `cos_raw`. A sample is a row for the summary targets and a
grid cell for the spatial ones; sums are kept in float64 on the device, so nothing syncs until `result`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor


class HeldOutScores:
    def __init__(self) -> None:
        self.cosine: dict[tuple[str, int], Tensor] = defaultdict(float)
        self.raw_cosine: dict[tuple[str, int], Tensor] = defaultdict(float)
        self.squared_error: dict[tuple[str, int], Tensor] = defaultdict(float)
        self.target_sum: dict[str, Tensor] = defaultdict(float)
        self.target_square_sum: dict[str, Tensor] = defaultdict(float)
        self.samples = 0

    def add(
        self, predictions: Mapping[tuple[str, int], Tensor], targets: Mapping[str, Tensor],
        raw_predictions: Mapping[tuple[str, int], Tensor] | None = None, raw_targets: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Predictions [n, C] keyed by (teacher, m) against each teacher's targets [n, C]; the same in the
        teachers' own space when `raw_predictions` and `raw_targets` are given."""
        for (teacher, m), prediction in (raw_predictions or {}).items():
            self.raw_cosine[teacher, m] += F.cosine_similarity(prediction.double(), raw_targets[teacher].double(), dim=-1).sum()
        for (teacher, m), prediction in predictions.items():
            prediction, target = prediction.double(), targets[teacher].double()
            self.cosine[teacher, m] += F.cosine_similarity(prediction, target, dim=-1).sum()
            self.squared_error[teacher, m] += (prediction - target).square().sum()
        for teacher, target in targets.items():
            self.target_sum[teacher] += target.double().sum(0)
            self.target_square_sum[teacher] += target.double().square().sum(0)
        self.samples += len(next(iter(targets.values())))

    def result(self) -> dict[str, dict[str, dict[str, float]]]:
        """{teacher: {m: {"cos", "r2"}}}, and "cos_raw" where raw predictions were given."""
        n = self.samples
        total_squares = {t: (self.target_square_sum[t] - self.target_sum[t].square() / n).sum() for t in self.target_sum}
        scores: dict[str, dict[str, dict[str, float]]] = {t: {} for t in self.target_sum}
        for (teacher, m), cosine_sum in self.cosine.items():
            scores[teacher][str(m)] = {
                "cos": (cosine_sum / n).item(), "r2": (1 - self.squared_error[teacher, m] / total_squares[teacher]).item(),
            }
            if (teacher, m) in self.raw_cosine:
                scores[teacher][str(m)]["cos_raw"] = (self.raw_cosine[teacher, m] / n).item()
        return scores
