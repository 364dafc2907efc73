"""Each teacher's input at its published scale: the refusal matrix (registry entries, no weights), the
pixels Prov-GigaPath is given from a real 0.499 um/px slide against its published transform, and the
features stage refusing, or recording, a teacher off its scale."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
import zarr
from PIL import Image
from torch import nn
from torchvision import transforms

from distill.evaluate.models import TeacherEmbedder, fit_to_model
from pipeline.config import Config
from pipeline.features.stage import run_features
from pipeline.inspect_store import describe_store
from pipeline.stores import Tiling, open_tile_store
from pipeline.teacher_input import TeacherScaleError, plan_teacher_input, plan_teacher_inputs
from pipeline.teachers import TEACHERS, LoadedTeacher, get_teacher
from pipeline.tiles.stage import run_tiles
from pipeline.views import apply_view, expand_views

REPO = Path(__file__).resolve().parent.parent
FIX = re.compile(r"tiling\.(target_mpp|tile_px|context_px): ([0-9]+(?:\.[0-9]+)?)")


def tiling(target_mpp: float = 0.5, tile_px: int = 224, context_px: int = 0) -> Tiling:
    return Tiling.from_config(Config.model_validate({"tiling": {"target_mpp": target_mpp, "tile_px": tile_px, "context_px": context_px}}))


def with_fixes(store: Tiling, message: str) -> Tiling:
    """The tiling the refusal's named fixes give."""
    settings = {"target_mpp": store.target_mpp, "tile_px": store.tile_px, "context_px": store.context_px}
    for key, value in FIX.findall(message):
        settings[key] = float(value) if key == "target_mpp" else int(value)
    return tiling(**settings)


# teacher x tile px x mpp x context px x views; a crop view of 8 px needs a context margin of 8 px itself.
MATRIX = [
    case for case in itertools.product(TEACHERS, (224, 225, 256), (0.25, 0.5, 0.51, 1.0), (0, 16), (["identity"], ["dihedral", "crop:8,-8"]))
    if case[3] >= 8 or "crop:8,-8" not in case[4]
]


@pytest.mark.parametrize(("teacher", "tile_px", "mpp", "context_px", "view_names"), MATRIX)
def test_every_scale_mismatch_is_refused_with_a_fix_that_works(teacher, tile_px, mpp, context_px, view_names):
    spec = get_teacher(teacher)
    store = tiling(mpp, tile_px, context_px)
    views = expand_views(view_names, context_px, tile_px)
    offset = 8 if "crop:8,-8" in view_names else 0
    scale_differs = abs(spec.target_mpp / mpp - 1) > store.mpp_tolerance
    field_fits = (tile_px - spec.field_px) % 2 == 0 and tile_px + 2 * context_px >= spec.field_px + 2 * offset
    if scale_differs or not field_fits:
        with pytest.raises(TeacherScaleError) as refused:
            plan_teacher_input(spec, store, views)
        message = str(refused.value)
        assert f"teacher {teacher!r}" in message and f"{spec.field_px} px tiles at {spec.target_mpp} um/px" in message
        if scale_differs:
            assert f"holds {mpp} um/px" in message and f"features.off_scale: [{teacher}]" in message
        fixed = with_fixes(store, message)
        assert plan_teacher_input(spec, fixed, expand_views(view_names, fixed.context_px, fixed.tile_px)).field_px == spec.field_px
        if field_fits:  # only the mpp differs: the named override runs it, recorded as off its scale
            given = plan_teacher_input(spec, store, views, off_scale=True)
            assert given.off_scale and given.store_mpp == mpp and given.published_mpp == spec.target_mpp
    else:
        given = plan_teacher_input(spec, store, views)
        assert not given.off_scale and given.field_px == spec.field_px and given.stored_px == tile_px + 2 * context_px
        stored = np.zeros((1, given.stored_px, given.stored_px, 3), np.uint8)
        assert all(apply_view(stored, view, given.field_px).shape[1:3] == (spec.field_px,) * 2 for view in views)


def test_the_cases_users_meet():
    gigapath, virchow = get_teacher("prov-gigapath"), get_teacher("virchow2")
    with pytest.raises(TeacherScaleError, match="256 px field centred on each 224 px tile.*set tiling.context_px: 16"):
        plan_teacher_input(gigapath, tiling(), [{"name": "identity"}])
    assert plan_teacher_input(gigapath, tiling(context_px=16), [{"name": "identity"}]).field_px == 256
    with pytest.raises(TeacherScaleError, match=r"published at 0.5 um/px, the tile store holds 0.25 um/px: tile at tiling.target_mpp: 0.5"):
        plan_teacher_input(virchow, tiling(0.25), [{"name": "identity"}])
    assert plan_teacher_input(virchow, tiling(tile_px=256), [{"name": "identity"}]).field_px == 224  # the centre, not a shrunk tile
    with pytest.raises(TeacherScaleError) as refused:  # every teacher that does not fit, in one error
        plan_teacher_inputs([virchow, gigapath], tiling(0.25), [{"name": "identity"}])
    assert "'virchow2'" in str(refused.value) and "'prov-gigapath'" in str(refused.value) and "context_px: 16" in str(refused.value)


@pytest.fixture(scope="module")
def svs_tiles(tmp_path_factory, real_svs, local_ray) -> Path:
    """The real Aperio slide (0.499 um/px) tiled at 0.5 um/px: 224 px tiles with a 24 px context margin."""
    run = tmp_path_factory.mktemp("gigapath") / "run"
    run_tiles(Config.model_validate({
        "run": str(run), "slides": [str(real_svs)], "tiling": {"tile_px": 224, "context_px": 24},
        "store": {"chunk_rows": 16, "shard_rows": 16, "tile_codec": "lossless"}, "ray": {"num_cpus": 2},  # compared with OpenSlide's pixels
    }))
    return run / "tiles.zarr"


def published_gigapath(region: Image.Image) -> torch.Tensor:
    """The transform of prov-gigapath's README, applied to a 256 px tile."""
    return transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])(region)


def test_gigapath_is_given_its_published_input_from_a_real_slide(svs_tiles, real_svs):
    spec = get_teacher("prov-gigapath")
    tiles = open_tile_store(svs_tiles)
    (record,) = tiles.attrs.slides
    assert record.read["level"] == 0 and not record.read["resized"] and abs(record.mpp - 0.499) < 1e-3
    views = expand_views(["identity", "rot90", "crop:8,-8"], 24, 224)
    given = plan_teacher_input(spec, tiles.attrs.tiling, views)
    teacher = LoadedTeacher(module=nn.Identity(), spec=spec, weights_sha256="", device=torch.device("cpu"))  # its transform needs no weights
    rows = np.flatnonzero(tiles["flags"][:] == 0)[[0, 7, 20]]  # margins inside the slide: no padding
    stored, coords = tiles["tiles"].oindex[rows], tiles["coords"].oindex[rows]
    reference_views = {"identity": (0, 0, None), "rot90": (0, 0, Image.Transpose.ROTATE_90), "crop": (8, -8, None)}
    with openslide.OpenSlide(str(real_svs)) as slide:
        for view in views:
            dx, dy, turn = reference_views[view["name"]]
            given_pixels = teacher.preprocess(torch.from_numpy(np.ascontiguousarray(apply_view(stored, view, given.field_px))))
            for index, (x, y) in enumerate(coords):
                # A 256 px tile read at 0.5 um/px with the same centre as the view's 224 px tile.
                region = slide.read_region((int(x) - 16 + dx, int(y) - 16 + dy), 0, (256, 256)).convert("RGB")
                region = region.transpose(turn) if turn is not None else region
                assert torch.equal(given_pixels[index], published_gigapath(region)), (view, index)
        # What it was given before: the 224 px tile upscaled to 256, so 0.4375 um/px and the central 196 px.
        old = teacher.preprocess(torch.from_numpy(np.ascontiguousarray(apply_view(stored, {"name": "identity"}, 224))))
        region = slide.read_region((int(coords[0][0]) - 16, int(coords[0][1]) - 16), 0, (256, 256)).convert("RGB")
        assert not torch.equal(old[0], published_gigapath(region))
    # evaluate shows it the same pixels: its field of view of an image at 0.5 um/px is the central 256 px.
    fitted, seen_mpp = fit_to_model(stored[0], 0.5, spec.target_mpp, spec.field_px)
    assert seen_mpp == 0.5 and torch.equal(teacher.preprocess(torch.from_numpy(fitted[None]))[0], published_gigapath(region))


def test_features_refuses_a_teacher_off_its_scale_unless_named_and_records_it(tmp_path, slide_factory, he_pixels, local_ray):
    slide = slide_factory("one-micron.tiff", he_pixels[1000:1448, 800:1248], mpp=1.0, levels=1)  # 2 x 2 tiles at 1 um/px
    settings = {
        "run": str(tmp_path / "run"), "slides": [str(slide)], "tiling": {"target_mpp": 1.0, "tile_px": 224},
        "tissue": {"min_fraction": 0.0}, "store": {"chunk_rows": 4, "shard_rows": 4}, "ray": {"num_cpus": 2},
        "features": {"teachers": ["demo-vit"], "batch_size": 4, "actors": 1, "threads_per_actor": 1},
    }
    config = Config.model_validate(settings)
    run_tiles(config)
    with pytest.raises(TeacherScaleError, match=r"'demo-vit'.*published at 0.5 um/px, the tile store holds 1.0 um/px.*features.off_scale: \[demo-vit\]"):
        run_features(config)
    with pytest.raises(TeacherScaleError, match=r"'prov-gigapath'.*tiling.target_mpp: 0.5.*tiling.context_px: 16"):
        run_features(config, ["prov-gigapath"])
    assert not (config.run / "features").exists() or not any((config.run / "features").iterdir())  # nothing written

    off = Config.model_validate({**settings, "features": {**settings["features"], "off_scale": ["demo-vit"]}})
    run_features(off)
    store = config.run / "features" / "demo-vit.zarr"
    given = {"field_px": 224, "published_mpp": 0.5, "store_mpp": 1.0, "stored_px": 224, "off_scale": True}
    assert zarr.open_group(str(store), mode="r").attrs["teacher"]["input"] == given == describe_store(store)["teacher"]["input"]
    shown = subprocess.run([sys.executable, "cli.py", "inspect-store", str(store)], cwd=REPO, capture_output=True, text=True, check=True)
    assert "given 224 px fields at 1.0 um/px" in shown.stdout and "off its published scale (features.off_scale)" in shown.stdout


def test_evaluate_shows_a_teacher_its_published_field(he_pixels):
    """A stand-in with Prov-GigaPath's field and transform: evaluate cuts 256 px at its mpp, crops the central 224."""
    spec = dataclasses.replace(get_teacher("demo-convnet"), field_px=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic")
    model = TeacherEmbedder(spec)
    assert (model.mpp, model.tile_px) == (0.5, 256)
    image = he_pixels[1000:1300, 800:1100]  # 300 px at 0.5 um/px
    fitted, seen_mpp = fit_to_model(image, 0.5, model.mpp, model.tile_px)
    assert seen_mpp == 0.5 and np.array_equal(fitted, image[22:278, 22:278])
    expected = model.teacher.forward(published_gigapath(Image.fromarray(image[22:278, 22:278]))[None])
    assert torch.equal(model.embed(torch.from_numpy(fitted[None]))["mean"], expected["mean"])
