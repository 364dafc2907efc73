"""Spatial recipes: a model's patch tokens pooled to a k x k grid of cells, and how views move the cells.

One rule for teachers (the ``grid`` array of a feature store) and students (their pooled patch tokens),
so both grids mean the same cells. Tokens [B, T, C] are the patch tokens alone (prefix tokens, CLS
and registers, already removed; a CNN's feature map cells flattened row-major), laid out row-major on
a square side x side grid, side = sqrt(T), in the pixels the model was given: row = y from the top,
column = x from the left. They are average-pooled to k x k cells, cells row-major the same way.

The rule when k does not divide side: adaptive average pooling (``torch.nn.functional.adaptive_avg_pool2d``),
whose cell i along an axis averages tokens [floor(i * side / k), ceil((i + 1) * side / k)), so cells of
neighbouring tokens overlap by at most one token (k = 4 on ViT-S/16's 14 x 14 tokens: cells of 4 tokens,
the middle ones sharing one). Those bins are mirror-symmetric (cell i of the mirrored tokens is cell
k - 1 - i mirrored), so every dihedral view of the pixels permutes the cells exactly (``view_grid``)
whether k divides side or not. Refused: tokens that are not a square grid, k < 1, and k > side (a cell
smaller than a token would repeat tokens, not pool them).
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F

from pipeline.errors import PathdistillError
from pipeline.views import DIHEDRAL, Pixels, apply_view


class GridError(PathdistillError, ValueError):
    """Tokens that cannot be pooled to the grid asked for."""


def token_side(count: int) -> int:
    """The side of a square grid of ``count`` patch tokens, or a GridError."""
    side = math.isqrt(count)
    if side * side != count:
        raise GridError(
            f"{count} patch tokens are not a square grid (prefix tokens removed), so they cannot be pooled to k x k cells: "
            "use a model on square inputs whose patch size divides its input, or set features.grid: 0"
        )
    return side


def pool_grid(tokens: Tensor, k: int) -> Tensor:
    """Patch tokens [B, T, C] (row-major on a square grid) average-pooled to [B, k*k, C], cells row-major."""
    batch, count, width = tokens.shape
    side = token_side(count)
    if not 1 <= k <= side:
        raise GridError(f"grid k = {k} does not fit {side} x {side} patch tokens: choose features.grid (or the student's grid) in 1..{side}")
    image = tokens.transpose(1, 2).reshape(batch, width, side, side)  # NCHW, H = y, W = x
    return F.adaptive_avg_pool2d(image, k).reshape(batch, width, k * k).transpose(1, 2)


def view_grid(grid: Pixels, view: dict) -> Pixels:
    """A grid [..., k*k, C] with its cells moved as ``apply_view`` moves pixels, for a dihedral view: the
    grid of a tile's pixels becomes the grid of the view's pixels. A crop leaves it as it is (the contract:
    a crop's grid is pooled on the crop's own pixels). Numpy or torch, as given."""
    if view["name"] == "crop":
        return grid
    if view["name"] not in DIHEDRAL:
        raise ValueError(f"unknown view {view!r}: this code knows {list(DIHEDRAL)} and crop")
    *lead, cells, width = grid.shape
    k = math.isqrt(cells)
    if k * k != cells:
        raise GridError(f"a grid of {cells} cells is not k x k")
    moved = apply_view(grid.reshape(*lead, k, k, width), view, k)  # the cells as a k x k image: no crop, the same turns
    return moved.reshape(*lead, cells, width)
