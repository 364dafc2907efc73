"""Damage on disk, end to end (issue 12 items 2, 7 and 8): a finished store that lost a stored object
(a shard or chunk file) or holds a corrupt one is reported by `inspect-store --verify` and refused by
every reader, in one line naming the store, array and rows; a slide that vanishes between planning
and reading is a failed slide; a full or read-only disk is one line naming the file.

Real stores on disk, real Ray, the real CLI, and real small file systems (tmpfs, mounted as root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from distill.data import BlockShuffleLoader, open_distill_data
from distill_run import STUDENT, config_for, make_run, write_config as write_distill_config
from feature_run import TEACHER, copy_tiles, settings, small_slide, write_config
from pipeline.config import Config, DistillConfig
from pipeline.embedding import ActorSettings, EmbedWorker, prepare_feature_store
from pipeline.stores import FLAG_READ_FAILED, StoreDamaged, StoreError, UnitReader, open_feature_store, open_tile_store
from pipeline.teacher_input import plan_teacher_input
from pipeline.teachers import build_teacher, get_teacher
from pipeline.tiles.stage import plan_tiles, run_tiles, write_tiles
from test_cli_errors import assert_one_error_line, run_cli

IDENTITY = [{"name": "identity"}]
pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, slide_factory, he_pixels) -> dict:
    """A real tile store of 48 tiles in 6 units of 8 rows (one shard of one chunk each)."""
    folder = tmp_path_factory.mktemp("integrity")
    config = settings(folder / "tiled", small_slide(slide_factory, he_pixels, "integrity.tiff"))
    run_tiles(Config.model_validate(config))
    return config


@pytest.fixture(scope="module")
def made(tmp_path_factory, he_pixels) -> Path:
    """A distiller's run (tests/distill_run.py): 384 rows, units of 32 rows, chunks of 8; copied before damaging."""
    run = tmp_path_factory.mktemp("made")
    make_run(run, he_pixels)
    return run


@pytest.fixture
def small_disk():
    """``mount(path, size)``: a tmpfs of ``size`` at ``path``, unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def make_unwritable(directory: Path, condition: str) -> None:
    """Fill the file system mounted at ``directory`` to the last byte, or remount it read-only."""
    if condition == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
        return
    with open(directory / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while handle.write(b"\0" * 65536):
            pass


CAUSE = {"full": "No space left on device", "read-only": "Read-only file system"}


def assert_reported_mid_run(result: subprocess.CompletedProcess, *names: str) -> None:
    """test_cli_errors.assert_one_error_line for a stage that fails mid-run: the last frame of its
    progress bar, and Ray's own log lines, may come before the one error line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for name in names:
        assert name in line, (name, line)


def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def flip_byte(path: Path, offset: int) -> None:
    damaged = bytearray(path.read_bytes())
    damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))


def tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_epoch(data) -> None:
    loader = BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=3, workers=2, seed=0)
    for _ in islice(loader, loader.rows_per_epoch // 16 + 1):
        pass


# Item 2: a deleted shard file is missing, not zeros.


def test_verify_names_every_stored_object_that_is_missing(made, tmp_path):
    run = copy_run(made, tmp_path / "run")
    shard = run / "tiles.zarr" / "tiles" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()  # its directory c/1 stays
    (run / "tiles.zarr" / "slide" / "c" / "3").unlink()
    (run / "features" / "alpha.zarr" / "cls" / "c" / "2" / "0" / "0").unlink()

    result = run_cli("inspect-store", run / "tiles.zarr", "--verify", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)["verify"]
    assert not report["ok"]
    assert [(m["array"], m["rows"], m["finished"]) for m in report["missing_chunks"]] == [("slide", [96, 128], True), ("tiles", [32, 64], True)]
    assert report["missing_chunks"][1]["file"] == str(shard)
    human = run_cli("inspect-store", run / "tiles.zarr", "--verify")
    assert human.returncode == 1 and "missing stored objects 2 (2 in units marked finished)" in human.stdout
    assert "'tiles'" in human.stdout and "[32, 64]" in human.stdout

    result = run_cli("inspect-store", run / "features" / "alpha.zarr", "--verify", "--json")
    assert result.returncode == 1, result.stderr
    assert [(m["array"], m["rows"]) for m in json.loads(result.stdout)["verify"]["missing_chunks"]] == [("cls", [64, 96])]


def test_features_refuses_a_tile_store_that_lost_a_shard_and_writes_nothing(tiled, tmp_path):
    config = copy_tiles(tiled, tmp_path / "run")
    (tmp_path / "run" / "tiles.zarr" / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()
    result = run_cli("features", "--config", write_config(config, tmp_path / "run.yaml"))
    assert_one_error_line(result, str(tmp_path / "run" / "tiles.zarr"), "'tiles'", "rows [8, 16)", f"`forget-units {tmp_path / 'run' / 'tiles.zarr'} 1`", "rerun `tiles`", "--overwrite")
    assert not (tmp_path / "run" / "features").exists()


def test_a_shard_lost_while_features_run_is_refused_by_the_unit_that_reads_it(tiled, tmp_path):
    config = Config.model_validate(copy_tiles(tiled, tmp_path / "run"))
    tiles = open_tile_store(config.run / "tiles.zarr")
    threads = torch.get_num_threads()
    worker = EmbedWorker(str(tiles.path), {TEACHER: functools.partial(build_teacher, TEACHER)}, ActorSettings(batch_size=8, threads_per_actor=1), IDENTITY)
    torch.set_num_threads(threads)
    out = config.run / "features" / f"{TEACHER}.zarr"
    store_id, _ = prepare_feature_store(out, tiles, worker.provenance()[TEACHER], worker.shapes()[TEACHER], IDENTITY, config.store, overwrite=False)
    outputs = {TEACHER: (str(out), store_id)}
    worker.run_unit(0, 0, 8, outputs)
    (config.run / "tiles.zarr" / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"tiles.zarr is damaged: array 'tiles' rows \[8, 16\) .*missing.*`forget-units .*tiles.zarr 1`"):
        worker.run_unit(1, 8, 16, outputs)
    assert open_feature_store(out).missing_units() == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_the_distiller_refuses_a_damaged_feature_store(made, tmp_path, damage):
    run = copy_run(made, tmp_path / "run")
    shard = run / "features" / "alpha.zarr" / "cls" / "c" / "2" / "0" / "0"  # rows 64-96, training rows
    if damage == "deleted":
        shard.unlink()
        expected = r"alpha.zarr is damaged: array 'cls' rows \[64, 96\) .*missing.*`forget-units .*alpha.zarr 2`.*rerun `features`"
    else:
        flip_byte(shard, 20)  # inside the shard's first chunk, rows 64-72
        expected = r"alpha.zarr: array 'cls' rows \[64, 72\) cannot be read .*Digest mismatch.*inspect-store --verify"  # targets are read by tensorstore
    data = open_distill_data([run], DistillConfig(**STUDENT))
    with pytest.raises(StoreError, match=expected):
        one_epoch(data)


def test_distill_refuses_a_damaged_store_in_one_line(made, tmp_path):
    run = copy_run(made, tmp_path / "run")
    (run / "features" / "alpha.zarr" / "cls" / "c" / "2" / "0" / "0").unlink()
    result = run_cli("distill", "--config", write_distill_config(config_for(run, steps=2), tmp_path / "distill.yaml"))
    assert_one_error_line(result, str(run / "features" / "alpha.zarr"), "'cls'", "rows [64, 96)", f"`forget-units {run / 'features' / 'alpha.zarr'} 2`")
    assert not (run / "student" / "checkpoints").exists()

    markers = open_tile_store(run / "tiles.zarr").markers()
    markers.fold()
    markers.index_path.write_text(markers.index_path.read_text()[:40])  # a torn copy of the unit index
    with pytest.raises(StoreError, match=r"tiles.zarr.progress/index.json is damaged .* which units are finished is unknown"):
        open_distill_data([run], DistillConfig(**STUDENT))


# Item 7: a slide that vanishes after planning is a failed slide.


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_slide_that_vanishes_after_planning_is_a_failed_slide(tmp_path, slide_factory, he_pixels, damage):
    kept = small_slide(slide_factory, he_pixels, f"kept-{damage}.tiff")
    # upside down, so that its content differs from the kept slide's (equal content would make it a duplicate)
    gone = small_slide(slide_factory, np.ascontiguousarray(he_pixels[::-1]), f"gone-{damage}.tiff")
    config = Config.model_validate({**settings(tmp_path / "run", kept), "slides": [str(kept), str(gone)]})
    planned = plan_tiles(config)
    assert [p.record.status for p in planned.plans] == ["ok", "ok"]
    if damage == "deleted":
        gone.unlink()
    else:
        gone.write_bytes(b"no longer a slide\n" * 1000)
    summary = write_tiles(config, planned)

    reason = "vanished or unreadable after planning"
    [failed] = summary.failed_slides
    assert failed.name == gone.stem and reason in failed.error
    assert summary.as_record()["failures"] == [{"name": gone.stem, "path": str(gone.resolve()), "error": failed.error}]
    attrs = open_tile_store(config.run / "tiles.zarr").attrs
    assert [(s.status, s.error) for s in attrs.slides] == [("ok", None), ("failed", failed.error)]
    assert attrs.slides == [planned.plans[0].record, dataclasses.replace(planned.plans[1].record, status="failed", error=failed.error)]  # the rest as planned
    flags = zarr.open_group(str(config.run / "tiles.zarr"), mode="r")["flags"][:]
    assert (flags[48:] & FLAG_READ_FAILED).all() and not (flags[:48] & FLAG_READ_FAILED).any()
    # folded into the store's unit index, where the next run finds it
    assert open_tile_store(config.run / "tiles.zarr").markers().read().notes[6]["failed_slides"] == [{"slide": 1, "error": failed.error}]


# Item 8: one line instead of a traceback.


def test_inspect_store_reports_a_corrupt_feature_chunk(made, tmp_path):
    run = copy_run(made, tmp_path / "run")
    store = run / "features" / "alpha.zarr"
    flip_byte(store / "cls" / "c" / "0" / "0" / "0", 20)

    plain = run_cli("inspect-store", store)
    assert plain.returncode == 0 and "Traceback" not in plain.stderr, plain.stderr
    assert "unreadable" in plain.stdout and "--verify" in plain.stdout
    statistics = json.loads(run_cli("inspect-store", store, "--json").stdout)["statistics"]
    assert "checksum" in statistics["cls"]["unreadable"] and "inspect-store --verify" in statistics["cls"]["unreadable"]
    assert statistics["mean"]["mean_norm"] is not None
    verified = run_cli("inspect-store", store, "--json", "--verify")
    assert verified.returncode == 1
    described = json.loads(verified.stdout)
    assert [(c["array"], c["rows"]) for c in described["verify"]["corrupt_chunks"]] == [("cls", [0, 8])]
    assert "unreadable" in described["statistics"]["cls"]


def test_features_reports_a_corrupt_tile_chunk_in_one_line(tiled, tmp_path):
    config = copy_tiles(tiled, tmp_path / "run")
    flip_byte(tmp_path / "run" / "tiles.zarr" / "tiles" / "c" / "2" / "0" / "0" / "0", 100)
    result = run_cli("features", "--config", write_config(config, tmp_path / "run.yaml"))
    assert_reported_mid_run(result, str(tmp_path / "run" / "tiles.zarr"), "'tiles'", "rows [16, 24)", "checksum", "inspect-store --verify", "`forget-units", "tiles.zarr 2`")
    assert 2 not in open_feature_store(tmp_path / "run" / "features" / f"{TEACHER}.zarr").markers().done()


def test_a_flipped_byte_inside_a_tiles_jpeg_is_refused_as_damage(made, tmp_path):
    run = copy_run(made, tmp_path / "run")
    tiles = open_tile_store(run / "tiles.zarr")
    assert tiles.attrs.tiling.store["tile_codec"] == "jpeg"
    flip_byte(run / "tiles.zarr" / "tiles" / "c" / "1" / "0" / "0" / "0", 3000)  # inside a JPEG of rows 32-40
    reader = UnitReader(tiles, "tiles", "tiles")
    assert reader.read(40, 64).shape == (24, 64, 64, 3)  # the shard's other chunks still read
    with pytest.raises(StoreDamaged, match=r"tiles.zarr: array 'tiles' rows \[32, 40\) cannot be read .*checksum.*inspect-store --verify"):
        reader.read(32, 40)


@pytest.mark.parametrize("condition", ["full", "read-only"])
def test_features_on_a_full_or_read_only_disk(tiled, tmp_path, small_disk, condition):
    config = copy_tiles(tiled, tmp_path / "run")
    features = small_disk(tmp_path / "run" / "features", "1m")
    store = features / f"{TEACHER}.zarr"
    tiles = open_tile_store(tmp_path / "run" / "tiles.zarr")
    given = plan_teacher_input(get_teacher(TEACHER), tiles.attrs.tiling, IDENTITY, off_scale=False).as_record()  # as the stage records it
    teacher = build_teacher(TEACHER, input_record=given)
    prepare_feature_store(store, tiles, teacher.provenance(), teacher.shapes, IDENTITY, Config.model_validate(config).store, overwrite=False)
    before = tree_digest(store)
    make_unwritable(features, condition)
    result = run_cli("features", "--config", write_config(config, tmp_path / "run.yaml"))
    assert_reported_mid_run(result, str(store), CAUSE[condition], "--out")
    assert tree_digest(store) == before and not (features / f"{TEACHER}.zarr.progress").exists()


@pytest.mark.parametrize("condition", ["full", "read-only"])
def test_distill_checkpoint_on_a_full_or_read_only_disk(made, tmp_path, small_disk, condition):
    run = copy_run(made, tmp_path / "run")
    checkpoints = small_disk(run / "student" / "checkpoints", "256k")
    make_unwritable(checkpoints, condition)
    config = config_for(run, steps=2, checkpoint_every=1, batch_size=16, warmup_steps=0, standardize_sample=256, loader_workers=0)
    result = run_cli("distill", "--config", write_distill_config(config, tmp_path / "distill.yaml"))
    assert_reported_mid_run(result, str(checkpoints / "step-00000001.pt"), CAUSE[condition], "--out")
    assert not list(checkpoints.glob("*.pt")) and not list(checkpoints.glob(".*partial"))
