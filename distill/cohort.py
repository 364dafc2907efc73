"""Several runs composed into one training set: each run's tile store with its feature stores.

A lab tiles and featurises each cohort once, in its own run, and trains on any list of runs. The
runs must agree on everything that decides what the student is shown and taught: the pixels
(target mpp, tile side, stored side with context) and the read unit (chunk rows), and per teacher
the weights (its provenance), the recipe and its width, the views and, when a spatial term reads
grids, the grid's k. Their rows are laid end to
end in one global row index in which each run starts on a chunk boundary (a run's last partial
chunk is padded, and padding rows are never kept), so every global chunk is a chunk of exactly one
run. Slide ids are per run, so a slide's global key is its id plus the ids of the runs before it:
the keys of the first run are its own ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import dask.array as da
import numpy as np
import tensorstore as ts
import zarr

from distill.pools import open_tensorstore
from pipeline.config import ConfigError
from pipeline.geometry import same_mpp
from pipeline.stores import FeatureStoreAttrs, RunDir, SlideRecord, StoreError, TileStoreAttrs, UnitReader


@dataclass
class Source:
    """One run of the training set: its stores, and where its rows and slide ids sit in the global ones."""

    run: Path
    tile_reader: UnitReader  # of uint8 [n, S, S, 3]
    target_readers: dict[str, UnitReader]  # teacher -> its recipe's float16 [n, V, D]
    tile_attrs: TileStoreAttrs
    feature_attrs: dict[str, FeatureStoreAttrs]  # teacher -> its store's attrs
    recipes: dict[str, str]  # teacher -> the recipe read
    offset: int  # global row of its row 0: a multiple of chunk_rows
    slide_base: int  # added to its slide ids to give their global keys
    grid_readers: dict[str, UnitReader] = field(default_factory=dict)  # teacher -> its float16 [n, V, k*k, C] grid; {}: no spatial term

    @property
    def tiles(self) -> zarr.Array:
        return self.tile_reader.array

    @property
    def targets(self) -> dict[str, zarr.Array]:
        return {teacher: reader.array for teacher, reader in self.target_readers.items()}

    @property
    def grids(self) -> dict[str, zarr.Array]:
        return {teacher: reader.array for teacher, reader in self.grid_readers.items()}

    @cached_property
    def target_stores(self) -> dict[str, ts.TensorStore]:
        """The targets opened with tensorstore too, for the loader's batched pool reads (distill/pools.py)."""
        return {teacher: open_tensorstore(array) for teacher, array in self.targets.items()}

    @cached_property
    def grid_stores(self) -> dict[str, ts.TensorStore]:
        return {teacher: open_tensorstore(array) for teacher, array in self.grids.items()}

    def pool_arrays(self) -> Iterator[tuple[str, str, UnitReader, ts.TensorStore]]:
        """(kind, teacher, reader, tensorstore) of every per-teacher array a pool reads: the targets
        (kind ``targets``), then the grids (kind ``grids``) when a spatial term asks for them."""
        for kind, readers, stores in (("targets", self.target_readers, self.target_stores), ("grids", self.grid_readers, self.grid_stores)):
            for teacher, reader in readers.items():
                yield kind, teacher, reader, stores[teacher]

    @property
    def n_rows(self) -> int:
        return self.tile_attrs.n_rows

    @property
    def chunk_rows(self) -> int:
        return self.tiles.chunks[0]

    @property
    def padded_rows(self) -> int:
        """Its rows up to the next chunk boundary: where the next run starts."""
        return -(-self.n_rows // self.chunk_rows) * self.chunk_rows

    @property
    def slide_keys_end(self) -> int:
        """The slide base of the next run."""
        return self.slide_base + max((slide.id for slide in self.tile_attrs.slides), default=-1) + 1

    def feature_path(self, teacher: str) -> Path:
        return RunDir(self.run).features(teacher)

    def lazy_tiles(self) -> da.Array:
        return _lazy(self.tiles)

    def lazy_targets(self) -> dict[str, da.Array]:
        return {teacher: _lazy(array) for teacher, array in self.targets.items()}

    def lazy_grids(self) -> dict[str, da.Array]:
        return {teacher: _lazy(array) for teacher, array in self.grids.items()}


def _lazy(array: zarr.Array) -> da.Array:
    # chunks explicit: the default for sharded arrays is one task per tiny inner chunk or per huge shard
    # depending on the Dask version (dask/dask#12586)
    return da.from_zarr(array, chunks=array.chunks)


@dataclass(frozen=True)
class Slide:
    """A slide of one run of the training set: `record` as its tile store holds it (its own id and
    rows), `key` unique across the runs."""

    run: Path
    tile_store_id: str
    key: int
    record: SlideRecord

    def as_record(self) -> dict:
        return {"run": str(self.run), "id": self.record.id, "name": self.record.name, "rows": self.record.rows}


def require_distinct(runs: list[Path]) -> list[Path]:
    """The runs, resolved; each may appear once (a run listed twice would be trained on twice)."""
    if not runs:
        raise ConfigError("distill.runs is empty: list at least one run directory (or leave it unset for the run itself)")
    resolved = [Path(run).resolve() for run in runs]
    repeated = sorted({str(run) for run in resolved if resolved.count(run) > 1})
    if repeated:
        raise ConfigError(f"distill.runs lists {repeated} more than once: list each run once")
    return resolved


def require_alike(sources: list[Source]) -> None:
    """Every run agrees with the first on pixels, read unit, teachers, recipes, views and (when grids are
    read) grid k, or a StoreError naming both runs, what differs and the fix."""
    first = sources[0]
    for other in sources[1:]:
        if other.tile_attrs.store_id == first.tile_attrs.store_id:
            raise StoreError(
                f"runs {first.run} and {other.run} hold the same tile store ({first.tile_attrs.store_id}, one copied from "
                "the other): list it once in distill.runs"
            )
        pixels = _tiling_differences(first, other)
        if pixels:
            raise StoreError(
                f"runs {first.run} and {other.run} were tiled differently ({'; '.join(pixels)}): a student is shown one "
                f"kind of tile, so rerun `tiles` (and `features`) for {other.run} with the tiling and store settings of "
                f"{first.run}, or leave it out of distill.runs"
            )
        for teacher in first.target_readers:
            ours, theirs = first.feature_attrs[teacher], other.feature_attrs[teacher]
            provenance = sorted(key for key in ours.teacher.keys() | theirs.teacher.keys() if ours.teacher.get(key) != theirs.teacher.get(key))
            if provenance:
                raise StoreError(
                    f"runs {first.run} and {other.run} hold features of different teachers named {teacher!r} (they differ in "
                    f"{provenance}): rerun `features` for {teacher!r} on {other.run} with the weights used for {first.run}"
                )
            recipe, width = first.recipes[teacher], ours.recipes[first.recipes[teacher]]
            if other.recipes[teacher] != recipe or theirs.recipes.get(recipe) != width:
                raise StoreError(
                    f"runs {first.run} and {other.run} give teacher {teacher!r} different targets (recipe {recipe!r} of width "
                    f"{width} vs {other.recipes[teacher]!r} of width {theirs.recipes.get(other.recipes[teacher])}): set "
                    f"distill.recipes.{teacher} to a recipe both stores hold"
                )
            if theirs.views != ours.views:
                raise StoreError(
                    f"runs {first.run} and {other.run} computed teacher {teacher!r} on different views ({ours.views} vs "
                    f"{theirs.views}): rerun `features` for {other.run} with the views of {first.run}"
                )
            if first.grid_readers and theirs.grid != ours.grid:
                raise StoreError(
                    f"runs {first.run} and {other.run} hold grids of teacher {teacher!r} of different sizes (k = {ours.grid} vs "
                    f"{theirs.grid}): rerun `features --overwrite` for {other.run} with features.grid: {ours.grid}"
                )


def _tiling_differences(first: Source, other: Source) -> list[str]:
    ours, theirs = first.tile_attrs.tiling, other.tile_attrs.tiling
    found = [] if same_mpp(theirs.target_mpp, ours.target_mpp) else [f"tiling.target_mpp {ours.target_mpp} vs {theirs.target_mpp}"]
    found += [
        f"tiling.{key} {getattr(ours, key)} vs {getattr(theirs, key)}" for key in ("tile_px", "stored_px") if getattr(ours, key) != getattr(theirs, key)
    ]
    if first.chunk_rows != other.chunk_rows:
        found.append(f"store.chunk_rows {first.chunk_rows} vs {other.chunk_rows}")
    return found


def cohort_slides(sources: list[Source]) -> list[Slide]:
    """Every slide of every run, in run order."""
    return [
        Slide(source.run, source.tile_attrs.store_id, source.slide_base + slide.id, slide)
        for source in sources
        for slide in source.tile_attrs.slides
    ]


def global_rows(sources: list[Source], per_run: list[np.ndarray], padding: int | bool) -> np.ndarray:
    """One run's array per source laid out in the global row index, padding rows set to `padding`."""
    total = sources[-1].offset + sources[-1].n_rows
    laid_out = np.full(total, padding, dtype=per_run[0].dtype)
    for source, values in zip(sources, per_run):
        laid_out[source.offset : source.offset + source.n_rows] = values
    return laid_out


def composition(sources: list[Source], train: list[Slide], val: list[Slide], kept_rows: dict[str, np.ndarray]) -> list[dict]:
    """What each run gave the training set: its path and stores, and the slides and readable rows used
    on each side (`kept_rows`: side -> global mask of the rows kept)."""
    records = []
    for source in sources:
        rows = slice(source.offset, source.offset + source.n_rows)
        records.append({
            "run": str(source.run),
            "tile_store_id": source.tile_attrs.store_id,
            "feature_store_ids": {teacher: attrs.store_id for teacher, attrs in source.feature_attrs.items()},
            "rows": {side: int(mask[rows].sum()) for side, mask in kept_rows.items()},
            "slides": {
                side: [{"id": s.record.id, "name": s.record.name} for s in slides if s.run == source.run]
                for side, slides in (("train", train), ("val", val))
            },
        })
    return records
