"""Figure 1: tiles/s of the tile stage against a per-tile read_region loop and the JPEG decode floor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from bench.common import Row, timed
from pipeline.config import Config, RayConfig, StoreConfig, TilingConfig, TissueConfig
from pipeline.geometry import ReadPlan
from pipeline.tiles.slide_identity import identify_slide
from pipeline.tiles.slides import SlideReader, SlideSource
from pipeline.tiles.stage import run_tiles
from pipeline.tiles.slide_tiles import plan_slide, read_tiles

FIGURE = "1 tiling"


def per_tile_loop(path: Path, read: dict, coords: np.ndarray) -> None:
    """What CLAM and TRIDENT do: one read_region per tile, then a PIL resize."""
    with openslide.OpenSlide(str(path)) as slide:
        for x, y in coords:
            tile = slide.read_region((int(x), int(y)), read["level"], (read["read_px"], read["read_px"])).convert("RGB")
            if read["resized"]:
                tile = tile.resize((read["tile_px"], read["tile_px"]), Image.Resampling.BILINEAR)
            np.asarray(tile)


def jpeg_decode_floor(path: Path, read: ReadPlan, coords0: np.ndarray) -> float:
    """Tiles/s if the only work were decoding, once each, the level's JPEG tiles under the kept tiles
    (tifffile + imagecodecs, one thread): the work no reader of this file can skip."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.series[0].levels[read.level].pages[0]
        columns = -(-page.imagewidth // page.tilewidth)
        needed = set()
        for x0, y0 in np.round(coords0 / read.level_downsample).astype(int):
            for row in range(y0 // page.tilelength, (y0 + read.read_px - 1) // page.tilelength + 1):
                needed.update(row * columns + column for column in range(x0 // page.tilewidth, (x0 + read.read_px - 1) // page.tilewidth + 1))
        encoded = []
        for index in sorted(needed):
            tiff.filehandle.seek(page.dataoffsets[index])
            encoded.append((index, tiff.filehandle.read(page.databytecounts[index])))
        seconds = timed(lambda: [page.decode(data, index, jpegtables=page.jpegtables) for index, data in encoded], repeat=2)
    return len(coords0) / seconds


def measure(slides: list[Path], work: Path, quick: bool) -> list[Row]:
    rows: list[Row] = []
    tiling, tissue = TilingConfig(), TissueConfig()
    for path in slides:
        plan = plan_slide(0, SlideSource(path), identify_slide(path, {}), tiling, tissue, None)
        read, coords = plan.record.read, plan.coords[: 128 if quick else None]
        def blocks(direct: bool) -> float:
            def read_all() -> None:
                with SlideReader(path, direct=direct) as reader:  # a fresh reader: no tiles cached from a previous repeat
                    read_tiles(reader, ReadPlan(**read), coords, tuple(plan.record.dimensions))

            return len(coords) / timed(read_all, repeat=2)

        ours, through_openslide = blocks(direct=True), blocks(direct=False)
        naive = len(coords) / timed(lambda: per_tile_loop(path, read, coords))
        floor = jpeg_decode_floor(path, ReadPlan(**read), coords)
        name = path.name
        rows += [
            Row(FIGURE, f"{name}: block reads, direct TIFF decode, 1 process", ours, "tiles/s", "per-tile read_region loop", ours / naive, ">= 2.0"),
            Row(FIGURE, f"{name}: block reads through OpenSlide, 1 process", through_openslide, "tiles/s", "per-tile read_region loop", through_openslide / naive),
            Row(FIGURE, f"{name}: per-tile read_region loop (CLAM/TRIDENT)", naive, "tiles/s"),
            Row(FIGURE, f"{name}: direct decode vs JPEG decode floor", ours, "tiles/s", f"decoding the level-{read['level']} JPEG tiles under them once ({floor:,.0f} tiles/s)", ours / floor, ">= 0.5"),
        ]
        for workers in (1, 2):
            config = Config(
                run=work / f"tiles-{path.stem}-{workers}", slides=[path], tiling=tiling, tissue=tissue,
                store=StoreConfig(), ray=RayConfig(num_cpus=workers),
            )
            summary = run_tiles(config, overwrite=True)
            rows.append(Row(FIGURE, f"{name}: tiles stage on Ray, {workers} worker(s)", summary.tiles_per_second, "tiles/s", "per-tile loop, 1 process", summary.tiles_per_second / naive, "", "units only: Ray start-up and planning excluded"))
    if importlib.util.find_spec("hs2p") is None:
        rows.append(Row(FIGURE, "hs2p at the same settings", float("nan"), "", note="skipped: hs2p is not installed (pip install hs2p to compare)"))
    return rows
