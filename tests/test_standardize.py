"""Target standardization: z-score and PHI-S on anisotropic Gaussian features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.standardize import Standardizer, fit_standardizer, hadamard


def anisotropic_gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n draws (seeded) from one fixed Gaussian per d: correlated dims, principal variances spanning 8
    orders of magnitude, offset mean."""
    distribution = np.random.default_rng(d)
    basis, _ = np.linalg.qr(distribution.normal(size=(d, d)))
    mean = distribution.normal(size=d) * 5
    return np.random.default_rng(seed).normal(size=(n, d)) * np.logspace(-2, 2, d) @ basis.T + mean


@pytest.mark.parametrize("d", [1, 2, 12, 20, 36, 384, 1280, 1536])
def test_hadamard_is_orthonormal_with_equal_magnitude_entries(d):
    h = hadamard(d)
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(d))


def test_hadamard_falls_back_to_an_orthonormal_matrix_where_none_exists():
    h = hadamard(6)
    np.testing.assert_allclose(h @ h.T, np.eye(6), atol=1e-12)
    assert not np.allclose(np.abs(h), 1 / np.sqrt(6))


def test_zscore_matches_numpy():
    sample = anisotropic_gaussian(2000, 16)
    standardized = fit_standardizer(sample, "zscore")(torch.from_numpy(sample)).numpy()
    expected = (sample - sample.mean(axis=0)) / sample.std(axis=0)
    np.testing.assert_allclose(standardized, expected, rtol=1e-4, atol=1e-4)


def test_zscore_only_centres_a_constant_dim():
    sample = anisotropic_gaussian(100, 4)
    sample[:, 2] = 7.0
    standardized = fit_standardizer(sample, "zscore")(torch.from_numpy(sample))
    assert torch.equal(standardized[:, 2], torch.zeros(100))


def test_phi_s_gives_every_dim_the_same_unit_variance():
    sample = anisotropic_gaussian(20000, 24)
    eigenvalues = np.linalg.eigvalsh(np.cov(sample.T))
    assert eigenvalues.max() / eigenvalues.min() > 1e6  # the input is far from isotropic
    standardizer = fit_standardizer(sample, "phi-s")
    np.testing.assert_allclose(standardizer(torch.from_numpy(sample)).numpy().var(axis=0), 1.0, rtol=1e-4)
    held_out = standardizer(torch.from_numpy(anisotropic_gaussian(20000, 24, seed=1))).numpy()
    np.testing.assert_allclose(held_out.var(axis=0), 1.0, rtol=0.1)


def test_phi_s_keeps_the_geometry_up_to_one_scale():
    sample = anisotropic_gaussian(500, 12)
    standardizer = fit_standardizer(sample, "phi-s")
    standardized = standardizer(torch.from_numpy(sample)).double()
    centred = torch.from_numpy(sample - sample.mean(axis=0))
    scale = standardizer.scale.double()
    distances, expected = torch.cdist(standardized, standardized), torch.cdist(centred, centred) / scale
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["zscore", "phi-s"])
@pytest.mark.parametrize("d", [24, 6])
def test_inverse_and_stored_state_round_trip(method, d):
    sample = anisotropic_gaussian(500, d)
    standardizer = fit_standardizer(sample, method)
    restored = Standardizer.from_state(standardizer.state_dict())
    assert restored.kind == standardizer.kind == method
    targets = torch.from_numpy(anisotropic_gaussian(50, d, seed=2)).float()
    standardized = standardizer(targets)
    assert torch.equal(restored(targets), standardized)
    torch.testing.assert_close(restored.inverse(standardized), targets, rtol=1e-4, atol=1e-3)


def test_fit_rejects_unusable_samples():
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_standardizer(np.array([[0.0, 1.0], [np.nan, 2.0]]), "zscore")
    with pytest.raises(ValueError, match=r"\[n >= 2, d\]"):
        fit_standardizer(np.ones((1, 4)), "zscore")
    with pytest.raises(ValueError, match="no variance"):
        fit_standardizer(np.ones((10, 4)), "phi-s")
    with pytest.raises(ValueError, match="unknown standardization 'pca'"):
        fit_standardizer(np.eye(4), "pca")
