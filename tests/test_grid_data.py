"""The distiller's grids: read beside the targets, with the same rows and views, only when a spatial term
asks for them; stores without grids (schema /1 among them) refused then, with the fix, and still trained on
summary-only. Real Zarr stores of real H&E tiles (tests/distill_run.py)."""

from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import zarr

from distill.data import BlockShuffleLoader, open_distill_data, target_sample, validation_batches
from distill_run import STUDENT, TEACHERS, make_run, synthetic_grid, write_synthetic_features
from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import FEATURES_SCHEMA, FEATURES_SCHEMA_V1, StoreError, open_feature_store

SPATIAL = DistillConfig(**STUDENT, spatial_weight=1.0)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, he_pixels):
    run_dir = tmp_path_factory.mktemp("grid-run") / "run"
    return run_dir, make_run(run_dir, he_pixels, views=["identity", "rot90", "flip"], grid=2)


def stored_grid(run_dir, teacher: str) -> np.ndarray:
    return zarr.open_array(str(run_dir / "features" / f"{teacher}.zarr" / "grid"), mode="r")[:]


def test_batches_carry_each_teachers_grid_of_the_view_the_student_is_shown(grid_run):
    run_dir, written = grid_run
    data = open_distill_data([run_dir], SPATIAL)
    assert data.grid == 2 and data.grid_widths == TEACHERS
    assert open_feature_store(run_dir / "features" / "alpha.zarr").attrs.SCHEMA == FEATURES_SCHEMA
    grids = {teacher: stored_grid(run_dir, teacher) for teacher in TEACHERS}
    assert grids["alpha"].shape == (384, 3, 4, 40) and grids["alpha"].dtype == np.float16
    batches = list(islice(BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=3, workers=2, seed=7), 12))
    assert set(np.concatenate([b.views for b in batches]).tolist()) == {0, 1, 2}
    for batch in batches:
        for seed, (teacher, width) in enumerate(TEACHERS.items()):
            assert batch.grids[teacher].shape == (16, 4, width) and batch.grids[teacher].dtype == np.float16
            assert batch.grids[teacher].tobytes() == grids[teacher][batch.rows, batch.views].tobytes()  # bit for bit, the targets' view
            assert np.array_equal(batch.targets[teacher], written["targets"][teacher][batch.rows, batch.views])
            # the grid of the very pixels the student is shown
            assert np.array_equal(synthetic_grid(batch.tiles, seed, 2, width).astype(np.float16), batch.grids[teacher])
    validation = next(validation_batches(data, 16, None))
    assert (validation.views == 0).all()
    assert validation.grids["beta"].tobytes() == grids["beta"][validation.rows, 0].tobytes()


def test_grids_are_read_only_for_a_spatial_term(grid_run):
    run_dir, _ = grid_run
    data = open_distill_data([run_dir], DistillConfig(**STUDENT))
    assert data.grid == 0 and data.grid_widths == {}
    assert next(iter(BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=3, workers=0, seed=7))).grids == {}
    masked = open_distill_data([run_dir], DistillConfig(**STUDENT, mask_ratio=0.5))
    assert masked.grid == 2 and set(masked.grid_widths) == set(TEACHERS)


def test_the_grid_sample_is_the_cells_of_training_rows(grid_run):
    run_dir, _ = grid_run
    data = open_distill_data([run_dir], SPATIAL)
    cells = target_sample(data, "beta", 50, seed=3, grid=True)
    assert cells.shape == (50 * 3 * 4, 24) and cells.dtype == np.float32
    train = np.flatnonzero(data.rows_of(data.split.train))
    stored = stored_grid(run_dir, "beta")[train].astype(np.float32).reshape(-1, 24)
    assert {row.tobytes() for row in cells} <= {row.tobytes() for row in stored}


def test_stores_without_grids_are_refused_for_a_spatial_term_naming_the_fix(tmp_path, he_pixels):
    run_dir = tmp_path / "plain"
    make_run(run_dir, he_pixels)
    for settings in (SPATIAL, DistillConfig(**STUDENT, mask_ratio=0.25)):
        with pytest.raises(ConfigError, match=r"alpha.zarr \(schema pathdistill.features/2\) holds no 'grid' array.*set features.grid: k .* rerun `features --overwrite` for 'alpha'"):
            open_distill_data([run_dir], settings)
    # A store of schema /1 (written before grids): summary-only distillation still reads it; a spatial term names the fix.
    for teacher in TEACHERS:
        group = zarr.open_group(str(run_dir / "features" / f"{teacher}.zarr"), mode="r+")
        attrs = dict(group.attrs)
        del attrs["grid"]
        group.attrs.put({**attrs, "schema": FEATURES_SCHEMA_V1})
    data = open_distill_data([run_dir], DistillConfig(**STUDENT))
    assert {attrs.SCHEMA for attrs in data.sources[0].feature_attrs.values()} == {FEATURES_SCHEMA_V1} and data.grid == 0
    assert len(next(iter(BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=3, workers=0, seed=7)))) == 16
    with pytest.raises(ConfigError, match=r"\(schema pathdistill.features/1\) holds no 'grid' array.*features.grid: k"):
        open_distill_data([run_dir], SPATIAL)


def test_grids_of_different_k_are_refused_across_teachers_and_runs(tmp_path, he_pixels, grid_run):
    run_dir = tmp_path / "mixed"
    written = make_run(run_dir, he_pixels, views=["identity", "rot90", "flip"], grid=2)
    shutil.rmtree(run_dir / "features" / "beta.zarr.progress")
    write_synthetic_features(run_dir, written["tiles"], written["tile_attrs"], written["views"], {"beta": 24}, grid=4)
    with pytest.raises(StoreError, match=r"teachers 'alpha' and 'beta' .* grids of different sizes \(k = 2 vs 4\).*features.grid for both"):
        open_distill_data([run_dir], SPATIAL)
    assert open_distill_data([run_dir], DistillConfig(**STUDENT)).grid == 0  # summary-only: the grids do not matter

    four = tmp_path / "four"
    make_run(four, he_pixels, views=["identity", "rot90", "flip"], grid=4)
    with pytest.raises(StoreError, match=r"grids of teacher 'alpha' of different sizes \(k = 2 vs 4\): rerun `features --overwrite` for .*four with features.grid: 2"):
        open_distill_data([grid_run[0], four], SPATIAL)
    assert open_distill_data([grid_run[0], four], DistillConfig(**STUDENT)).grid == 0

