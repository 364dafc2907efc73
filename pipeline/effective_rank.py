"""Effective rank: how many principal components hold a share (90%) of a set of embeddings' variance.

A teacher whose features are nearly a low-rank function of the pixels teaches a nested student nothing
beyond its first few dims: its m = 16 scores as its full width. ``inspect-store`` prints this figure per
recipe so a user sees that before distilling (the demo's texture stand-in: pipeline/texture_bank.py).
"""

from __future__ import annotations

import numpy as np

SHARE = 0.9


def effective_rank(features: np.ndarray, share: float = SHARE) -> int:
    """The fewest principal components of the rows of ``features`` [N, D] (centred) whose variance adds up to
    ``share`` of the total; 0 when the rows do not vary. At most min(N - 1, D)."""
    rows = np.asarray(features, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"effective_rank takes rows [N, D], got shape {rows.shape}")
    centred = rows - rows.mean(axis=0)
    small = centred @ centred.T if len(rows) < rows.shape[1] else centred.T @ centred  # the smaller Gram matrix: same nonzero spectrum
    variances = np.sort(np.clip(np.linalg.eigvalsh(small), 0, None))[::-1]
    total = variances.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(variances) / total, share * (1 - 1e-12)) + 1)
