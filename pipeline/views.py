"""Views: the fixed geometric variants of a stored tile that teachers embed and students are shown.

A view is a small JSON-able dict, recorded in a feature store's ``views`` attr, so the feature stage
(which computes a teacher target per view) and the distiller (which shows the student a view with
its target) cut exactly the same pixels from the same stored tile. This module is the only place
that says which pixels a view is.

A stored tile has side S = tile_px + 2 * context_px. Every view first cuts a tile_px square from it:
the centre one, or for ``{"name": "crop", "dx": DX, "dy": DY}`` the one whose top-left corner is at
(x, y) = (context_px + DX, context_px + DY). Then the dihedral ones mirror left-right (``flip``) and
rotate by k quarter turns counter-clockwise (``rotK``, as ``np.rot90``), mirror first.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from pipeline.config import ConfigError

# name -> (mirror left-right first, quarter turns counter-clockwise)
DIHEDRAL = {
    "identity": (False, 0),
    "rot90": (False, 1),
    "rot180": (False, 2),
    "rot270": (False, 3),
    "flip": (True, 0),
    "flip_rot90": (True, 1),
    "flip_rot180": (True, 2),
    "flip_rot270": (True, 3),
}

Pixels = TypeVar("Pixels", np.ndarray, torch.Tensor)


def expand_views(names: list[str], context_px: int, tile_px: int) -> list[dict]:
    """The view records for config names: the DIHEDRAL names, 'dihedral' (all 8) and 'crop:DX,DY'."""
    views: list[dict] = []
    for name in names:
        if name == "dihedral":
            views += [{"name": dihedral} for dihedral in DIHEDRAL]
        elif name in DIHEDRAL:
            views.append({"name": name})
        elif name.startswith("crop:"):
            views.append(_crop_view(name, context_px, tile_px))
        else:
            raise ConfigError(f"unknown view {name!r}: use one of {list(DIHEDRAL)}, 'dihedral' or 'crop:DX,DY'")
    if not views:
        raise ConfigError("no views given: list at least 'identity'")
    return views


def _crop_view(name: str, context_px: int, tile_px: int) -> dict:
    try:
        dx, dy = (int(part) for part in name.removeprefix("crop:").split(","))
    except ValueError:
        raise ConfigError(f"view {name!r} must be crop:DX,DY with integer pixel offsets, e.g. crop:-16,8") from None
    if max(abs(dx), abs(dy)) > context_px:
        raise ConfigError(
            f"view {name!r} moves the {tile_px} px crop by more than the stored context margin "
            f"(tiling.context_px = {context_px}); raise tiling.context_px to at least {max(abs(dx), abs(dy))} and rerun tiles"
        )
    return {"name": "crop", "dx": dx, "dy": dy}


def apply_view(tiles_nhwc: Pixels, view: dict, tile_px: int) -> Pixels:
    """The view of tiles [..., S, S, C] as [..., tile_px, tile_px, C]: same type; numpy results may be views."""
    side = tiles_nhwc.shape[-2]
    margin = (side - tile_px) // 2
    if view["name"] == "crop":
        x, y, (mirror, turns) = margin + view["dx"], margin + view["dy"], (False, 0)
    elif view["name"] in DIHEDRAL:
        x, y, (mirror, turns) = margin, margin, DIHEDRAL[view["name"]]
    else:
        raise ValueError(f"unknown view {view!r}: this code knows {list(DIHEDRAL)} and crop")
    if not (0 <= x <= side - tile_px and 0 <= y <= side - tile_px):
        raise ValueError(f"view {view} does not fit a {tile_px} px crop in stored tiles of {side} px")
    crop = tiles_nhwc[..., y : y + tile_px, x : x + tile_px, :]
    if isinstance(crop, torch.Tensor):
        crop = crop.flip(-2) if mirror else crop
        return torch.rot90(crop, turns, dims=(-3, -2)) if turns else crop
    crop = np.flip(crop, -2) if mirror else crop
    return np.rot90(crop, turns, axes=(-3, -2)) if turns else crop
