"""The ``features`` stage: ``RUN/tiles.zarr`` + teachers -> ``RUN/features/<teacher>.zarr``, on Ray.

Ray actors each load every teacher of their pool once, then take whole units (the tile store's
shards of rows): a unit's tiles are read and decoded once and fed to each teacher, which applies
its own resize and normalisation. Each teacher's rows go to its own store; a marker per store and
unit follows the write, so reruns compute only unfinished units. A dead actor is restarted by Ray
and its unit retried; a unit is recomputed whole, so retries and reruns write identical bytes.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from pipeline.config import Config, ConfigError, FeaturesConfig
from pipeline.console import progress_bar, results, table
from pipeline.errors import PathdistillError
from pipeline.ray_runtime import completed, ray_session
from pipeline.run_report import append_stage_record
from pipeline.stores import (
    TILES_SCHEMA, StoreError, UnitMarkers, create_feature_store, now, open_feature_store,
    open_store, remove_store, unit_ranges, write_rows,
)
from pipeline.teachers import get_teacher
from pipeline.views import expand_views

FLOAT16_MAX = 65504.0


class NonFiniteFeatures(PathdistillError, RuntimeError):
    """A teacher produced NaN/Inf (or values beyond float16) for some rows: nothing is written."""


@dataclass
class FeatureSummary:
    run_dir: Path
    n_rows: int
    teachers: list[str]
    units_total: int = 0
    units_run: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    rows_done: int = 0
    units_seconds: float = 0.0  # wall time of the unit phase, without Ray start-up and teacher loading

    def as_record(self) -> dict:
        forward = {t: self.timings.get(f"forward:{t}", 0.0) for t in self.teachers}
        return {
            "stage": "features",
            "finished": now(),
            "teachers": self.teachers,
            "skipped_finished": self.skipped,
            "rows": self.n_rows,
            "units_total": self.units_total,
            "units_run": self.units_run,
            "rows_computed": self.rows_done,
            "wall_seconds": round(self.seconds, 3),
            "units_seconds": round(self.units_seconds, 3),
            "tiles_per_second": round(self.rows_done / self.units_seconds, 2) if self.units_seconds else 0.0,
            "teacher_tiles_per_second": {t: round(self.rows_done / s, 2) if s else None for t, s in forward.items()},
            "seconds": {k: round(v, 3) for k, v in sorted(self.timings.items())},
        }


class TeacherWorker:
    """Holds one pool's teachers and an open tile store; computes and writes whole units."""

    def __init__(self, tile_store: str, run_dir: str, teachers: list[str], settings: FeaturesConfig, views: list[dict], tile_px: int):
        import torch

        from pipeline.teachers import build_teacher

        torch.set_num_threads(settings.threads_per_actor)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.tiles = open_store(Path(tile_store), TILES_SCHEMA)
        self.run_dir = Path(run_dir)
        self.teachers = {name: build_teacher(get_teacher(name), device, settings.weights.get(name)) for name in teachers}
        self.settings, self.views, self.tile_px = settings, views, tile_px

    def provenance(self) -> dict[str, dict]:
        return {name: {**t.spec.to_json(), "weights_sha256": t.weights_sha256} for name, t in self.teachers.items()}

    def run_unit(self, unit: int, start: int, end: int, store_ids: dict[str, str]) -> dict:
        """Compute and write rows [start, end) for the teachers named in ``store_ids``."""
        import torch

        from pipeline.views import apply_view

        timings: dict[str, float] = defaultdict(float)
        began = time.perf_counter()
        pixels = self.tiles["tiles"][start:end]
        timings["read"] += time.perf_counter() - began
        outputs = {
            name: {recipe: np.zeros((end - start, len(self.views), width), np.float32) for recipe, width in t.spec.widths.items()}
            for name, t in self.teachers.items()
            if name in store_ids
        }
        teachers = {name: self.teachers[name] for name in outputs}
        batch_size = self.settings.batch_size
        for view_index, view in enumerate(self.views):
            for first in range(0, end - start, batch_size):
                clock = time.perf_counter()
                batch = torch.from_numpy(np.ascontiguousarray(apply_view(pixels[first : first + batch_size], view, self.tile_px)))
                timings["transform"] += time.perf_counter() - clock
                for name, teacher in teachers.items():
                    clock = time.perf_counter()
                    embedded = teacher.embed(batch.to(teacher.device))
                    timings[f"forward:{name}"] += time.perf_counter() - clock
                    for recipe, values in embedded.items():
                        outputs[name][recipe][first : first + len(batch), view_index] = values.float().cpu().numpy()
        for name, recipes in outputs.items():
            for recipe, values in recipes.items():
                bad = ~np.isfinite(values).all(axis=(1, 2)) | (np.abs(values).max(axis=(1, 2)) > FLOAT16_MAX)
                if bad.any():
                    rows = (np.flatnonzero(bad) + start).tolist()
                    raise NonFiniteFeatures(f"teacher {name!r} recipe {recipe!r} gave NaN/Inf or values beyond float16 for rows {rows[:20]}; nothing was written for unit {unit}")
        for name, recipes in outputs.items():
            clock = time.perf_counter()
            store = self.run_dir / "features" / f"{name}.zarr"
            write_rows(store, start, {recipe: values.astype(np.float16) for recipe, values in recipes.items()})
            UnitMarkers(store, store_ids[name]).mark(unit, {"start": start, "end": end})
            timings["write"] += time.perf_counter() - clock
        return {"rows": end - start, "timings": dict(timings)}


def run_features(config: Config, teachers: list[str] | None = None, overwrite: bool = False) -> FeatureSummary:
    started = time.perf_counter()
    settings = config.features
    names = teachers or settings.teachers
    for name in names:
        get_teacher(name)  # unknown names fail before any work, with the list of known teachers
    pools = settings.pools or [names]
    if sorted(sum(pools, [])) != sorted(names):
        raise ConfigError(f"features.pools {pools} must hold each selected teacher ({names}) exactly once")
    run_dir = config.run.resolve()
    tile_path = run_dir / "tiles.zarr"
    tiles = open_store(tile_path, TILES_SCHEMA)
    units = unit_ranges(tiles.attrs["n_rows"], tiles["tiles"].shards[0])
    missing_tiles = set(range(len(units))) - UnitMarkers(tile_path, tiles.attrs["store_id"]).done()
    if missing_tiles:
        raise StoreError(f"{tile_path} is unfinished ({len(missing_tiles)} of {len(units)} units missing); rerun `tiles` first")
    tiling = tiles.attrs["tiling"]
    views = expand_views(settings.views, tiling["context_px"], tiling["tile_px"])
    summary = FeatureSummary(run_dir, tiles.attrs["n_rows"], names, units_total=len(units) * len(names))
    with ray_session(config.ray):
        for pool in pools:
            _run_pool(pool, tiles, tile_path, units, views, config, overwrite, summary)
    summary.seconds = time.perf_counter() - started
    append_stage_record(run_dir, summary.as_record())
    return summary


def _run_pool(pool: list[str], tiles, tile_path: Path, units, views, config: Config, overwrite: bool, summary: FeatureSummary) -> None:
    settings = config.features
    actor_count = settings.actors or _default_actor_count(settings)
    worker_class = ray.remote(num_cpus=settings.threads_per_actor, num_gpus=settings.gpus_per_actor, max_restarts=3, max_task_retries=3)(TeacherWorker)
    args = (str(tile_path), str(summary.run_dir), pool, settings, views, tiles.attrs["tiling"]["tile_px"])
    workers = [worker_class.remote(*args) for _ in range(actor_count)]
    provenance = ray.get(workers[0].provenance.remote())
    store_ids, missing = {}, {}
    for name in pool:
        store_path = summary.run_dir / "features" / f"{name}.zarr"
        store_ids[name], missing[name] = _prepare_feature_store(store_path, tiles, provenance[name], views, config, overwrite)
        if not missing[name]:
            summary.skipped.append(name)
    # Each unit is computed for the teachers whose stores lack it: a finished store is never rewritten.
    queue = [(unit, {n: store_ids[n] for n in pool if unit in missing[n]}) for unit in range(len(units))]
    queue = [(unit, ids) for unit, ids in queue if ids]
    summary.units_run += sum(len(ids) for _, ids in queue)
    pending: dict = {}  # ref -> the worker running it

    def feed_workers() -> None:
        for worker in workers:
            while queue and list(pending.values()).count(worker) < 2:  # one running, one waiting: no idle actor
                unit, ids = queue.pop(0)
                pending[worker.run_unit.remote(unit, *units[unit], ids)] = worker

    started = time.perf_counter()
    with progress_bar() as progress:
        remaining = sum(units[unit][1] - units[unit][0] for unit, _ in queue)
        task = progress.add_task(f"features {'+'.join(pool)}", total=summary.n_rows, completed=summary.n_rows - remaining, rate="")
        feed_workers()
        for _, stats in completed(pending):
            feed_workers()
            summary.rows_done += stats["rows"]
            for key, seconds in stats["timings"].items():
                summary.timings[key] += seconds
            rate = summary.rows_done / (summary.units_seconds + time.perf_counter() - started)
            progress.update(task, advance=stats["rows"], rate=f"{rate:.0f} tiles/s")
    summary.units_seconds += time.perf_counter() - started
    for worker in workers:
        ray.kill(worker)


def _default_actor_count(settings: FeaturesConfig) -> int:
    resources = ray.cluster_resources()
    if settings.gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) // settings.gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // settings.threads_per_actor))


def _prepare_feature_store(store_path: Path, tiles, teacher: dict, views: list[dict], config: Config, overwrite: bool) -> tuple[str, set[int]]:
    """The store id and the units still to compute: a new store, or a matching one to resume.

    A finished store (every unit marked) is left alone unless ``overwrite``; a store from another
    tile store, teacher, weights or views is refused unless ``overwrite``.
    """
    n_units = len(unit_ranges(tiles.attrs["n_rows"], tiles["tiles"].shards[0]))
    teacher, views = json.loads(json.dumps(teacher)), json.loads(json.dumps(views))  # as attrs store them
    if store_path.exists() and overwrite:
        remove_store(store_path)
    if store_path.exists():
        try:
            existing = open_feature_store(store_path, tiles)
        except StoreError as error:
            raise StoreError(f"{error}\nUse --overwrite to replace {store_path}.") from error
        differences = [
            f"{key}: store has {existing.attrs[key]!r}, now {value!r}"
            for key, value in (("teacher", teacher), ("views", views))
            if existing.attrs[key] != value
        ]
        if differences:
            raise StoreError(f"{store_path} was computed differently:\n  - " + "\n  - ".join(differences) + "\nUse --overwrite to replace it.")
        store_id = existing.attrs["store_id"]
        return store_id, set(range(n_units)) - UnitMarkers(store_path, store_id).done()
    tile_arrays = tiles["tiles"]
    group = create_feature_store(
        store_path, dict(tiles.attrs), tile_arrays.chunks[0], tile_arrays.shards[0], config.store,
        teacher, teacher["widths"], views,
    )
    return group.attrs["store_id"], set(range(n_units))


def print_summary(summary: FeatureSummary) -> None:
    record = summary.as_record()
    rows = [[t, "finished earlier, left as is" if t in summary.skipped else f"{record['teacher_tiles_per_second'][t] or '-'}", f"{summary.timings.get(f'forward:{t}', 0):.1f}"] for t in summary.teachers]
    results.print(table(f"features -> {summary.run_dir / 'features'}", ["teacher", "tiles/s (forward)", "forward s"], rows))
    seconds = record["seconds"]
    results.print(
        f"{summary.rows_done} tile rows computed in {summary.units_seconds:.1f} s ({record['tiles_per_second']} tiles/s through every teacher; "
        f"{summary.seconds:.1f} s with start-up); "
        f"read {seconds.get('read', 0):.1f} s, transform {seconds.get('transform', 0):.1f} s, "
        f"forward {sum(v for k, v in seconds.items() if k.startswith('forward:')):.1f} s, write {seconds.get('write', 0):.1f} s"
    )
