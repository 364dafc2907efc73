"""Resolution and tile geometry, in micrometres per pixel (mpp), in one place.

The rules, in the order they are applied:

1. Level-0 mpp comes from the slide's properties, first match wins: ``openslide.mpp-x``, vendor
   keys, the TIFF resolution tags, and objective power as a last resort (10 / power). The source is
   recorded with the value. A per-slide override beats all of them.
2. The read level is the coarsest level whose mpp is not coarser than the target (within the
   relative tolerance). Upsampling is an error unless explicitly allowed.
3. A level within tolerance of the target is read at the tile size as is; otherwise the tile is read
   at ``round(tile_px * target / level_mpp)`` level pixels and resized down with an area filter.
4. The grid is laid out in whole read-level pixels, so every level-0 coordinate is an integer
   multiple of the level downsample (exact for integer downsamples) and OpenSlide reads whole
   pixels without resampling. Tiles must lie fully inside the slide; coordinates are the level-0
   top-left corner of the tile proper (a context margin, when used, extends around it).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.errors import PathdistillError

MPP_TOLERANCE = 0.05  # relative mpp difference treated as equal, unless a run sets tiling.mpp_tolerance
# Vendor-specific keys that carry microns per pixel directly.
VENDOR_MPP_KEYS = ("aperio.MPP", "openslide.mirax.MPP")
RESOLUTION_UNIT_UM = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


class MppError(PathdistillError, ValueError):
    """The slide has no usable microns-per-pixel value and none was given."""


class UpsampleError(PathdistillError, ValueError):
    """The target resolution is finer than the slide's base level."""


def read_mpp(properties: Mapping[str, str]) -> tuple[float, str]:
    """Level-0 mpp and the property it came from, or MppError naming the fix."""
    for key in ("openslide.mpp-x", *VENDOR_MPP_KEYS):
        value = _positive_float(properties.get(key))
        if value is not None:
            return value, key
    resolution = _positive_float(properties.get("tiff.XResolution"))
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    if resolution is not None and unit in RESOLUTION_UNIT_UM:
        return RESOLUTION_UNIT_UM[unit] / resolution, "tiff.XResolution"
    comment_mpp = re.search(r"MPP\s*=\s*([0-9.]+)", str(properties.get("openslide.comment", "")))
    if comment_mpp and _positive_float(comment_mpp.group(1)):
        return float(comment_mpp.group(1)), "openslide.comment"
    power = _positive_float(properties.get("openslide.objective-power"))
    if power is not None:
        return 10.0 / power, "openslide.objective-power"
    raise MppError(
        "no microns-per-pixel in the slide's properties (openslide.mpp-x, vendor keys, TIFF resolution, "
        "objective power); give it in a slide manifest (CSV/YAML with columns path,mpp)"
    )


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


@dataclass(frozen=True)
class ReadPlan:
    """How one slide is read: which level, how many level pixels per tile, and the grid step."""

    level: int
    level_downsample: float
    level_mpp: float
    read_px: int  # tile proper, in read-level pixels
    step_px: int  # grid step, in read-level pixels
    context_read_px: int  # margin on each side, in read-level pixels
    tile_px: int  # tile proper at the target mpp
    context_px: int  # margin on each side at the target mpp
    resized: bool  # read_px != tile_px: resized with an area filter
    effective_mpp: float  # mpp of the stored pixels

    @property
    def stored_px(self) -> int:
        return self.tile_px + 2 * self.context_px

    @property
    def region_px(self) -> int:
        """Read-level pixels of the stored region (tile plus margins)."""
        return self.read_px + 2 * self.context_read_px

    def to_level0(self, level_px: float) -> int:
        return int(round(level_px * self.level_downsample))

    def as_record(self) -> dict:
        return asdict(self)


def plan_read(
    mpp0: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    tile_px: int,
    overlap_px: int = 0,
    context_px: int = 0,
    tolerance: float = MPP_TOLERANCE,
    allow_upsample: bool = False,
) -> ReadPlan:
    """Choose the read level and pixel sizes for tiles of ``tile_px`` at ``target_mpp``."""
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must be in [0, tile_px): got {overlap_px} for tile_px {tile_px}")
    level_mpps = [mpp0 * ds for ds in level_downsamples]
    level = read_level(level_mpps, target_mpp, tolerance)
    if level is None:
        if not allow_upsample:
            raise UpsampleError(
                f"target {target_mpp} um/px is finer than the slide's base level ({mpp0:.4f} um/px) beyond "
                f"tolerance {tolerance}; choose a coarser target (tiling.target_mpp, or --target-mpp) or upsample by "
                "setting tiling.allow_upsample: true in the run config (the YAML file given with --config)"
            )
        level = 0
    level_mpp = level_mpps[level]
    scale = target_mpp / level_mpp  # read-level pixels per target pixel
    if same_mpp(level_mpp, target_mpp, tolerance):
        scale = 1.0
    return ReadPlan(
        level=level,
        level_downsample=float(level_downsamples[level]),
        level_mpp=level_mpp,
        read_px=int(round(tile_px * scale)),
        step_px=int(round((tile_px - overlap_px) * scale)),
        context_read_px=int(round(context_px * scale)),
        tile_px=tile_px,
        context_px=context_px,
        resized=scale != 1.0,
        effective_mpp=level_mpp * scale,
    )


def read_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float) -> int | None:
    """Rule 2: the coarsest level not coarser than ``target_mpp`` (within ``tolerance``); None if every level is."""
    fine_enough = [i for i, mpp in enumerate(level_mpps) if mpp <= target_mpp * (1 + tolerance)]
    return max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else None


def same_mpp(found: float, expected: float, tolerance: float = MPP_TOLERANCE) -> bool:
    """Rule 3's equality: ``found`` is ``expected`` within the relative ``tolerance``."""
    return abs(expected / found - 1) <= tolerance


def tile_grid(dimensions: tuple[int, int], plan: ReadPlan) -> np.ndarray:
    """Level-0 (x, y) of every tile that lies fully inside the slide, row-major, int64 [n, 2]."""
    width0, height0 = dimensions

    def starts(extent0: int) -> np.ndarray:
        level_extent = extent0 / plan.level_downsample
        count = int(math.floor((level_extent - plan.read_px) / plan.step_px)) + 1 if level_extent >= plan.read_px else 0
        return np.array([plan.to_level0(i * plan.step_px) for i in range(count)], dtype=np.int64)

    xs, ys = starts(width0), starts(height0)
    # A start that rounds past the edge for a fractional downsample is dropped.
    xs = xs[xs + plan.to_level0(plan.read_px) <= width0]
    ys = ys[ys + plan.to_level0(plan.read_px) <= height0]
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def resize_area(pixels: np.ndarray, size: int) -> np.ndarray:
    """Area-filtered resize of a square RGB tile to ``size`` px: each source pixel weighs by the part
    of it that an output pixel covers. PIL's BOX samples pixel centres instead, which is area only
    for whole-number factors, so PIL's ``reduce`` serves those and separable taps the others."""
    source = pixels.shape[0]
    if source % size == 0:
        return np.asarray(Image.fromarray(pixels).reduce(source // size))
    index, weight = area_taps(source, size)
    columns = (pixels[index].astype(np.float32) * weight[:, :, None, None]).sum(axis=1)  # [size, source, 3]
    resized = (columns[:, index] * weight[None, :, :, None]).sum(axis=2)  # [size, size, 3]
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def area_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel, the source pixels it overlaps and their weights (overlap / output width)."""
    scale = source / target
    lows = np.arange(target)[:, None] * scale
    index = np.floor(lows).astype(np.int64) + np.arange(int(np.ceil(scale)) + 1)
    overlap = np.clip(np.minimum(lows + scale, index + 1) - np.maximum(lows, index), 0, None)
    return np.minimum(index, source - 1), (overlap / scale).astype(np.float32)
