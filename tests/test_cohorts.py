"""Several runs composed into one training set (distill/cohort.py): the global row index, the split
across runs by content, the refusals of runs that do not match, and distill and fidelity over a
list of runs, on real Zarr stores (tests/distill_run.py) and on runs tiled from real slide files."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli import app
from distill.data import BlockShuffleLoader, open_distill_data, target_sample, validation_batches
from distill.evaluate.fidelity import fidelity
from distill.evaluate.report import held_out_text
from distill.train import run_distill
from distill_run import SLIDE_ROWS, STUDENT, config_for, make_run, write_config, write_synthetic_features
from feature_run import settings as tile_settings
from pipeline.config import Config, ConfigError, DistillConfig
from pipeline.stores import StoreError, open_tile_store
from pipeline.tiles.stage import run_tiles
from pipeline.views import expand_views

ODD_ROWS = (100, 90, 110, 85)  # 385 rows: the last chunk of 8 rows is partial, so the next run starts at 392


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, he_pixels):
    """Run `a` (385 rows) and run `b` (384 rows, other pixels), each with the teachers alpha and beta."""
    folder = tmp_path_factory.mktemp("cohort")
    a = make_run(folder / "a", he_pixels, slide_rows=ODD_ROWS)
    b = make_run(folder / "b", np.ascontiguousarray(he_pixels[::-1, ::-1]))
    return (folder / "a", a), (folder / "b", b)


def open_both(two_runs, **settings):
    return open_distill_data([two_runs[0][0], two_runs[1][0]], DistillConfig(**STUDENT, **settings))


def test_runs_start_on_chunk_boundaries_and_batches_carry_each_run_s_own_rows(two_runs):
    (_, a), (_, b) = two_runs
    data = open_both(two_runs, val_slides=2)
    assert [s.offset for s in data.sources] == [0, 392] and len(data.slide_of_row) == 392 + 384
    assert (data.slide_of_row[385:392] == -1).all() and data.read_failed[385:392].all()  # padding, never kept
    assert np.array_equal(data.slide_of_row[392:], b["slide"] + 10)  # run a's ids end at 9 ("unreadable")
    assert data.chunk_source(48) == (data.sources[0], 384, 385) and data.chunk_source(49) == (data.sources[1], 0, 8)
    written = {0: a, 1: b}
    keep = data.rows_of(data.split.train)
    loader = BlockShuffleLoader(data, keep, 16, pool_chunks=3, workers=2, seed=1)
    seen = []
    for batch in islice(loader, loader.rows_per_epoch // 16):
        for run in (0, 1):
            offset = data.sources[run].offset
            mine = (batch.rows >= offset) & (batch.rows < offset + data.sources[run].n_rows)
            local = batch.rows[mine] - offset
            assert np.array_equal(batch.tiles[mine], written[run]["tiles"][local])
            assert np.array_equal(batch.targets["beta"][mine], written[run]["targets"]["beta"][local, 0])
            assert np.array_equal(batch.slides[mine], written[run]["slide"][local] + data.sources[run].slide_base)
        seen.append(batch.rows)
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) and np.isin(seen, np.flatnonzero(keep)).all()
    assert (seen < 385).any() and (seen >= 392).any()  # an epoch draws from both runs
    # the held-out groups come from each run in turn: its last slide, run b first
    assert [(s.run.name, s.record.name) for s in data.split.val] == [("a", "slide-3"), ("b", "slide-3")]
    held_out = np.concatenate([batch.rows for batch in validation_batches(data, 16, None)])
    assert np.array_equal(held_out, np.flatnonzero(data.rows_of(data.split.val)))
    assert target_sample(data, "alpha", 10_000, seed=0).shape == (int(keep.sum()), 40)  # every training row of both runs


def test_a_slide_in_both_runs_is_on_one_side(two_runs):
    """Run b's slide-1 is run a's slide-3 again (same content hash): one slide, held out or trained on whole."""
    folder = two_runs[0][0].parent / "common"
    runs = [shutil.copytree(run, folder / run.name) for run, _ in two_runs]
    for run, hashes in zip(runs, ({"slide-3": "sha256:common"}, {"slide-1": "sha256:common"})):
        group = zarr.open_group(str(run / "tiles.zarr"), mode="r+")
        group.attrs["slides"] = [{**s, "hash": hashes.get(s["name"], f"sha256:{run.name}-{s['name']}")} for s in group.attrs["slides"]]
    for val_slides, common_side in ((1, "train"), (2, "val")):
        data = open_distill_data(runs, DistillConfig(**STUDENT, val_slides=val_slides))
        sides = {"train": data.split.train, "val": data.split.val}
        assert not {s.record.hash for s in sides["train"]} & {s.record.hash for s in sides["val"]}
        assert sorted((s.run.name, s.record.name) for s in sides[common_side] if s.record.hash == "sha256:common") == [("a", "slide-3"), ("b", "slide-1")]
        other = data.rows_of(sides["val" if common_side == "train" else "train"])
        assert not other[392 + SLIDE_ROWS[0] : 392 + sum(SLIDE_ROWS[:2])].any()  # no row of b's copy on the other side
    assert len(data.split.val) == 3  # the common group (two slides) and run b's slide-3


def test_runs_that_do_not_match_are_refused_naming_both_and_the_fix(two_runs, tmp_path, he_pixels):
    a = two_runs[0][0]

    def refused(other: Path, error: type, pattern: str, **settings) -> None:
        with pytest.raises(error, match=pattern) as raised:
            open_distill_data([a, other], DistillConfig(**settings))
        assert str(a) in str(raised.value) and str(other) in str(raised.value)

    make_run(tmp_path / "small", he_pixels, tile_px=48)
    refused(tmp_path / "small", StoreError, r"tiled differently \(tiling.tile_px 64 vs 48; tiling.stored_px 64 vs 48\).*rerun `tiles`")
    make_run(tmp_path / "flipped", he_pixels, views=["flip"])
    refused(tmp_path / "flipped", StoreError, r"computed teacher 'alpha' on different views.*rerun `features`")
    make_run(tmp_path / "wider", he_pixels, teachers={"alpha": 40, "beta": 32})
    refused(tmp_path / "wider", StoreError, r"give teacher 'beta' different targets \(recipe 'cls' of width 24 vs 'cls' of width 32\): set distill.recipes.beta")
    make_run(tmp_path / "other-weights", he_pixels)
    group = zarr.open_group(str(tmp_path / "other-weights" / "features" / "alpha.zarr"), mode="r+")
    group.attrs["teacher"] = {**group.attrs["teacher"], "weights_sha256": "0" * 64}
    refused(tmp_path / "other-weights", StoreError, r"features of different teachers named 'alpha' \(they differ in \['weights_sha256'\]\)")
    make_run(tmp_path / "alpha-only", he_pixels, teachers={"alpha": 40})
    with pytest.raises(StoreError, match=r"no feature store for teacher 'beta' at .*alpha-only.*run `features` for 'beta'"):
        open_distill_data([a, tmp_path / "alpha-only"], DistillConfig())
    copied = shutil.copytree(a, tmp_path / "copy")
    refused(copied, StoreError, r"hold the same tile store .* list it once in distill.runs")
    with pytest.raises(ConfigError, match=r"lists \[.*'\] more than once: list each run once"):
        open_distill_data([a, a], DistillConfig())


@pytest.fixture(scope="module")
def tiled_runs(tmp_path_factory, slide_factory, he_pixels, local_ray):
    """Two runs tiled separately from real slide files: `a` from slides x and common, `b` from common and
    y; the synthetic teachers alpha and beta computed on each run's stored tiles."""
    folder = tmp_path_factory.mktemp("tiled")
    crops = {"x": (0, 0), "common": (1000, 700), "y": (2000, 1400)}
    slides = {name: slide_factory(f"{name}.tiff", he_pixels[r : r + 384, c : c + 512], mpp=0.5, levels=1) for name, (r, c) in crops.items()}
    runs = {}
    for run, names in (("a", ("x", "common")), ("b", ("common", "y"))):
        config = tile_settings(folder / run, slides[names[0]])
        config = {**config, "slides": [str(slides[name]) for name in names], "tiling": {"tile_px": 64}}
        run_tiles(Config.model_validate(config))
        store = open_tile_store(folder / run / "tiles.zarr")
        write_synthetic_features(folder / run, store["tiles"][:], store.attrs, expand_views(["identity"], 0, 64))
        runs[run] = folder / run
    return runs


def test_copies_of_a_slide_file_tiled_in_two_runs_share_a_hash_and_a_side(tiled_runs):
    """Run a holds x and common, run b common and y: one held out is y (run b's last); two are y and
    then run a's last group, common, with its copy in run b."""
    for val_slides, common_side in ((1, "train"), (2, "val")):
        split = open_distill_data([tiled_runs["a"], tiled_runs["b"]], DistillConfig(**STUDENT, val_slides=val_slides)).split
        sides = {"train": split.train, "val": split.val}
        copies = [s for s in sides[common_side] if s.record.name == "common"]
        assert sorted(s.run.name for s in copies) == ["a", "b"] and copies[0].record.hash == copies[1].record.hash is not None
        assert not {s.record.hash for s in split.train} & {s.record.hash for s in split.val}
        assert [s.record.name for s in split.val][-1] == "y"


def test_distill_over_two_runs_records_them_and_fidelity_is_measured_over_both(tiled_runs, tmp_path):
    out = tmp_path / "cohort-student"
    config = write_config(config_for(out, steps=6, batch_size=16, eval_every=3, checkpoint_every=6, precision="fp32"), tmp_path / "c.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["distill", "--config", str(config), "--runs", str(tiled_runs["a"]), "--runs", str(tiled_runs["b"]), "--json"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    student = out / "student"
    record = json.loads((student / "student.json").read_text())
    composition = record["composition"]
    assert [part["run"] for part in composition] == [str(tiled_runs["a"].resolve()), str(tiled_runs["b"].resolve())]
    for part, run in zip(composition, ("a", "b")):
        assert part["tile_store_id"] == open_tile_store(tiled_runs[run] / "tiles.zarr").attrs.store_id
        features = {t: zarr.open_group(str(tiled_runs[run] / "features" / f"{t}.zarr"), mode="r").attrs["store_id"] for t in ("alpha", "beta")}
        assert part["feature_store_ids"] == features
    # val_slides 1: y (run b's last slide) is held out; x and both copies of common are trained on
    assert [[s["name"] for s in part["slides"]["train"]] for part in composition] == [["x", "common"], ["common"]]
    assert [[s["name"] for s in part["slides"]["val"]] for part in composition] == [[], ["y"]]
    assert [part["rows"] for part in composition] == [{"train": 96, "val": 0}, {"train": 48, "val": 48}]
    assert summary["rows"] == {"train": 144, "val": 48} and summary["composition"] == composition
    assert json.loads((student / "config.json").read_text())["pathdistill"]["composition"] == composition

    measured = fidelity(None, student, None)  # the runs the student records
    assert [(s["run"], s["name"]) for s in measured["held_out_slides"]] == [(str(tiled_runs["b"].resolve()), "y")]
    assert measured["rows"] == 48 and held_out_text(measured["held_out_slides"]) == f"y of {tiled_runs['b'].resolve()}"
    for teacher, by_dim in measured["run"].items():  # the same student on the same held-out rows: the run's own final validation
        for dim, scores in by_dim.items():
            assert measured["recomputed"][teacher][dim]["cos"] == pytest.approx(scores["cos"], abs=1e-4)
    only_a = fidelity([tiled_runs["a"]], student, None)
    assert "are not the runs the student was distilled from" in only_a["skipped"] and "--runs" in only_a["skipped"]


def test_a_cohort_run_resumes_from_moved_runs_but_not_from_other_data(two_runs, tmp_path):
    moved = [shutil.copytree(run, tmp_path / "moved" / run.name) for run, _ in two_runs]
    short = dict(steps=2, batch_size=8, eval_every=2, checkpoint_every=2, loader_workers=0, precision="fp32")
    run_distill(config_for(tmp_path / "out", runs=[str(run) for run, _ in two_runs], **short))
    resumed = run_distill(config_for(tmp_path / "out", runs=[str(run) for run in moved], **{**short, "steps": 3}), resume=True)
    assert resumed["steps"] == 3 and resumed["settings_history"][-1]["changed"]["runs"][1] == [str(run) for run in moved]
    with pytest.raises(StoreError, match="was trained on other data"):
        run_distill(config_for(tmp_path / "out", runs=[str(moved[0])], **{**short, "steps": 4}), resume=True)
