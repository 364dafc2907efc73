"""A tiny finished tile store and what a plain local ``features`` run makes of it: the reference that
runs on clusters (a Slurm allocation, several Ray nodes) must reproduce bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml
import zarr

from pipeline.config import Config
from pipeline.features.stage import run_features
from pipeline.stores import StoreError, open_store
from pipeline.tiles.stage import run_tiles

TEACHER = "demo-vit"


def small_slide(slide_factory, he_pixels: np.ndarray, name: str) -> Path:
    """A one-level slide of real H&E pixels at 0.5 um/px: 6 x 8 tiles of 224 px."""
    return slide_factory(name, he_pixels[1000:2792, 700:2044], mpp=0.5, levels=1)


def settings(run: Path, slide: Path, **features) -> dict:
    """48 tiles in 6 units of 8 rows, one actor of one thread (unless ``features`` says otherwise)."""
    return {
        "run": str(run), "slides": [str(slide)],
        "tiling": {"tile_px": 224}, "tissue": {"min_fraction": 0.0},
        "store": {"chunk_rows": 8, "shard_rows": 8}, "ray": {"num_cpus": 2},
        "features": {"teachers": [TEACHER], "batch_size": 8, "actors": 1, "threads_per_actor": 1, **features},
    }


def make_reference(folder: Path, slide: Path, **features) -> tuple[dict, dict[str, np.ndarray]]:
    """Tile ``slide`` into ``folder/reference`` and compute its features on a local Ray."""
    config = settings(folder / "reference", slide, **features)
    run_tiles(Config.model_validate(config))
    run_features(Config.model_validate(config))
    return config, feature_arrays(Path(config["run"]))


def copy_tiles(config: dict, run: Path) -> dict:
    """The same tile store (same store id, markers included) in a new run directory, features not yet computed."""
    source = Path(config["run"])
    for name in ("tiles.zarr", "tiles.zarr.progress"):
        shutil.copytree(source / name, run / name)
    return {**config, "run": str(run)}


def finished_units(store: Path) -> int:
    """How many units of ``store`` are finished so far (0 before the store exists): for waiting on a running stage."""
    try:
        return len(open_store(store).markers().done())
    except StoreError:
        return 0


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def feature_arrays(run: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(run / "features" / f"{TEACHER}.zarr"), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def assert_same_features(run: Path, reference: dict[str, np.ndarray]) -> None:
    computed = feature_arrays(run)
    assert sorted(computed) == sorted(reference)
    for recipe, values in reference.items():
        same = computed[recipe].shape == values.shape and computed[recipe].tobytes() == values.tobytes()
        assert same, f"{recipe} differs from the local run"
