"""Figure 2: the feature pipeline's tiles/s against the bare model forward on tensors already in memory."""

from __future__ import annotations

import torch

from bench.common import Row, timed
from pipeline.config import Config
from pipeline.features.stage import run_features
from pipeline.stores import RunDir, open_tile_store
from pipeline.teachers import LoadedTeacher, build_teacher

FIGURE = "2 features"


def bare_forward_tiles_per_second(teacher: LoadedTeacher, tiles: torch.Tensor, batch_size: int) -> float:
    """The model alone: preprocessing done beforehand (on the teacher's device), same precision and batch as the actors."""
    batches = [teacher.preprocess(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]

    def forward_all() -> None:
        for batch in batches:
            teacher.forward(batch)
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    teacher.forward(batches[0])  # warm-up
    return len(tiles) / timed(forward_all, repeat=2)


def bare_rates(tiled: Config) -> dict[str, float]:
    """Bare forward tiles/s of each teacher on the run's tiles (``tiled`` holds a finished tile store)."""
    settings = tiled.features
    tiles = torch.from_numpy(open_tile_store(RunDir(tiled.run).tiles)["tiles"][:])
    torch.set_num_threads(settings.threads_per_actor)  # as the actors run
    return {name: bare_forward_tiles_per_second(build_teacher(name), tiles, settings.batch_size) for name in settings.teachers}


def measure(tiled: Config, bare: dict[str, float], quick: bool) -> list[Row]:
    """The pipeline against the bare forward; in full, also against separate passes and against no overlap
    (``quick``: the first row only, the others being the same stage under other settings)."""
    settings = tiled.features
    teachers = settings.teachers
    bare_all = 1 / sum(1 / rate for rate in bare.values())  # one tile through every teacher
    one_pass = run_features(tiled, overwrite=True)
    pipeline = one_pass.rows_done / one_pass.units_seconds
    rows = [Row(FIGURE, f"bare forward, {name}", rate, "tiles/s", note=f"batch {settings.batch_size}, {settings.threads_per_actor} threads") for name, rate in bare.items()]
    rows.append(Row(FIGURE, f"pipeline, {len(teachers)} teachers in one pass", pipeline, "tiles/s", f"bare forward of all teachers ({bare_all:.1f} tiles/s)", pipeline / bare_all, ">= 0.9", "read + transform + forward + write, on Ray"))
    if quick:
        return rows
    separate_seconds = sum(run_features(tiled, [name], overwrite=True).units_seconds for name in teachers)
    one_at_a_time = run_features(tiled.model_copy(update={"features": settings.model_copy(update={"overlap": False})}), overwrite=True)
    sequential = one_at_a_time.rows_done / one_at_a_time.units_seconds
    return rows + [
        Row(FIGURE, f"{len(teachers)} separate passes vs one pass", separate_seconds, "s", f"one pass ({one_pass.units_seconds:.1f} s)", separate_seconds / one_pass.units_seconds, "", "> 1: one pass saves the repeated reads"),
        Row(FIGURE, "reading ahead and writing behind vs one unit at a time", pipeline, "tiles/s", f"features.overlap false ({sequential:.1f} tiles/s)", pipeline / sequential, "", "> 1: the forward pass waits less for reads and writes"),
    ]
