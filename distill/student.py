"""The student, a timm backbone whose pooled embedding z [B, D] is nested (Matryoshka): its first m
dims are an embedding on their own. During training, heads map each prefix z[:m] to every teacher,
and, for spatial targets, the first m dims of each grid cell's token to every teacher's grid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.grids import pool_grid
from pipeline.weights import RandomInit, WeightsError, parse_source, state_dict_for


def default_nested_dims(width: int) -> list[int]:
    """MRL's powers of two from 16 up to the width, plus the width itself."""
    return sorted({2**k for k in range(4, width.bit_length())} | {width})


class Student(nn.Module):
    """timm backbone without classifier; its pooled output is z [B, D]. `init` is a weight source of
    pipeline/weights.py: "random:SEED", "hf-hub:ORG/NAME[@REVISION]" (read from the Hugging Face cache
    when HF_HUB_OFFLINE=1) or a .safetensors / torch checkpoint file.

    `mean` / `std` normalise the input pixels: by default those the backbone's timm pretrained config
    names (ImageNet's when it names none); an exported student passes the ones it was trained with.

    `mask_token` adds a learned token that `forward_tokens` puts in place of masked patches (masked-token
    regression); only a timm VisionTransformer takes it. It is no backbone weight: the export keeps it
    in heads.safetensors, so student.safetensors stays what plain timm loads."""

    def __init__(
        self,
        arch: str,
        timm_kwargs: Mapping[str, Any] | None = None,
        nested_dims: Sequence[int] | None = None,
        init: str = "random:0",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        mask_token: bool = False,
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
        if mask_token and not isinstance(self.backbone, VisionTransformer):
            raise ValueError(
                f"{arch} is a {type(self.backbone).__name__}, not a timm VisionTransformer: masked patches need a ViT's "
                "patch embedding, so choose a ViT student or set distill.mask_ratio: 0"
            )
        # DINOv2 starts its mask token at zero, too
        self.mask_token = nn.Parameter(torch.zeros(self.backbone.embed_dim)) if mask_token else None

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def forward_tokens(self, images: Tensor, masked_cells: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z [B, D], exactly what forward gives, and the patch tokens [B, T, D'] it comes from, row-major:
        a ViT's tokens after its final norm without its prefix (class, register) tokens, a CNN's final
        feature map cells. `masked_cells` bool [B, k*k] masks every patch inside those cells of the k x k
        grid (pool_grid's cells): its patch embedding is replaced by the mask token before the position
        embedding is added, as in iBOT and MAE."""
        backbone = self.backbone
        if masked_cells is None:
            features = backbone.forward_features(images)
        else:
            if self.mask_token is None:
                raise ValueError("this student has no mask token: build it with mask_token=True to mask patches")
            features = self._masked_features(images, masked_cells)
        z = backbone.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # a CNN's [B, C, H, W]
            return z, features.flatten(2).transpose(1, 2)
        return z, features[:, backbone.num_prefix_tokens :]

    def mask_patches(self, patches: Tensor, masked_cells: Tensor) -> Tensor:
        """Patch embeddings [B, T, C] (or [B, H, W, C] with dynamic_img_size) with the mask token in place
        of every patch of the masked cells."""
        masked = patches_in_cells(masked_cells, patches[0, ..., 0].numel()).view(*patches.shape[:-1], 1)
        return torch.where(masked, self.mask_token.to(patches.dtype), patches)

    def _masked_features(self, images: Tensor, masked_cells: Tensor) -> Tensor:
        """timm VisionTransformer.forward_features (timm 1.0) with the patches masked after patch_embed."""
        vit = self.backbone
        x = self.mask_patches(vit.patch_embed(images), masked_cells)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

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


def patches_in_cells(masked_cells: Tensor, patches: int) -> Tensor:
    """bool [B, T]: the patches of a square row-major grid of T patches lying in any masked cell of the
    k x k grid (masked_cells bool [B, k*k]). A patch is in a cell when pool_grid averages it into that
    cell, so the mask follows whatever pooling the teachers' grids were made with."""
    k = math.isqrt(masked_cells.shape[1])
    identity = torch.eye(patches, device=masked_cells.device).unsqueeze(0)  # patch t's one-hot token
    in_cell = pool_grid(identity, k)[0] > 0  # [k*k, T]
    return (masked_cells.float() @ in_cell.float()) > 0


class PrefixMLP(nn.Module):
    """LayerNorm, Linear, GELU, Linear applied to x [..., m] for any m <= in_width: the LayerNorm and the
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


class PrefixLinear(nn.Linear):
    """One Linear (LitePath's linear projector) applied to x [B, m] for any m <= in_features, with its
    first m input weights, so that tied heads work as PrefixMLP's do."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : x.shape[-1]], self.bias)


HeadKind = Literal["mlp", "linear"]


class NestedHeads(nn.Module):
    """A head per teacher and nested dim m mapping z[:m] to the teacher's standardized target; with
    `tied`, one head per teacher shared by every m (MRL-E), which cuts head parameters about |M|-fold.
    z may carry leading dims: the spatial heads map grid cell tokens [B, k*k, D] cell by cell.

    `kind` "mlp" (PrefixMLP) or "linear" (PrefixLinear). An MLP head's predictions lie in an affine
    subspace of its hidden width, so `hidden` None gives each teacher's head its target's width (an int
    gives every head that width, a mapping one per teacher, as student.json records it)."""

    def __init__(
        self, teacher_widths: Mapping[str, int], nested_dims: Sequence[int], hidden: int | Mapping[str, int] | None = None,
        tied: bool = False, kind: HeadKind = "mlp",
    ):
        super().__init__()
        self.teacher_widths = dict(teacher_widths)
        self.nested_dims = list(nested_dims)
        self.tied = tied
        self.kind = kind
        self.hidden = resolve_hidden(kind, hidden, self.teacher_widths)

        def make(in_width: int, teacher: str) -> nn.Module:
            width = self.teacher_widths[teacher]
            return PrefixLinear(in_width, width) if kind == "linear" else PrefixMLP(in_width, self.hidden[teacher], width)

        self.heads = nn.ModuleDict(
            {
                teacher: make(max(nested_dims), teacher)
                if tied
                else nn.ModuleDict({str(m): make(m, teacher) for m in nested_dims})
                for teacher in self.teacher_widths
            }
        )

    def head(self, teacher: str, m: int) -> nn.Module:
        return self.heads[teacher] if self.tied else self.heads[teacher][str(m)]

    def record(self) -> dict[str, Any]:
        """What student.json keeps to rebuild these heads: NestedHeads(widths, dims, **record)."""
        return {"kind": self.kind, "hidden": self.hidden, "tied": self.tied}

    def forward(self, z: Tensor) -> dict[tuple[str, int], Tensor]:
        """Predictions [..., teacher width] keyed by (teacher, m)."""
        return {
            (teacher, m): self.head(teacher, m)(z[..., :m])
            for teacher in self.teacher_widths
            for m in self.nested_dims
        }


def resolve_hidden(kind: HeadKind, hidden: int | Mapping[str, int] | None, teacher_widths: Mapping[str, int]) -> dict[str, int] | None:
    """Each teacher's MLP hidden width (None for linear heads, which have none)."""
    if kind not in ("mlp", "linear"):
        raise ValueError(f"unknown head kind {kind!r}: use 'mlp' or 'linear'")
    if kind == "linear":
        if hidden is not None:
            raise ValueError(f"linear heads have no hidden layer, but hidden={hidden} was given")
        return None
    if hidden is None:
        return dict(teacher_widths)
    if isinstance(hidden, int):
        return {teacher: hidden for teacher in teacher_widths}
    if set(hidden) != set(teacher_widths):
        raise ValueError(f"hidden widths are for teachers {sorted(hidden)}, the heads for {sorted(teacher_widths)}")
    return {teacher: int(hidden[teacher]) for teacher in teacher_widths}
