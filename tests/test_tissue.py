"""Tissue mask on real and blank pixels; per-tile tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tiles.tissue import tissue_fractions, tissue_mask


def test_blank_glass_has_no_tissue():
    glass = np.full((300, 300, 3), 243, np.uint8)
    assert not tissue_mask(glass, 4.0).any()


def test_real_he_is_mostly_tissue_and_glass_is_not(he_pixels):
    overview = he_pixels[::8, ::8]  # about 4 um/px
    mask = tissue_mask(overview, 4.0)
    assert 0.2 < mask.mean() < 0.9
    bright = np.all(overview > 225, axis=-1)  # glass, and lumens that hole filling keeps as tissue
    assert mask[bright].mean() < 0.1


def test_fractions_count_the_tile_footprint():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue
    coords = np.array([[0, 0], [20, 0], [50, 50], [40, 0]])
    fractions = tissue_fractions(mask, level0_per_mask_px=10.0, coords0=coords, footprint0=20)
    assert fractions.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.5])
