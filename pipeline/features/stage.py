"""The ``features`` stage: ``RUN/tiles.zarr`` + teachers -> ``RUN/features/<teacher>.zarr``, on Ray.

Ray actors each load every teacher of their pool once, then take whole units (the tile store's
shards of rows): a unit's tiles are read and decoded once and each teacher is given its published
field of view at its published mpp (checked before any model is built: pipeline/teacher_input.py),
to which it applies its own resize and normalisation, while the actor reads the next unit and
writes the previous one (``features.overlap``). Each teacher's rows go to its own store; a marker
per store and unit follows the write (folded into the store's unit index), so reruns compute only
unfinished units. A dead actor is restarted by Ray and its unit retried; a unit is recomputed
whole, so retries and reruns write identical bytes.

With ``features.grid`` k > 0 every teacher also stores its spatial recipe, the ``grid`` array
[N, V, k*k, C] of its patch tokens pooled on each view's own pixels (pipeline/grids.py), and the
summary states what it costs per tile.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config, ConfigError
from pipeline.console import results, table
from pipeline.embedding import ActorSettings, EmbedSummary, embed_pool
from pipeline.inspect_store import describe_grid_cost, grid_cost
from pipeline.locks import exclusive
from pipeline.ray_runtime import ray_session
from pipeline.run_report import append_stage_record
from pipeline.stores import GRID, RunDir, now, open_feature_store, open_tile_store
from pipeline.teacher_input import plan_teacher_inputs
from pipeline.teacher_specs import parse_teacher_specs
from pipeline.teachers import build_teacher, get_teacher, require_patch_tokens
from pipeline.views import expand_views


@dataclass
class FeatureSummary(EmbedSummary):
    run_dir: Path = Path()
    seconds: float = 0.0
    grid_costs: dict[str, dict] = field(default_factory=dict)  # teacher -> grid_cost of its store's grid array

    @property
    def teachers(self) -> list[str]:
        return self.names

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
            "grid": self.grid_costs,
        }


def run_features(config: Config, teachers: list[str] | None = None, overwrite: bool = False) -> FeatureSummary:
    started = time.perf_counter()
    settings = config.features
    names = teachers or settings.teachers
    user_specs = parse_teacher_specs(settings.teacher_specs)
    specs = {name: get_teacher(name, user_specs) for name in names}  # unknown names fail before any work, listing the known
    for name in settings.off_scale:
        get_teacher(name, user_specs)
    pools = settings.pools or [names]
    if sorted(sum(pools, [])) != sorted(names):
        raise ConfigError(f"features.pools {pools} must hold each selected teacher ({names}) exactly once")
    run = RunDir.of(config)
    tiles = open_tile_store(run.tiles)
    tiles.require_finished("tiles")
    units = tiles.units()
    tiling = tiles.attrs.tiling
    views = expand_views(settings.views, tiling.context_px, tiling.tile_px)
    inputs = plan_teacher_inputs(list(specs.values()), tiling, views, settings.off_scale)  # each teacher at its published scale, before any model
    if settings.grid:
        for spec in specs.values():  # on the meta device: a teacher without patch tokens fails before any weights are read
            require_patch_tokens(spec)
    summary = FeatureSummary(tiles.attrs.n_rows, names, units_total=len(units) * len(names), run_dir=run.root)
    actors = ActorSettings(settings.batch_size, settings.actors, settings.gpus_per_actor, settings.threads_per_actor, settings.overlap)
    with exclusive(run.lock("features")), ray_session(config.ray):
        for pool in pools:
            builders = {
                name: functools.partial(build_teacher, specs[name], weights=settings.weights.get(name), input_record=inputs[name].as_record(), grid=settings.grid)
                for name in pool
            }
            embed_pool(tiles, builders, {name: run.features(name) for name in pool}, views, actors, config.store, overwrite, summary)
    for name in names:
        store = open_feature_store(run.features(name))
        if store.attrs.grid:
            summary.grid_costs[name] = grid_cost(store[GRID])
    summary.seconds = time.perf_counter() - started
    append_stage_record(run.root, summary.as_record())
    return summary


def print_summary(summary: FeatureSummary) -> None:
    record = summary.as_record()
    rows = [[t, "finished earlier, left as is" if t in summary.skipped else f"{record['teacher_tiles_per_second'][t] or '-'}", f"{summary.timings.get(f'forward:{t}', 0):.1f}"] for t in summary.teachers]
    results.print(table(f"features -> {RunDir(summary.run_dir).features_dir}", ["teacher", "tiles/s (forward)", "forward s"], rows))
    seconds = record["seconds"]
    results.print(
        f"{summary.rows_done} tile rows computed in {summary.units_seconds:.1f} s ({record['tiles_per_second']} tiles/s through every teacher; "
        f"{summary.seconds:.1f} s with start-up); "
        f"read {seconds.get('read', 0):.1f} s, transform {seconds.get('transform', 0):.1f} s, "
        f"forward {sum(v for k, v in seconds.items() if k.startswith('forward:')):.1f} s, write {seconds.get('write', 0):.1f} s"
    )
    for teacher, cost in summary.grid_costs.items():
        results.print(f"{teacher}: {describe_grid_cost(cost)}")
