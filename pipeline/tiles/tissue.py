"""Tissue detection on a low-resolution overview, and the tissue fraction of each tile.

H&E tissue is coloured and glass is not, so the mask is a threshold on HSV saturation (Otsu,
clamped so that a slide that is nearly all tissue or all glass is not split in two by noise),
followed by morphology that closes small gaps and drops specks and small holes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from skimage import color, filters, morphology

from pipeline.geometry import read_level
from pipeline.tiles.slides import SlideReader

STRIP_ROWS = 512  # overview rows produced per read, bounding memory on single-level slides


def read_overview(reader: SlideReader, mpp0: float, overview_mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """The whole slide as RGB at ``overview_mpp``, read from the coarsest level fine enough for it,
    and a bool mask of the overview pixels that touch undecodable level pixels: those are white, so
    never tissue, and the rest of the slide is still tiled."""
    slide = reader.slide
    downsamples = slide.level_downsamples
    level = read_level([mpp0 * ds for ds in downsamples], overview_mpp, tolerance=0.0) or 0
    level_width, level_height = slide.level_dimensions[level]
    factor = overview_mpp / (mpp0 * downsamples[level])  # level pixels per overview pixel
    out_width = max(1, int(round(level_width / factor)))
    out_height = max(1, int(round(level_height / factor)))
    strips, unread_strips = [], []
    for top in range(0, out_height, STRIP_ROWS):
        bottom = min(out_height, top + STRIP_ROWS)
        level_top = int(math.floor(top * factor))
        level_bottom = min(level_height, int(math.ceil(bottom * factor)))
        location0 = (0, int(round(level_top * downsamples[level])))
        strip, unread = reader.read_tolerant(location0, level, (level_width, level_bottom - level_top))
        out_size = (out_width, bottom - top)
        strips.append(np.asarray(Image.fromarray(strip).resize(out_size, Image.Resampling.BOX)))
        unread_strips.append(np.asarray(Image.fromarray(unread.astype(np.uint8) * 255).resize(out_size, Image.Resampling.BOX)) > 0)
    return np.concatenate(strips, axis=0), np.concatenate(unread_strips, axis=0)


def tissue_mask(
    overview: np.ndarray,
    overview_mpp: float,
    saturation_range: tuple[float, float] = (0.04, 0.15),
    min_object_um2: float = 10_000.0,
    min_hole_um2: float = 10_000.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB overview."""
    saturation = filters.median(color.rgb2hsv(overview)[..., 1], morphology.disk(1))
    low, high = saturation_range
    threshold = float(np.clip(filters.threshold_otsu(saturation), low, high)) if np.ptp(saturation) > 0 else high
    mask = morphology.closing(saturation > threshold, morphology.disk(2))
    pixel_um2 = overview_mpp**2
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(min_object_um2 / pixel_um2)))
    return morphology.remove_small_holes(mask, max_size=max(1, int(min_hole_um2 / pixel_um2)))


def tissue_fractions(mask: np.ndarray, level0_per_mask_px: float, coords0: np.ndarray, footprint0: int) -> np.ndarray:
    """Fraction of each tile's level-0 footprint that the mask calls tissue, float32 [n]."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.shape

    def bounds(start0: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        low = np.clip(np.round(start0 / level0_per_mask_px).astype(np.int64), 0, limit)
        high = np.clip(np.round((start0 + footprint0) / level0_per_mask_px).astype(np.int64), 0, limit)
        return low, np.maximum(high, np.minimum(low + 1, limit))

    x0, x1 = bounds(coords0[:, 0], width)
    y0, y1 = bounds(coords0[:, 1], height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)
