"""Slides with undecodable JPEG tiles: the rest of the slide is still tiled, and only the tiles that
touch the damage are flagged. The damage is real bytes overwritten in a copy of the real Aperio SVS."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from pipeline.config import Config, RayConfig, StoreConfig, TilingConfig, TissueConfig
from pipeline.stores import FLAG_READ_FAILED
from pipeline.tiles.slide_identity import identify_slide
from pipeline.tiles.slide_tiles import plan_slide
from pipeline.tiles.slides import SlideSource
from pipeline.tiles.stage import run_tiles
from pipeline.tiles.tiff_levels import TiffLevels

pytestmark = pytest.mark.usefixtures("local_ray")
DAMAGED_BYTES = 64 * 1024


def damage_middle(source: Path, copy: Path) -> list[tuple[int, int, int, int]]:
    """Copy ``source`` with 64 KiB of seeded random bytes at its middle; the level-0 rectangles
    (x0, y0, x1, y1) of the JPEG tiles those bytes land in."""
    shutil.copy(source, copy)
    start = copy.stat().st_size // 2 - DAMAGED_BYTES // 2
    end = start + DAMAGED_BYTES
    with open(copy, "r+b") as handle:
        handle.seek(start)
        handle.write(np.random.default_rng(12).integers(0, 256, DAMAGED_BYTES, dtype=np.uint8).tobytes())
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages[0]
        offsets, counts = np.array(page.dataoffsets), np.array(page.databytecounts)
        assert offsets.min() <= start and end <= (offsets + counts).max(), "the damage must land in level-0 tile data only"
        columns = -(-page.imagewidth // page.tilewidth)
        rectangles = []
        for index in np.flatnonzero((offsets < end) & (offsets + counts > start)):
            x0, y0 = index % columns * page.tilewidth, index // columns * page.tilelength
            rectangles.append((x0, y0, min(x0 + page.tilewidth, page.imagewidth), min(y0 + page.tilelength, page.imagelength)))
    return rectangles


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_a_damaged_single_level_slide_is_tiled_and_only_tiles_on_the_damage_are_flagged(tmp_path, real_svs, reader):
    damaged = tmp_path / "damaged.svs"
    rectangles = damage_middle(real_svs, damaged)
    config = Config(
        run=tmp_path / "run", slides=[real_svs, damaged], tiling=TilingConfig(reader=reader),
        tissue=TissueConfig(min_fraction=0.0), store=StoreConfig(chunk_rows=8, shard_rows=32), ray=RayConfig(num_cpus=2),
    )
    summary = run_tiles(config)
    intact, broken = summary.slides
    assert broken.status == "ok", broken.error
    assert broken.reader == intact.reader == ("tifffile" if reader == "auto" else "openslide")
    assert intact.overview_unread_fraction is None
    damaged_area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rectangles) / np.prod(intact.dimensions)
    assert damaged_area <= broken.overview_unread_fraction < 1.2 * damaged_area

    group = zarr.open_group(str(tmp_path / "run" / "tiles.zarr"), mode="r")
    rows_intact, rows_broken = (np.s_[slice(*record.rows)] for record in (intact, broken))
    coords = group["coords"][rows_broken]
    assert np.array_equal(coords, group["coords"][rows_intact])  # min_fraction 0: the full grid of both
    footprint = broken.read["read_px"]  # level 0 is read as is
    touches_damage = np.zeros(len(coords), bool)
    for x0, y0, x1, y1 in rectangles:
        touches_damage |= (coords[:, 0] < x1) & (coords[:, 0] + footprint > x0) & (coords[:, 1] < y1) & (coords[:, 1] + footprint > y0)
    flagged = (group["flags"][rows_broken] & FLAG_READ_FAILED).astype(bool)
    assert touches_damage.any() and np.array_equal(flagged, touches_damage)
    assert not (group["flags"][rows_intact] & FLAG_READ_FAILED).any()
    tiles_broken, tiles_intact = group["tiles"][rows_broken], group["tiles"][rows_intact]
    assert not tiles_broken[flagged].any()
    assert np.array_equal(tiles_broken[~flagged], tiles_intact[~flagged])
    assert summary.read_failed_tiles == flagged.sum()


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_a_slide_with_no_decodable_tile_fails_with_that_reason(tmp_path, real_svs, reader):
    """Every level-0 JPEG tile zeroed: a failed slide saying so, not 'no tissue' or a slide of blank tiles."""
    zeroed = tmp_path / "zeroed.svs"
    shutil.copy(real_svs, zeroed)
    with tifffile.TiffFile(zeroed) as tiff:
        page = tiff.pages[0]
        extents = list(zip(page.dataoffsets, page.databytecounts))
    with open(zeroed, "r+b") as handle:
        for offset, count in extents:
            handle.seek(offset)
            handle.write(b"\0" * count)
    for min_fraction in (0.0, 0.25):
        record = plan_slide(0, SlideSource(zeroed), identify_slide(zeroed, {}), TilingConfig(reader=reader), TissueConfig(min_fraction=min_fraction), None).record
        assert record.status == "failed" and "none of its overview could be decoded" in record.error, record.error


def test_damaged_byte_counts_read_a_bounded_amount_and_still_decode(tmp_path, real_svs):
    """Random TileByteCounts claim up to 4 GiB per tile, and reading that many bytes allocates that
    much memory per tile; the JPEG data still starts at the right offset and decodes."""
    damaged = tmp_path / "counts.svs"
    shutil.copy(real_svs, damaged)
    with tifffile.TiffFile(damaged) as tiff:
        counts = tiff.pages[0].tags["TileByteCounts"]
        table, table_bytes = counts.valueoffset, counts.valuebytecount
    with open(damaged, "r+b") as handle:
        handle.seek(table)
        handle.write(np.random.default_rng(3).integers(0, 256, table_bytes, dtype=np.uint8).tobytes())
    with openslide.OpenSlide(str(real_svs)) as slide:
        dimensions, intact = slide.level_dimensions, np.asarray(slide.read_region((0, 0), 0, (240, 240)).convert("RGB"))
    levels = TiffLevels(damaged, dimensions)
    try:
        assert levels.pages[0].databytecounts[0] > 2**30
        tracemalloc.start()
        try:
            pixels = levels.read(0, 0, 0, 240, 240)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.array_equal(pixels, intact) and peak < 2**24
    finally:
        levels.close()
