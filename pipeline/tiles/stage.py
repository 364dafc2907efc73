"""The ``tiles`` stage: slides -> ``RUN/tiles.zarr``, on Ray, resumable.

All work runs on one Ray actor per CPU, started with the run (pipeline/tiles/workers.py).

1. A worker per slide hashes its files (full sha256, cached for unchanged files); a slide with the
   content of an earlier one is recorded as its duplicate. A worker per other slide plans its
   tiles (mpp, read level, tissue, grid, QC picture).
2. The driver sizes the store once (rows of a slide are contiguous) or checks that an existing
   store was made from the same slides and settings; it refuses a mismatch unless told to overwrite.
3. Workers take units (one shard of rows each), neighbouring units of a slide to the same worker
   where no worker idles for it; a unit reads its tiles, writes its shards, then its marker; the
   driver folds markers into the store's unit index as they come (pipeline/stores.py UnitMarkers).
   Finished units are skipped, so a rerun after any interruption does only what is missing.
   A slide that a unit cannot open (it vanished or broke after planning) gets blank, flagged rows,
   is named in the unit's marker, and at the end is failed in the summary and the store's records.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, ConfigError
from pipeline.console import progress_bar, results, table
from pipeline.inspect_store import describe_read, tiles_on_disk
from pipeline.locks import exclusive
from pipeline.ray_runtime import on_actors, ray_session
from pipeline.run_report import append_stage_record
from pipeline.stores import (
    RunDir, SlideRecord, StoreError, TileStoreAttrs, Tiling, UnitMarkers, create_tile_store, now, open_tile_store,
    remove_store, rewrite_attrs, unit_ranges,
)
from pipeline.tiles.slide_identity import DigestCache, SlideIdentity
from pipeline.tiles.slide_tiles import SlidePlan, duplicate_plan
from pipeline.tiles.slides import SlideList, SlideSource, discover_slides
from pipeline.tiles.workers import tile_workers


@dataclass
class TileSummary:
    store: Path
    n_rows: int
    slides: list[SlideRecord]
    units_total: int = 0
    units_run: int = 0
    seconds: float = 0.0
    read_failed_tiles: int = 0
    rows_written: int = 0
    units_seconds: float = 0.0  # wall time of the unit phase (reading and writing), without start-up and planning
    units_cpu_seconds: float = 0.0  # CPU time the workers' processes spent on this run's units
    warnings: list[str] = field(default_factory=list)  # entries that named an already listed slide file
    hashed_files: int = 0  # slide files read for their content hash in this run (the others' digests were cached)
    hashed_bytes: int = 0

    @property
    def failed_slides(self) -> list[SlideRecord]:
        return [s for s in self.slides if not s.ok]

    @property
    def tiles_per_second(self) -> float:
        return self.rows_written / self.units_seconds if self.units_seconds else 0.0

    def as_record(self) -> dict:
        return {
            "stage": "tiles",
            "finished": now(),
            "store": str(self.store),
            "rows": self.n_rows,
            "units_total": self.units_total,
            "units_run": self.units_run,
            "wall_seconds": round(self.seconds, 3),
            "units_seconds": round(self.units_seconds, 3),
            "tiles_per_second": round(self.tiles_per_second, 2),
            "read_failed_tiles": self.read_failed_tiles,
            "hashed_files": self.hashed_files,
            "hashed_bytes": self.hashed_bytes,
            "warnings": self.warnings,
            "failures": [{"name": s.name, "path": s.path, "error": s.error} for s in self.failed_slides],
            "slides": [{k: getattr(s, k) for k in ("name", "status", "n_tiles", "mpp", "mpp_source", "rows")} for s in self.slides],
        }


def run_tiles(config: Config, overwrite: bool = False) -> TileSummary:
    started = time.perf_counter()
    run = RunDir.of(config)
    listed = list_slides(config)  # a bad manifest or an empty list is refused before any Ray starts
    with exclusive(run.lock("tiles")), ray_session(config.ray), tile_workers() as workers:
        summary = write_tiles(config, plan_tiles(config, workers, listed), overwrite, workers)
    summary.seconds = time.perf_counter() - started
    append_stage_record(run.root, summary.as_record())
    return summary


@dataclass
class TilePlan:
    """What planning learnt: each slide's plan with its rows [start, end), and how slides were identified."""

    plans: list[SlidePlan]
    warnings: list[str]  # slides listed more than once
    hashed_files: int
    hashed_bytes: int


def list_slides(config: Config) -> SlideList:
    """The config's slide files, folders and manifests expanded; an empty list is an error."""
    listed = discover_slides(config.slides)
    if not listed.sources:
        raise ConfigError("no slides given: list slide files, folders or manifests under 'slides' or on the command line")
    return listed


def plan_tiles(config: Config, workers: list | None = None, listed: SlideList | None = None) -> TilePlan:
    """Phase 1 (needs a Ray session): every slide identified and planned, and its rows in the store.
    ``workers`` from ``tile_workers``; without them, workers are started for this phase alone."""
    if workers is None:
        with tile_workers() as started:
            return plan_tiles(config, started, listed)
    listed = listed if listed is not None else list_slides(config)
    run = RunDir.of(config)
    identities = _identify_all(listed.sources, DigestCache(run.slide_hashes), workers)
    plans = _plan_all(listed.sources, identities, config, run.qc, workers)
    rows = np.cumsum([0] + [len(p.coords) for p in plans])
    for plan, start, end in zip(plans, rows[:-1], rows[1:]):
        plan.record = dataclasses.replace(plan.record, rows=[int(start), int(end)])
    return TilePlan(
        plans, listed.repeats, sum(i.hashed_files for i in identities), sum(i.hashed_bytes for i in identities),
    )


def write_tiles(config: Config, planned: TilePlan, overwrite: bool = False, workers: list | None = None) -> TileSummary:
    """Phases 2 and 3 (needs a Ray session): the store sized or reused, then every missing unit written."""
    if workers is None:
        with tile_workers() as started:
            return write_tiles(config, planned, overwrite, started)
    run = RunDir.of(config)
    plans = planned.plans
    slides = [p.record for p in plans]
    summary = TileSummary(
        run.tiles, sum(len(p.coords) for p in plans), slides, warnings=planned.warnings,
        hashed_files=planned.hashed_files, hashed_bytes=planned.hashed_bytes,
    )
    if summary.n_rows:
        store_id = _prepare_store(run.tiles, config, slides, summary.n_rows, overwrite)
        _write_units(run.tiles, store_id, plans, config.store.shard_rows, summary, workers)
    return summary


def _identify_all(sources: list[SlideSource], cache: DigestCache, workers: list) -> list[SlideIdentity]:
    """Every slide's content hash, one worker call per slide; digests of unchanged files come from the cache."""
    found = _gather(on_actors(workers, range(len(sources)), lambda worker, index: worker.identify.remote(
        sources[index].path, cache.for_slide(sources[index].path),
    )), len(sources), "hashing slides")
    identities = [found[index] for index in range(len(sources))]
    cache.save(identities)
    return identities


def _plan_all(sources: list[SlideSource], identities: list[SlideIdentity], config: Config, qc_dir: Path, workers: list) -> list[SlidePlan]:
    """Plan each slide on a worker, except a slide whose content hash an earlier slide has: that one is a duplicate."""
    first_with_hash: dict[str, Path] = {}
    duplicates, to_plan = {}, []
    for index, (source, identity) in enumerate(zip(sources, identities)):
        if identity.error is None and first_with_hash.setdefault(identity.hash, source.path) != source.path:
            duplicates[index] = duplicate_plan(index, source, identity, first_with_hash[identity.hash])
        else:
            to_plan.append(index)
    planned = on_actors(workers, to_plan, lambda worker, index: worker.plan.remote(
        index, sources[index], identities[index], config.tiling, config.tissue, qc_dir,
    ))
    plans = {**_gather(planned, len(to_plan), "planning slides"), **duplicates}
    return [plans[index] for index in range(len(sources))]


def _gather(finished: Iterator[tuple[Any, Any]], total: int, description: str) -> dict:
    """Each job -> its result, with a progress bar."""
    found = {}
    with progress_bar() as progress:
        task = progress.add_task(description, total=total, rate="")
        for job, result in finished:
            found[job] = result
            progress.advance(task)
    return found


def _prepare_store(store_path: Path, config: Config, slides: list[SlideRecord], n_rows: int, overwrite: bool) -> str:
    """The id of a store ready for writing: the existing one when it matches, else a new one."""
    tiling = Tiling.from_config(config)
    if store_path.exists():
        if overwrite:
            remove_store(store_path)
        else:
            try:
                existing = open_tile_store(store_path)
            except StoreError:
                if (store_path / "zarr.json").is_file() and not any(store_path.glob("*/c")):
                    remove_store(store_path)  # creation was interrupted before any unit ran
                else:
                    raise
            else:
                differences = store_differences(existing.attrs, tiling, slides, n_rows)
                if differences:
                    raise StoreError(
                        f"{store_path} was made from other slides or settings:\n  - " + "\n  - ".join(differences)
                        + "\nUse another --out, or --overwrite to replace it."
                    )
                return existing.attrs.store_id
    attrs = TileStoreAttrs.new(tiling, slides, n_rows)
    create_tile_store(store_path, attrs, config.store)
    return attrs.store_id


def store_differences(attrs: TileStoreAttrs, tiling: Tiling, slides: list[SlideRecord], n_rows: int) -> list[str]:
    """Human-readable differences between a store's recorded inputs and the current ones."""
    found = attrs.tiling.differences(tiling)
    before = {s.path: s for s in attrs.slides}
    after = {s.path: s for s in slides}
    found += [f"slide {path} is new" for path in after.keys() - before.keys()]
    found += [f"slide {path} is no longer listed" for path in before.keys() - after.keys()]
    for path in sorted(after.keys() & before.keys()):
        old, new = before[path], after[path]
        changed = [key for key in SlideRecord.IDENTITY if getattr(old, key) != getattr(new, key)]
        if changed:
            found.append(f"slide {path} changed: " + ", ".join(f"{k} {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in changed))
    if not found and [s.path for s in attrs.slides] != [s.path for s in slides]:
        found.append("the slides are listed in another order")
    if not found and attrs.n_rows != n_rows:
        found.append(f"rows: store has {attrs.n_rows}, now {n_rows}")
    return found


def _write_units(store_path: Path, store_id: str, plans: list[SlidePlan], shard_rows: int, summary: TileSummary, workers: list) -> None:
    ranges = unit_ranges(summary.n_rows, shard_rows)
    markers = UnitMarkers(store_path, store_id)
    earlier = markers.fold()
    done = earlier.units
    lost = [(unit, failure) for unit, note in earlier.notes.items() for failure in note.get("failed_slides", [])]
    summary.read_failed_tiles = earlier.read_failed()  # blank tiles of units finished by an earlier, interrupted run
    todo = [unit for unit in range(len(ranges)) if unit not in done]
    summary.units_total, summary.units_run = len(ranges), len(todo)
    unit_started = time.perf_counter()
    written = on_actors(workers, todo, lambda worker, unit: worker.write_unit.remote(
        str(store_path), store_id, unit, ranges[unit][0], unit_segments(plans, *ranges[unit]),
    ))
    with progress_bar() as progress:
        task = progress.add_task("tiling", total=summary.n_rows, completed=sum(ranges[u][1] - ranges[u][0] for u in done), rate="")
        for unit, stats in written:
            lost += [(unit, failure) for failure in stats["failed_slides"]]
            summary.rows_written += stats["rows"]
            summary.read_failed_tiles += stats["read_failed"]
            summary.units_cpu_seconds += stats["cpu_seconds"]
            summary.units_seconds = time.perf_counter() - unit_started
            progress.update(task, advance=stats["rows"], rate=f"{summary.tiles_per_second:.0f} tiles/s")
            markers.fold_if_due()
    markers.fold()
    _fail_slides_lost_after_planning(store_path, summary, lost)


def _fail_slides_lost_after_planning(store_path: Path, summary: TileSummary, lost: list[tuple[int, dict]]) -> None:
    """A slide a unit could not open has blank rows: it is failed, with the reason of its first such
    unit, in the summary (so in report.json and for --strict) and in the store's slide records."""
    reasons: dict[int, str] = {}
    for _, failure in sorted(lost, key=lambda item: item[0]):
        reasons.setdefault(failure["slide"], failure["error"])
    if not reasons:
        return
    summary.slides = [dataclasses.replace(s, status="failed", error=reasons[s.id]) if s.id in reasons else s for s in summary.slides]
    store = open_tile_store(store_path)
    if store.attrs.slides != summary.slides:
        rewrite_attrs(store, dataclasses.replace(store.attrs, slides=summary.slides))


def unit_segments(plans: list[SlidePlan], start: int, end: int) -> list[dict]:
    """The slides' pieces that fall in rows [start, end), with what a worker needs to read them."""
    segments = []
    for plan in plans:
        first, last = plan.record.rows
        lo, hi = max(first, start), min(last, end)
        if lo >= hi:
            continue
        segments.append({
            "slide": plan.record.id,
            "path": plan.record.path,
            "dimensions": tuple(plan.record.dimensions),
            "read": plan.record.read,
            "reader": plan.record.reader,
            "coords": plan.coords[lo - first : hi - first],
            "tissue": plan.tissue[lo - first : hi - first],
        })
    return segments


def print_summary(summary: TileSummary) -> None:
    for line in summary.warnings:
        results.print(f"[yellow]warning[/yellow]: {line}")
    results.print(table(f"tiles -> {summary.store}", ["slide", "mpp (source)", "read", "tiles", "status"], [
        [
            s.name, f"{s.mpp:.4f} ({s.mpp_source})" if s.mpp else "-", describe_read(s.read),
            str(s.n_tiles or 0), "ok" if s.ok else f"[red]failed[/red]: {s.error}",
        ]
        for s in summary.slides
    ]))
    results.print(
        f"{summary.n_rows} tiles from {len(summary.slides) - len(summary.failed_slides)}/{len(summary.slides)} slides; "
        f"{summary.units_run}/{summary.units_total} units ({summary.rows_written} tiles) written in {summary.units_seconds:.1f} s "
        f"({summary.tiles_per_second:.0f} tiles/s; {summary.seconds:.1f} s with start-up and planning); "
        f"{summary.read_failed_tiles} tiles blank after read errors; {summary.hashed_files} slide files hashed "
        f"({summary.hashed_bytes / 1e6:.0f} MB), the others' digests cached"
    )
    if summary.n_rows:
        results.print(tiles_on_disk(summary.store))
