"""Figure 1: tiles/s of the tile reader against a per-tile read_region loop and the JPEG decode floor,
and of the tile stage's units phase on Ray against ``write_unit`` called in this process."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from bench.common import Row, timed
from pipeline.config import Config, RayConfig, StoreConfig, TilingConfig, TissueConfig
from pipeline.geometry import ReadPlan
from pipeline.ray_runtime import ray_session
from pipeline.stores import TileStoreAttrs, Tiling, create_tile_store, unit_ranges
from pipeline.tiles.slide_identity import identify_slide
from pipeline.tiles.slides import OpenSlides, SlideReader, SlideSource
from pipeline.tiles.stage import run_tiles, unit_segments
from pipeline.tiles.slide_tiles import SlidePlan, plan_slide, read_tiles
from pipeline.tiles.workers import UnitBuffer, write_unit

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


def plan_in_process(config: Config) -> tuple[list[SlidePlan], TileStoreAttrs]:
    """The slides' plans with their rows, and the attrs of their store, as the stage makes them."""
    plans: list[SlidePlan] = []
    for index, path in enumerate(config.slides):
        plan = plan_slide(index, SlideSource(path), identify_slide(path, {}), config.tiling, config.tissue, None)
        start = plans[-1].record.rows[1] if plans else 0
        plan.record = dataclasses.replace(plan.record, rows=[start, start + len(plan.coords)])
        plans.append(plan)
    return plans, TileStoreAttrs.new(Tiling.from_config(config), [p.record for p in plans], plans[-1].record.rows[1])


def in_process_units(config: Config, plans: list[SlidePlan], attrs: TileStoreAttrs, warm: bool) -> tuple[float, dict[str, float]]:
    """Seconds to write every unit into a new store by calling ``write_unit`` here, one unit after
    another, and the seconds its units spent reading and writing, and on the CPU.

    ``warm`` False is a unit as a task does it alone: its slides opened and its buffer allocated for
    it. ``warm`` True keeps both from one unit to the next, as a stage worker does.
    """
    store = config.run / "tiles.zarr"
    shutil.rmtree(config.run, ignore_errors=True)
    create_tile_store(store, attrs, config.store)
    split = {"read_seconds": 0.0, "write_seconds": 0.0, "cpu_seconds": 0.0}

    def all_units() -> None:
        with OpenSlides() as kept:
            buffer = UnitBuffer()
            for unit, (start, end) in enumerate(unit_ranges(attrs.n_rows, config.store.shard_rows)):
                with OpenSlides() as fresh:
                    stats = write_unit(
                        str(store), attrs.store_id, unit, start, unit_segments(plans, start, end),
                        kept if warm else fresh, buffer if warm else UnitBuffer(),
                    )
                for key in split:
                    split[key] += stats[key]

    return timed(all_units), split


def stage_against_in_process(slides: list[Path], work: Path, repeats: int) -> list[Row]:
    """The tile stage's units phase with 1 and 2 workers against ``write_unit`` in this process on the
    same units, interleaved: each repeat runs every side once; the best of the repeats counts."""
    def config(name: str, workers: int) -> Config:
        return Config(run=work / name, slides=slides, store=StoreConfig(), ray=RayConfig(num_cpus=workers))

    plans, attrs = plan_in_process(config("tiles-in-process", 1))
    best = {"cold": float("inf"), "warm": float("inf"), 1: float("inf"), 2: float("inf")}
    cpu = dict(best)  # CPU seconds of the units: the work done, whatever share of the cores the machine's load left
    split: dict[str, float] = {}
    for _ in range(repeats):
        for warm in (False, True):
            seconds, split = in_process_units(config("tiles-in-process", 1), plans, attrs, warm)
            key = "warm" if warm else "cold"
            best[key], cpu[key] = min(best[key], seconds), min(cpu[key], split["cpu_seconds"])
        for workers in (1, 2):
            with ray_session(RayConfig(num_cpus=workers)):  # Ray's start-up is not part of the units phase
                summary = run_tiles(config(f"tiles-stage-{workers}", workers), overwrite=True)
            best[workers], cpu[workers] = min(best[workers], summary.units_seconds), min(cpu[workers], summary.units_cpu_seconds)
    rate = {key: attrs.n_rows / seconds for key, seconds in best.items()}
    units = f"{summary.units_total} units of {StoreConfig().shard_rows} rows from {len(slides)} slides"
    read_share = split["read_seconds"] / (split["read_seconds"] + split["write_seconds"])
    baseline = "write_unit in this process, a unit as a task does it"
    return [
        Row(FIGURE, "write_unit in this process, slides and buffer kept between units", rate["warm"], "tiles/s", baseline, rate["warm"] / rate["cold"], "", units),
        Row(FIGURE, "write_unit in this process, a unit as a task does it", rate["cold"], "tiles/s", note=f"read {read_share:.0%}, write {1 - read_share:.0%} of a unit (warm)"),
        Row(FIGURE, "tiles stage on Ray, units phase, 1 worker", rate[1], "tiles/s", baseline + " (1 core)", rate[1] / rate["cold"], ">= 0.9", units),
        Row(FIGURE, "tiles stage on Ray, units phase, 2 workers", rate[2], "tiles/s", baseline + " x 2 (per core)", rate[2] / (2 * rate["cold"]), ">= 0.9", units),
        Row(FIGURE, "tiles stage on Ray, units phase, 2 workers against 1", rate[2], "tiles/s", "the stage's units phase with 1 worker", rate[2] / rate[1], ">= 1.5", units),
        *[
            Row(FIGURE, f"CPU seconds per 1,000 tiles, stage's {workers} worker(s)", 1000 * cpu[workers] / attrs.n_rows, "s", "the same for write_unit in this process, a unit as a task does it",
                cpu[workers] / cpu["cold"], "", "the work itself, apart from the share of the cores the machine's load left; Ray's own processes not counted")
            for workers in (1, 2)
        ],
    ]


def measure(slides: list[Path], stage_slides: list[Path], work: Path, quick: bool) -> list[Row]:
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
    rows += stage_against_in_process(stage_slides, work, repeats=1 if quick else 3)
    if importlib.util.find_spec("hs2p") is None:
        rows.append(Row(FIGURE, "hs2p at the same settings", float("nan"), "", note="skipped: hs2p is not installed (pip install hs2p to compare)"))
    return rows
