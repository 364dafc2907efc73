"""``python -m bench --gpu``: the GPU path, measured on one CUDA device in under 8 minutes.

Figures (each a ratio against a baseline measured in this run, GPU utilisation in the note):
- G1 features: the pipeline (read ahead, forward, write behind, on Ray) with the real UNI, Virchow2
  and H-optimus-1 architectures (random weights: speed does not depend on them) against their bare
  forward on preprocessed tensors already on the GPU;
- G2 student step: forward, backward and fused AdamW in bf16 of Pathryoshka-S and -B sized students
  (ViT-S/14 and ViT-B/14 with registers) against those teachers' targets; for S also compiled;
- G3 loader: the distiller's loader alone against each student's step.

Work is sized by rates measured first, to a time budget per figure: the pipeline runs on the real
SVS and the large generated slide when the teachers' bare rate embeds them within its budget, else
on the real SVS alone. Estimated on an H100-class GPU: tiling ~1 min, bare forwards ~2 min, the
pipeline pass < 1 min, students ~3 min with compiling.
Without CUDA it says so and exits 0: nothing here can be measured on a CPU.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from bench.common import Row, write_results
from bench.features import bare_forward_tiles_per_second
from bench.inference import STUDENTS, random_teacher
from bench.loader import loader_rate
from distill.data import open_distill_data, target_sample
from distill.standardize import fit_standardizer
from distill.student import NestedHeads
from distill.train import Distiller, build_student, compile_student, forward_backward, make_optimizer, optimizer_step, training_loader
from pipeline.config import Config, DistillConfig, RayConfig, StoreConfig
from pipeline.demo.slides import make_demo_slides
from pipeline.embedding import ActorSettings, EmbedSummary, embed_pool
from pipeline.ray_runtime import ray_session
from pipeline.stores import RunDir, open_tile_store
from pipeline.tiles.stage import run_tiles
from pipeline.views import expand_views

TEACHERS = ["uni", "virchow2", "h-optimus-1"]
BUDGET_SECONDS = 20.0  # of timed work per measurement; with model builds, tiling and compiling the whole run stays under 8 minutes
FEATURES_BUDGET_SECONDS = 60.0  # the pipeline pass over the whole tile store
TEACHER_BATCH, STUDENT_BATCH = 64, 64
MAX_BARE_TILES = 4096  # preprocessed on the GPU at once for the bare forward: 2.4 GB of float32 at 224 px


class Utilisation:
    """Mean GPU utilisation (%) while the block runs, sampled every 0.2 s: torch.cuda.utilization (NVML,
    when pynvml is installed), else nvidia-smi; None when neither can tell."""

    def __enter__(self) -> Utilisation:
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    @property
    def mean(self) -> str:
        return f"GPU {np.mean(self.samples):.0f}% busy" if self.samples else "GPU utilisation not readable"

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            value = _utilisation_now()
            if value is not None:
                self.samples.append(value)


def _utilisation_now() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except Exception:  # pynvml missing or NVML unusable: ask the driver's tool
        pass
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={torch.cuda.current_device()}"]
    answer = subprocess.run(query, capture_output=True, text=True, timeout=5)
    return float(answer.stdout.strip()) if answer.returncode == 0 and answer.stdout.strip() else None


def measure(demo: Path, out: Path) -> None:
    """Every figure, written to ``out`` as the CPU bench writes its own; on a machine without CUDA, one line."""
    if not torch.cuda.is_available():
        print("bench --gpu: no CUDA device here (torch.cuda.is_available() is False); nothing measured. Run it on a machine with a GPU.")
        return
    started = time.perf_counter()
    slides = {path.name: path for path in make_demo_slides(demo)}
    work = out / "work"
    small = tile_run(work / "gpu-small", [slides["cmu_small_region.svs"]])
    large = tile_run(work / "gpu-large", [slides["cmu_small_region.svs"], slides["synthetic_40x_large.tiff"]])
    bare, bare_rows = bare_teacher_rates(small)
    bare_all = 1 / sum(1 / rate for rate in bare.values())
    run = large if open_tile_store(RunDir(large.run).tiles).attrs.n_rows / bare_all <= FEATURES_BUDGET_SECONDS else small
    rows = bare_rows + [features_row(run, bare_all)]
    for label, arch in STUDENTS.items():
        for compiled in [False, True] if "-S" in label else [False]:
            rows += student_rows(run, label, arch, compiled)
    rows.append(Row("G0 total", "bench --gpu wall time", time.perf_counter() - started, "s", note=f"{torch.cuda.get_device_name()}; budget 8 minutes"))
    write_results(rows, out)


def tile_run(folder: Path, slides: list[Path]) -> Config:
    config = Config(run=folder, slides=slides, store=StoreConfig(), ray=RayConfig())
    if not (folder / "tiles.zarr").exists():
        run_tiles(config)
    return config


def bare_teacher_rates(run: Config) -> tuple[dict[str, float], list[Row]]:
    """Each teacher's bare forward on the run's tiles, repeated to fill the budget (a first pass over them gives the rate)."""
    tiles = torch.from_numpy(open_tile_store(RunDir(run.run).tiles)["tiles"][:])
    rates, rows = {}, []
    for name in TEACHERS:
        teacher = random_teacher(name, "cuda")
        first = bare_forward_tiles_per_second(teacher, tiles, TEACHER_BATCH)
        copies = max(1, min(MAX_BARE_TILES // len(tiles), int(first * BUDGET_SECONDS / 2 / len(tiles))))  # timed twice
        with Utilisation() as busy:
            rates[name] = bare_forward_tiles_per_second(teacher, tiles.repeat(copies, 1, 1, 1), TEACHER_BATCH)
        rows.append(Row("G1 features", f"bare forward, {name}", rates[name], "tiles/s", note=f"{teacher.spec.precision} autocast, batch {TEACHER_BATCH}; {busy.mean}"))
        del teacher
        torch.cuda.empty_cache()
    return rates, rows


def features_row(run: Config, bare_all: float) -> Row:
    tiles = open_tile_store(RunDir(run.run).tiles)
    views = expand_views(["identity"], tiles.attrs.tiling.context_px, tiles.attrs.tiling.tile_px)
    summary = EmbedSummary(tiles.attrs.n_rows, TEACHERS)
    builders = {name: functools.partial(random_teacher, name) for name in TEACHERS}
    actors = ActorSettings(batch_size=TEACHER_BATCH, actors=1, gpus_per_actor=1.0, threads_per_actor=min(4, os.cpu_count() or 1))
    with ray_session(run.ray), Utilisation() as busy:
        embed_pool(tiles, builders, {name: RunDir(run.run).features(name) for name in TEACHERS}, views, actors, run.store, True, summary)
    rate = summary.rows_done / summary.units_seconds
    return Row(
        "G1 features", f"pipeline, {len(TEACHERS)} teachers in one pass ({summary.rows_done} tiles)", rate, "tiles/s",
        f"bare forward of all teachers ({bare_all:.1f} tiles/s)", rate / bare_all, ">= 0.9", f"read ahead + write behind on Ray; {busy.mean}",
    )


def student_rows(run: Config, label: str, arch: str, compiled: bool) -> list[Row]:
    """The step of one student on the run's targets, and the loader against it."""
    settings = DistillConfig(
        student=arch, student_kwargs={"img_size": 224}, batch_size=STUDENT_BATCH, val_slides=0, precision="bf16", compile=compiled,
        loader_workers=4,
    )
    data = open_distill_data([run.run.resolve()], settings)
    student = build_student(settings, data.tile_px)
    heads = NestedHeads(data.widths, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    standardizers = {t: fit_standardizer(target_sample(data, t, settings.standardize_sample, settings.seed), settings.standardize) for t in data.targets}
    model = Distiller(student, heads, standardizers, settings).to("cuda")
    if compiled:
        compile_student(model)
    optimizer = make_optimizer(model, settings)
    with closing(iter(training_loader(data, settings))) as batches:
        batch = next(batches)  # the step runs on one batch in memory: the loader is timed on its own

    def step() -> None:
        forward_backward(model, model, batch, settings)
        optimizer_step(model, optimizer, settings)

    clock = time.perf_counter()
    for _ in range(3):  # warm-up (and compiling)
        step()
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - clock
    clock = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = max(3, int(BUDGET_SECONDS / ((time.perf_counter() - clock) / 3)))
    with Utilisation() as busy:
        clock = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rate = steps * STUDENT_BATCH / (time.perf_counter() - clock)
    name = f"student step, {label}{', compiled' if compiled else ''}"
    rows = [Row("G2 student step", name, rate, "samples/s", note=f"bf16, fused AdamW, batch {STUDENT_BATCH}, {steps} steps; warm-up {warm_up:.0f} s; {busy.mean}")]
    if not compiled:
        loaded = loader_rate(data, max(STUDENT_BATCH, int(rate * BUDGET_SECONDS / 2)), settings)  # timed twice
        rows.append(Row("G3 loader", f"loader vs the step of {label}", loaded, "samples/s", f"student step ({rate:,.0f}/s)", loaded / rate, ">= 1.0", f"{settings.loader_workers} loader workers"))
    return rows

