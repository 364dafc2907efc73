"""The student, a timm backbone whose pooled embedding z [B, D] is nested (Matryoshka): its first m
dims are an embedding on their own. During training, heads map each prefix z[:m] to every teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from pipeline.weights import RandomInit, WeightsError, parse_source, state_dict_for


def default_nested_dims(width: int) -> list[int]:
    """MRL's powers of two from 16 up to the width, plus the width itself."""
    return sorted({2**k for k in range(4, width.bit_length())} | {width})


class Student(nn.Module):
    """timm backbone without classifier; its pooled output is z [B, D]. `init` is a weight source of
    pipeline/weights.py: "random:SEED", "hf-hub:ORG/NAME[@REVISION]" (read from the Hugging Face cache
    when HF_HUB_OFFLINE=1) or a .safetensors / torch checkpoint file.

    `mean` / `std` normalise the input pixels: by default those the backbone's timm pretrained config
    names (ImageNet's when it names none); an exported student passes the ones it was trained with."""

    def __init__(
        self,
        arch: str,
        timm_kwargs: Mapping[str, Any] | None = None,
        nested_dims: Sequence[int] | None = None,
        init: str = "random:0",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        self.arch = arch
        self.timm_kwargs = dict(timm_kwargs or {})
        self.backbone = create_backbone(arch, self.timm_kwargs, init)
        pretrained_cfg = self.backbone.pretrained_cfg
        self.mean = tuple(pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN) if mean is None else mean)
        self.std = tuple(pretrained_cfg.get("std", IMAGENET_DEFAULT_STD) if std is None else std)
        self.width = self.backbone.head_hidden_size
        dims = default_nested_dims(self.width) if nested_dims is None else list(nested_dims)
        if not dims or dims != sorted(set(dims)) or dims[0] < 1 or dims[-1] > self.width:
            raise ValueError(f"nested dims {dims} must be increasing and within 1..D={self.width}")
        self.nested_dims = dims

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def preprocess(self, tiles_uint8_nhwc: Tensor) -> Tensor:
        """uint8 tiles [B, H, W, 3] -> the normalised float input [B, 3, H, W], on the student's device."""
        return self.normalise(self.pixels(tiles_uint8_nhwc))

    def pixels(self, tiles_uint8_nhwc: Tensor) -> Tensor:
        """uint8 tiles [B, H, W, 3] -> float pixels [B, 3, H, W] in [0, 1] on the student's device (what augmentations change)."""
        return tiles_uint8_nhwc.to(next(self.parameters()).device).permute(0, 3, 1, 2).float().div_(255)

    def normalise(self, pixels: Tensor) -> Tensor:
        """Float pixels in [0, 1] -> the student's input, normalised by its mean and std."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def embed(self, images: Tensor, dim: int | None = None) -> Tensor:
        """The first `dim` dims of z (all D when None)."""
        dim = self.width if dim is None else dim
        if not 1 <= dim <= self.width:
            raise ValueError(
                f"dim={dim} is outside this student's embedding: choose 1..D={self.width} "
                f"(trained nested dims: {self.nested_dims})"
            )
        return self(images)[:, :dim]


def create_backbone(arch: str, timm_kwargs: Mapping[str, Any], init: str) -> nn.Module:
    """timm backbone (num_classes=0) from `init`, see Student. Unlike a teacher, a checkpoint goes
    through timm's own pretrained loading, so its per-arch conversions apply (e.g. DINOv2's 518 px
    position embedding resampled to the student's img_size); every backbone key must still match
    (classifier keys aside)."""
    source = parse_source(init)
    if isinstance(source, RandomInit):
        return source.build(lambda: timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs))
    weights = state_dict_for(source)
    classifiers = timm.models.get_pretrained_cfg_value(arch, "classifier") or ()
    for classifier in (classifiers,) if isinstance(classifiers, str) else classifiers:  # not part of a backbone
        weights.pop(f"{classifier}.weight", None)
        weights.pop(f"{classifier}.bias", None)
    try:
        # num_classes=0 in the overlay too: timm loads non-strictly when it differs from the model's.
        backbone = timm.create_model(
            arch,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay=dict(state_dict=weights, num_classes=0),
            **timm_kwargs,
        )
    except RuntimeError as error:
        raise WeightsError(f"student init {source} does not fit timm {arch} {dict(timm_kwargs)}: {error}") from error
    backbone.pretrained_cfg["state_dict"] = None  # timm keeps the overlay; do not hold a second copy
    return backbone


class PrefixMLP(nn.Module):
    """LayerNorm, Linear, GELU, Linear applied to x [B, m] for any m <= in_width: the LayerNorm and the
    first Linear use only their first m input weights, so one head can serve every nested dim (MRL-E)."""

    def __init__(self, in_width: int, hidden: int, out_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_width)
        self.fc1 = nn.Linear(in_width, hidden)
        self.fc2 = nn.Linear(hidden, out_width)

    def forward(self, x: Tensor) -> Tensor:
        m = x.shape[-1]
        x = F.layer_norm(x, (m,), self.norm.weight[:m], self.norm.bias[:m], self.norm.eps)
        x = F.linear(x, self.fc1.weight[:, :m], self.fc1.bias)
        return self.fc2(F.gelu(x))


class NestedHeads(nn.Module):
    """A head per teacher and nested dim m mapping z[:m] to the teacher's standardized target; with
    `tied`, one head per teacher shared by every m (MRL-E), which cuts head parameters about |M|-fold."""

    def __init__(
        self, teacher_widths: Mapping[str, int], nested_dims: Sequence[int], hidden: int, tied: bool = False
    ):
        super().__init__()
        self.teacher_widths = dict(teacher_widths)
        self.nested_dims = list(nested_dims)
        self.hidden = hidden
        self.tied = tied
        self.heads = nn.ModuleDict(
            {
                teacher: PrefixMLP(max(nested_dims), hidden, width)
                if tied
                else nn.ModuleDict({str(m): PrefixMLP(m, hidden, width) for m in nested_dims})
                for teacher, width in teacher_widths.items()
            }
        )

    def head(self, teacher: str, m: int) -> PrefixMLP:
        return self.heads[teacher] if self.tied else self.heads[teacher][str(m)]

    def forward(self, z: Tensor) -> dict[tuple[str, int], Tensor]:
        """Predictions [B, teacher width] keyed by (teacher, m)."""
        return {
            (teacher, m): self.head(teacher, m)(z[:, :m])
            for teacher in self.teacher_widths
            for m in self.nested_dims
        }
