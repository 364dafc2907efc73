"""Views: the exact pixels each view name cuts from a stored tile, for numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.views import DIHEDRAL, apply_view, expand_views

# A 2 x 2 tile with context 1 (stored 4 x 4); pixel values are 10 * y + x in every channel.
STORED = np.repeat((10 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(np.uint8)[None, :, :, None], 3, axis=3)
CENTRE = [[11, 12], [21, 22]]  # rows are y, columns are x


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("identity", [[11, 12], [21, 22]]),
        ("rot90", [[12, 22], [11, 21]]),  # counter-clockwise: the top-right pixel moves to the top-left
        ("rot180", [[22, 21], [12, 11]]),
        ("rot270", [[21, 11], [22, 12]]),
        ("flip", [[12, 11], [22, 21]]),  # mirrored left-right
        ("flip_rot90", [[11, 21], [12, 22]]),  # mirrored, then turned counter-clockwise
        ("flip_rot180", [[21, 22], [11, 12]]),
        ("flip_rot270", [[22, 12], [21, 11]]),
    ],
)
def test_each_dihedral_view_cuts_the_centre_and_turns_it(name, expected):
    viewed = apply_view(STORED, {"name": name}, tile_px=2)
    assert viewed.shape == (1, 2, 2, 3)
    assert viewed[0, :, :, 0].tolist() == expected and (viewed[..., 1] == viewed[..., 0]).all()
    as_tensor = apply_view(torch.from_numpy(STORED), {"name": name}, tile_px=2)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor[0, :, :, 0].tolist() == expected


def test_crops_are_offset_from_the_centre_by_dx_along_x_and_dy_along_y():
    views = expand_views(["crop:-1,-1", "crop:1,0", "crop:0,1"], context_px=1, tile_px=2)
    assert views == [{"name": "crop", "dx": -1, "dy": -1}, {"name": "crop", "dx": 1, "dy": 0}, {"name": "crop", "dx": 0, "dy": 1}]
    assert [apply_view(STORED, view, 2)[0, :, :, 0].tolist() for view in views] == [
        [[0, 1], [10, 11]],
        [[12, 13], [22, 23]],
        [[21, 22], [31, 32]],
    ]
    assert torch.equal(apply_view(torch.from_numpy(STORED), views[1], 2), torch.from_numpy(apply_view(STORED, views[1], 2).copy()))


def test_views_work_on_a_single_tile_and_on_real_sized_batches():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(5, 96, 96, 3), dtype=np.uint8)
    for view in expand_views(["dihedral", "crop:16,-16"], context_px=16, tile_px=64):
        batch = apply_view(tiles, view, 64)
        assert batch.shape == (5, 64, 64, 3)
        assert np.array_equal(apply_view(tiles[3], view, 64), batch[3])
        assert np.array_equal(apply_view(torch.from_numpy(tiles), view, 64).numpy(), batch)


def test_expand_views_names_and_refusals():
    assert expand_views(["dihedral"], 0, 224) == [{"name": name} for name in DIHEDRAL]
    assert expand_views(["identity", "flip"], 0, 224) == [{"name": "identity"}, {"name": "flip"}]
    with pytest.raises(ConfigError, match="unknown view 'rot45'"):
        expand_views(["rot45"], 0, 224)
    with pytest.raises(ConfigError, match="raise tiling.context_px to at least 20"):
        expand_views(["crop:20,0"], 16, 224)
    with pytest.raises(ConfigError, match="crop:DX,DY with integer"):
        expand_views(["crop:a,b"], 16, 224)
    with pytest.raises(ValueError, match="does not fit"):
        apply_view(STORED, {"name": "crop", "dx": 2, "dy": 0}, 2)
