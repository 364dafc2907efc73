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
from pipeline.inspect_store import describe_store
from pipeline.precision import autocast
from pipeline.stores import FEATURES_SCHEMA, GRID, StoreError, forget_units, open_feature_store
from pipeline.teacher_loaders import LOADERS
from pipeline.teacher_specs import parse_teacher_specs
from pipeline.teachers import GridUnavailable, UnknownTeacherError, build_teacher, get_teacher
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

    forget_units(store, {0, 1, 2})  # as if those units were never written
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


def test_the_grid_recipe_is_each_teachers_patch_tokens_pooled_on_each_views_pixels(tmp_path, slide_factory, he_pixels):
    """features.grid 2 on 4 tiles, three views, a ViT (14 x 14 tokens after 5 prefix tokens) and a CNN (7 x 7 map cells)."""
    slide = slide_factory("grid.tiff", he_pixels[1000:1448, 800:1248], mpp=0.5, levels=1)
    views = ["identity", "rot90", "flip_rot270"]
    config = Config.model_validate(settings(tmp_path / "run", slide, views=views, grid=2))
    run_tiles(config)
    summary = run_features(config)
    tiles = zarr.open_group(str(tmp_path / "run" / "tiles.zarr"), mode="r")["tiles"][:]
    assert tiles.shape[0] == 4
    for name, width in (("demo-vit", 192), ("demo-convnet", 320)):
        path = tmp_path / "run" / "features" / f"{name}.zarr"
        store = open_feature_store(path)
        assert store.attrs.SCHEMA == FEATURES_SCHEMA and store.attrs.grid == 2 and store.attrs.recipes == get_teacher(name).widths
        grid = store[GRID]
        assert grid.shape == (4, 3, 4, width) and grid.dtype == np.float16 and grid.metadata.dimension_names == ("row", "view", "cell", "feature")
        assert grid.chunks == (8, 3, 4, width)  # whole views, cells and features per chunk, rows as the tile store's
        teacher = build_teacher(name, grid=2)
        values = grid[:]
        for index, view in enumerate(store.attrs.views):
            pixels = torch.from_numpy(np.ascontiguousarray(apply_view(tiles, view, 224)))
            # the teacher's own tokens of the viewed pixels, pooled here by hand: quadrants of its token grid
            with torch.inference_mode(), autocast("cpu", teacher.spec.precision):
                outputs = LOADERS[teacher.spec.loader].forward(teacher.module, teacher.preprocess(pixels))
            tokens = outputs.tokens[:, outputs.prefix:].float().numpy()
            side = int(np.sqrt(tokens.shape[1]))
            assert side == {"demo-vit": 14, "demo-convnet": 7}[name]
            by_hand = np.stack([
                tokens.reshape(4, side, side, width)[:, rows, columns].mean(axis=(1, 2))
                for rows in (slice(0, -(-side // 2)), slice(side // 2, side)) for columns in (slice(0, -(-side // 2)), slice(side // 2, side))
            ], axis=1)
            np.testing.assert_allclose(values[:, index], by_hand, rtol=2e-2, atol=2e-2)
            np.testing.assert_allclose(values[:, index], teacher.embed(pixels)[GRID].numpy(), rtol=2e-2, atol=2e-2)
        assert not np.allclose(values[:, 0], values[:, 1], atol=1e-2)  # a turned tile has its own grid
        cost = summary.grid_costs[name]
        assert cost["k"] == 2 and cost["raw_bytes_per_view"] == 4 * width * 2 and cost["raw_bytes_per_tile"] == 3 * 4 * width * 2
        assert 0 < cost["stored_bytes_per_tile"] < cost["raw_bytes_per_tile"] * 1.5
        described = describe_store(path, verify=True)
        assert described["grid"] == cost and described["verify"]["ok"] and described["verify"]["non_finite"][GRID] == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]["grid"] == summary.grid_costs

    regridded = Config.model_validate(settings(tmp_path / "run", slide, views=views, grid=3))
    with pytest.raises(StoreError, match=r"grid: store has 2, now 3[\s\S]*--overwrite"):
        run_features(regridded, ["demo-vit"])


def test_a_teacher_without_patch_tokens_is_refused_a_grid_before_any_work(tiled_run, tmp_path):
    """An open_clip tower gives only its pooled embedding: nothing to pool into cells."""
    clip = {
        "source": "random:0", "stand_in": True, "loader": "open_clip", "arch": "ViT-B-32", "target_mpp": 0.5, "input_px": 224,
        "kwargs": {"embed_dim": 24, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
                   "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}},
        "mean": [0.5] * 3, "std": [0.5] * 3, "recipes": {"embedding": "pooled"}, "widths": {"embedding": 24},
    }
    config = Config.model_validate({**tiled_run, "features": {**tiled_run["features"], "teacher_specs": {"clip": clip}, "teachers": ["demo-vit", "clip"], "grid": 2}})
    with pytest.raises(GridUnavailable, match=r"teacher 'clip' \(open_clip ViT-B-32\) gives only a pooled embedding.*leave it out of this run"):
        run_features(config)
    assert not (config.run / "features" / "clip.zarr").exists()
    with pytest.raises(GridUnavailable, match="no patch tokens"):
        build_teacher(get_teacher("clip", parse_teacher_specs({"clip": clip})), grid=2)
