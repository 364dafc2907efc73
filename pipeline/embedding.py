"""Embedding a tile store into feature stores, one unit at a time, on Ray: the loop every embedder runs.

The ``features`` stage runs teachers through it and ``embed`` runs an exported student through it,
so both get the same guarantees. Ray actors each build every embedder of their pool once, then take
whole units (the tile store's shards of rows): a unit's tiles are read and decoded once, and each
embedder is given its field (``field_px``, centred on each view's tile; pipeline/teacher_input.py)
and applies its own resize and normalisation. Each embedder's rows go to its own
store, checked for NaN/Inf before anything is written; a marker per store and unit follows the
write (the driver folds markers into the store's unit index), so reruns compute only unfinished
units. A dead actor is restarted by Ray and its unit retried; a unit is recomputed whole, so
retries and reruns write identical bytes.

Tiles are never embedded from a damaged tile store: a pool starts only when every shard of the
``tiles`` array is on disk (one stat per shard, small beside embedding it), each unit checks its
shard again when it reads it (the store may be damaged while a long run goes on), and a chunk
failing its checksum stops the run naming store, array and rows.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import ray

from pipeline.config import StoreConfig
from pipeline.console import progress_bar
from pipeline.errors import PathdistillError
from pipeline.ray_runtime import completed
from pipeline.stores import (
    GRID, FeatureStoreAttrs, Store, StoreError, TileStoreAttrs, UnitMarkers, UnitReader, create_feature_store, open_feature_store,
    open_tile_store, remove_store, write_rows,
)
from pipeline.views import apply_view

FLOAT16_MAX = 65504.0


class NonFiniteFeatures(PathdistillError, RuntimeError):
    """An embedder produced NaN/Inf (or values beyond float16) for some rows: nothing is written."""


class Embedder(Protocol):
    """A model that embeds uint8 tiles [B, px, px, 3] into float vectors, one per recipe (and a teacher's
    spatial recipe, a grid of vectors per tile)."""

    shapes: dict[str, tuple[int, ...]]  # array -> what one tile gives: (width,) per recipe, (k*k, C) for the grid
    device: object
    field_px: int  # px: the square it takes, cut centred on each view's tile from the stored pixels

    def embed(self, tiles_uint8_nhwc) -> dict: ...

    def provenance(self) -> dict: ...


@dataclass(frozen=True)
class ActorSettings:
    """How a pool's Ray actors are sized."""

    batch_size: int = 32
    actors: int | None = None  # none: one per GPU, or one per threads_per_actor CPUs without GPUs
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 2
    overlap: bool = True  # read the next unit and write the previous one during a unit's forward pass (EmbedWorker)

    @property
    def units_in_flight(self) -> int:
        """Units an actor works on at once: one reading, one in the forward pass, one writing."""
        return 3 if self.overlap else 1


@dataclass
class EmbedSummary:
    """What a run of the loop did, summed over its pools."""

    n_rows: int
    names: list[str]
    units_total: int = 0
    units_run: int = 0
    skipped: list[str] = field(default_factory=list)  # embedders whose stores were already finished
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rows_done: int = 0
    units_seconds: float = 0.0  # wall time of the unit phase, without Ray start-up and model loading


class EmbedWorker:
    """Holds one pool's embedders and an open tile store; computes and writes whole units.

    Up to three units move through an actor at once (Ray runs its calls in ``units_in_flight``
    threads, the driver keeps that many queued): while one unit is in the forward pass, the next
    unit's tiles are read and decoded and the previous unit's features are written, so a GPU does
    not wait for the disk. The bounds: one unit in the forward pass, tiles of at most two units in
    memory (the one in the forward pass and one read ahead). A call still returns only once its
    unit is written and marked, so Ray's retries, the markers and resume work per unit as without
    the overlap, and a failed read or write is that unit's error. Each unit's rows are computed
    alone, by the same code in the same order, so the overlap changes no byte.

    Embedders are built on first use, not in ``__init__``: Ray reports an error raised in a method with
    the error itself (so a missing weights file reaches the user as one line), but an error raised in an
    actor's ``__init__`` only as "the actor died"."""

    def __init__(self, tile_store: str, builders: dict[str, Callable[[str], Embedder]], settings: ActorSettings, views: list[dict]):
        import torch

        torch.set_num_threads(settings.threads_per_actor)
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.tiles = UnitReader(open_tile_store(Path(tile_store)), "tiles", "tiles")
        self.builders, self.settings, self.views = builders, settings, views
        self.built: dict[str, Embedder] | None = None
        self.building = threading.Lock()
        self.forward_pass = threading.Lock()  # one unit on the device at a time
        self.tiles_in_memory = threading.BoundedSemaphore(2)  # the unit in the forward pass and the one read ahead

    @property
    def embedders(self) -> dict[str, Embedder]:
        with self.building:  # the first calls may come in together (after a restart, say): build once
            if self.built is None:
                self.built = {name: build(self.device) for name, build in self.builders.items()}
        return self.built

    def provenance(self) -> dict[str, dict]:
        return {name: embedder.provenance() for name, embedder in self.embedders.items()}

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {name: embedder.shapes for name, embedder in self.embedders.items()}

    def run_unit(self, unit: int, start: int, end: int, outputs: dict[str, tuple[str, str]]) -> dict:
        """Compute and write rows [start, end) for the embedders in ``outputs`` (name -> store path, store id)."""
        timings: dict[str, float] = defaultdict(float)
        results = self._read_and_embed(start, end, list(outputs), timings)
        for name, recipes in results.items():
            for recipe, values in recipes.items():
                per_row = tuple(range(1, values.ndim))
                bad = ~np.isfinite(values).all(axis=per_row) | (np.abs(values).max(axis=per_row) > FLOAT16_MAX)
                if bad.any():
                    rows = (np.flatnonzero(bad) + start).tolist()
                    raise NonFiniteFeatures(f"{name!r} recipe {recipe!r} gave NaN/Inf or values beyond float16 for rows {rows[:20]}; nothing was written for unit {unit}")
        for name, recipes in results.items():
            clock = time.perf_counter()
            store_path, store_id = outputs[name]
            write_rows(Path(store_path), start, {recipe: values.astype(np.float16) for recipe, values in recipes.items()})
            UnitMarkers(Path(store_path), store_id).mark(unit, {"start": start, "end": end})
            timings["write"] += time.perf_counter() - clock
        return {"rows": end - start, "timings": dict(timings)}

    def _read_and_embed(self, start: int, end: int, names: list[str], timings: dict[str, float]) -> dict[str, dict[str, np.ndarray]]:
        """Each embedder's float32 [rows, views, *shape] per array; the unit's tiles are let go on return."""
        import torch

        with self.tiles_in_memory:
            clock = time.perf_counter()
            pixels = self.tiles.read(start, end)
            timings["read"] += time.perf_counter() - clock
            with self.forward_pass:
                embedders = {name: self.embedders[name] for name in names}
                results = {
                    name: {recipe: np.zeros((end - start, len(self.views), *shape), np.float32) for recipe, shape in embedder.shapes.items()}
                    for name, embedder in embedders.items()
                }
                batch_size = self.settings.batch_size
                fields = {embedder.field_px for embedder in embedders.values()}  # each cut once, for every embedder taking it
                for view_index, view in enumerate(self.views):
                    for first in range(0, end - start, batch_size):
                        clock = time.perf_counter()
                        block = pixels[first : first + batch_size]
                        batches = {px: torch.from_numpy(np.ascontiguousarray(apply_view(block, view, px))) for px in fields}
                        if self.device == "cuda":  # page-locked: the copy to the device does not block
                            batches = {px: batch.pin_memory() for px, batch in batches.items()}
                        timings["transform"] += time.perf_counter() - clock
                        for name, embedder in embedders.items():
                            batch = batches[embedder.field_px]
                            clock = time.perf_counter()
                            embedded = embedder.embed(batch.to(embedder.device, non_blocking=True))
                            for recipe, values in embedded.items():  # the copy back waits for the device: the timing is the forward's
                                results[name][recipe][first : first + len(batch), view_index] = values.float().cpu().numpy()
                            timings[f"forward:{name}"] += time.perf_counter() - clock
        return results


def embed_pool(
    tiles: Store[TileStoreAttrs], builders: dict[str, Callable[[str], Embedder]], out_paths: dict[str, Path],
    views: list[dict], settings: ActorSettings, store: StoreConfig, overwrite: bool, summary: EmbedSummary,
) -> None:
    """Run one pool of embedders over every unit their stores still lack; needs a Ray session."""
    tiles.require_intact("tiles", arrays=["tiles"])
    units = tiles.units()
    actor_count = settings.actors or _default_actor_count(settings)
    worker_class = ray.remote(
        num_cpus=settings.threads_per_actor, num_gpus=settings.gpus_per_actor, max_concurrency=settings.units_in_flight, max_restarts=3, max_task_retries=3,
    )(EmbedWorker)
    workers = [worker_class.remote(str(tiles.path), builders, settings, views) for _ in range(actor_count)]
    try:  # the actors go when the pool ends, failed or not: none goes on writing units after an error
        provenance, shapes = ray.get([workers[0].provenance.remote(), workers[0].shapes.remote()])
        outputs, missing = {}, {}
        for name, path in out_paths.items():
            store_id, missing[name] = prepare_feature_store(path, tiles, provenance[name], shapes[name], views, store, overwrite)
            outputs[name] = (str(path), store_id)
            if not missing[name]:
                summary.skipped.append(name)
        # Each unit is computed for the embedders whose stores lack it: a finished store is never rewritten.
        queue = [(unit, {n: outputs[n] for n in out_paths if unit in missing[n]}) for unit in range(len(units))]
        queue = [(unit, wanted) for unit, wanted in queue if wanted]
        summary.units_run += sum(len(wanted) for _, wanted in queue)
        markers = [UnitMarkers(Path(path), store_id) for path, store_id in outputs.values()]
        pending: dict = {}  # ref -> the worker running it

        def feed_workers() -> None:
            for worker in workers:
                while queue and list(pending.values()).count(worker) <= settings.units_in_flight:  # one more waiting: no idle actor
                    unit, wanted = queue.pop(0)
                    pending[worker.run_unit.remote(unit, *units[unit], wanted)] = worker

        started = time.perf_counter()
        with progress_bar() as progress:
            remaining = sum(units[unit][1] - units[unit][0] for unit, _ in queue)
            task = progress.add_task(f"embedding {'+'.join(out_paths)}", total=summary.n_rows, completed=summary.n_rows - remaining, rate="")
            feed_workers()
            for _, stats in completed(pending):
                feed_workers()
                summary.rows_done += stats["rows"]
                for key, seconds in stats["timings"].items():
                    summary.timings[key] += seconds
                rate = summary.rows_done / (summary.units_seconds + time.perf_counter() - started)
                progress.update(task, advance=stats["rows"], rate=f"{rate:.0f} tiles/s")
                for store_markers in markers:
                    store_markers.fold_if_due()
        summary.units_seconds += time.perf_counter() - started
        for store_markers in markers:
            store_markers.fold()
    finally:
        for worker in workers:
            ray.kill(worker)


def _default_actor_count(settings: ActorSettings) -> int:
    resources = ray.cluster_resources()
    if settings.gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) // settings.gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // settings.threads_per_actor))


def prepare_feature_store(
    store_path: Path, tiles: Store[TileStoreAttrs], provenance: dict, shapes: dict[str, tuple[int, ...]], views: list[dict],
    store: StoreConfig, overwrite: bool,
) -> tuple[str, set[int]]:
    """The store id and the units still to compute: a new store, or a matching one to resume.

    A finished store (every unit marked) is left alone unless ``overwrite``; a store from another
    tile store, model, weights, views or grid is refused unless ``overwrite``.
    """
    cells, grid_width = shapes.get(GRID, (0, 0))
    recipes = {recipe: shape[0] for recipe, shape in shapes.items() if recipe != GRID}
    attrs = FeatureStoreAttrs.new(tiles.attrs, provenance, recipes, views, grid=math.isqrt(cells))
    if store_path.exists() and overwrite:
        remove_store(store_path)
    if store_path.exists():
        try:
            existing = open_feature_store(store_path, tiles)
        except StoreError as error:
            raise StoreError(f"{error}\nUse --overwrite to replace {store_path}.") from error
        differences = [
            f"{key}: store has {getattr(existing.attrs, key)!r}, now {getattr(attrs, key)!r}"
            for key in ("teacher", "views", "grid")
            if getattr(existing.attrs, key) != getattr(attrs, key)
        ]
        if differences:
            raise StoreError(f"{store_path} was computed differently:\n  - " + "\n  - ".join(differences) + "\nUse --overwrite to replace it.")
        return existing.attrs.store_id, existing.missing_units()
    tile_array = tiles["tiles"]
    create_feature_store(store_path, attrs, tile_array.chunks[0], tile_array.shards[0], store, grid_width)
    return attrs.store_id, set(range(len(tiles.units())))
