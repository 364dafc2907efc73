"""Per-teacher target standardization, fitted on a sample of the feature store.

Teachers differ in scale and a few of their dims carry most of the variance, so raw targets would let
one teacher and a few dims dominate the loss. Two remedies:
- z-score: centre and divide each dim by its std;
- PHI-S (arXiv 2410.01680, NVlabs/RADIO phi_s.py): centre, rotate by the covariance eigenvectors U and
  then a normalised Hadamard matrix H, and divide by one scalar sqrt(mean eigenvalue). H spreads every
  eigen-direction evenly over all dims, so every dim ends with the same variance (1) while the
  geometry is kept up to one scale.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

Method = Literal["zscore", "phi-s"]


class Standardizer(nn.Module):
    """y = rotation (x - mean) / scale, and back. An nn.Module so its tensors follow .to(device) and
    state_dict() (mean, scale and, for PHI-S, rotation) is what gets stored next to the student."""

    def __init__(self, mean: Tensor, scale: Tensor, rotation: Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", mean)  # [d]
        self.register_buffer("scale", scale)  # [d] for z-score, [1] for PHI-S
        self.register_buffer("rotation", rotation)  # [d, d] orthonormal for PHI-S, None for z-score

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> Standardizer:
        return cls(state["mean"], state["scale"], state.get("rotation"))

    @property
    def kind(self) -> Method:
        return "zscore" if self.rotation is None else "phi-s"

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    def forward(self, targets: Tensor) -> Tensor:
        centred = targets.to(self.mean.dtype) - self.mean
        if self.rotation is not None:
            centred = centred @ self.rotation.T
        return centred / self.scale

    def inverse(self, standardized: Tensor) -> Tensor:
        centred = standardized * self.scale
        if self.rotation is not None:
            centred = centred @ self.rotation
        return centred + self.mean


def fit_standardizer(sample: np.ndarray, method: Method) -> Standardizer:
    """Estimate a teacher's standardization from a sample of its target rows [n, d] (float64 maths)."""
    if sample.ndim != 2 or sample.shape[0] < 2:
        raise ValueError(f"need a sample of shape [n >= 2, d] to fit a standardizer, got {sample.shape}")
    if not np.isfinite(sample).all():
        raise ValueError("the sample holds NaN or Inf: run `inspect-store --verify` on the feature store")
    sample = sample.astype(np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    if method == "zscore":
        std = centred.std(axis=0)
        std[std == 0] = 1.0  # a dim constant over the sample is only centred
        return Standardizer(_float32(mean), _float32(std))
    if method == "phi-s":
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(centred))
        mean_eigenvalue = eigenvalues.clip(min=0).mean()  # clip round-off below zero, as RADIO does
        if mean_eigenvalue == 0:
            raise ValueError("the sample has no variance: every row is the same")
        rotation = hadamard(sample.shape[1]) @ eigenvectors.T
        return Standardizer(_float32(mean), _float32([math.sqrt(mean_eigenvalue)]), _float32(rotation))
    raise ValueError(f"unknown standardization {method!r}: use 'zscore' or 'phi-s'")


def hadamard(d: int) -> np.ndarray:
    """An orthonormal d x d matrix, with all entries +-1/sqrt(d) (a normalised Hadamard matrix) when
    d = 2^k, 2^k (q + 1) for a prime q = 3 mod 4, or 2^k 2 (q + 1) for a prime q = 1 mod 4.

    As in RADIO's hadamard.py: Sylvester's construction times Paley's I or II. That covers every
    teacher width in use (384 = 32*12, 768, 1024, 1536 = 128*12, 2560 = 128*20). For other d (e.g.
    d > 2 not a multiple of 4, where no Hadamard matrix exists) it falls back, as RADIO does, to
    random signs made orthonormal (seeded): PHI-S's variances are then equal only approximately.
    """
    twos = 1
    while d % (twos * 2) == 0:
        twos *= 2
    while twos >= 1:
        rest = d // twos
        if rest == 1:
            return scipy.linalg.hadamard(d) / math.sqrt(d)
        if _is_prime(rest - 1) and (rest - 1) % 4 == 3:
            return np.kron(scipy.linalg.hadamard(twos), _paley_1(rest - 1)) / math.sqrt(d)
        if rest % 2 == 0 and _is_prime(rest // 2 - 1) and (rest // 2 - 1) % 4 == 1:
            return np.kron(scipy.linalg.hadamard(twos), _paley_2(rest // 2 - 1)) / math.sqrt(d)
        twos //= 2
    random_signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(d, d))
    orthonormal, _ = np.linalg.qr(random_signs)
    return orthonormal


def _paley_1(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    h = np.ones((q + 1, q + 1))
    h[1:, 0] = -1
    h[1:, 1:] = _jacobsthal(q) + np.eye(q)
    return h


def _paley_2(q: int) -> np.ndarray:
    """Hadamard matrix of order 2 (q + 1) for a prime q = 1 mod 4."""
    s = np.ones((q + 1, q + 1))
    s[0, 0] = 0
    s[1:, 1:] = _jacobsthal(q)
    return np.kron(s, [[1, 1], [1, -1]]) + np.kron(s == 0, [[1, -1], [-1, -1]])


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = Legendre symbol of (a - b) mod q."""
    legendre = -np.ones(q)
    legendre[0] = 0
    legendre[np.arange(1, q) ** 2 % q] = 1
    index = np.arange(q)
    return legendre[(index[:, None] - index[None, :]) % q]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % divisor for divisor in range(2, math.isqrt(n) + 1))


def _float32(values: np.ndarray | list[float]) -> Tensor:
    return torch.tensor(np.asarray(values), dtype=torch.float32)
