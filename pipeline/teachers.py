"""Teacher registry: a teacher is data (a ``TeacherSpec``) plus one builder (``build_teacher``).

A spec carries everything that decides a teacher's embedding, so it doubles as provenance
(``to_json``): where the weights come from, the timm architecture and kwargs, the teacher's own
resize / crop / normalisation, which tokens each recipe pools, the scale it was published at (``target_mpp``
and ``field_px``: the tile its published transform takes) and autocast precision.
Real entries follow each model card and the public pipelines that load the model (TRIDENT, eva), model card
first; each entry's ``notes`` says where sources disagree and what we follow.

Weights come from ``source`` (or the builder's ``weights`` override): ``hf-hub:ORG/NAME``, a local file, or
``random:SEED`` for a stand-in, always labelled (see pipeline/weights.py). Whatever the source, the weights are
loaded into the spec's own architecture with every key as stored: a hub repo's config.json is not consulted,
and no conversion may silently change the published model.

Pooling rules over the token sequence of ``forward_features`` (prefix tokens = CLS + registers):
``cls`` the CLS token; ``mean`` the mean of the patch tokens after all prefix tokens (for a CNN,
the mean over H and W); ``cls_mean`` the two concatenated.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import PathdistillError
from pipeline.precision import DTYPES as PRECISIONS
from pipeline.precision import autocast
from pipeline.weights import RandomInit, WeightsError, build_strict, parse_source

POOLS = {
    "cls": lambda tokens, prefix: tokens[:, 0],
    "mean": lambda tokens, prefix: tokens[:, prefix:].mean(1),
    "cls_mean": lambda tokens, prefix: torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1),
}
RESIZE_RULES = ("resize", "resize_center_crop")

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Layers named, not imported, so a spec stays JSON; resolved by name at build time.
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


class UnknownTeacherError(PathdistillError, ValueError):
    """No registry entry has this name."""


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """Everything that decides a teacher's embedding.

    ``params`` (None for stand-ins) and ``widths`` are the published figures; widths are checked against
    the built architecture, so the feature store can size its arrays from the spec alone. ``target_mpp``
    and ``field_px`` are the published scale: the teacher's transform (resize, crop) was published for
    tiles of ``field_px`` pixels at ``target_mpp``; ``field_px`` defaults to ``resize_px``, the tile the
    published resize leaves as it is. pipeline/teacher_input.py holds a tile store to that scale.
    """

    name: str
    source: str
    arch: str
    kwargs: dict = field(default_factory=dict)
    input_px: int = 224
    resize: str = "resize_center_crop"
    resize_px: int = 224
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipes: dict[str, str]
    widths: dict[str, int]
    target_mpp: float = 0.5
    field_px: int | None = None
    precision: str
    params: int | None = None
    stand_in: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        try:
            is_random = isinstance(parse_source(self.source), RandomInit)
        except WeightsError as err:
            raise ValueError(f"teacher spec {self.name!r}: {err}") from err
        checks = {
            f"recipe rules {list(self.recipes.values())} must be among {list(POOLS)}":
                all(rule in POOLS for rule in self.recipes.values()),
            f"widths {sorted(self.widths)} must name exactly the recipes {sorted(self.recipes)}":
                self.widths.keys() == self.recipes.keys(),
            f"resize {self.resize!r} must be one of {RESIZE_RULES}": self.resize in RESIZE_RULES,
            f"resize_px {self.resize_px} must equal input_px {self.input_px} for 'resize' and not be below it":
                self.resize_px == self.input_px if self.resize == "resize" else self.resize_px >= self.input_px,
            f"interpolation {self.interpolation!r} must be a torchvision InterpolationMode":
                self.interpolation in {mode.value for mode in InterpolationMode},
            f"field_px {self.field_px} must be a positive number of pixels": self.field_px is None or self.field_px > 0,
            f"target_mpp {self.target_mpp} must be positive": self.target_mpp > 0,
            f"precision {self.precision!r} must be one of {list(PRECISIONS)}": self.precision in PRECISIONS,
            # Stand-ins are labelled everywhere, so the label is tied to the weight source.
            f"stand_in={self.stand_in} must be True exactly for random: sources": self.stand_in == is_random,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError(f"teacher spec {self.name!r}: " + "; ".join(problems))
        if self.field_px is None:
            object.__setattr__(self, "field_px", self.resize_px)  # recorded resolved, so provenance says what ran

    def to_json(self) -> dict:
        """The full spec as a JSON-serialisable dict, for the feature store's provenance."""
        return asdict(self)


TEACHERS: dict[str, TeacherSpec] = {spec.name: spec for spec in (
    TeacherSpec(
        name="uni",
        source="hf-hub:MahmoodLab/UNI",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1024},
        field_px=224,
        precision="fp16",
        params=303_000_000,
        notes="ViT-L/16. Loader kwargs and Resize 224 + CenterCrop 224 (torchvision default bilinear) from "
              "mahmoodlab/UNI get_encoder.py and TRIDENT; CLS. No source read states a precision for UNI's "
              "card; fp16 follows TRIDENT (same lab). Scale: 224 px at 0.5 um/px (20x, slide2vec), on which the card's "
              "transform is a no-op; the paper tiles 256 and 512 px at 20x for DINOv2's crops, and TRIDENT reads "
              "256 px at 20x and resizes them to 224 (0.571 um/px): a spec with field_px 256 reproduces that.",
    ),
    TeacherSpec(
        name="uni2-h",
        source="hf-hub:MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, **SWIGLU,
                "reg_tokens": 8, "dynamic_img_size": True},
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1536},
        field_px=224,
        precision="bf16",
        params=681_000_000,
        notes="ViT-H/14 with 8 registers; kwargs verbatim from the UNI README, Resize 224 + CenterCrop 224, "
              "CLS. Precision disagrees: TRIDENT bf16, slide2vec fp16; we follow TRIDENT (same lab as UNI). Scale as UNI's: 224 px at 0.5 um/px.",
    ),
    TeacherSpec(
        name="virchow2",
        source="hf-hub:paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SWIGLU,
                "dynamic_img_size": True},
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls", "cls_mean": "cls_mean"},
        widths={"cls": 1280, "cls_mean": 2560},
        field_px=224,
        precision="fp16",
        params=631_000_000,
        notes="ViT-H/14 with 4 registers (arch as in TRIDENT's local build; the card loads hf-hub with "
              "SwiGLUPacked/SiLU). Card: timm data config (224 px, bicubic), fp16 autocast, CLS concatenated "
              "with the mean of the patch tokens after the 5 prefix tokens (2560); TRIDENT and slide2vec agree, "
              "STAMP and eva default to CLS only (1280). We cache both. TRIDENT resizes without a crop: the same "
              "on square tiles. Scale: 224 px at 20x (0.5 um/px) as in TRIDENT; trained on mixed magnifications "
              "(https://arxiv.org/abs/2408.00738), so off_scale runs at 0.25-2 um/px are defensible.",
    ),
    *(TeacherSpec(
        name=name,
        source=f"hf-hub:bioptimus/{repo}",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        interpolation="bicubic",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1536},
        field_px=224,
        precision="fp16",
        params=1_130_000_000,
        notes="ViT-g/14, 4 registers, 40 blocks (bioptimus/releases README). Card: init_values 1e-5, "
              "dynamic_img_size False (TRIDENT and eva pass True: no difference at 224 px), fp16 autocast, "
              "H-optimus mean/std, CLS. The card feeds 224 px tiles with no resize, so our resize is a no-op "
              "at 224 px; for other sizes we follow slide2vec (bicubic resize + centre crop). H-optimus-1 "
              "uses H-optimus-0's recipe in every source read. Scale: the card's 224 px tiles at 0.5 um/px.",
    ) for name, repo in (("h-optimus-0", "H-optimus-0"), ("h-optimus-1", "H-optimus-1"))),
    TeacherSpec(
        name="h0-mini",
        source="hf-hub:bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "mlp_ratio": 2.66667 * 2, **SWIGLU},
        interpolation="bicubic",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        recipes={"cls": "cls", "cls_mean": "cls_mean"},
        widths={"cls": 768, "cls_mean": 1536},
        field_px=224,
        precision="fp16",
        params=86_000_000,
        notes="ViT-B/14 with 4 registers distilled from H-optimus-0; card: hf-hub with SwiGLUPacked/SiLU, "
              "output (B, 261, 768), fp16 autocast. Recipe defaults disagree: the card's snippet and slide2vec "
              "use CLS + patch mean (1536), TRIDENT, eva and plismbench CLS (768); we cache both. mlp_ratio "
              "5.33334 (SwiGLU hidden 2048, DINOv2's 2/3 rule) is inferred, not read: the hub config.json was "
              "not retrievable; it reproduces the published ~86M parameters, while timm's default ratio 4 "
              "with SwiGLUPacked would give 71.6M. Mean/std: H-optimus values as in the authors' plismbench; "
              "one third-party repo used ImageNet stats. Scale: 224 px at 0.5 um/px, as its teacher's.",
    ),
    TeacherSpec(
        name="prov-gigapath",
        source="hf-hub:prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
        resize_px=256,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1536},
        field_px=256,
        precision="fp16",
        params=1_130_000_000,
        notes="ViT-g arch with 16 px patches, 40 blocks (hub config, as mirrored by TRIDENT's local build; "
              "needs timm>=1.0.3). README: Resize 256 bicubic + CenterCrop 224, ImageNet stats, CLS. fp16 "
              "follows TRIDENT. Scale: 256 px tiles at 0.5 um/px (https://github.com/prov-gigapath/prov-gigapath/blob/main/gigapath/pipeline.py encodes tiles "
              "named on a 256 px grid with that transform; TRIDENT's table and slide2vec's input_size 256 at "
              "0.5 um/px agree), so it sees their central 224 px: with 224 px student tiles the store needs "
              "tiling.context_px 16 (pipeline/teacher_input.py). Upscaling a 224 px tile to 256 instead would "
              "show it 0.4375 um/px.",
    ),
    TeacherSpec(
        name="demo-vit",
        source="random:0",
        arch="vit_tiny_patch16_224",
        kwargs={"img_size": 224, "depth": 4, "reg_tokens": 4},
        resize="resize",
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls", "cls_mean": "cls_mean"},
        widths={"cls": 192, "cls_mean": 384},
        precision="bf16",
        stand_in=True,
        notes="Stand-in with seeded random weights, not a pathology model: demos and tests only. 4 registers "
              "so cls_mean skips prefix tokens as Virchow2 and H0-mini do.",
    ),
    TeacherSpec(
        name="demo-convnet",
        source="random:1",
        arch="convnext_atto",
        resize_px=256,
        interpolation="bilinear",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        recipes={"mean": "mean"},
        widths={"mean": 320},
        field_px=224,
        precision="bf16",
        stand_in=True,
        notes="Stand-in with seeded random weights, not a pathology model: demos and tests only. A CNN family "
              "(global average pool) whose transform upscales its 224 px field to 256 and crops the central 224.",
    ),
)}


def get_teacher(name: str) -> TeacherSpec:
    """The registry entry, or an error that lists the choices."""
    if name in TEACHERS:
        return TEACHERS[name]
    close = difflib.get_close_matches(name, TEACHERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownTeacherError(
        f"unknown teacher {name!r}{hint}; choose one of: {', '.join(TEACHERS)}, "
        "or add a TeacherSpec entry to TEACHERS in pipeline/teachers.py"
    )


def create_architecture(spec: TeacherSpec) -> nn.Module:
    """The spec's architecture with timm's random init; inside ``torch.device("meta")`` it costs nothing."""
    return timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec))


def param_count_meta(spec: TeacherSpec) -> int:
    """Parameter count of the architecture, built on the meta device so even 1.1B models are free."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_architecture(spec).parameters())


def describe_teachers() -> list[dict]:
    """One row per registry entry for the ``teachers`` command."""
    return [
        {
            "name": spec.name,
            "params": param_count_meta(spec) if spec.params is None else spec.params,
            "params_source": "counted" if spec.params is None else "published",
            "widths": dict(spec.widths),
            "recipes": dict(spec.recipes),
            "mpp": spec.target_mpp,
            "field_px": spec.field_px,
            "source": spec.source,
            "stand_in": spec.stand_in,
        }
        for spec in TEACHERS.values()
    ]


@dataclass(frozen=True)
class LoadedTeacher:
    """A built teacher: frozen module, its spec, the content hash of the weights it runs and, in a
    ``features`` run, the record of how its input is cut from the tile store (``TeacherInput``)."""

    module: nn.Module
    spec: TeacherSpec
    weights_sha256: str
    device: torch.device
    input_record: dict | None = None

    @property
    def widths(self) -> dict[str, int]:
        return self.spec.widths

    @property
    def field_px(self) -> int:
        """Side of the square, at the tiles' mpp, that ``embed`` takes: the published tile."""
        return self.spec.field_px

    def provenance(self) -> dict:
        """The spec, the hash of the weights and the input record: what a feature store records of its teacher."""
        record = {**self.spec.to_json(), "weights_sha256": self.weights_sha256}
        return record | {"input": self.input_record} if self.input_record else record

    def embed(self, batch_uint8_nhwc: Tensor) -> dict[str, Tensor]:
        """Float32 ``[B, width]`` per recipe, from uint8 RGB fields of ``field_px`` at the teacher's mpp,
        with the teacher's own preprocessing."""
        return self.forward(self.preprocess(batch_uint8_nhwc))

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """The model alone, on preprocessed NCHW pixels, under the teacher's autocast precision."""
        with torch.inference_mode(), autocast(self.device.type, self.spec.precision):
            features = self.module.forward_features(pixels)
        return self.pool(features)

    def preprocess(self, batch_uint8_nhwc: Tensor) -> Tensor:
        """Resize/crop on uint8 (as the cards' PIL pipelines do), scale to [0, 1], normalise: NCHW float."""
        batch = batch_uint8_nhwc
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB tiles [B, H, W, 3], got {batch.dtype} {tuple(batch.shape)}")
        spec = self.spec
        mode = InterpolationMode(spec.interpolation)
        x = batch.to(self.device).permute(0, 3, 1, 2)  # a channels-last view: the fast uint8 resize layout
        if spec.resize == "resize":
            x = TF.resize(x, [spec.input_px, spec.input_px], interpolation=mode, antialias=True)
        else:
            x = TF.resize(x, [spec.resize_px], interpolation=mode, antialias=True)
            x = TF.center_crop(x, [spec.input_px, spec.input_px])
        x = x.contiguous().float().div_(255)  # back to plain NCHW: the layout the models are fastest on
        return TF.normalize(x, mean=list(spec.mean), std=list(spec.std))

    def pool(self, features: Tensor) -> dict[str, Tensor]:
        """Each recipe from ``forward_features``: tokens ``[B, N, C]`` or a CNN map ``[B, C, H, W]``."""
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        prefix = getattr(self.module, "num_prefix_tokens", 0)
        return {recipe: POOLS[rule](tokens, prefix).float() for recipe, rule in self.spec.recipes.items()}


def build_teacher(
    spec: TeacherSpec | str, device: str | torch.device = "cpu", weights: str | None = None, input_record: dict | None = None,
) -> LoadedTeacher:
    """The one builder: architecture + weights from ``weights`` or the spec's source, frozen on ``device``;
    ``input_record`` (how a features run cuts its input) is carried into its provenance."""
    spec = get_teacher(spec) if isinstance(spec, str) else spec
    source = parse_source(weights or spec.source)
    module, weights_sha256 = build_strict(
        lambda: create_architecture(spec), source, f"teacher {spec.name!r} ({spec.arch})"
    )
    _check_recipes(module, spec)
    module = module.eval().requires_grad_(False).to(device)
    return LoadedTeacher(module=module, spec=spec, weights_sha256=weights_sha256, device=torch.device(device), input_record=input_record)


def _timm_kwargs(spec: TeacherSpec) -> dict:
    """Spec kwargs with layer names resolved; a teacher is a feature extractor, never with a head."""
    resolved = {k: _layer(v) if k.endswith("_layer") and isinstance(v, str) else v for k, v in spec.kwargs.items()}
    return {"num_classes": 0, **resolved}


def _layer(name: str) -> type[nn.Module]:
    for namespace in (torch.nn, timm.layers):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise ValueError(f"unknown layer {name!r}: neither torch.nn nor timm.layers has it")


def _check_recipes(module: nn.Module, spec: TeacherSpec) -> None:
    """Fail at build time, not mid-extraction, when the recipes do not fit the architecture."""
    if any(rule != "mean" for rule in spec.recipes.values()) and getattr(module, "cls_token", None) is None:
        raise ValueError(f"teacher {spec.name!r}: recipes {spec.recipes} need a CLS token, {spec.arch} has none")
    prefix = getattr(module, "num_prefix_tokens", 0)
    probe = torch.empty(1, prefix + 1, module.num_features, device="meta")  # widths from the pooling code itself
    built = {recipe: POOLS[rule](probe, prefix).shape[-1] for recipe, rule in spec.recipes.items()}
    if built != spec.widths:
        raise ValueError(f"teacher {spec.name!r}: architecture gives widths {built}, spec says {spec.widths}")
