"""Figure 8: the distiller's start-up, planning, memory and loader rate as the store grows 10x (issue
11 item 6), on runs of 10^5 and 10^6 rows built in seconds from a real tiled and featurised run.

A grown run is what `tiles` and `features` would leave for that many rows: a tile store and one
feature store per teacher with the source's array layout and codecs, every stored object (shard, or
chunk of an unsharded array) a hard link to the object of source unit ``unit mod k``, the `slide`
array written for synthetic slides of UNITS_PER_SLIDE units each, slide records to match, and every
unit recorded finished in each store's unit index, with its read-failed rows, as the stages record them. The pixels and
targets are real; the bytes on disk are the source's, so both sizes read the same cached files and
the figures measure what grows with the row count (bookkeeping, planning, per-row arrays), not the disk.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import psutil

from bench.common import Row
from bench.loader import loader_rate
from distill.data import BlockShuffleLoader, DistillData, open_distill_data
from pipeline.config import Config, DistillConfig, StoreConfig
from pipeline.stores import (
    FeatureStoreAttrs, RunDir, SlideRecord, Store, TileStoreAttrs, create_feature_store, create_tile_store, object_files,
    open_feature_store, open_tile_store, remove_store, tile_unit_record, write_rows,
)

FIGURE = "8 scale"
UNITS_PER_SLIDE = 16  # 4,096 rows per synthetic slide at 256 rows per unit: a slide of ordinary size
START_UP_BUDGET = 5.0  # seconds, at 10^6 rows (issue 11)


def grown_run(source: Path, dest: Path, units: int) -> tuple[Path, float]:
    """``dest`` grown from ``source`` to ``units`` units, and the seconds its build took. A run grown
    earlier from a source of the same tiling and teachers is reused: it holds its own bytes (hard
    links keep them), and deleting ~10^5 files and folders costs minutes on a busy disk."""
    recipe = grow_recipe(source, units)
    stamp = dest / "grown.json"
    if stamp.is_file() and json.loads(stamp.read_text())["recipe"] == recipe:
        return dest, json.loads(stamp.read_text())["build_seconds"]
    began = time.perf_counter()
    grow_run(source, dest, units)
    seconds = time.perf_counter() - began
    stamp.write_text(json.dumps({"recipe": recipe, "build_seconds": seconds}))
    return dest, seconds


def grow_recipe(source: Path, units: int) -> dict:
    """What a grown run is made of: its size, the source's tiling, and each teacher's provenance, recipes and views."""
    tiles = open_tile_store(RunDir(source).tiles)
    teachers = {name: open_feature_store(RunDir(source).features(name), tiles).attrs for name in RunDir(source).teachers_with_features()}
    return {
        "units": units, "tiling": tiles.attrs.tiling.to_dict(),
        "teachers": {name: {"teacher": a.teacher, "recipes": a.recipes, "views": a.views} for name, a in teachers.items()},
    }


def grow_run(source: Path, dest: Path, units: int) -> None:
    """``dest`` as a finished run of ``units`` units grown from the finished run ``source`` (see the module doc)."""
    tiles = open_tile_store(RunDir(source).tiles)
    run = RunDir(dest)
    unit_rows, n_rows, source_units = tiles.unit_rows, units * tiles.unit_rows, len(tiles.units())
    slide_rows = UNITS_PER_SLIDE * unit_rows
    slides = [
        SlideRecord(
            id=index, name=f"synthetic-{index}", path=f"synthetic/{index}", status="ok", error=None, hash=f"synthetic-{index}",
            n_tiles=min(n_rows, first + slide_rows) - first, rows=[first, min(n_rows, first + slide_rows)],
        )
        for index, first in enumerate(range(0, n_rows, slide_rows))
    ]
    attrs = TileStoreAttrs.new(tiles.attrs.tiling, slides, n_rows)
    store_config = StoreConfig(**tiles.attrs.tiling.store)
    for path in (run.tiles, *(run.features(name) for name in RunDir(source).teachers_with_features())):
        remove_store(path)
    grown = create_tile_store(run.tiles, attrs, store_config)
    origin_of = {unit: (unit % source_units) * unit_rows for unit in range(units)}
    link_units(tiles, grown, origin_of, [name for name in tiles.array_names() if name != "slide"])
    # The slide array: each slide's first unit written, its other units linked to that one.
    for slide in slides:
        write_rows(run.tiles, slide.rows[0], {"slide": np.full(unit_rows, slide.id, np.int32)})
    slide_firsts = {unit: slide.rows[0] for slide in slides for unit in range(slide.rows[0] // unit_rows + 1, slide.rows[1] // unit_rows)}
    link_units(grown, grown, slide_firsts, ["slide"])
    flags = tiles["flags"][:]
    grown.markers().fold({
        unit: {"start": start, **tile_unit_record(start, flags[origin_of[unit] : origin_of[unit] + end - start])}
        for unit, (start, end) in enumerate(grown.units())
    })
    for teacher in RunDir(source).teachers_with_features():
        features = open_feature_store(RunDir(source).features(teacher), tiles)
        feature_attrs = FeatureStoreAttrs.new(attrs, features.attrs.teacher, features.attrs.recipes, features.attrs.views)
        first_array = features[features.array_names()[0]]
        grown_features = create_feature_store(run.features(teacher), feature_attrs, first_array.chunks[0], first_array.shards[0], store_config)
        link_units(features, grown_features, origin_of, features.array_names())
        grown_features.markers().fold({unit: {"start": start, "end": end} for unit, (start, end) in enumerate(grown_features.units())})


def link_units(source: Store, grown: Store, origin_of: dict[int, int], arrays: list[str]) -> None:
    """Hard-link each stored object of ``arrays`` of ``grown``'s unit u to that of ``source``'s unit from row ``origin_of[u]``."""
    unit_rows = source.unit_rows
    made: set[Path] = set()
    for name in arrays:
        origin, target = source[name], grown[name]
        if origin.metadata.codecs != target.metadata.codecs or origin.chunks != target.chunks or origin.shards != target.shards:
            raise RuntimeError(f"{grown.path}/{name} is not laid out as {source.path}/{name}: its objects cannot be linked")
        for unit, first in origin_of.items():
            start = unit * unit_rows
            for (_, existing), (_, link) in zip(object_files(origin, first, first + unit_rows), object_files(target, start, start + unit_rows)):
                if link.parent not in made:
                    link.parent.mkdir(parents=True, exist_ok=True)
                    made.add(link.parent)
                os.link(existing, link)


def training_loader(data: DistillData, settings: DistillConfig) -> BlockShuffleLoader:
    return BlockShuffleLoader(data, data.rows_of(data.split.train), settings.batch_size, settings.pool_chunks, settings.loader_workers, seed=0)


def start_up_seconds(run: Path, settings: DistillConfig) -> float:
    """What `distill` does before its first read: open and check the stores, open the data, build the loader."""
    began = time.perf_counter()
    open_tile_store(RunDir(run).tiles).require_finished("tiles")
    data = open_distill_data([run], settings)
    training_loader(data, settings)
    return time.perf_counter() - began


def first_batch_seconds(run: Path, settings: DistillConfig) -> float:
    """Planning: from a new loader to its first batch (the epoch's pool order, then the first pools read)."""
    data = open_distill_data([run], settings)
    began = time.perf_counter()
    loader = training_loader(data, settings)
    with closing(iter(loader)) as batches:
        next(batches)
    return time.perf_counter() - began


def loader_rss_growth_mib(run: Path, settings: DistillConfig, samples: int) -> float:
    """RSS growth of opening the data and loading ``samples`` samples, in a fresh process so that
    nothing earlier is reused; sampled after every batch, in MiB."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_rss_growth_here, run, settings, samples).result()


def _rss_growth_here(run: Path, settings: DistillConfig, samples: int) -> float:
    process = psutil.Process()
    before = peak = process.memory_info().rss
    data = open_distill_data([run], settings)
    loader = training_loader(data, settings)
    seen = 0
    with closing(iter(loader)) as batches:
        for batch in batches:
            peak = max(peak, process.memory_info().rss)
            seen += len(batch)
            if seen >= samples:
                break
    return (peak - before) / 2**20


def measure(tiled: Config, work: Path, quick: bool) -> list[Row]:
    """``tiled`` holds a finished tile store and feature stores: the source of the grown runs."""
    settings = tiled.distill
    unit_rows = open_tile_store(RunDir(tiled.run).tiles).unit_rows
    small_units, large_units = (4, 40) if quick else (-(-10**5 // unit_rows), -(-10**6 // unit_rows))
    small, _ = grown_run(tiled.run, work / f"scale-{small_units}", small_units)
    large, build = grown_run(tiled.run, work / f"scale-{large_units}", large_units)
    n_small, n_large = small_units * unit_rows, large_units * unit_rows
    samples = 256 if quick else 4096
    start_up, planning, rate = {small: [], large: []}, {small: [], large: []}, {small: [], large: []}
    for _ in range(1 if quick else 3):  # interleaved: load on the machine moves both sizes alike
        for run in (small, large):
            start_up[run].append(start_up_seconds(run, settings))
            planning[run].append(first_batch_seconds(run, settings))
            data = open_distill_data([run], settings)
            rate[run].append(loader_rate(data, samples, settings))
    start_up_small, start_up_large = min(start_up[small]), min(start_up[large])
    planning_small, planning_large = min(planning[small]), min(planning[large])
    rate_small, rate_large = max(rate[small]), max(rate[large])
    memory_small, memory_large = (loader_rss_growth_mib(run, settings, samples) for run in (small, large))
    size = f"{n_large:,} rows"
    return [
        Row(FIGURE, f"build a {size} run from real tiles", build, "s", "", None, "", "hard links to the source's objects; reused while tiling and teachers are unchanged"),
        Row(
            FIGURE, f"start-up at {size}", start_up_large, "s", f"the {START_UP_BUDGET:.0f} s budget (at {n_small:,} rows: {start_up_small:.2f} s)",
            start_up_large / START_UP_BUDGET, "<= 1.0", "open + require_finished + open_distill_data + loader",
        ),
        Row(FIGURE, f"planning (new loader to first batch) at {size}", planning_large, "s", f"at {n_small:,} rows ({planning_small:.2f} s)", planning_large / planning_small, "", "10x the rows"),
        Row(FIGURE, f"loader RSS growth at {size}", memory_large, "MiB", f"at {n_small:,} rows ({memory_small:.0f} MiB)", memory_large / max(memory_small, 1.0), "", "open + loader + first samples, fresh process"),
        Row(FIGURE, f"loader rate at {size}", rate_large, "samples/s", f"at {n_small:,} rows ({rate_small:,.0f}/s)", rate_large / rate_small, ">= 0.9", "cost flat per row"),
    ]
