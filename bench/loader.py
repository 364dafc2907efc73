"""Figures 3 and 4: the distiller's loader against the floors and the per-sample readers others use,
and cached-target training against running the teachers online.

Floors and baselines, all on the same rows of the same run:
- decompression floor: the loader's chunks (tiles and every target) decoded by the same codec from
  bytes already in memory, with no Zarr, no shuffling and no batching;
- per-sample Zarr: one read per sample and array, the usual map-style Dataset;
- per-tile HDF5: TRIDENT/CLAM files (one per slide, chunks of one row, no compression), one read per sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import zarr
from numcodecs import Blosc

from bench.common import Row, timed
from distill.data import BlockShuffleLoader, open_distill_data
from distill.train import run_distill
from pipeline.config import Config

FIGURE_LOADER, FIGURE_CACHED = "3 loader", "4 cached vs online"


def loader_rate(data, samples: int, settings) -> float:
    keep = np.ones(len(data.slide_of_row), bool)

    def consume() -> None:
        seen = 0
        loader = BlockShuffleLoader(data, keep, settings.batch_size, settings.pool_chunks, settings.loader_workers, seed=0)
        for batch in loader:
            seen += len(batch)
            if seen >= samples:
                break

    return samples / timed(consume, repeat=2)


def decompression_floor(arrays: list[zarr.Array], rows: int) -> float:
    """Rows/s of decoding the first ``rows`` rows' chunks of every array from in-memory compressed bytes."""
    codec = Blosc("zstd", 1, Blosc.NOSHUFFLE)
    encoded = [codec.encode(np.ascontiguousarray(array[start : start + array.chunks[0]])) for array in arrays for start in range(0, rows, array.chunks[0])]
    return rows / timed(lambda: [codec.decode(block) for block in encoded], repeat=3)


def per_sample_rate(read_one, rows: np.ndarray) -> float:
    return len(rows) / timed(lambda: [read_one(int(row)) for row in rows])


def hdf5_like_trident(tiles: zarr.Array, targets: list[zarr.Array], rows: int, folder: Path) -> Path:
    """The same rows as TRIDENT/CLAM keep them: HDF5, chunks of one row, no compression."""
    path = folder / "trident_like.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("imgs", data=tiles[:rows], chunks=(1, *tiles.shape[1:]))
        for index, target in enumerate(targets):
            values = target[:rows]
            handle.create_dataset(f"features_{index}", data=values, chunks=(1, *values.shape[1:]))
    return path


def measure(tiled: Config, work: Path, quick: bool, demo_teacher_rates: dict[str, float], real_teacher_rates: dict[str, float]) -> list[Row]:
    settings = tiled.distill
    data = open_distill_data(tiled.training_runs, settings)
    tiles, targets = data.sources[0].tiles, list(data.sources[0].targets.values())
    n_rows = len(data.slide_of_row)
    samples = min(n_rows, 256 if quick else 2048)
    rng = np.random.default_rng(0)
    random_rows = rng.choice(n_rows, size=min(samples, 256 if quick else 1024), replace=False)
    loader = loader_rate(data, samples, settings)
    floor = decompression_floor([tiles, *targets], samples - samples % tiles.chunks[0])
    zarr_per_sample = per_sample_rate(lambda row: [tiles[row], *(t[row] for t in targets)], random_rows)
    h5_path = hdf5_like_trident(tiles, targets, samples, work)
    with h5py.File(h5_path, "r") as handle:
        datasets = [handle["imgs"], *(handle[f"features_{i}"] for i in range(len(targets)))]
        hdf5_per_sample = per_sample_rate(lambda row: [d[row] for d in datasets], random_rows[random_rows < samples])
    shutil.rmtree(tiled.run / "student", ignore_errors=True)  # a fresh student: the tile store may be new too
    short = settings.model_copy(update={"steps": 10 if quick else 40, "eval_every": 1000, "checkpoint_every": 1000})
    summary = run_distill(tiled.model_copy(update={"distill": short}))
    speed = summary["speed"]
    rows = [
        Row(FIGURE_LOADER, "block-shuffle loader (tiles + targets)", loader, "samples/s", f"decompression floor ({floor:,.0f}/s)", loader / floor, ">= 0.8"),
        Row(FIGURE_LOADER, "loader vs per-sample Zarr reads", loader, "samples/s", f"per-sample zarr ({zarr_per_sample:,.0f}/s)", loader / zarr_per_sample, ">= 10"),
        Row(FIGURE_LOADER, "loader vs per-tile HDF5 (TRIDENT/CLAM layout)", loader, "samples/s", f"per-tile h5py ({hdf5_per_sample:,.0f}/s)", loader / hdf5_per_sample),
        Row(FIGURE_LOADER, "loader vs the training step", loader, "samples/s", f"student step on in-memory batches ({speed['step']:,.1f}/s)", loader / speed["step"], ">= 1.0", "> 1: the step never waits for data"),
    ]
    return rows + [
        cached_vs_online(speed, demo_teacher_rates, "the demo stand-in teachers"),
        cached_vs_online(speed, real_teacher_rates, "real teacher architectures (figure 5)"),
    ]


def cached_vs_online(speed: dict, teacher_rates: dict[str, float], which: str) -> Row:
    """Seconds per 1,000 samples: cached = training as run; online = the same step plus every teacher's
    bare forward on the same tiles, measured in this run (reading slides online is not even counted,
    which flatters the online side)."""
    cached = 1000 / speed["training"]
    online = 1000 / speed["step"] + sum(1000 / rate for rate in teacher_rates.values())
    return Row(
        FIGURE_CACHED, f"cached targets vs online {which}", cached, "s per 1,000 samples", f"online ({online:,.1f} s): step + {' + '.join(teacher_rates)}",
        online / cached, ">= 5",
    )
