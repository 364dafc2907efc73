"""What the distiller reads: the tile store and the teachers' feature stores of one run or of several
composed into one training set (distill/cohort.py), checked, split by slide and loaded.

Two ways in, for two jobs:
- lazy Dask arrays over the tiles and each teacher's recipe (Dask chunks = Zarr chunks), for
  statistics over a sample of rows (the target standardizers) and for describing the data;
- the block-shuffle loader for training: per-sample random reads of ~100 KB chunks are the classic
  bottleneck (scDataset, arXiv 2506.01883), so it reads whole chunks, a pool of them at a time, and shuffles rows
  inside the pool (the annbatch / scDataset pattern).

Rows of one slide are contiguous, so a chunk mostly holds rows of one slide; a pool of chunks drawn from
random places of the store mixes slides in every batch (`pool_chunks` sets how many; the loader counts
the distinct slides per batch). Under DDP each rank reads only its own pools. A pool is read into
reused buffers by distill/pools.py. Chunk ids are global: `DistillData.locate` is the one place that
maps them onto a run's stores and rows (`chunk_source`).

Every read goes through a ``UnitReader`` (pipeline/stores.py): a unit whose shard file is gone is
refused the first time it is read instead of read as zeros, and a chunk failing its checksum is an
error naming the store, array and rows; tiles and targets are checked unit by unit as the first epoch
reaches them. Opening reads no per-row array: each row's slide comes from the slide records and the
read-failed rows from the tile store's unit index (pipeline/stores.py), so a start at 10^8 rows does not
read ~390k chunk files of `slide` and `flags`.

A spatial term (`distill.spatial_weight` or `distill.mask_ratio` > 0) also needs each teacher's
`grid` array (pipeline/grids.py, made with `features.grid: k`): it is opened for every teacher and read
with the same rows and views as the targets into `Rows.grids`; without those settings it is not read,
so stores without grids (schema pathdistill.features/1 among them) train summary-only as before.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

import numpy as np

from distill.cohort import Slide, Source, cohort_slides, composition, global_rows, require_alike, require_distinct
from distill.pools import ChunkSpan, PoolBuffers
from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import GRID, FeatureStoreAttrs, RunDir, Store, StoreError, Tiling, UnitReader, open_feature_store, open_tile_store, read_failed_mask, slide_of_row
from pipeline.views import apply_view


@dataclass(frozen=True)
class Split:
    """Slides by role, split by content: slides of equal content hash are copies of one slide, so they
    are always on the same side, whichever runs they are in, and validation never holds a slide whose
    content is in training."""

    train: list[Slide]
    val: list[Slide]

    RULE = (
        "slides with tiles grouped by content hash (slides without one: by path), in order of their first "
        "slide; val_slides groups are held out for validation, taken from the end of each run in turn (last run "
        "first; a group belongs to the run of its first slide), every slide of a group on the same side"
    )

    @classmethod
    def of(cls, slides: list[Slide], val_slides: int) -> Split:
        groups: dict[str, list[Slide]] = {}
        for slide in slides:
            record = slide.record
            if record.ok and record.rows[1] > record.rows[0]:
                groups.setdefault(record.hash or f"path:{record.path}", []).append(slide)
        if val_slides >= len(groups):
            raise ConfigError(
                f"distill.val_slides = {val_slides}, but the training set has {len(groups)} distinct slides with tiles; "
                "leave at least one for training"
            )
        ordered = list(groups.values())
        of_run: dict[Path, list[int]] = {}
        for index, group in enumerate(ordered):
            of_run.setdefault(group[0].run, []).append(index)
        queues, held_out = list(reversed(of_run.values())), set()
        while len(held_out) < val_slides:
            for queue in queues:
                if queue and len(held_out) < val_slides:
                    held_out.add(queue.pop())
        return cls(
            train=[s for index, group in enumerate(ordered) if index not in held_out for s in group],
            val=[s for index, group in enumerate(ordered) if index in held_out for s in group],
        )

    def as_record(self) -> dict:
        return {"rule": self.RULE, "train": [s.as_record() for s in self.train], "val": [s.as_record() for s in self.val]}


@dataclass
class DistillData:
    """The opened, checked stores of one or more runs (distill/cohort.py): per run the tiles and one
    recipe array [n, V, D] per teacher (and, for a spatial term, its grid [n, V, k*k, C]), aligned, in
    one global row index."""

    sources: list[Source]  # in the order given, each starting on a chunk boundary
    recipes: dict[str, str]
    teacher_specs: dict[str, dict]
    views: list[dict]
    tiling: Tiling
    slide_of_row: np.ndarray  # int32 [N]: global slide keys; -1 on the padding between runs
    read_failed: np.ndarray  # bool [N]; True on the padding
    split: Split
    grid: int = 0  # k of every teacher's grid read into Rows.grids; 0: grids are not read

    @property
    def tile_px(self) -> int:
        return self.tiling.tile_px

    @property
    def chunk_rows(self) -> int:
        return self.sources[0].chunk_rows

    @property
    def widths(self) -> dict[str, int]:
        return {teacher: array.shape[2] for teacher, array in self.sources[0].targets.items()}

    @property
    def grid_widths(self) -> dict[str, int]:
        """Teacher -> C of its grid; {} when no spatial term is asked for."""
        return {teacher: array.shape[3] for teacher, array in self.sources[0].grids.items()}

    def locate(self, chunks: Sequence[int]) -> list[ChunkSpan]:
        """Where each global chunk's rows are read from: the one place the loader maps chunk ids onto stores."""
        spans = []
        for chunk in chunks:
            source, start, end = self.chunk_source(int(chunk))
            spans.append(ChunkSpan(source, start, end, source.offset + start))
        return spans

    def rows_of(self, slides: list[Slide]) -> np.ndarray:
        """Mask [N] of the rows of these slides that were read (read-failed tiles are blank)."""
        return np.isin(self.slide_of_row, [s.key for s in slides]) & ~self.read_failed

    def chunk_source(self, chunk: int) -> tuple[Source, int, int]:
        """The run holding global chunk `chunk`, and the chunk's rows [start, end) in that run's stores."""
        start = chunk * self.chunk_rows
        source = self.sources[bisect_right([s.offset for s in self.sources], start) - 1]
        local = start - source.offset
        return source, local, min(local + self.chunk_rows, source.n_rows)

    def composition(self) -> list[dict]:
        """Per run: path, tile and feature store ids, the slides and readable rows used on each side."""
        kept = {"train": self.rows_of(self.split.train), "val": self.rows_of(self.split.val)}
        return composition(self.sources, self.split.train, self.split.val, kept)

    def describe(self) -> list[str]:
        lines = []
        for source in self.sources:
            arrays = {
                "tiles": source.lazy_tiles(), **{f"{t} ({self.recipes[t]})": a for t, a in source.lazy_targets().items()},
                **{f"{t} ({GRID} {self.grid}x{self.grid})": a for t, a in source.lazy_grids().items()},
            }
            lines += [
                f"{source.run.name + ': ' if len(self.sources) > 1 else ''}{name}: {a.dtype} {list(a.shape)}, "
                f"{a.numblocks[0]} chunks of {a.chunksize[0]} rows, {a.nbytes / 1e9:.2f} GB"
                for name, a in arrays.items()
            ]
        return lines


def open_distill_data(runs: Sequence[Path], settings: DistillConfig) -> DistillData:
    """The training set made of these runs' tile stores and the selected teachers' feature stores, checked
    alike and split by slide across them, or a StoreError saying what to fix."""
    runs = require_distinct(list(runs))
    teachers = settings.teachers or RunDir(runs[0]).teachers_with_features()
    if not teachers:
        raise StoreError(f"no feature stores in {RunDir(runs[0]).features_dir}; run `features` first")
    for key, named in (("recipes", settings.recipes), ("teacher_weights", settings.teacher_weights)):
        if set(named) - set(teachers):
            raise ConfigError(f"distill.{key} names {sorted(set(named) - set(teachers))}, not among the distilled teachers {teachers}")
    sources, slide_of_row, read_failed = [], [], []
    offset, slide_base = 0, 0
    for run in runs:
        source, slides, failed = _open_run(run, settings, teachers, offset, slide_base)
        sources.append(source)
        slide_of_row.append(np.where(slides < 0, -1, slides + slide_base).astype(np.int32))
        read_failed.append(failed)
        offset, slide_base = offset + source.padded_rows, source.slide_keys_end
    require_alike(sources)
    first = sources[0]
    return DistillData(
        sources=sources,
        recipes=first.recipes,
        teacher_specs={teacher: attrs.teacher for teacher, attrs in first.feature_attrs.items()},
        views=first.feature_attrs[teachers[0]].views,
        tiling=first.tile_attrs.tiling,
        slide_of_row=global_rows(sources, slide_of_row, -1),
        read_failed=global_rows(sources, read_failed, True),
        split=Split.of(cohort_slides(sources), settings.val_slides),
        grid=first.feature_attrs[teachers[0]].grid if first.grid_readers else 0,
    )


def _open_run(run_dir: Path, settings: DistillConfig, teachers: list[str], offset: int, slide_base: int) -> tuple[Source, np.ndarray, np.ndarray]:
    """One run's checked stores, and its rows' slide ids and read-failed flags."""
    run = RunDir(run_dir)
    tiles = open_tile_store(run.tiles)
    tiles.require_finished("tiles")
    chunk_rows = tiles["tiles"].chunks[0]
    readers, recipes, attrs, grid_readers = {}, {}, {}, {}
    spatial = settings.spatial_weight > 0 or settings.mask_ratio > 0
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
        readers[teacher], recipes[teacher], attrs[teacher] = reader, recipe, store.attrs
        if spatial:
            grid_readers[teacher] = _grid_reader(store, teacher, chunk_rows)
    first = teachers[0]
    for teacher in teachers[1:]:
        if attrs[teacher].views != attrs[first].views:
            raise StoreError(
                f"teachers {first!r} and {teacher!r} were computed on different views ({attrs[first].views} vs "
                f"{attrs[teacher].views}); a student sample shows one view to every teacher: rerun features with the same views"
            )
        if spatial and attrs[teacher].grid != attrs[first].grid:
            raise StoreError(
                f"teachers {first!r} and {teacher!r} of {run.root} hold grids of different sizes (k = {attrs[first].grid} vs "
                f"{attrs[teacher].grid}); the spatial term pools the student's tokens to one grid: rerun `features --overwrite` "
                f"with one features.grid for both"
            )
    source = Source(
        run=run.root, tile_reader=UnitReader(tiles, "tiles", "tiles"), target_readers=readers, tile_attrs=tiles.attrs,
        feature_attrs=attrs, recipes=recipes, offset=offset, slide_base=slide_base, grid_readers=grid_readers,
    )
    return source, slide_of_row(tiles.attrs), read_failed_mask(tiles)


def _grid_reader(store: Store[FeatureStoreAttrs], teacher: str, chunk_rows: int) -> UnitReader:
    """The teacher's grid array, or a ConfigError naming the fix when its store has none."""
    if not store.attrs.grid or GRID not in store.array_names():
        raise ConfigError(
            f"{store.path} (schema {store.attrs.SCHEMA}) holds no {GRID!r} array, which distill.spatial_weight and "
            f"distill.mask_ratio need: set features.grid: k (e.g. 4) and rerun `features --overwrite` for {teacher!r}, "
            "or set distill.spatial_weight: 0 and distill.mask_ratio: 0 to distil summaries only"
        )
    reader = UnitReader(store, GRID, "features")
    if reader.array.chunks[0] != chunk_rows:
        raise StoreError(f"{store.path} has grid chunks of {reader.array.chunks[0]} rows, the tile store {chunk_rows}; rerun features")
    return reader


def target_sample(data: DistillData, teacher: str, size: int, seed: int, grid: bool = False) -> np.ndarray:
    """Targets [rows * V, D] (float32) of up to `size` training rows drawn with `seed`, read through Dask;
    with `grid`, the grid cells of those rows instead, [rows * V * k*k, C] (for a standardizer of tokens)."""
    train_rows = np.flatnonzero(data.rows_of(data.split.train))
    rows = np.sort(np.random.default_rng(seed).choice(train_rows, size=min(size, len(train_rows)), replace=False))
    parts = []
    for source in data.sources:
        local = rows[(rows >= source.offset) & (rows < source.offset + source.n_rows)] - source.offset
        if not len(local):
            continue
        reader = (source.grid_readers if grid else source.target_readers)[teacher]
        reader.require_rows(local)
        with reader.reading(int(local[0]), int(local[-1]) + 1):
            values = (source.lazy_grids() if grid else source.lazy_targets())[teacher][local].compute()
        check_finite(values, teacher, source, local, GRID if grid else None)
        parts.append(values)
    values = np.concatenate(parts)
    return values.reshape(-1, values.shape[-1]).astype(np.float32)


def check_finite(values: np.ndarray, teacher: str, source: Source, rows: np.ndarray, recipe: str | None = None) -> None:
    """Targets [n, ...] of `rows` (of the run's own stores; of the teacher's recipe, or of `recipe`: the grid)
    must be finite: a NaN would poison every weight in one step."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        raise StoreError(
            f"teacher {teacher!r} (recipe {recipe or source.recipes[teacher]!r}) has NaN/Inf targets in rows "
            f"{rows[bad][:20].tolist()}{' ...' if bad.sum() > 20 else ''}: run `inspect-store --verify {source.feature_path(teacher)}` "
            "and rerun features for this teacher"
        )


@dataclass
class Rows:
    """Rows in memory: what the student sees (`tiles`, uint8 [n, px, px, 3], the sample's view
    applied), each teacher's target for that view (float16 [n, D]) and, for a spatial term, its grid of
    that view (float16 [n, k*k, C]; {} without one)."""

    rows: np.ndarray
    slides: np.ndarray
    views: np.ndarray
    tiles: np.ndarray
    targets: dict[str, np.ndarray]
    grids: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | np.ndarray) -> Rows:
        return Rows(
            self.rows[index], self.slides[index], self.views[index], self.tiles[index],
            {teacher: values[index] for teacher, values in self.targets.items()},
            {teacher: values[index] for teacher, values in self.grids.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        return Rows(
            np.concatenate([p.rows for p in parts]),
            np.concatenate([p.slides for p in parts]),
            np.concatenate([p.views for p in parts]),
            np.concatenate([p.tiles for p in parts]),
            {teacher: np.concatenate([p.targets[teacher] for p in parts]) for teacher in parts[0].targets},
            {teacher: np.concatenate([p.grids[teacher] for p in parts]) for teacher in parts[0].grids},
        )


def read_rows(
    data: DistillData, chunks: Sequence[int], keep: np.ndarray, rng: np.random.Generator | None, buffers: PoolBuffers, view: int = 0,
) -> Rows:
    """The `keep` rows of whole chunks, read into `buffers`, each shown with a view: drawn from `rng`, or
    view number `view` when `rng` is None. With an rng the rows are also shuffled (by the same rng).

    Host copies per tile: the codec decodes a chunk, Zarr copies it into the reused pool buffer, and
    the view is applied while copying the tile from there into the pool's output, in shuffled order."""
    stored_rows = buffers.read(data.locate(chunks))
    kept = np.flatnonzero(keep[stored_rows])
    order = rng.permutation(len(kept)) if rng is not None else np.arange(len(kept))
    views = rng.integers(len(data.views), size=len(kept)) if rng is not None else np.full(len(kept), view, np.int64)
    picked = kept[order]  # positions in the buffers, in the order shown
    targets, grids = {}, {}
    for teacher, values in buffers.targets.items():
        _require_finite(data, teacher, values[kept], stored_rows[kept])
        targets[teacher] = values[picked, views]
    for teacher, values in buffers.grids.items():
        _require_finite(data, teacher, values[kept], stored_rows[kept], GRID)
        grids[teacher] = values[picked, views]
    tiles = np.empty((len(picked), data.tile_px, data.tile_px, 3), np.uint8)
    for index, (position, view) in enumerate(zip(picked, views)):
        tiles[index] = apply_view(buffers.tiles[position], data.views[view], data.tile_px)
    rows = stored_rows[picked]
    return Rows(rows=rows, slides=data.slide_of_row[rows], views=views, tiles=tiles, targets=targets, grids=grids)


def _require_finite(data: DistillData, teacher: str, values: np.ndarray, rows: np.ndarray, recipe: str | None = None) -> None:
    """check_finite on targets (or grids) of global `rows`, each run's rows named as that run's own."""
    for source in data.sources:
        mine = (rows >= source.offset) & (rows < source.offset + source.n_rows)
        if mine.any():
            check_finite(values[mine], teacher, source, rows[mine] - source.offset, recipe)


def rows_per_chunk(keep: np.ndarray, chunk_rows: int) -> np.ndarray:
    """How many `keep` rows each chunk holds."""
    return np.add.reduceat(keep.astype(np.int64), np.arange(0, len(keep), chunk_rows))


@dataclass
class SlideMix:
    """How many distinct slides the batches held: the diversity a pool of `pool_chunks` chunks buys."""

    batches: int = 0
    total: int = 0
    least: int | None = None

    def add(self, slides: np.ndarray) -> None:
        distinct = len(np.unique(slides))
        self.batches, self.total = self.batches + 1, self.total + distinct
        self.least = distinct if self.least is None else min(self.least, distinct)

    def as_record(self) -> dict:
        return {"batches": self.batches, "mean": self.total / max(1, self.batches), "min": self.least}


class BlockShuffleLoader:
    """Batches of `batch_size` training rows of this rank, forever: epoch after epoch.

    An epoch orders the chunks holding training rows at random (seeded by (seed, epoch)) and cuts the
    order into pools of `pool_chunks` chunks; rank r of `world` takes pools r, r + world, ... (every rank
    computes the same order), so the ranks read disjoint rows whose union is the epoch. A pool is read
    whole, its rows shuffled and given views (seeded by (seed, epoch, pool)); the rank's batches are
    consecutive slices of its stream of rows, and may run across pools and epochs. The state is the
    rows this rank has yielded, equal on every rank (each yields the same batches per step): a loader
    built with a saved state, on the same number of ranks, yields exactly the batches that would have come next.

    Pools are read ahead by `workers` threads, each into its own reused buffers: at most `workers`
    pool buffers and `workers + 1` read pools in memory. Threads, not processes: reading is
    decompression and checksums plus numpy copies, which release the GIL; threads share the open
    arrays with no pickling or fork (which Zarr and torch handle badly, as forked readers can
    deadlock). Pools are consumed in the order they were submitted and each is shuffled by its own
    seed, so batch content and order never depend on thread timing. `workers=0` reads inline.
    """

    def __init__(
        self, data: DistillData, keep: np.ndarray, batch_size: int, pool_chunks: int, workers: int, seed: int,
        state: dict | None = None, rank: int = 0, world: int = 1,
    ):
        self.data, self.keep = data, keep
        self.batch_size, self.pool_chunks, self.workers, self.seed = batch_size, pool_chunks, workers, seed
        self.rank, self.world = rank, world
        self.rows_in_chunk = rows_per_chunk(keep, data.chunk_rows)
        self.chunks = np.flatnonzero(self.rows_in_chunk)
        self.rows_per_epoch = int(self.rows_in_chunk.sum())  # of all ranks together
        if not self.rows_per_epoch:
            raise StoreError(f"{', '.join(str(s.run) for s in data.sources)}: no readable rows in the training slides; nothing to train on")
        if math.ceil(len(self.chunks) / pool_chunks) < world:
            raise ConfigError(
                f"the training rows fill {math.ceil(len(self.chunks) / pool_chunks)} pools of distill.pool_chunks = {pool_chunks} "
                f"chunks, fewer than the {world} processes: lower distill.pool_chunks"
            )
        state = state or {"rows": 0, "world_size": world}
        if state.get("world_size") != world:
            raise ConfigError(
                f"the checkpoint's loader state {state} was saved by a run of {state.get('world_size', 'an unknown number of')} "
                f"process(es); resume it with that many, not {world}"
            )
        self.cursor = state["rows"]  # rows this rank yielded since the start
        self.mix = SlideMix()

    def state_dict(self) -> dict:
        return {"rows": self.cursor, "world_size": self.world}

    def epoch_pools(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(pool index in the epoch, chunk ids) of this rank's pools of `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunks)
        return [(index, order[index * self.pool_chunks : (index + 1) * self.pool_chunks]) for index in range(self.rank, math.ceil(len(order) / self.pool_chunks), self.world)]

    def __iter__(self) -> Iterator[Rows]:
        leftover: Rows | None = None
        for pool in self._pools():
            stream = pool if leftover is None else Rows.concat([leftover, pool])
            starts = range(0, len(stream) - self.batch_size + 1, self.batch_size)
            for start in starts:
                self.cursor += self.batch_size
                batch = stream[start : start + self.batch_size]
                self.mix.add(batch.slides)
                yield batch
            leftover = stream[len(starts) * self.batch_size :]

    def _pools(self) -> Iterator[Rows]:
        """Pools from the current state on, read ahead in threads; the first one is cut where the state points."""
        free: SimpleQueue[PoolBuffers] = SimpleQueue()
        for _ in range(max(1, self.workers)):
            free.put(PoolBuffers.like(self.data.sources[0], self.pool_chunks * self.data.chunk_rows))

        def read(epoch: int, index: int, chunks: np.ndarray, skip: int) -> Rows:
            buffers = free.get()
            try:
                return read_rows(self.data, chunks, self.keep, np.random.default_rng([self.seed, epoch, index]), buffers)[skip:]
            finally:
                free.put(buffers)

        if not self.workers:
            yield from (read(*plan) for plan in self._plans())
            return
        with ThreadPoolExecutor(self.workers) as executor:
            submitted: deque = deque()
            try:
                for plan in self._plans():
                    submitted.append(executor.submit(read, *plan))
                    if len(submitted) > self.workers:
                        yield submitted.popleft().result()
            finally:
                for future in submitted:
                    future.cancel()

    def _plans(self) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, pool index, chunk ids, rows to skip at its start) of this rank's pools, forever from the state on.

        Ranks' epochs hold different numbers of rows, so the state is found by walking the epochs: one
        permutation of the chunk ids per epoch passed."""
        epoch, position = 0, self.cursor
        while True:
            pools = self.epoch_pools(epoch)
            sizes = np.array([self.rows_in_chunk[chunks].sum() for _, chunks in pools])
            ends = np.cumsum(sizes)
            for at in range(int(np.searchsorted(ends, position, side="right")), len(pools)):
                yield epoch, pools[at][0], pools[at][1], max(0, position - int(ends[at] - sizes[at]))
            epoch, position = epoch + 1, max(0, position - int(ends[-1]))


def validation_batches(data: DistillData, batch_size: int, max_rows: int | None) -> Iterator[Rows]:
    """The validation slides' readable rows in store order, each shown in every view of the stores (a
    chunk's rows in view 0, then in view 1, ...), in batches; at most `max_rows` rows (so at most
    `max_rows` times the views samples), taken from evenly spaced chunks so every validation slide is
    represented."""
    keep = data.rows_of(data.split.val)
    chunks = np.flatnonzero(rows_per_chunk(keep, data.chunk_rows))
    if max_rows is not None and keep.sum() > max_rows:
        wanted = min(len(chunks), math.ceil(max_rows / data.chunk_rows))
        chunks = chunks[np.linspace(0, len(chunks) - 1, wanted).round().astype(int)]
    chunks_per_read = max(1, batch_size // data.chunk_rows)
    buffers = PoolBuffers.like(data.sources[0], chunks_per_read * data.chunk_rows)
    remaining = max_rows if max_rows is not None else int(keep.sum())
    for first in range(0, len(chunks), chunks_per_read):
        for view in range(len(data.views)):  # the chunks read again per view, into the same buffers
            rows = read_rows(data, chunks[first : first + chunks_per_read], keep, None, buffers, view)[:remaining]
            for start in range(0, len(rows), batch_size):
                yield rows[start : start + batch_size]
        remaining -= len(rows)
        if remaining <= 0:
            return
