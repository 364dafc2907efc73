"""Planning a slide's tiles (tissue and grid) and reading them in blocks.

Reading is done in blocks of neighbouring grid cells: one OpenSlide call per block, tiles cut from
it in memory, each tile resized on its own. Blocks are a fixed partition of the slide's grid, so a
tile's pixels do not depend on how rows were split into units (a rerun gives identical bytes).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw
from skimage import segmentation

from pipeline.config import TilingConfig, TissueConfig
from pipeline.errors import PathdistillError
from pipeline.geometry import ReadPlan, plan_read, read_mpp, resize_area, tile_grid
from pipeline.stores import FLAG_PADDED, FLAG_READ_FAILED, SlideRecord
from pipeline.tiles.slide_identity import SlideIdentity
from pipeline.tiles.slides import SlideReader, SlideReadError, SlideSource
from pipeline.tiles.tissue import read_overview, tissue_fractions, tissue_mask

BLOCK_CELLS = (4, 8)  # grid rows x columns read with one OpenSlide call


class SlideSkipped(PathdistillError):
    """The slide cannot be tiled; the message is the reason recorded for it."""


@dataclass
class SlidePlan:
    """What the tile stage learns of one slide before reading pixels."""

    record: SlideRecord
    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    tissue: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def ok(self) -> bool:
        return self.record.ok


def plan_slide(index: int, source: SlideSource, identity: SlideIdentity, tiling: TilingConfig, tissue: TissueConfig, qc_dir: Path | None) -> SlidePlan:
    """Measure and grid one identified slide; any failure becomes the slide's recorded reason."""
    record = _identified_record(index, source, identity)
    try:
        if identity.error is not None:
            raise SlideSkipped(identity.error)
        try:
            reader = SlideReader(source.path, direct=tiling.reader == "auto")
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as error:
            raise SlideSkipped(f"OpenSlide cannot open it ({type(error).__name__}: {error}); is it a whole-slide image?") from error
        with reader:
            return _plan_open_slide(reader, source, record, tiling, tissue, qc_dir)
    except SlideSkipped as reason:
        record["error"] = str(reason)
    except Exception as error:  # noqa: BLE001 - one slide's failure must not stop the run
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=5)
    return SlidePlan(SlideRecord(**record))


def duplicate_plan(index: int, source: SlideSource, identity: SlideIdentity, first: Path) -> SlidePlan:
    """A slide whose content is an earlier slide's: recorded, not tiled, so that no slide is in the
    store twice (and so never on both sides of a training split)."""
    record = _identified_record(index, source, identity)
    record["error"] = f"duplicate of {first} (the same content hash); tiled once, as that slide"
    return SlidePlan(SlideRecord(**record))


def _identified_record(index: int, source: SlideSource, identity: SlideIdentity) -> dict:
    """A failed record (until planning succeeds) with what identifies the slide."""
    record: dict = {"id": index, "name": source.name, "path": str(source.path), "status": "failed", "error": None}
    if identity.error is None:
        record.update(size=identity.size, hash=identity.hash)
    return record


def _plan_open_slide(reader: SlideReader, source: SlideSource, record: dict, tiling: TilingConfig, tissue: TissueConfig, qc_dir: Path | None) -> SlidePlan:
    slide = reader.slide
    properties = dict(slide.properties)
    record.update(
        vendor=properties.get("openslide.vendor", "unknown"),
        dimensions=list(slide.dimensions),
        level_count=slide.level_count,
        level_downsamples=[float(ds) for ds in slide.level_downsamples],
    )
    if source.mpp_override is not None:
        mpp0, mpp_source = source.mpp_override, "override"
    else:
        mpp0, mpp_source = read_mpp(properties)
    record.update(mpp=mpp0, mpp_source=mpp_source)
    plan = plan_read(
        mpp0, slide.level_downsamples, tiling.target_mpp, tiling.tile_px, tiling.overlap_px,
        tiling.context_px, tiling.mpp_tolerance, tiling.allow_upsample,
    )
    record.update(read=plan.as_record(), reader=reader.backend(plan.level))
    coords = tile_grid(slide.dimensions, plan)
    if len(coords) == 0:
        raise SlideSkipped(f"slide {tuple(slide.dimensions)} px is smaller than one tile ({plan.to_level0(plan.read_px)} level-0 px)")
    overview, unread = read_overview(reader, mpp0, tissue.mask_mpp)
    if unread.all():
        raise SlideSkipped("none of its overview could be decoded: the image data is damaged; re-export or re-scan the slide")
    mask = tissue_mask(overview, tissue.mask_mpp, tuple(tissue.saturation_range), tissue.min_object_um2, tissue.min_hole_um2)
    fractions = tissue_fractions(mask, tissue.mask_mpp / mpp0, coords, plan.to_level0(plan.read_px))
    keep = fractions >= tissue.min_fraction
    record.update(grid_tiles=int(len(coords)), tissue_area_fraction=float(mask.mean()))
    if unread.any():  # absent when all was read, so stores of undamaged slides keep their attrs
        record["overview_unread_fraction"] = float(unread.mean())
    if qc_dir is not None:
        picture = draw_qc(qc_dir / f"{record['id']:05d}_{record['name']}.png", overview, mask, coords[keep], plan, tissue.mask_mpp / mpp0)
        record["qc"] = str(picture.relative_to(qc_dir.parent))  # relative to the run directory
    if not keep.any():
        unread_note = f"; {unread.mean():.1%} of it could not be decoded" if unread.any() else ""
        raise SlideSkipped(f"no tissue: no tile reaches tissue fraction {tissue.min_fraction} (tissue covers {mask.mean():.1%} of the overview{unread_note})")
    record.update(status="ok", n_tiles=int(keep.sum()))
    return SlidePlan(SlideRecord(**record), coords[keep], fractions[keep])


def draw_qc(path: Path, overview: np.ndarray, mask: np.ndarray, kept0: np.ndarray, plan: ReadPlan, level0_per_px: float) -> Path:
    """Overview with the tissue outline (green) and the kept tiles (blue), for a human to check."""
    image = Image.fromarray(overview).convert("RGB")
    draw = ImageDraw.Draw(image)
    ys, xs = np.nonzero(segmentation.find_boundaries(mask, mode="inner"))
    draw.point(list(zip(xs.tolist(), ys.tolist())), fill=(0, 170, 0))
    side = plan.to_level0(plan.read_px) / level0_per_px
    for x0, y0 in kept0 / level0_per_px:
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(30, 60, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def read_tiles(
    reader: SlideReader | None, plan: ReadPlan, coords0: np.ndarray, dimensions: tuple[int, int],
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored pixels uint8 [n, S, S, 3] and flags uint8 [n] for tiles at level-0 ``coords0``.

    ``out`` (tiles, flags) is filled in place, every row of it (a unit's buffer, reused: no copy into
    the unit and no fresh pages per unit); without it new arrays are returned. ``reader`` None means
    the slide could not be opened now: every tile is blank and flagged.
    """
    size = plan.stored_px
    tiles, flags = out if out is not None else (np.empty((len(coords0), size, size, 3), np.uint8), np.empty(len(coords0), np.uint8))
    flags[:] = 0
    if reader is None:
        tiles[:] = 0
        flags[:] = FLAG_READ_FAILED
        return tiles, flags
    level_xy = np.round(coords0 / plan.level_downsample).astype(np.int64) - plan.context_read_px
    region = plan.region_px
    flags[_reaches_outside(level_xy, region, plan, dimensions)] |= FLAG_PADDED
    # Blocks are fixed cells of the slide's grid, read from the cell's own corner: OpenSlide shifts a
    # region by a sub-pixel amount when a level's downsample is fractional, so a tile's pixels must
    # not depend on which other tiles a unit happens to read with it.
    block_cells = np.array(BLOCK_CELLS[::-1])  # (columns, rows)
    cells = (level_xy + plan.context_read_px) // plan.step_px // block_cells
    origins = cells * block_cells * plan.step_px - plan.context_read_px
    _, block_of_tile = np.unique(cells[:, ::-1], axis=0, return_inverse=True)  # blocks in row-major order
    for block in range(block_of_tile.max() + 1 if len(coords0) else 0):
        members = np.flatnonzero(block_of_tile == block)
        left, top = origins[members[0]]
        right, bottom = level_xy[members].max(0) + region
        try:
            pixels = reader.read((plan.to_level0(left), plan.to_level0(top)), plan.level, (int(right - left), int(bottom - top)))
        except SlideReadError:
            pixels = None
        for row in members:
            x, y = level_xy[row]
            if pixels is not None:
                cut = pixels[y - top : y - top + region, x - left : x - left + region]
            else:
                try:
                    cut = reader.read((plan.to_level0(x), plan.to_level0(y)), plan.level, (region, region))
                except SlideReadError:
                    flags[row] |= FLAG_READ_FAILED
                    tiles[row] = 0
                    continue
            tiles[row] = resize_area(cut, size) if plan.resized else cut
    return tiles, flags


def _reaches_outside(level_xy: np.ndarray, region: int, plan: ReadPlan, dimensions: tuple[int, int]) -> np.ndarray:
    extent = np.array(dimensions) / plan.level_downsample
    return (level_xy < 0).any(1) | (level_xy + region > extent).any(1)
