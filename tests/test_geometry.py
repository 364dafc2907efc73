"""Resolution rules: where mpp comes from, which level is read, how the grid meets the slide edge."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.geometry import MppError, UpsampleError, plan_read, read_mpp, tile_grid


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"openslide.mpp-x": "0.2525", "aperio.MPP": "0.3"}, (0.2525, "openslide.mpp-x")),
        ({"aperio.MPP": "0.499"}, (0.499, "aperio.MPP")),
        ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, (0.25, "tiff.XResolution")),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, (0.25, "tiff.XResolution")),
        ({"openslide.comment": "Aperio Image |AppMag = 20|MPP = 0.4990"}, (0.499, "openslide.comment")),
        ({"openslide.objective-power": "40"}, (0.25, "openslide.objective-power")),
        ({"openslide.mpp-x": "0", "openslide.objective-power": "20"}, (0.5, "openslide.objective-power")),
    ],
)
def test_mpp_sources_in_order(properties, expected):
    mpp, source = read_mpp(properties)
    assert mpp == pytest.approx(expected[0]) and source == expected[1]


def test_missing_mpp_names_the_fix():
    with pytest.raises(MppError, match="manifest"):
        read_mpp({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"})


def test_level_within_tolerance_is_read_as_is():
    plan = plan_read(0.25, [1, 2, 4, 8], target_mpp=0.5, tile_px=224)
    assert (plan.level, plan.read_px, plan.resized) == (1, 224, False)
    plan = plan_read(0.499, [1], target_mpp=0.5, tile_px=224)
    assert (plan.level, plan.read_px, plan.resized, plan.effective_mpp) == (0, 224, False, 0.499)


def test_coarsest_level_not_coarser_than_target_then_area_resize():
    plan = plan_read(0.25, [1, 2, 4, 8], target_mpp=0.75, tile_px=224)
    assert (plan.level, plan.read_px, plan.resized) == (1, 336, True)
    assert plan.effective_mpp == pytest.approx(0.75)
    odd = plan_read(0.2265, [1, 4, 16], target_mpp=0.5, tile_px=224)
    assert (odd.level, odd.read_px) == (0, round(224 * 0.5 / 0.2265))


def test_never_upsample_unless_allowed():
    with pytest.raises(UpsampleError, match="coarser target") as refused:
        plan_read(0.5, [1, 4], target_mpp=0.25, tile_px=224)
    assert "tiling.allow_upsample: true" in str(refused.value) and "--config" in str(refused.value)
    plan = plan_read(0.5, [1, 4], target_mpp=0.25, tile_px=224, allow_upsample=True)
    assert (plan.level, plan.read_px) == (0, 112)


def test_grid_keeps_only_whole_tiles_at_edges():
    plan = plan_read(0.5, [1], target_mpp=0.5, tile_px=100)
    assert len(tile_grid((300, 200), plan)) == 3 * 2
    assert len(tile_grid((299, 200), plan)) == 2 * 2
    assert len(tile_grid((99, 500), plan)) == 0
    coords = tile_grid((300, 200), plan)
    assert coords.tolist() == [[0, 0], [100, 0], [200, 0], [0, 100], [100, 100], [200, 100]]  # row-major


def test_grid_is_in_whole_read_level_pixels():
    plan = plan_read(0.25, [1, 2, 4], target_mpp=1.0, tile_px=64, overlap_px=16)
    coords = tile_grid((4000, 3000), plan)
    assert plan.level == 2 and plan.step_px == 48
    assert np.all(coords % 4 == 0)
    assert np.all(np.diff(np.unique(coords[:, 0])) == 48 * 4)
    assert coords[:, 0].max() + 64 * 4 <= 4000 and coords[:, 1].max() + 64 * 4 <= 3000


def test_context_margin_extends_the_read():
    plan = plan_read(0.25, [1, 2], target_mpp=0.5, tile_px=224, context_px=16)
    assert (plan.stored_px, plan.region_px, plan.step_px) == (256, 256, 224)
