"""Figure 7: peak memory (RSS of the command and every process it starts, Ray's included) of each stage
as the number of tiles grows about 4x: the same slide tiled at 1.0 and at 0.5 um/px (4x the grid; the
tissue filter and the edges move the count a little). Stages stream, so the peak should stay flat."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402

from bench.common import Row  # noqa: E402

FIGURE = "7 memory"
CLI = Path(__file__).resolve().parent.parent / "cli.py"


def peak_rss_mib(command: list[str]) -> float:
    """Run ``command``, sampling the summed RSS of its process tree every 50 ms; the peak, in MiB."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read()[-2000:]}")
    return peak / 2**20


def tiles_rows(run_dir: Path) -> int:
    """Rows of the run's newest tile store (report.json keeps every earlier run too)."""
    return [s for s in json.loads((run_dir / "report.json").read_text())["stages"] if s["stage"] == "tiles"][-1]["rows"]


def measure(slide: Path, work: Path, stages: list[str], plot_dir: Path) -> list[Row]:
    peaks: dict[str, dict[int, float]] = {stage: {} for stage in stages}
    for mpp in (1.0, 0.5):  # at 1.0 um/px the stand-in teachers run off their published 0.5 (features.off_scale)
        config = work / f"memory-{mpp}.json"
        config.write_text(json.dumps({
            "run": str(work / f"memory-{mpp}"), "slides": [str(slide)], "tiling": {"target_mpp": mpp}, "ray": {"num_cpus": 2},
            "features": {"actors": 1, "off_scale": ["demo-vit", "demo-convnet"]}, "distill": {"steps": 20, "eval_every": 10, "checkpoint_every": 20, "val_slides": 0},
        }))
        for stage in stages:
            shutil.rmtree(work / f"memory-{mpp}" / "student", ignore_errors=True)  # distill starts afresh
            flags = ["--overwrite"] if stage in ("tiles", "features") else []
            peaks[stage][mpp] = peak_rss_mib([sys.executable, str(CLI), stage, "--config", str(config), *flags])
    rows_of = {mpp: tiles_rows(work / f"memory-{mpp}") for mpp in (1.0, 0.5)}
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for stage, by_mpp in peaks.items():
        axes.plot([rows_of[1.0], rows_of[0.5]], [by_mpp[1.0], by_mpp[0.5]], marker="o", label=stage)
    axes.set(xlabel="tiles", ylabel="peak RSS, MiB (all processes)", title="Memory as tiles grow 4x", ylim=(0, None))
    axes.legend()
    plot_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot_dir / "memory.png", dpi=120, bbox_inches="tight")
    return [
        Row(FIGURE, f"{stage}: peak RSS at {rows_of[0.5]} tiles", by_mpp[0.5], "MiB", f"{rows_of[1.0]} tiles ({by_mpp[1.0]:.0f} MiB)", by_mpp[0.5] / by_mpp[1.0], "<= 1.5", "flat means streaming")
        for stage, by_mpp in peaks.items()
    ]
