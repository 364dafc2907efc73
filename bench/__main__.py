"""``python -m bench [--quick | --gpu]``: run every figure, print the table, write bench/results/latest.{json,md}.

``--quick`` runs each figure on a handful of tiles: the smoke test uses it, not the numbers.
``--gpu`` runs the GPU figures instead (bench/gpu.py), on a CUDA machine; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import features, gpu, inference, loader, memory, scale, stores, tiling
from bench.common import RESULTS, write_results
from pipeline.config import Config, FeaturesConfig, RayConfig, load_config
from pipeline.demo.slides import make_demo_slides
from pipeline.ray_runtime import ray_session
from pipeline.tiles.stage import run_tiles

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs: checks the bench runs, numbers mean little")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.json, latest.md and plots go")
    parser.add_argument("--gpu", action="store_true", help="the GPU figures (features, student step, loader) on one CUDA device, in under 8 minutes")
    args = parser.parse_args()
    if args.gpu:
        gpu.measure(DEMO, args.out)
        return
    work = args.out / "work"
    slides = {path.name: path for path in make_demo_slides(DEMO)}
    tiled_slides = [slides["cmu_small_region.svs"]] if args.quick else [slides["synthetic_40x_large.tiff"], slides["cmu_small_region.svs"]]
    rows = tiling.measure(tiled_slides, tiled_slides if args.quick else list(slides.values()), work, args.quick)
    tiled_run = Config(
        run=work / f"tiles-{tiled_slides[0].stem}-2", slides=[tiled_slides[0]], ray=RayConfig(num_cpus=2),
        # one slide: no held-out one; the summary path only (its feature stores hold no grid), as the loader figures measure it
        features=FeaturesConfig(actors=1), distill=load_config().distill.model_copy(update={"val_slides": 0, "spatial_weight": 0.0, "mask_ratio": 0.0}),
    )
    run_tiles(tiled_run)  # the tile store the later figures read
    bare = features.bare_rates(tiled_run)
    with ray_session(tiled_run.ray):  # one Ray for the four feature runs (its start-up is in none of their timings), gone before the loader's
        rows += features.measure(tiled_run, bare, args.quick)
    inference_rows, real_teachers = inference.measure(args.quick)
    rows += loader.measure(tiled_run, work, args.quick, bare, real_teachers)
    rows += scale.measure(tiled_run, work, args.quick)
    rows += stores.measure(tiled_run.run, slides["cmu_small_region.svs"], work, args.quick)
    rows += inference_rows
    stages = ["tiles"] if args.quick else ["tiles", "features", "distill"]
    rows += memory.measure(slides["cmu_small_region.svs" if args.quick else "synthetic_40x_large.tiff"], work, stages, args.out / "plots")
    write_results(rows, args.out)


if __name__ == "__main__":
    main()
