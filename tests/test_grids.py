"""Grid pooling of patch tokens: hand-computed cells, and grids that follow the pixels under every view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.grids import GridError, pool_grid, view_grid
from pipeline.views import DIHEDRAL, apply_view


def tokens_of(pixels: np.ndarray, patch: int) -> torch.Tensor:
    """Tokens [B, T, 3] of uint8 tiles [B, px, px, 3]: each patch's mean colour, row-major over the patches,
    as a patch embedding lays them out (a mean is unchanged by turning the patch, so only positions move)."""
    batch, px = pixels.shape[:2]
    side = px // patch
    means = pixels.reshape(batch, side, patch, side, patch, 3).astype(np.float64).mean(axis=(2, 4))
    return torch.from_numpy(means.reshape(batch, side * side, 3))


def test_pooling_by_hand_divisible_and_adaptive():
    four = torch.arange(16.0).reshape(1, 16, 1)  # token (y, x) holds 4y + x
    assert pool_grid(four, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # quadrants, row-major from the top left
    assert pool_grid(four, 1).flatten().tolist() == [7.5]
    assert torch.equal(pool_grid(four, 4), four)
    three = torch.arange(9.0).reshape(1, 9, 1)  # 3 x 3 to 2 x 2: rows and columns [0, 2) and [1, 3)
    assert pool_grid(three, 2).flatten().tolist() == [2.0, 3.0, 5.0, 6.0]
    wide = torch.stack([four, 10 * four], dim=-1).reshape(1, 16, 2)  # channels pool apart
    assert pool_grid(wide, 2)[0].tolist() == [[2.5, 25.0], [4.5, 45.0], [10.5, 105.0], [12.5, 125.0]]


def test_view_grid_moves_cells_as_apply_view_moves_pixels():
    grid = np.array([11, 12, 21, 22], np.float32).reshape(1, 4, 1)  # cell (row, column) holds 10 (row + 1) + column + 1
    assert view_grid(grid, {"name": "rot90"}).flatten().tolist() == [12, 22, 11, 21]  # as tests/test_views.py's pixels
    assert view_grid(grid, {"name": "flip"}).flatten().tolist() == [12, 11, 22, 21]
    assert view_grid(torch.from_numpy(grid), {"name": "flip_rot90"}).flatten().tolist() == [11, 21, 12, 22]
    assert view_grid(grid, {"name": "crop", "dx": 3, "dy": -2}) is grid


@pytest.mark.parametrize(("px", "patch", "k"), [(64, 4, 4), (56, 4, 4), (64, 8, 3), (48, 4, 12)])
def test_the_grid_of_a_view_is_the_viewed_grid(he_pixels, px, patch, k):
    """Pool the tokens of each dihedral view's pixels: the same cells as the tile's grid moved by the view,
    whether k divides the token side (16 by 4) or not (14 by 4, 8 by 3)."""
    stored = np.ascontiguousarray(np.stack([he_pixels[300 : 300 + px, 500 : 500 + px], he_pixels[900 : 900 + px, 200 : 200 + px]]))
    tile_grid = pool_grid(tokens_of(stored, patch), k)
    assert tile_grid.shape == (2, k * k, 3)
    for name in DIHEDRAL:
        viewed = np.ascontiguousarray(apply_view(stored, {"name": name}, px))
        of_view = pool_grid(tokens_of(viewed, patch), k)
        torch.testing.assert_close(view_grid(tile_grid, {"name": name}), of_view, rtol=0, atol=1e-9, msg=f"view {name}")
        if name != "identity":
            assert not torch.allclose(of_view, tile_grid), f"view {name} left the cells where they were: the test cannot tell"


def test_refusals_name_the_problem():
    with pytest.raises(GridError, match="15 patch tokens are not a square grid"):
        pool_grid(torch.zeros(1, 15, 4), 2)
    with pytest.raises(GridError, match=r"grid k = 5 does not fit 4 x 4 patch tokens: choose .* in 1\.\.4"):
        pool_grid(torch.zeros(1, 16, 4), 5)
    with pytest.raises(GridError, match="grid k = 0"):
        pool_grid(torch.zeros(1, 16, 4), 0)
    with pytest.raises(GridError, match="not k x k"):
        view_grid(np.zeros((1, 5, 2)), {"name": "flip"})
