"""Student-side augmentations against the clean cached target (`distill.augment`): the student learns to
give a changed tile the embedding its teachers gave the clean one.

Each micro-batch is first trained as always, on the exact cached views (the exact-view term). Then
the samples that drew at least one photometric augmentation are augmented, in this order: HED stain
jitter, colour jitter, Gaussian blur, JPEG re-compression (the stain first, then the scanner's optics
and codec, as evaluate's robustness proxy makes them), and go through the student once more; every
augmentation is its own term, the nested loss over the samples it changed (with whatever else they
drew), against their clean targets. Local crops (DINO's local-to-global) are cut from the clean
tiles, n per sample, resized to `px` and shown in a third forward; their term regresses each crop to
its tile's full-view target. So the step costs (1 + share of augmented samples + n (px / tile px)^2)
forwards and backwards, and the exact-view term is the loss a run without augmentations computes:

    L = L_exact + sum_k weight_k L_k        (k: hed, colour, blur, jpeg, local_crops)

A term none of whose samples were drawn in a micro-batch is 0 there. Validation and fidelity see
clean views only (they never augment).

All randomness of a micro-batch comes from one torch.Generator seeded by (distill.seed, step,
micro-batch, rank), as the loader's pools are seeded by (seed, epoch, pool): a pure function of where
the run is, so a resumed run draws the same pixels with no generator state in its checkpoints, and
no other stream (the global torch RNG) is drawn from. Parameters are drawn on the CPU (a few numbers
per sample) and applied on the pixels' device; JPEG encodes and decodes on the device when it is a
GPU (torchvision's nvjpeg), else on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

from distill.losses import Parts, nested_distill_loss
from distill.student import NestedHeads
from pipeline.config import AugmentConfig, ConfigError

PHOTOMETRIC = ("hed", "colour", "blur", "jpeg")  # in the order they are applied
LOCAL_CROPS = "local_crops"
TERMS = (*PHOTOMETRIC, LOCAL_CROPS)
# skimage's Beer-Lambert floor and scale: densities are log(max(rgb, 1e-6)) / log(1e-6), so rgb2hed's units
LOG_FLOOR = 1e-6
STREAM = 0xA06  # tells the augmentation stream apart from other streams seeded by (seed, step, ...)


def augment_generator(settings: AugmentConfig, seed: int, step: int, micro: int, rank: int) -> torch.Generator | None:
    """The micro-batch's generator, or None when every augmentation is off."""
    if not settings.enabled:
        return None
    key = np.random.SeedSequence([STREAM, seed, step, micro, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


# Pixel functions: float pixels [B, 3, H, W] in [0, 1] in, the same out; one parameter row per sample.

def rgb_to_hed(pixels: Tensor) -> Tensor:
    """Haematoxylin, eosin and DAB densities [B, 3, H, W], skimage's rgb2hed without its clip at 0 (so
    hed_to_rgb inverts it exactly; rgb2hed equals it wherever all three are positive)."""
    density = pixels.clamp(min=LOG_FLOOR).log() / math.log(LOG_FLOOR)
    return torch.einsum("bchw,cd->bdhw", density, _matrix(hed_from_rgb, pixels))


def hed_to_rgb(stains: Tensor) -> Tensor:
    """skimage's hed2rgb: RGB from densities, clipped to [0, 1]."""
    density = torch.einsum("bchw,cd->bdhw", stains, _matrix(rgb_from_hed, stains))
    return torch.exp(density * math.log(LOG_FLOOR)).clamp(0, 1)


def hed_jitter(pixels: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Each sample's H, E, DAB densities times scale [B, 3] plus shift [B, 3] (Tellez et al. 2018, arXiv 1808.05896)."""
    stains = rgb_to_hed(pixels)
    return hed_to_rgb(stains * scale[:, :, None, None].to(stains) + shift[:, :, None, None].to(stains))


def colour_jitter(pixels: Tensor, factors: Tensor) -> Tensor:
    """torchvision's brightness, contrast, saturation factors and hue shift, factors [B, 4], applied in
    that order to each sample."""
    out = []
    for image, (brightness, contrast, saturation, hue) in zip(pixels, factors.tolist()):
        image = TF.adjust_brightness(image, brightness)
        image = TF.adjust_contrast(image, contrast)
        image = TF.adjust_saturation(image, saturation)
        out.append(TF.adjust_hue(image, hue))
    return torch.stack(out)


def blur_kernel(sigma: float) -> int:
    """Odd kernel side covering 3 sigma each way (PIL's and torchvision's ColorJitter-era rule)."""
    return 2 * math.ceil(3 * sigma) + 1


def gaussian_blur(pixels: Tensor, sigma: Tensor) -> Tensor:
    """torchvision's Gaussian blur (reflect padding) with each sample's sigma [B] px."""
    return torch.stack([TF.gaussian_blur(image, [blur_kernel(s)] * 2, [s, s]) for image, s in zip(pixels, sigma.tolist())])


def jpeg(pixels: Tensor, quality: Tensor) -> Tensor:
    """Each sample rounded to uint8, JPEG-coded at its quality [B] and decoded, by torchvision
    (on the device when it is a GPU)."""
    device = pixels.device
    codec_device = device if device.type == "cuda" else torch.device("cpu")
    images = pixels.mul(255).round_().to(torch.uint8).to(codec_device)
    decoded = [decode_jpeg(encode_jpeg(image, quality=q), device=codec_device) for image, q in zip(images, quality.tolist())]
    return torch.stack(decoded).to(device).float().div_(255)


def local_crops(pixels: Tensor, boxes: Tensor, px: int) -> Tensor:
    """Squares boxes [N, 4] = (sample, top, left, side) of the pixels, each resized to px x px
    (bilinear, antialiased when shrinking)."""
    return torch.cat([
        F.interpolate(pixels[b : b + 1, :, top : top + side, left : left + side], size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        for b, top, left, side in boxes.tolist()
    ])


@dataclass(frozen=True)
class Draw:
    """What one micro-batch of B samples draws: per photometric kind which samples get it, and every
    sample's parameters (used where chosen); the local crops' boxes."""

    chosen: dict[str, Tensor]  # kind -> bool [B]
    hed_scale: Tensor  # [B, 3]
    hed_shift: Tensor  # [B, 3]
    colour: Tensor  # [B, 4]: brightness, contrast, saturation factors, hue shift
    blur_sigma: Tensor  # [B]
    jpeg_quality: Tensor  # [B] int
    crop_boxes: Tensor  # [B * n, 4] int: sample, top, left, side


def draw(settings: AugmentConfig, batch_size: int, tile_px: int, generator: torch.Generator) -> Draw:
    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    chosen = {kind: torch.rand(batch_size, generator=generator) < getattr(settings, kind).p for kind in PHOTOMETRIC}
    hed, colour, blur, jpeg_settings, crops = settings.hed, settings.colour, settings.blur, settings.jpeg, settings.local_crops
    factors = [uniform(max(0.0, 1 - spread), 1 + spread, batch_size) for spread in (colour.brightness, colour.contrast, colour.saturation)]
    n = batch_size * crops.n
    side = (uniform(*crops.scale, n).sqrt() * tile_px).round().clamp(1, tile_px).long()
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (tile_px - side + 1)).long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (tile_px - side + 1)).long()
    return Draw(
        chosen=chosen,
        hed_scale=uniform(1 - hed.sigma, 1 + hed.sigma, batch_size, 3),
        hed_shift=uniform(-hed.sigma, hed.sigma, batch_size, 3),
        colour=torch.stack([*factors, uniform(-colour.hue, colour.hue, batch_size)], dim=1),
        blur_sigma=uniform(*blur.sigma, batch_size),
        jpeg_quality=torch.randint(jpeg_settings.quality[0], jpeg_settings.quality[1] + 1, (batch_size,), generator=generator),
        crop_boxes=torch.stack([torch.arange(batch_size).repeat_interleave(crops.n), top, left, side], dim=1),
    )


@dataclass(frozen=True)
class Augmented:
    """A micro-batch's augmented student inputs (normalised later, by the Distiller)."""

    pixels: Tensor  # [A, 3, H, W]: the samples at least one photometric augmentation changed
    rows: Tensor  # [A]: their rows in the batch
    touched: dict[str, Tensor]  # kind -> indices into `pixels` of the samples it changed
    crops: Tensor  # [B * n, 3, px, px]
    crop_rows: Tensor  # [B * n]: the batch row each crop was cut from


def augment(pixels: Tensor, settings: AugmentConfig, generator: torch.Generator) -> Augmented:
    """The augmented copies of clean pixels [B, 3, H, W] in [0, 1]; `pixels` itself is left as it is."""
    drawn = draw(settings, len(pixels), pixels.shape[-1], generator)
    any_chosen = torch.stack(list(drawn.chosen.values())).any(dim=0)
    rows = any_chosen.nonzero().flatten()
    changed = pixels[rows.to(pixels.device)]  # a copy: indexing with a tensor gathers
    apply = {
        "hed": lambda x, r: hed_jitter(x, drawn.hed_scale[r], drawn.hed_shift[r]),
        "colour": lambda x, r: colour_jitter(x, drawn.colour[r]),
        "blur": lambda x, r: gaussian_blur(x, drawn.blur_sigma[r]),
        "jpeg": lambda x, r: jpeg(x, drawn.jpeg_quality[r]),
    }
    touched = {}
    for kind in PHOTOMETRIC:
        index = drawn.chosen[kind][rows].nonzero().flatten()
        touched[kind] = index
        if len(index):
            on_device = index.to(pixels.device)
            changed[on_device] = apply[kind](changed[on_device], rows[index])
    crops = settings.local_crops
    crop_pixels = local_crops(pixels, drawn.crop_boxes, crops.px) if crops.n else pixels.new_zeros((0, 3, crops.px, crops.px))
    return Augmented(changed, rows, touched, crop_pixels, drawn.crop_boxes[:, 0])


def augment_loss(
    embed: Callable[[Tensor], Tensor], heads: NestedHeads, augmented: Augmented, targets: dict[str, Tensor], settings: AugmentConfig, loss_weights: dict,
) -> tuple[Tensor, Parts]:
    """sum_k weight_k L_k over the terms (module docstring); `embed` maps pixels to the student's z
    (one forward for the augmented samples, one for the crops). Parts keyed ("augment", term) hold
    each term's detached "loss" (0 when it had no sample) for the train records."""
    device = next(iter(targets.values())).device
    z = embed(augmented.pixels) if len(augmented.rows) else None
    z_crops = embed(augmented.crops) if len(augmented.crops) else None
    samples = {kind: (z, augmented.rows[augmented.touched[kind]], augmented.touched[kind]) for kind in PHOTOMETRIC}
    samples[LOCAL_CROPS] = (z_crops, augmented.crop_rows, torch.arange(len(augmented.crops)))
    total = torch.zeros((), device=device)
    parts: Parts = {}
    for term, (embeddings, rows, index) in samples.items():
        loss = torch.zeros((), device=device)
        if len(index):
            rows = rows.to(device)
            loss, _ = nested_distill_loss(embeddings[index.to(device)], heads, {t: y[rows] for t, y in targets.items()}, **loss_weights)
            total = total + getattr(settings, term).weight * loss
        parts["augment", term] = {"loss": loss.detach()}
    return total, parts


def _matrix(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(values).to(device=like.device, dtype=like.dtype)


def check_crops_fit(settings: AugmentConfig, patch_embed, tile_px: int) -> None:
    """Local crops of `px` must be images the student takes: its own size, or any multiple of its patch
    with timm's dynamic_img_size (pos. embeddings resampled); refused with the keys to set otherwise."""
    crops = settings.local_crops
    if not crops.n or patch_embed is None or crops.px == tile_px:
        return
    if getattr(patch_embed, "strict_img_size", False):
        raise ConfigError(
            f"distill.augment.local_crops.px {crops.px} differs from the {tile_px} px tiles this student takes: set "
            f"distill.student_kwargs.dynamic_img_size: true (a ViT then takes any multiple of its patch), or local_crops.px: {tile_px}"
        )
    patch = patch_embed.patch_size[0]
    if crops.px % patch and not getattr(patch_embed, "dynamic_img_pad", False):
        raise ConfigError(f"distill.augment.local_crops.px {crops.px} is not a multiple of the student's {patch} px patch: choose {crops.px // patch * patch or patch}")
