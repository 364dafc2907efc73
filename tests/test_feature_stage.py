"""The feature stage on a real tile store with the demo stand-in teachers, a real local Ray and Zarr on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from feature_run import TEACHER as ONE_TEACHER, assert_same_features, copy_tiles, make_reference, small_slide
from safetensors.torch import save_file

from pipeline.config import Config
from pipeline.features.stage import run_features
from feature_run import finished_units
from pipeline.stores import StoreError, forget_units, open_feature_store
from pipeline.teachers import UnknownTeacherError, build_teacher
from pipeline.tiles.stage import run_tiles
from pipeline.views import apply_view

REPO = Path(__file__).resolve().parent.parent
TEACHERS = ["demo-vit", "demo-convnet"]
pytestmark = pytest.mark.usefixtures("local_ray")


def settings(run: Path, slide: Path, context_px: int = 0, **features) -> dict:
    return {
        "run": str(run), "slides": [str(slide)],
        "tiling": {"tile_px": 224, "context_px": context_px}, "tissue": {"min_fraction": 0.0},
        "store": {"chunk_rows": 8, "shard_rows": 16}, "ray": {"num_cpus": 2},
        "features": {"teachers": TEACHERS, "batch_size": 8, "actors": 1, **features},
    }


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory, slide_factory, he_pixels) -> dict:
    """A tile store of 48 real H&E tiles (3 units) to compute features for."""
    slide = slide_factory("features.tiff", he_pixels[1000:2792, 700:2044], mpp=0.5, levels=1)  # 6 x 8 tiles
    run = tmp_path_factory.mktemp("features") / "run"
    config = settings(run, slide)
    run_tiles(Config.model_validate(config))
    return config


def stored(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def test_every_teacher_sees_each_tile_as_its_own_embed_would(tiled_run):
    config = Config.model_validate(tiled_run)
    summary = run_features(config)
    assert summary.rows_done == 48 and summary.units_run == 3 * len(TEACHERS)
    tiles = zarr.open_group(str(config.run / "tiles.zarr"), mode="r")
    for name in TEACHERS:
        store = zarr.open_group(str(config.run / "features" / f"{name}.zarr"), mode="r")
        teacher = build_teacher(name)
        assert store.attrs["tile_store_id"] == tiles.attrs["store_id"] and store.attrs["n_rows"] == 48
        assert store.attrs["teacher"]["weights_sha256"] == teacher.weights_sha256 and store.attrs["teacher"]["stand_in"]
        assert store.attrs["views"] == [{"name": "identity"}]
        expected = teacher.embed(torch.from_numpy(tiles["tiles"][16:24]))
        for recipe, width in teacher.spec.widths.items():
            values = store[recipe][:]
            assert values.shape == (48, 1, width) and values.dtype == np.float16
            np.testing.assert_allclose(values[16:24, 0], expected[recipe].numpy(), rtol=2e-2, atol=2e-2)
    record = json.loads((config.run / "report.json").read_text())["stages"][-1]
    assert record["stage"] == "features" and set(record["teacher_tiles_per_second"]) == set(TEACHERS)
    assert {"read", "transform", "write", "forward:demo-vit"} <= set(record["seconds"])

    before = {name: stored(config.run / "features" / f"{name}.zarr") for name in TEACHERS}
    again = run_features(config)
    assert again.units_run == 0 and sorted(again.skipped) == sorted(TEACHERS)  # finished stores are left alone
    for name in TEACHERS:
        after = stored(config.run / "features" / f"{name}.zarr")
        assert all(np.array_equal(after[k], before[name][k]) for k in after)


def test_views_are_the_pixels_the_teacher_saw(tmp_path, slide_factory, he_pixels):
    slide = slide_factory("views.tiff", he_pixels[1000:1488, 800:1288], mpp=0.5, levels=1)
    config = Config.model_validate(settings(tmp_path / "run", slide, context_px=16, teachers=["demo-vit"], views=["identity", "rot90", "flip", "crop:-16,8"]))
    run_tiles(config)
    run_features(config)
    store = zarr.open_group(str(tmp_path / "run" / "features" / "demo-vit.zarr"), mode="r")
    tiles = zarr.open_group(str(tmp_path / "run" / "tiles.zarr"), mode="r")["tiles"][:4]
    assert tiles.shape[1] == 256 and store["cls"].shape[1] == 4
    teacher = build_teacher("demo-vit")
    for index, view in enumerate(store.attrs["views"]):
        expected = teacher.embed(torch.from_numpy(np.ascontiguousarray(apply_view(tiles, view, 224))))["cls"].numpy()
        np.testing.assert_allclose(store["cls"][:4, index], expected, rtol=2e-2, atol=2e-2)
    assert not np.allclose(store["cls"][:4, 0], store["cls"][:4, 1], atol=1e-2)  # rot90 is not the identity


def test_bad_inputs_are_refused_before_anything_is_written(tiled_run, tmp_path):
    config = Config.model_validate(tiled_run)
    with pytest.raises(UnknownTeacherError, match="uni-3.*demo-vit"):
        run_features(config, ["uni-3"])
    other = Config.model_validate({**tiled_run, "features": {**tiled_run["features"], "views": ["rot90"]}, "store": tiled_run["store"]})
    run_features(config, ["demo-vit"])
    with pytest.raises(StoreError, match="views: store has .*identity.*rot90[\\s\\S]*--overwrite"):
        run_features(other, ["demo-vit"])

    # A store computed for another tile store is refused, naming both.
    foreign = Config.model_validate({**tiled_run, "run": str(tmp_path / "foreign")})
    run_tiles(foreign)
    (tmp_path / "foreign" / "features").mkdir()
    (tmp_path / "foreign" / "features" / "demo-vit.zarr").symlink_to(config.run / "features" / "demo-vit.zarr", target_is_directory=True)
    with pytest.raises(StoreError, match="computed from tile store .* not from this one"):
        run_features(foreign, ["demo-vit"])


def test_non_finite_outputs_are_refused_naming_teacher_and_rows(tiled_run, tmp_path):
    teacher = build_teacher("demo-vit")
    poisoned = {key: value.clone() for key, value in teacher.module.state_dict().items()}
    poisoned["norm.weight"][:] = float("nan")
    weights = tmp_path / "nan.safetensors"
    save_file(poisoned, str(weights))
    config = Config.model_validate({**tiled_run, "run": str(tmp_path / "run"), "features": {**tiled_run["features"], "weights": {"demo-vit": str(weights)}}})
    run_tiles(config)
    with pytest.raises(Exception, match=r"'demo-vit' recipe 'cls' gave NaN/Inf .* rows \[(0|16|32), "):  # whichever unit of those in flight fails first
        run_features(config, ["demo-vit"])
    assert finished_units(tmp_path / "run" / "features" / "demo-vit.zarr") == 0


def test_killed_worker_is_retried_and_killed_driver_resumes_to_identical_stores(tiled_run, tmp_path):
    """kill -9 of the actor process mid-run: Ray restarts it and retries. Then kill -9 of the driver: the rerun finishes."""
    reference = Config.model_validate(tiled_run)
    run_features(reference)  # no-op when an earlier test already finished them
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps({**tiled_run, "run": str(tmp_path / "run")}))
    run_tiles(Config.model_validate_json(config_path.read_text()))
    store = tmp_path / "run" / "features" / "demo-vit.zarr"
    command = [sys.executable, str(REPO / "cli.py"), "features", "--config", str(config_path)]

    def start_and_wait_for_markers(count: int) -> subprocess.Popen:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and finished_units(store) < count:
            time.sleep(0.05)
        return process

    process = start_and_wait_for_markers(1)
    actors = [p for p in psutil.Process(process.pid).children(recursive=True) if "EmbedWorker" in " ".join(p.cmdline())]
    assert len(actors) == 1, [p.cmdline() for p in psutil.Process(process.pid).children(recursive=True)]
    actors[0].kill()
    assert process.wait(timeout=300) == 0, process.stderr.read()
    for name in TEACHERS:
        for array, values in stored(reference.run / "features" / f"{name}.zarr").items():
            assert np.array_equal(stored(tmp_path / "run" / "features" / f"{name}.zarr")[array], values), (name, array)

    subprocess.run([sys.executable, str(REPO / "cli.py"), "features", "--config", str(config_path), "--overwrite", "--teachers", "demo-vit"], cwd=REPO, check=True, capture_output=True)
    forget_units(store, {0, 1, 2})
    process = start_and_wait_for_markers(1)
    for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        victim.kill()
    process.wait()
    finished_before = finished_units(store)
    summary = run_features(Config.model_validate_json(config_path.read_text()), ["demo-vit"])
    assert summary.units_run == 3 - finished_before < 3
    for array, values in stored(reference.run / "features" / "demo-vit.zarr").items():
        assert np.array_equal(stored(tmp_path / "run" / "features" / "demo-vit.zarr")[array], values), array


def test_overlapped_units_write_the_bytes_of_one_unit_at_a_time_and_a_failed_write_stops_the_run(tmp_path, slide_factory, he_pixels):
    """Reading ahead and writing behind (three units in the actor at once) against one unit at a time,
    on 6 units; then a unit whose write fails: the run stops with that error, and its rerun completes
    the store to the same bytes."""
    reference_config, reference = make_reference(tmp_path, small_slide(slide_factory, he_pixels, "overlap.tiff"), overlap=False)
    config = Config.model_validate(copy_tiles({**reference_config, "features": {**reference_config["features"], "overlap": True}}, tmp_path / "run"))
    assert run_features(config).units_run == 6
    assert_same_features(config.run, reference)

    store = config.run / "features" / f"{ONE_TEACHER}.zarr"
    forget_units(store, set(range(6)))
    blocked = config.run / "features" / f"{ONE_TEACHER}.zarr" / "cls" / "c" / "3"  # unit 3's shard folder, made a file: its write fails
    shutil.rmtree(blocked)
    blocked.write_bytes(b"")
    with pytest.raises(OSError, match="demo-vit.zarr"):
        run_features(config)
    assert 3 in open_feature_store(store).missing_units()
    blocked.unlink()
    assert run_features(config).units_run >= 1  # unit 3 at least; units finished before the error are kept
    assert_same_features(config.run, reference)
