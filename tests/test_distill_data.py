"""The distiller's data: checks on the stores, the slide split, and the block-shuffle loader, on real
Zarr stores of real H&E tiles (tests/distill_run.py)."""

from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import zarr

from distill.data import BlockShuffleLoader, DistillData, open_distill_data, target_sample, validation_batches
from distill.train import build_student
from distill_run import READ_FAILED_ROWS, SLIDE_ROWS, STUDENT, make_run, synthetic_teacher
from pipeline.config import ConfigError, DistillConfig
from pipeline.stores import StoreError, forget_units, write_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, he_pixels):
    run_dir = tmp_path_factory.mktemp("data-run")
    return run_dir, make_run(run_dir, he_pixels)


@pytest.fixture(scope="module")
def data(run) -> DistillData:
    return open_distill_data([run[0]], DistillConfig(**STUDENT))


def loader(data: DistillData, workers: int = 2, state: dict | None = None, batch_size: int = 16) -> BlockShuffleLoader:
    return BlockShuffleLoader(data, data.rows_of(data.split.train), batch_size, pool_chunks=3, workers=workers, seed=7, state=state)


def stream(batches, rows: int) -> np.ndarray:
    """The row ids of the first `rows` rows the batches carry."""
    collected, total = [], 0
    for batch in batches:
        collected.append(batch.rows)
        total += len(batch)
        if total >= rows:
            break
    return np.concatenate(collected)[:rows]


def test_split_holds_out_the_last_slides_and_skips_failed_ones(data):
    assert [s.record.name for s in data.split.train] == ["slide-0", "slide-1", "slide-2"]
    assert [s.record.name for s in data.split.val] == ["slide-3"]
    assert data.split.as_record()["val"] == [{"run": str(data.sources[0].run), "id": 3, "name": "slide-3", "rows": [300, 384]}]
    assert data.recipes == {"alpha": "cls", "beta": "cls"} and data.widths == {"alpha": 40, "beta": 24}
    [source] = data.sources
    lazy = source.lazy_targets()["alpha"]
    assert lazy.chunksize == (8, 1, 40) and lazy.shape == (384, 1, 40)
    assert source.lazy_tiles().chunksize == (8, 64, 64, 3)


def test_the_split_keeps_slides_of_equal_content_on_one_side(tmp_path, he_pixels):
    """A store made by older code or another tool may hold one slide twice: slide-3 is slide-0 again."""
    make_run(tmp_path, he_pixels)
    group = zarr.open_group(str(tmp_path / "tiles.zarr"), mode="r+")
    hashes = {"slide-0": "sha256:aa", "slide-1": "sha256:bb", "slide-2": "sha256:cc", "slide-3": "sha256:aa"}
    group.attrs["slides"] = [{**s, "hash": hashes.get(s["name"])} for s in group.attrs["slides"]]
    for val_slides in (1, 2):
        split = open_distill_data([tmp_path], DistillConfig(**STUDENT, val_slides=val_slides)).split
        train, val = {s.record.hash for s in split.train}, {s.record.hash for s in split.val}
        assert not train & val and len(split.train) + len(split.val) == 4
    assert [s.record.name for s in split.val] == ["slide-1", "slide-2"]
    assert "content hash" in split.as_record()["rule"]
    with pytest.raises(ConfigError, match="3 distinct slides with tiles; leave at least one for training"):
        open_distill_data([tmp_path], DistillConfig(**STUDENT, val_slides=3))


def test_an_epoch_visits_every_training_row_once_and_never_a_validation_or_blank_one(data):
    train = np.flatnonzero(data.rows_of(data.split.train))
    assert len(train) == sum(SLIDE_ROWS[:3]) - 3  # read-failed rows 5, 6 and 150 are left out
    assert not set(READ_FAILED_ROWS) & set(train.tolist()) and train.max() < 300
    first, second = np.split(stream(loader(data), 2 * len(train)), 2)
    assert np.array_equal(np.sort(first), train) and np.array_equal(np.sort(second), train)
    assert not np.array_equal(first, second)  # each epoch has its own order


def test_batches_mix_slides_and_carry_the_stored_pixels_and_targets(run, data):
    _, written = run
    batches = list(islice(loader(data), 10))
    assert np.mean([len(np.unique(b.slides)) for b in batches]) > 1.5
    for batch in batches:
        assert batch.tiles.shape == (16, 64, 64, 3) and batch.tiles.dtype == np.uint8
        assert np.array_equal(batch.tiles, written["tiles"][batch.rows])
        assert np.array_equal(batch.slides, written["slide"][batch.rows])
        for teacher, targets in batch.targets.items():
            assert np.array_equal(targets, written["targets"][teacher][batch.rows, 0])


def test_batches_do_not_depend_on_worker_threads(data):
    inline, threaded = islice(loader(data, workers=0), 40), islice(loader(data, workers=3), 40)
    for a, b in zip(inline, threaded, strict=True):
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.views, b.views) and np.array_equal(a.tiles, b.tiles)


def test_a_loader_built_from_a_saved_state_yields_the_same_next_batches(data):
    first = loader(data)
    batches = iter(first)
    for _ in range(23):  # past the first epoch (297 rows) and into the middle of a pool
        next(batches)
    state = first.state_dict()
    assert state == {"rows": 23 * 16, "world_size": 1}
    expected = [next(batches) for _ in range(25)]
    resumed = islice(loader(data, workers=1, state=state), 25)
    for a, b in zip(expected, resumed, strict=True):
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.tiles, b.tiles)
        assert all(np.array_equal(a.targets[t], b.targets[t]) for t in a.targets)


def rank_loader(data: DistillData, rank: int, state: dict | None = None) -> BlockShuffleLoader:
    return BlockShuffleLoader(data, data.rows_of(data.split.train), 8, pool_chunks=3, workers=1, seed=7, state=state, rank=rank, world=2)


def test_ddp_ranks_read_disjoint_pools_whose_union_is_the_epoch_and_resume_exactly(data):
    single = loader(data, workers=0)
    ranks = [rank_loader(data, rank) for rank in (0, 1)]
    own = [np.concatenate([single.epoch_pools(0)[i][1] for i in range(rank, len(single.epoch_pools(0)), 2)]) for rank in (0, 1)]
    assert [np.concatenate([c for _, c in r.epoch_pools(0)]).tolist() for r in ranks] == [o.tolist() for o in own]
    rows_of = [int(r.rows_in_chunk[o].sum()) for r, o in zip(ranks, own)]
    first_epoch = [stream(iter(r), n) for r, n in zip(ranks, rows_of)]
    assert not set(first_epoch[0].tolist()) & set(first_epoch[1].tolist())
    assert np.array_equal(np.sort(np.concatenate(first_epoch)), np.sort(stream(single, single.rows_per_epoch)))
    for rank in (0, 1):  # into the second epoch of the rank, mid pool
        batches = iter(rank_loader(data, rank))
        for _ in range(21):
            next(batches)
        state = {"rows": 21 * 8, "world_size": 2}
        expected = [next(batches) for _ in range(6)]
        for a, b in zip(expected, islice(rank_loader(data, rank, state), 6), strict=True):
            assert np.array_equal(a.rows, b.rows) and np.array_equal(a.tiles, b.tiles) and np.array_equal(a.views, b.views)
    with pytest.raises(ConfigError, match=r"saved by a run of 2 process\(es\); resume it with that many, not 1"):
        loader(data, state={"rows": 8, "world_size": 2})


def test_the_loader_reports_how_many_slides_its_batches_mix(data):
    few, many = loader(data, workers=0), BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=12, workers=0, seed=7)
    for each in (few, many):
        for batch in islice(each, 12):
            assert each.mix.least <= len(np.unique(batch.slides))
    assert few.mix.as_record()["batches"] == 12 and 1 <= few.mix.as_record()["min"] <= few.mix.as_record()["mean"] <= 3
    assert many.mix.as_record()["mean"] > few.mix.as_record()["mean"]  # larger pools, more slides per batch


def test_each_sample_shows_the_view_its_targets_were_computed_on(tmp_path, he_pixels):
    written = make_run(tmp_path, he_pixels, context_px=8, views=["dihedral", "crop:-8,8"])
    data = open_distill_data([tmp_path], DistillConfig(**STUDENT))
    assert len(data.views) == 9
    batches = list(islice(loader(data), 12))
    views = np.concatenate([b.views for b in batches])
    assert set(views.tolist()) == set(range(9))
    for batch in batches:
        for teacher, seed, width in (("alpha", 0, 40), ("beta", 1, 24)):
            assert np.array_equal(batch.targets[teacher], written["targets"][teacher][batch.rows, batch.views])
            # the target of the pixels the student is shown, recomputed from those very pixels
            recomputed = synthetic_teacher(batch.tiles, seed, width).astype(np.float16)
            assert np.array_equal(recomputed, batch.targets[teacher])
    validation = next(validation_batches(data, 16, None))
    assert (validation.views == 0).all() and validation.rows.min() >= 300


def test_validation_shows_every_held_out_row_once_in_every_view(tmp_path, he_pixels):
    written = make_run(tmp_path, he_pixels, views=["identity", "flip"])
    data = open_distill_data([tmp_path], DistillConfig(**STUDENT))
    batches = list(validation_batches(data, 16, None))
    rows, views = np.concatenate([b.rows for b in batches]), np.concatenate([b.views for b in batches])
    held_out = np.flatnonzero(data.rows_of(data.split.val))
    assert len(rows) == 2 * len(held_out)  # each row counted twice, once per view
    for view in (0, 1):
        assert np.array_equal(np.sort(rows[views == view]), held_out)
    for batch in batches:
        assert np.array_equal(batch.targets["alpha"], written["targets"]["alpha"][batch.rows, batch.views])
        assert np.array_equal(synthetic_teacher(batch.tiles, 0, 40).astype(np.float16), batch.targets["alpha"])
    capped = np.concatenate([b.rows for b in validation_batches(data, 16, 40)])
    assert 60 < len(capped) <= 80 and len(np.unique(capped)) == len(capped) // 2  # the cap counts rows, each shown twice


def test_validation_reads_held_out_rows_once_and_respects_the_cap(data):
    every = np.concatenate([b.rows for b in validation_batches(data, 16, None)])
    assert np.array_equal(every, np.flatnonzero(data.rows_of(data.split.val)))  # row 330 is blank
    capped = np.concatenate([b.rows for b in validation_batches(data, 16, 40)])
    assert 30 < len(capped) <= 40 and capped.max() > 370  # evenly spaced chunks reach the end of the slide


def test_standardizer_sample_is_seeded_and_from_training_rows(data):
    sample = target_sample(data, "beta", 50, seed=3)
    assert sample.shape == (50, 24) and sample.dtype == np.float32
    assert np.array_equal(sample, target_sample(data, "beta", 50, seed=3))


def copy_run(source, destination):
    shutil.copytree(source, destination)
    return destination


def swap_feature_store(run_dir, teacher, other_run):
    """Put the other run's store of `teacher` (and its markers) in place of this run's."""
    for suffix in (".zarr", ".zarr.progress"):
        shutil.rmtree(run_dir / "features" / f"{teacher}{suffix}")
        shutil.copytree(other_run / "features" / f"{teacher}{suffix}", run_dir / "features" / f"{teacher}{suffix}")


def test_refusals_name_the_input_and_the_fix(run, tmp_path, he_pixels):
    run_dir, _ = run
    with pytest.raises(StoreError, match=r"no feature store for teacher 'gamma'.*holds \['alpha', 'beta'\]"):
        open_distill_data([run_dir], DistillConfig(teachers=["alpha", "gamma"]))
    with pytest.raises(StoreError, match=r"has no recipe 'pooled'; it holds \['cls', 'mean'\]: fix distill.recipes.beta"):
        open_distill_data([run_dir], DistillConfig(recipes={"beta": "pooled"}))
    assert open_distill_data([run_dir], DistillConfig(recipes={"beta": "mean"})).widths == {"alpha": 40, "beta": 8}
    with pytest.raises(ConfigError, match=r"distill.teacher_weights names \['gamma'\], not among the distilled teachers"):
        open_distill_data([run_dir], DistillConfig(teacher_weights={"gamma": 2.0}))
    with pytest.raises(ConfigError, match="leave at least one for training"):
        open_distill_data([run_dir], DistillConfig(val_slides=4))

    other = tmp_path / "other"
    make_run(other, he_pixels)
    mixed = copy_run(run_dir, tmp_path / "mixed")
    swap_feature_store(mixed, "beta", other)
    with pytest.raises(StoreError, match="was computed from tile store .* not from this one .* rerun features"):
        open_distill_data([mixed], DistillConfig())

    unfinished = copy_run(run_dir, tmp_path / "unfinished")
    forget_units(unfinished / "features" / "alpha.zarr", {0})
    with pytest.raises(StoreError, match=r"alpha.zarr is unfinished \(1 of 12 units missing\); rerun `features`"):
        open_distill_data([unfinished], DistillConfig())

    with pytest.raises(ConfigError, match=r"nested dims \[16, 4096\] must be increasing and within 1..D=192"):
        build_student(DistillConfig(**STUDENT, nested_dims=[16, 4096]), 64)
    with pytest.raises(ConfigError, match=r"distill.dim_weights names dims \[32\]; the nested dims are \[16, 64, 192\]"):
        build_student(DistillConfig(**STUDENT, nested_dims=[16, 64, 192], dim_weights={32: 2.0}), 64)
    with pytest.raises(ConfigError, match="set distill.student_kwargs.img_size: 64"):
        build_student(DistillConfig(student="vit_tiny_patch16_224", student_kwargs={"depth": 1}), 64)


def test_non_finite_targets_are_refused_naming_teacher_and_rows(run, tmp_path):
    broken = copy_run(run[0], tmp_path / "broken")
    values = zarr.open_array(str(broken / "features" / "beta.zarr" / "cls"), mode="r")[:]
    values[[40, 41], 0, 3] = np.nan
    values[250, 0, 0] = np.inf
    write_rows(broken / "features" / "beta.zarr", 0, {"cls": values})
    data = open_distill_data([broken], DistillConfig())
    with pytest.raises(StoreError, match=r"teacher 'beta' \(recipe 'cls'\) has NaN/Inf targets in rows \[40, 41, 250\].*inspect-store --verify"):
        target_sample(data, "beta", 10_000, seed=0)
    with pytest.raises(StoreError, match=r"teacher 'beta' \(recipe 'cls'\) has NaN/Inf targets in rows \[(40, 41|250)\]"):
        for _ in loader(data):
            pass


def test_feature_stores_on_different_views_are_refused(tmp_path, he_pixels):
    identity, flipped = tmp_path / "identity", tmp_path / "flipped"
    make_run(identity, he_pixels)
    make_run(flipped, he_pixels, views=["flip"])
    swap_feature_store(identity, "beta", flipped)
    # the copied store belongs to the other tile store: point it at this one, as if computed here
    group = zarr.open_group(str(identity / "features" / "beta.zarr"), mode="r+")
    group.attrs["tile_store_id"] = zarr.open_group(str(identity / "tiles.zarr"), mode="r").attrs["store_id"]
    with pytest.raises(StoreError, match=r"teachers 'alpha' and 'beta' were computed on different views"):
        open_distill_data([identity], DistillConfig())
