"""The tile stage's workers: one Ray actor per CPU for the whole run, and the unit they write.

A Ray task per unit paid, in its unit's time, for what a long-lived worker pays once: a worker
process started and importing (cold workers started late into the unit phase), the slides opened
again, the JPEG tiles a unit shares with its neighbour decoded again, a fresh unit's worth of pages
filled, and zarr's codec threads contending with the other workers for the same cores. The actors
are started before hashing, so they are warm by the time units run; each keeps its last slides
open (``OpenSlides``) and one unit buffer that every unit fills in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import zarr

from pipeline.config import TilingConfig, TissueConfig
from pipeline.geometry import ReadPlan
from pipeline.stores import UnitMarkers, tile_unit_record, write_rows
from pipeline.tiles.slide_identity import SlideIdentity, identify_slide
from pipeline.tiles.slide_tiles import SlidePlan, plan_slide, read_tiles
from pipeline.tiles.slides import OpenSlides, SlideSource

ZARR_THREADS = 1  # per worker: one worker per core already fills the cores, more threads only contend


class UnitBuffer:
    """A unit's columns, allocated once per worker and filled in place by every unit."""

    def __init__(self) -> None:
        self.columns: dict[str, np.ndarray] = {}

    def rows(self, n_rows: int, side: int) -> dict[str, np.ndarray]:
        """Views of the first ``n_rows`` rows of each column (contents left from an earlier unit)."""
        tiles = self.columns.get("tiles")
        if tiles is None or len(tiles) < n_rows or tiles.shape[1] != side:
            self.columns = {
                "tiles": np.empty((n_rows, side, side, 3), np.uint8), "coords": np.empty((n_rows, 2), np.int64),
                "slide": np.empty(n_rows, np.int32), "tissue": np.empty(n_rows, np.float32), "flags": np.empty(n_rows, np.uint8),
            }
        return {name: column[:n_rows] for name, column in self.columns.items()}


def write_unit(store_path: str, store_id: str, unit: int, start: int, segments: list[dict], slides: OpenSlides, buffer: UnitBuffer) -> dict:
    """Read and write one unit's rows, then mark it done. Idempotent: a retry rewrites the same bytes."""
    began, cpu_began = time.perf_counter(), time.process_time()
    n_rows = sum(len(segment["coords"]) for segment in segments)
    columns = buffer.rows(n_rows, ReadPlan(**segments[0]["read"]).stored_px)
    failed_slides = []
    row = 0
    for segment in segments:
        rows = slice(row, row + len(segment["coords"]))
        row = rows.stop
        try:
            reader = slides.get(Path(segment["path"]), direct=segment["reader"] == "tifffile")
        except Exception as error:  # noqa: BLE001 - the slide vanished or broke since planning: blank, flagged rows
            reader = None
            failed_slides.append({"slide": segment["slide"], "error": (
                f"vanished or unreadable after planning ({type(error).__name__}: {error}); its tiles are blank and flagged: "
                "restore the file and rerun `tiles --overwrite`"
            )})
        read_tiles(reader, ReadPlan(**segment["read"]), segment["coords"], segment["dimensions"], out=(columns["tiles"][rows], columns["flags"][rows]))
        columns["coords"][rows] = segment["coords"]
        columns["tissue"][rows] = segment["tissue"]
        columns["slide"][rows] = segment["slide"]
    read_done = time.perf_counter()
    write_rows(Path(store_path), start, columns)
    finished = time.perf_counter()
    stats = {
        **tile_unit_record(start, columns["flags"]),
        "read_seconds": read_done - began,
        "write_seconds": finished - read_done,
        "cpu_seconds": time.process_time() - cpu_began,  # of the whole process (zarr's thread too): the work, whatever share of the cores it got
        "failed_slides": failed_slides,
    }
    UnitMarkers(Path(store_path), store_id).mark(unit, {"start": start, **stats})
    return stats


class TileWorker:
    """One Ray actor: hashes, plans and writes units, keeping its slides open and its buffer between units."""

    def __init__(self) -> None:
        zarr.config.set({"threading.max_workers": ZARR_THREADS})  # read when zarr first starts its pool
        self.slides = OpenSlides()
        self.buffer = UnitBuffer()

    def identify(self, path: Path, cached: dict) -> SlideIdentity:
        return identify_slide(path, cached)

    def plan(self, index: int, source: SlideSource, identity: SlideIdentity, tiling: TilingConfig, tissue: TissueConfig, qc_dir: Path) -> SlidePlan:
        return plan_slide(index, source, identity, tiling, tissue, qc_dir)

    def write_unit(self, store_path: str, store_id: str, unit: int, start: int, segments: list[dict]) -> dict:
        return write_unit(store_path, store_id, unit, start, segments, self.slides, self.buffer)


@contextmanager
def tile_workers() -> Iterator[list]:
    """One TileWorker per CPU of the Ray cluster (needs a Ray session); removed at the end, so the next
    stage gets the CPUs. A worker that dies is restarted and its calls retried, as tasks were."""
    worker_class = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(TileWorker)
    workers = [worker_class.remote() for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1))))]
    try:
        yield workers
    finally:
        for worker in workers:
            ray.kill(worker)
