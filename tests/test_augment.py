"""Student-side augmentations by pixels, on real H&E pixels: each does to the pixels what it says, p = 0
leaves the batch as it is, one seed draws the same pixels, the cached targets are never touched; a
short run with augmentations logs their terms and resumes bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from skimage.color import rgb2hed
from torchvision.io import decode_jpeg, encode_jpeg

from distill.augment import TERMS, augment, augment_generator, blur_kernel, colour_jitter, draw, gaussian_blur, hed_jitter, jpeg, local_crops
from distill.data import Rows
from distill.standardize import Standardizer
from distill.student import NestedHeads
from distill.train import Distiller, build_student, forward_backward, run_distill, seed_everything
from distill_run import config_for, make_run, tissue_tiles
from pipeline.config import AugmentConfig, ConfigError, DistillConfig

ALL_ON = {"hed": {"p": 1.0}, "colour": {"p": 1.0}, "blur": {"p": 1.0}, "jpeg": {"p": 1.0}, "local_crops": {"n": 2, "px": 32}}


@pytest.fixture(scope="module")
def tiles(he_pixels) -> np.ndarray:
    """uint8 [8, 64, 64, 3] tissue tiles."""
    return tissue_tiles(he_pixels, 8, 64)


@pytest.fixture(scope="module")
def pixels(tiles) -> torch.Tensor:
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255


def only(kind: str, **fields) -> AugmentConfig:
    """One augmentation at p = 1, the others off."""
    return AugmentConfig.model_validate({kind: {"p": 1.0, **fields}})


def generator(settings: AugmentConfig, step: int = 0) -> torch.Generator:
    return augment_generator(settings, seed=0, step=step, micro=0, rank=0)


def high_frequency_energy(images: torch.Tensor) -> float:
    """Spectral energy outside the lowest quarter of frequencies."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images - images.mean(dim=(-2, -1), keepdim=True)), dim=(-2, -1)).abs().square()
    side = images.shape[-1]
    centre = slice(side // 2 - side // 8, side // 2 + side // 8)
    return float(spectrum.sum() - spectrum[..., centre, centre].sum())


def test_hed_jitter_of_zero_sigma_is_the_identity_and_a_known_h_scaling_moves_rgb2hed_s_h_as_set(tiles, pixels):
    unchanged = augment(pixels, only("hed", sigma=0.0), generator(only("hed", sigma=0.0))).pixels
    assert np.array_equal(unchanged.mul(255).round().byte().permute(0, 2, 3, 1).numpy(), tiles)  # identity within rounding

    scaled = hed_jitter(pixels, torch.tensor([[1.3, 1.0, 1.0]] * len(pixels)), torch.zeros(len(pixels), 3))
    before = rgb2hed(pixels.permute(0, 2, 3, 1).double().numpy())
    after = rgb2hed(scaled.permute(0, 2, 3, 1).double().numpy())
    # where rgb2hed clips nothing (every density above 0) and hed2rgb clips nothing (no channel at 0 or 1)
    clean = (before > 1e-3).all(-1) & ((scaled > 1e-3) & (scaled < 1 - 1e-3)).all(1).numpy()
    assert clean.mean() > 0.2
    np.testing.assert_allclose(after[..., 0][clean], 1.3 * before[..., 0][clean], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(after[..., 1:][clean], before[..., 1:][clean], atol=1e-5)


def test_colour_jitter_applies_torchvision_s_brightness_contrast_saturation_and_hue(pixels):
    def factors(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
        return torch.tensor([[brightness, contrast, saturation, hue]] * len(pixels), dtype=torch.float64)

    torch.testing.assert_close(colour_jitter(pixels, factors(brightness=1.2)), (pixels * 1.2).clamp(0, 1), atol=1e-5, rtol=0)
    grey = 0.2989 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    torch.testing.assert_close(colour_jitter(pixels, factors(saturation=0.0)), grey[:, None].expand_as(pixels), atol=1e-5, rtol=0)
    mean_grey = grey.mean(dim=(1, 2))[:, None, None, None]
    torch.testing.assert_close(colour_jitter(pixels, factors(contrast=0.0)), mean_grey.expand_as(pixels), atol=1e-5, rtol=0)
    torch.testing.assert_close(colour_jitter(pixels, factors()), pixels, atol=1e-5, rtol=0)  # hue 0 round-trips through HSV
    shifted = colour_jitter(pixels, factors(hue=0.25))
    assert (shifted - pixels).abs().mean() > 0.05


def test_blur_lowers_high_frequency_energy_more_the_larger_sigma(pixels):
    light, strong = (gaussian_blur(pixels, torch.full((len(pixels),), sigma)) for sigma in (0.5, 2.0))
    for image, a, b in zip(pixels, light, strong):
        assert high_frequency_energy(b) < 0.5 * high_frequency_energy(a) < 0.5 * high_frequency_energy(image)
    torch.testing.assert_close(strong.mean(dim=(2, 3)), pixels.mean(dim=(2, 3)), atol=5e-3, rtol=0)  # light is kept
    assert blur_kernel(0.5) == 5 and blur_kernel(2.0) == 13


def test_jpeg_is_torchvision_s_decode_of_its_encode(tiles, pixels):
    quality = torch.tensor([20, 50, 70, 95, 20, 50, 70, 95])
    coded = jpeg(pixels, quality)
    for index, q in enumerate(quality.tolist()):
        expected = decode_jpeg(encode_jpeg(torch.from_numpy(tiles[index]).permute(2, 0, 1).contiguous(), quality=q))
        assert torch.equal(coded[index].mul(255).round().byte(), expected)
    error = (coded - pixels).abs().mean(dim=(1, 2, 3))
    assert error[0] > error[3] > 0  # quality 20 changes more than 95


def test_local_crops_are_the_stated_regions_resized(pixels):
    settings = AugmentConfig.model_validate({"local_crops": {"n": 3, "px": 32, "scale": [0.25, 0.5]}})
    drawn = draw(settings, len(pixels), 64, generator(settings))
    crops = augment(pixels, settings, generator(settings)).crops
    assert crops.shape == (len(pixels) * 3, 3, 32, 32)
    for crop, (sample, top, left, side) in zip(crops, drawn.crop_boxes.tolist()):
        assert 0.25 * 64**2 - 64 <= side**2 <= 0.5 * 64**2 + 64 and top + side <= 64 and left + side <= 64
        region = pixels[sample : sample + 1, :, top : top + side, left : left + side]
        assert torch.equal(crop, F.interpolate(region, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0])
    whole = local_crops(pixels, torch.tensor([[1, 0, 0, 64]]), 64)
    assert torch.equal(whole[0], pixels[1])


def test_each_augmentation_at_p_1_is_its_function_with_the_drawn_parameters(pixels):
    apply = {
        "hed": lambda d: hed_jitter(pixels, d.hed_scale, d.hed_shift),
        "colour": lambda d: colour_jitter(pixels, d.colour),
        "blur": lambda d: gaussian_blur(pixels, d.blur_sigma),
        "jpeg": lambda d: jpeg(pixels, d.jpeg_quality),
    }
    for kind, expected in apply.items():
        settings = only(kind)
        augmented = augment(pixels, settings, generator(settings))
        assert torch.equal(augmented.rows, torch.arange(len(pixels))) and torch.equal(augmented.touched[kind], torch.arange(len(pixels)))
        assert torch.equal(augmented.pixels, expected(draw(settings, len(pixels), 64, generator(settings)))), kind
        assert (augmented.pixels - pixels).abs().mean() > 1e-3, kind


def test_p_0_leaves_the_batch_untouched_and_one_seed_draws_the_same_pixels(pixels):
    before = pixels.clone()
    assert augment_generator(AugmentConfig(), 0, 0, 0, 0) is None  # all off: no augmentation, nothing drawn
    crops_only = AugmentConfig.model_validate({"hed": {"p": 0.0}, "local_crops": {"n": 1, "px": 32}})
    nothing = augment(pixels, crops_only, generator(crops_only))
    assert len(nothing.rows) == 0 and all(len(index) == 0 for index in nothing.touched.values())

    settings = AugmentConfig.model_validate(ALL_ON)
    first, again, later = (augment(pixels, settings, generator(settings, step)) for step in (3, 3, 4))
    assert torch.equal(pixels, before)  # the clean pixels are never changed in place
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.crops, again.crops)
    assert not torch.equal(first.pixels, later.pixels)
    half = AugmentConfig.model_validate({"blur": {"p": 0.5}})
    drawn = augment(pixels, half, generator(half))
    assert 0 < len(drawn.rows) < len(pixels)
    untouched = sorted(set(range(len(pixels))) - set(drawn.rows.tolist()))
    assert torch.equal(drawn.pixels, gaussian_blur(pixels[drawn.rows], draw(half, len(pixels), 64, generator(half)).blur_sigma[drawn.rows]))
    assert untouched  # the others are not in the augmented forward at all


TINY = DistillConfig(
    student="vit_tiny_patch16_224", student_kwargs={"img_size": 64, "depth": 1, "embed_dim": 32, "num_heads": 2, "dynamic_img_size": True},
    nested_dims=[16, 32], head_hidden=16, precision="fp32", warmup_steps=0,
)


def test_the_loss_is_the_exact_view_term_plus_the_weighted_augment_terms_and_targets_stay_clean(tiles):
    weights = {"hed": 0.5, "colour": 2.0, "blur": 1.0, "jpeg": 0.25, "local_crops": 3.0}
    settings = TINY.model_copy(update={"augment": AugmentConfig.model_validate({k: {**v, "weight": weights[k]} for k, v in ALL_ON.items()})})
    seed_everything(0)
    student = build_student(settings, 64)
    heads = NestedHeads({"alpha": 12}, student.nested_dims, settings.head_hidden)
    model = Distiller(student, heads, {"alpha": Standardizer(torch.zeros(12), torch.ones(12))}, settings)
    targets = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float16)
    batch = Rows(rows=np.arange(8), slides=np.zeros(8, int), views=np.zeros(8, int), tiles=tiles.copy(), targets={"alpha": targets.copy()})

    images, standardized = model.inputs(batch)
    clean, clean_parts, _ = model(images, standardized)
    total, parts, _ = model(images, standardized, augmented=model.augmented(batch, generator(settings.augment)))
    augment_terms = {key[1]: part["loss"] for key, part in parts.items() if key[0] == "augment"}
    assert list(augment_terms) == list(TERMS) and all(value > 0 for value in augment_terms.values())
    torch.testing.assert_close(total, clean + sum(weights[term] * value for term, value in augment_terms.items()))
    assert all(torch.equal(parts[key]["loss"], part["loss"]) for key, part in clean_parts.items())  # the exact-view term is the unaugmented one
    assert np.array_equal(batch.tiles, tiles) and np.array_equal(batch.targets["alpha"], targets)  # cached tiles and targets untouched
    assert torch.equal(model.inputs(batch)[0], images)
    loss, _, _ = forward_backward(model, model, batch, settings, generator(settings.augment))
    assert torch.equal(loss, total.detach())


def test_local_crops_below_the_tile_size_need_a_student_that_takes_them():
    crops = AugmentConfig.model_validate({"local_crops": {"n": 1, "px": 32}})
    fixed = TINY.model_copy(update={"student_kwargs": {**TINY.student_kwargs, "dynamic_img_size": False}, "augment": crops})
    with pytest.raises(ConfigError, match="dynamic_img_size: true"):
        build_student(fixed, 64)
    odd = TINY.model_copy(update={"augment": AugmentConfig.model_validate({"local_crops": {"n": 1, "px": 40}})})
    with pytest.raises(ConfigError, match="not a multiple of the student's 16 px patch: choose 32"):
        build_student(odd, 64)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        AugmentConfig.model_validate({"hed": {"p": 0.5, "sigmas": 0.1}})


def train_records(student: Path) -> list[dict]:
    return [r for r in map(json.loads, (student / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_a_run_with_augmentations_logs_their_terms_and_resumes_bit_for_bit(tmp_path, he_pixels):
    run_dir = tmp_path / "run"
    make_run(run_dir, he_pixels)
    augment_settings = {**ALL_ON, "hed": {"p": 0.5}, "jpeg": {"p": 0.5, "quality": [40, 90]}, "local_crops": {"n": 1, "px": 32}}
    config = config_for(
        run_dir, student_kwargs={"img_size": 64, "depth": 1, "dynamic_img_size": True}, steps=4, batch_size=8, warmup_steps=1,
        precision="fp32", eval_every=4, checkpoint_every=2, loader_workers=0, augment=augment_settings,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_distill(config)
        student = run_dir / "student"
        train = train_records(student)
        assert [sorted(r["augment_loss"]) for r in train] == [sorted(TERMS)] * 4
        assert all(value > 0 for r in train for value in r["augment_loss"].values())
        assert json.loads((student / "student.json").read_text())["distill"]["augment"]["local_crops"]["n"] == 1

        shutil.move(student, tmp_path / "uninterrupted")
        (student / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "uninterrupted" / "checkpoints" / "step-00000002.pt", student / "checkpoints")
        run_distill(config, resume=True)
    finally:
        torch.set_num_threads(threads)
    for name in ("student.safetensors", "heads.safetensors"):
        expected, resumed = (safetensors.torch.load_file(d / name) for d in (tmp_path / "uninterrupted", student))
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    resumed_train = train_records(student)
    assert [r["augment_loss"] for r in resumed_train] == [r["augment_loss"] for r in train[2:]]
