"""What the distiller reads: the tile store and the teachers' feature stores, checked, split and loaded.

Two ways in, for two jobs:
- lazy Dask arrays over the tiles and each teacher's recipe (Dask chunks = Zarr chunks), for
  statistics over a sample of rows (the target standardizers) and for describing the data;
- the block-shuffle loader for training: per-sample random reads of ~100 KB chunks are the classic
  bottleneck (scDataset, arXiv 2506.01883), so it reads whole chunks, a pool of them at a time, and shuffles rows
  inside the pool (the annbatch / scDataset pattern).

Rows of one slide are contiguous, so a chunk mostly holds rows of one slide; a pool of chunks drawn from
random places of the store mixes slides in every batch.

Every read goes through a ``UnitReader`` (pipeline/stores.py): a unit whose shard file is gone is
refused the first time it is read instead of read as zeros, and a chunk failing its checksum is an
error naming the store, array and rows; tiles and targets are checked unit by unit as the first epoch
reaches them. Opening reads no per-row array: each row's slide comes from the slide records and the
read-failed rows from the tile store's unit index (pipeline/stores.py), so a start at 10^8 rows does not
read ~390k chunk files of `slide` and `flags`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import RunDir, SlideRecord, StoreError, Tiling, UnitReader, open_feature_store, open_tile_store, read_failed_mask, slide_of_row
from pipeline.views import apply_view


@dataclass(frozen=True)
class Split:
    """Slides by role, split by content: slides of equal content hash are copies of one slide, so they
    are always on the same side, and validation never holds a slide whose content is in training."""

    train: list[SlideRecord]
    val: list[SlideRecord]

    RULE = (
        "slides with tiles grouped by content hash (slides without one: by path), in order of their first "
        "slide; the last val_slides groups are held out for validation, every slide of a group on the same side"
    )

    @classmethod
    def of(cls, slides: list[SlideRecord], val_slides: int) -> Split:
        groups: dict[str, list[SlideRecord]] = {}
        for slide in slides:
            if slide.ok and slide.rows[1] > slide.rows[0]:
                groups.setdefault(slide.hash or f"path:{slide.path}", []).append(slide)
        if val_slides >= len(groups):
            raise ConfigError(
                f"distill.val_slides = {val_slides}, but the tile store has {len(groups)} distinct slides with tiles; "
                "leave at least one for training"
            )
        ordered = list(groups.values())
        held_out = len(ordered) - val_slides
        return cls(train=[s for group in ordered[:held_out] for s in group], val=[s for group in ordered[held_out:] for s in group])

    def as_record(self) -> dict:
        def describe(slides: list[SlideRecord]) -> list[dict]:
            return [{"id": s.id, "name": s.name, "rows": s.rows} for s in slides]

        return {"rule": self.RULE, "train": describe(self.train), "val": describe(self.val)}


@dataclass
class DistillData:
    """The opened, checked stores: one recipe array [N, V, D] per teacher, aligned with the tiles."""

    tile_path: Path
    tile_reader: UnitReader  # of uint8 [N, S, S, 3]
    target_readers: dict[str, UnitReader]  # teacher -> its recipe's float16 [N, V, D]
    recipes: dict[str, str]
    teacher_specs: dict[str, dict]
    views: list[dict]
    tiling: Tiling
    tile_store_id: str
    slide_of_row: np.ndarray  # int32 [N]
    read_failed: np.ndarray  # bool [N]
    split: Split

    @property
    def tiles(self) -> zarr.Array:
        return self.tile_reader.array

    @property
    def targets(self) -> dict[str, zarr.Array]:
        return {teacher: reader.array for teacher, reader in self.target_readers.items()}

    @property
    def tile_px(self) -> int:
        return self.tiling.tile_px

    @property
    def chunk_rows(self) -> int:
        return self.tiles.chunks[0]

    @property
    def widths(self) -> dict[str, int]:
        return {teacher: array.shape[2] for teacher, array in self.targets.items()}

    def rows_of(self, slides: list[SlideRecord]) -> np.ndarray:
        """Mask [N] of the rows of these slides that were read (read-failed tiles are blank)."""
        return np.isin(self.slide_of_row, [s.id for s in slides]) & ~self.read_failed

    def lazy_tiles(self) -> da.Array:
        return _lazy(self.tiles)

    def lazy_targets(self) -> dict[str, da.Array]:
        return {teacher: _lazy(array) for teacher, array in self.targets.items()}

    def describe(self) -> list[str]:
        arrays = {"tiles": self.lazy_tiles(), **{f"{t} ({self.recipes[t]})": a for t, a in self.lazy_targets().items()}}
        return [
            f"{name}: {a.dtype} {list(a.shape)}, {a.numblocks[0]} chunks of {a.chunksize[0]} rows, {a.nbytes / 1e9:.2f} GB"
            for name, a in arrays.items()
        ]


def _lazy(array: zarr.Array) -> da.Array:
    # chunks explicit: the default for sharded arrays is one task per tiny inner chunk or per huge shard
    # depending on the Dask version (dask/dask#12586)
    return da.from_zarr(array, chunks=array.chunks)


def open_distill_data(run_dir: Path, settings: DistillConfig) -> DistillData:
    """The run's tile store and the selected teachers' feature stores, or a StoreError saying what to fix."""
    run = RunDir(run_dir)
    tiles = open_tile_store(run.tiles)
    tiles.require_finished("tiles")
    chunk_rows = tiles["tiles"].chunks[0]
    teachers = settings.teachers or run.teachers_with_features()
    if not teachers:
        raise StoreError(f"no feature stores in {run.features_dir}; run `features` first")
    for key, named in (("recipes", settings.recipes), ("teacher_weights", settings.teacher_weights)):
        if set(named) - set(teachers):
            raise ConfigError(f"distill.{key} names {sorted(set(named) - set(teachers))}, not among the distilled teachers {teachers}")
    readers, recipes, specs, views_of = {}, {}, {}, {}
    for teacher in teachers:
        path = run.features(teacher)
        if not path.exists():
            raise StoreError(
                f"no feature store for teacher {teacher!r} at {path}; {run.features_dir} holds "
                f"{run.teachers_with_features() or 'none'}: fix distill.teachers or run `features` for {teacher!r}"
            )
        store = open_feature_store(path, tiles)
        recipe = settings.recipes.get(teacher, next(iter(store.attrs.recipes)))
        if recipe not in store.attrs.recipes:
            raise StoreError(
                f"{path} has no recipe {recipe!r}; it holds {list(store.attrs.recipes)}: fix distill.recipes.{teacher}"
            )
        reader = UnitReader(store, recipe, "features")
        store.require_finished("features")
        if reader.array.chunks[0] != chunk_rows:
            raise StoreError(f"{path} has chunks of {reader.array.chunks[0]} rows, the tile store {chunk_rows}; rerun features")
        readers[teacher], recipes[teacher], specs[teacher], views_of[teacher] = reader, recipe, store.attrs.teacher, store.attrs.views
    first = teachers[0]
    for teacher in teachers[1:]:
        if views_of[teacher] != views_of[first]:
            raise StoreError(
                f"teachers {first!r} and {teacher!r} were computed on different views ({views_of[first]} vs "
                f"{views_of[teacher]}); a student sample shows one view to every teacher: rerun features with the same views"
            )
    split = Split.of(tiles.attrs.slides, settings.val_slides)
    return DistillData(
        tile_path=run.tiles,
        tile_reader=UnitReader(tiles, "tiles", "tiles"),
        target_readers=readers,
        recipes=recipes,
        teacher_specs=specs,
        views=views_of[first],
        tiling=tiles.attrs.tiling,
        tile_store_id=tiles.attrs.store_id,
        slide_of_row=slide_of_row(tiles.attrs),
        read_failed=read_failed_mask(tiles),
        split=split,
    )


def target_sample(data: DistillData, teacher: str, size: int, seed: int) -> np.ndarray:
    """Targets [rows * V, D] (float32) of up to `size` training rows drawn with `seed`, read through Dask."""
    train_rows = np.flatnonzero(data.rows_of(data.split.train))
    rows = np.sort(np.random.default_rng(seed).choice(train_rows, size=min(size, len(train_rows)), replace=False))
    reader = data.target_readers[teacher]
    reader.require_rows(rows)
    with reader.reading(int(rows[0]), int(rows[-1]) + 1):
        values = data.lazy_targets()[teacher][rows].compute()
    check_finite(values, teacher, data, rows)
    return values.reshape(-1, values.shape[-1]).astype(np.float32)


def check_finite(values: np.ndarray, teacher: str, data: DistillData, rows: np.ndarray) -> None:
    """Targets [n, ...] of `rows` must be finite: a NaN would poison every weight in one step."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        path = RunDir(data.tile_path.parent).features(teacher)
        raise StoreError(
            f"teacher {teacher!r} (recipe {data.recipes[teacher]!r}) has NaN/Inf targets in rows "
            f"{rows[bad][:20].tolist()}{' ...' if bad.sum() > 20 else ''}: run `inspect-store --verify {path}` "
            "and rerun features for this teacher"
        )


@dataclass
class Rows:
    """Rows in memory: what the student sees (`tiles`, uint8 [n, px, px, 3], the sample's view
    applied) and each teacher's target for that view (float16 [n, D])."""

    rows: np.ndarray
    slides: np.ndarray
    views: np.ndarray
    tiles: np.ndarray
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | np.ndarray) -> Rows:
        return Rows(
            self.rows[index], self.slides[index], self.views[index], self.tiles[index],
            {teacher: values[index] for teacher, values in self.targets.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        return Rows(
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.slides for p in parts]),
            np.concatenate([p.views for p in parts]),
            np.concatenate([p.tiles for p in parts]),
            {teacher: np.concatenate([p.targets[teacher] for p in parts]) for teacher in parts[0].targets},
        )


def read_rows(data: DistillData, chunks: Sequence[int], keep: np.ndarray, rng: np.random.Generator | None) -> Rows:
    """The `keep` rows of whole chunks, in chunk order, each shown with a view: drawn from `rng`, or the
    first view when `rng` is None. With an rng the rows are also shuffled (by the same rng)."""
    row_parts, tile_parts, target_parts = [], [], {teacher: [] for teacher in data.targets}
    for chunk in chunks:
        start = chunk * data.chunk_rows
        end = min(start + data.chunk_rows, len(keep))
        kept = np.flatnonzero(keep[start:end])
        row_parts.append(start + kept)
        tile_parts.append(data.tile_reader.read(start, end)[kept])
        for teacher, reader in data.target_readers.items():
            values = reader.read(start, end)[kept]
            check_finite(values, teacher, data, start + kept)
            target_parts[teacher].append(values)
    rows, stored = np.concatenate(row_parts), np.concatenate(tile_parts)
    targets = {teacher: np.concatenate(parts) for teacher, parts in target_parts.items()}
    order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
    views = rng.integers(len(data.views), size=len(rows)) if rng is not None else np.zeros(len(rows), np.int64)
    rows, stored = rows[order], stored[order]
    tiles = np.empty((len(rows), data.tile_px, data.tile_px, 3), np.uint8)
    for index, view in enumerate(data.views):
        shown = views == index
        if shown.any():
            tiles[shown] = apply_view(stored[shown], view, data.tile_px)
    return Rows(
        rows=rows,
        slides=data.slide_of_row[rows],
        views=views,
        tiles=tiles,
        targets={teacher: values[order, views] for teacher, values in targets.items()},
    )


def rows_per_chunk(keep: np.ndarray, chunk_rows: int) -> np.ndarray:
    """How many `keep` rows each chunk holds."""
    return np.add.reduceat(keep.astype(np.int64), np.arange(0, len(keep), chunk_rows))


class BlockShuffleLoader:
    """Batches of `batch_size` training rows, forever: epoch after epoch, each visiting every row once.

    An epoch orders the chunks holding training rows at random (seeded by (seed, epoch)) and cuts the
    order into pools of `pool_chunks` chunks; a pool is read whole, its rows shuffled and given views
    (seeded by (seed, epoch, pool)); batches are consecutive slices of the resulting stream of rows,
    and may run across pools and epochs. The state is (epoch, position = rows of the epoch already
    yielded): a loader built with a saved state yields exactly the batches that would have come next.

    Pools are read ahead by `workers` threads, at most `workers + 1` pools in memory. Threads, not
    processes: reading is Zarr's decompression and checksums plus numpy copies, which release the GIL;
    threads share the open arrays with no pickling or fork (which Zarr and torch handle badly,
    as forked readers can deadlock). Pools are consumed in the order they were submitted and each is shuffled by
    its own seed, so batch content and order never depend on thread timing. `workers=0` reads inline.
    """

    def __init__(
        self, data: DistillData, keep: np.ndarray, batch_size: int, pool_chunks: int, workers: int, seed: int,
        state: dict | None = None,
    ):
        self.data, self.keep = data, keep
        self.batch_size, self.pool_chunks, self.workers, self.seed = batch_size, pool_chunks, workers, seed
        self.rows_in_chunk = rows_per_chunk(keep, data.chunk_rows)
        self.chunks = np.flatnonzero(self.rows_in_chunk)
        self.rows_per_epoch = int(self.rows_in_chunk.sum())
        if not self.rows_per_epoch:
            raise StoreError(f"{data.tile_path} has no readable rows in the training slides; nothing to train on")
        state = state or {"epoch": 0, "position": 0}
        self.cursor = state["epoch"] * self.rows_per_epoch + state["position"]  # rows yielded since the start

    def state_dict(self) -> dict:
        epoch, position = divmod(self.cursor, self.rows_per_epoch)
        return {"epoch": epoch, "position": position}

    def epoch_pools(self, epoch: int) -> list[np.ndarray]:
        """Chunk ids of each pool of `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        return [order[i : i + self.pool_chunks] for i in range(0, len(order), self.pool_chunks)]

    def __iter__(self) -> Iterator[Rows]:
        leftover: Rows | None = None
        for pool in self._pools():
            stream = pool if leftover is None else Rows.concat([leftover, pool])
            starts = range(0, len(stream) - self.batch_size + 1, self.batch_size)
            for start in starts:
                self.cursor += self.batch_size
                yield stream[start : start + self.batch_size]
            leftover = stream[len(starts) * self.batch_size :]

    def _pools(self) -> Iterator[Rows]:
        """Pools from the current state on, read ahead in threads; the first one is cut where the state points."""
        if not self.workers:
            yield from (self._read_pool(*plan) for plan in self._plans())
            return
        with ThreadPoolExecutor(self.workers) as executor:
            submitted: deque = deque()
            try:
                for plan in self._plans():
                    submitted.append(executor.submit(self._read_pool, *plan))
                    if len(submitted) > self.workers:
                        yield submitted.popleft().result()
            finally:
                for future in submitted:
                    future.cancel()

    def _plans(self) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, pool index, chunk ids, rows to skip at its start), forever."""
        epoch, position = divmod(self.cursor, self.rows_per_epoch)
        while True:
            pools = self.epoch_pools(epoch)
            sizes = np.array([self.rows_in_chunk[pool].sum() for pool in pools])
            ends = np.cumsum(sizes)
            for index in range(int(np.searchsorted(ends, position, side="right")), len(pools)):
                yield epoch, index, pools[index], max(0, position - int(ends[index] - sizes[index]))
            epoch, position = epoch + 1, 0

    def _read_pool(self, epoch: int, index: int, chunks: np.ndarray, skip: int) -> Rows:
        return read_rows(self.data, chunks, self.keep, np.random.default_rng([self.seed, epoch, index]))[skip:]


def validation_batches(data: DistillData, batch_size: int, max_rows: int | None) -> Iterator[Rows]:
    """The validation slides' readable rows in store order, first view, in batches; at most `max_rows`
    of them, taken from evenly spaced chunks so every validation slide is represented."""
    keep = data.rows_of(data.split.val)
    chunks = np.flatnonzero(rows_per_chunk(keep, data.chunk_rows))
    if max_rows is not None and keep.sum() > max_rows:
        wanted = min(len(chunks), math.ceil(max_rows / data.chunk_rows))
        chunks = chunks[np.linspace(0, len(chunks) - 1, wanted).round().astype(int)]
    chunks_per_read = max(1, batch_size // data.chunk_rows)
    remaining = max_rows if max_rows is not None else int(keep.sum())
    for first in range(0, len(chunks), chunks_per_read):
        rows = read_rows(data, chunks[first : first + chunks_per_read], keep, rng=None)[:remaining]
        remaining -= len(rows)
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]
        if remaining <= 0:
            return
