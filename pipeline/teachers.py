"""Teacher registry: a teacher is data (a ``TeacherSpec``) plus one builder (``build_teacher``).

A spec carries everything that decides a teacher's embedding, so it doubles as provenance
(``to_json``): where the weights come from, the library (``loader``: timm, transformers, open_clip) with
the architecture and its kwargs, the teacher's own resize / crop / normalisation, which outputs each recipe
pools, the scale it was published at (``target_mpp`` and ``field_px``: the tile its published transform
takes) and autocast precision. Real entries follow each model card and the public pipelines that load the
model (TRIDENT, eva), model card first; each entry's ``notes`` cites its sources, says where they disagree
and what we follow. Users add their own specs in YAML (pipeline/teacher_specs.py), validated the same way.

Weights come from ``source`` (or the builder's ``weights`` override): ``hf-hub:ORG/NAME``, a local file, or
``random:SEED`` or ``bundled:NAME`` (shipped with the project) for a stand-in, always labelled (see pipeline/weights.py). Whatever the source, the weights are
loaded into the spec's own architecture with every key as stored: a hub repo's config.json is not consulted,
and no conversion may silently change the published model.

Pooling rules over a forward pass (pipeline/teacher_loaders.py; prefix tokens = CLS + registers):
``cls`` the CLS token; ``mean`` the mean of the patch tokens after all prefix tokens (for a CNN, the mean
over H and W; for a texture stand-in, over its grid cells); ``cls_mean`` the two concatenated; ``pooled`` the library's own pooled embedding (timm's
pre-logits, transformers' ``pooler_output``, an open_clip image tower's output).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from pydantic import ConfigDict
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import PathdistillError
from pipeline.grids import pool_grid
from pipeline.precision import DTYPES as PRECISIONS
from pipeline.precision import autocast
from pipeline.stores import GRID
from pipeline.teacher_loaders import LOADERS, Outputs
from pipeline.weights import STAND_IN_SOURCES, WeightsError, build_strict, parse_source

POOLS = {
    "cls": lambda out: out.tokens[:, 0],
    "mean": lambda out: out.tokens[:, out.prefix:].mean(1),
    "cls_mean": lambda out: torch.cat([out.tokens[:, 0], out.tokens[:, out.prefix:].mean(1)], dim=-1),
    "pooled": lambda out: out.pooled,
}
TOKEN_RULES = ("cls", "mean", "cls_mean")
RESIZE_RULES = ("resize", "resize_center_crop")

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)  # kaiko's normalisation (eva's default, Midnight's card)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
# Peer loaders, pinned to the commits whose code the entries were checked against.
TRIDENT_LOAD = "https://github.com/mahmoodlab/TRIDENT/blob/a91fa8490e0210ebbbe58452c3babe009e0ab7ca/trident/patch_encoder_models/load.py"
EVA_BACKBONES = "https://github.com/kaiko-ai/eva/blob/73b61a797bfda8daf232f6abea2bc87ac614589c/src/eva/vision/models/networks/backbones/pathology/"
# Layers named, not imported, so a spec stays JSON; resolved by name at build time.
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


class UnknownTeacherError(PathdistillError, ValueError):
    """No registry entry has this name."""


class GridUnavailable(PathdistillError, ValueError):
    """features.grid asks for a teacher's patch tokens, and its library's outputs have none."""


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """Everything that decides a teacher's embedding.

    ``params`` (None for stand-ins) and ``widths`` are the published figures; widths are checked against
    the built architecture, so the feature store can size its arrays from the spec alone. ``target_mpp``
    and ``field_px`` are the published scale: the teacher's transform (resize, crop) was published for
    tiles of ``field_px`` pixels at ``target_mpp``; ``field_px`` defaults to ``resize_px``, the tile the
    published resize leaves as it is. pipeline/teacher_input.py holds a tile store to that scale.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # YAML specs (pipeline/teacher_specs.py): unknown keys refused

    name: str
    source: str
    loader: str = "timm"
    arch: str
    kwargs: dict = field(default_factory=dict)
    input_px: int = 224
    resize: str = "resize_center_crop"
    resize_px: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipes: dict[str, str]
    widths: dict[str, int]
    target_mpp: float = 0.5
    field_px: int | None = None
    precision: str = "fp32"  # exact: an autocast precision is a published recipe's choice, written out
    params: int | None = None
    stand_in: bool = False
    notes: str = ""
    cites: tuple[str, ...] = ()  # where the recipe was read: model cards, READMEs, peer loaders

    def __post_init__(self) -> None:
        try:
            is_stand_in_source = isinstance(parse_source(self.source), STAND_IN_SOURCES)
        except WeightsError as err:
            raise ValueError(f"teacher spec {self.name!r}: {err}") from err
        checks = {
            f"loader {self.loader!r} must be one of {list(LOADERS)}": self.loader in LOADERS,
            f"recipe rules {list(self.recipes.values())} must be among {list(POOLS)}":
                all(rule in POOLS for rule in self.recipes.values()),
            f"widths {sorted(self.widths)} must name exactly the recipes {sorted(self.recipes)}":
                self.widths.keys() == self.recipes.keys(),
            f"recipe name {GRID!r} is the spatial recipe's (features.grid): name the recipe otherwise": GRID not in self.recipes,
            f"resize {self.resize!r} must be one of {RESIZE_RULES}": self.resize in RESIZE_RULES,
            f"resize_px {self.resize_px} must equal input_px {self.input_px} for 'resize' and not be below it":
                self.resize_px == self.input_px if self.resize == "resize" else self.resize_px >= self.input_px,
            f"interpolation {self.interpolation!r} must be a torchvision InterpolationMode":
                self.interpolation in {mode.value for mode in InterpolationMode},
            f"field_px {self.field_px} must be a positive number of pixels": self.field_px is None or self.field_px > 0,
            f"target_mpp {self.target_mpp} must be positive": self.target_mpp > 0,
            f"precision {self.precision!r} must be one of {list(PRECISIONS)}": self.precision in PRECISIONS,
            # Stand-ins are labelled everywhere, so the label is tied to the weight source.
            f"stand_in={self.stand_in} must be True exactly for random: and bundled: sources": self.stand_in == is_stand_in_source,
            f"cites {list(self.cites)} must be https:// URLs": all(url.startswith("https://") for url in self.cites),
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
        cites=("https://github.com/mahmoodlab/UNI", TRIDENT_LOAD),
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
        cites=("https://huggingface.co/MahmoodLab/UNI2-h", "https://github.com/mahmoodlab/UNI", TRIDENT_LOAD),
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
        cites=("https://huggingface.co/paige-ai/Virchow2", TRIDENT_LOAD, EVA_BACKBONES + "paige.py"),
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
        cites=("https://github.com/bioptimus/releases/tree/main/models/h-optimus/v0", TRIDENT_LOAD, EVA_BACKBONES + "bioptimus.py"),
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
        cites=("https://huggingface.co/bioptimus/H0-mini", TRIDENT_LOAD, EVA_BACKBONES + "bioptimus.py"),
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
        cites=("https://github.com/prov-gigapath/prov-gigapath", TRIDENT_LOAD, EVA_BACKBONES + "gigapath.py"),
    ),
    TeacherSpec(
        name="virchow",
        source="hf-hub:paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU, "dynamic_img_size": True},
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls", "cls_mean": "cls_mean"},
        widths={"cls": 1280, "cls_mean": 2560},
        precision="fp16",
        params=632_000_000,
        notes="Virchow (v1): ViT-H/14 without registers, SwiGLUPacked/SiLU, mlp_ratio 5.3375 (TRIDENT's local build). "
              "Card and TRIDENT: Resize 224 bicubic (no crop: the same on square tiles), ImageNet stats, fp16, CLS "
              "concatenated with the mean of the patch tokens after the CLS (2560, TRIDENT's default); CLS alone "
              "(1280) cached too. 632M parameters (paper). 224 px at 20x (TRIDENT README).",
        cites=("https://huggingface.co/paige-ai/Virchow", TRIDENT_LOAD),
    ),
    TeacherSpec(
        name="kaiko-vitl14",
        source="hf-hub:1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
        arch="vit_large_patch14_reg4_dinov2",
        kwargs={"img_size": 518, "dynamic_img_size": True},
        interpolation="bilinear",
        mean=HALF,
        std=HALF,
        recipes={"cls": "cls"},
        widths={"cls": 1024},
        precision="fp32",
        params=304_000_000,
        notes="kaiko.ai ViT-L/14 with 4 registers, built at 518 px (its position embedding's grid) and run at 224 "
              "px with dynamic_img_size, as TRIDENT does; weights as timm-converted by 1aurent (TRIDENT's source; eva "
              "loads the same model through torch.hub with trust_repo, which we never do). Resize 224 + CenterCrop "
              "224 bilinear, mean/std 0.5, CLS (timm's token pool), fp32 (TRIDENT). TRIDENT reads 256 px tiles at 20x "
              "for every kaiko model, so its crop sees a 0.571 um/px view; we follow the 0.5 um/px, 224 px recipe.",
        cites=(TRIDENT_LOAD, EVA_BACKBONES + "kaiko.py", "https://github.com/kaiko-ai/towards_large_pathology_fms"),
    ),
    TeacherSpec(
        name="lunit-vits8",
        source="hf-hub:1aurent/vit_small_patch8_224.lunit_dino",
        arch="vit_small_patch8_224",
        kwargs={"img_size": 224, "dynamic_img_size": True},
        interpolation="bilinear",
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 384},
        precision="fp32",
        params=21_700_000,
        notes="Lunit DINO ViT-S/8 (benchmark-ssl-pathology). Arch and kwargs from TRIDENT (weights as timm-converted by "
              "1aurent; eva reads Lunit's own release, a pickle). Mean/std: the training values eva quotes from "
              "Lunit; Resize 224 + CenterCrop 224 as eva's ResizeAndCrop (TRIDENT takes the hub's data config, not "
              "retrievable here); CLS; fp32. Trained on TCGA tiles at 20x and 40x; 224 px at 20x as TRIDENT.",
        cites=(TRIDENT_LOAD, EVA_BACKBONES + "lunit.py", "https://github.com/lunit-io/benchmark-ssl-pathology"),
    ),
    TeacherSpec(
        name="gpfm",
        source="hf-hub:majiabo/GPFM/GPFM.pth",
        arch="vit_large_patch14_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1024},
        precision="fp16",
        params=304_000_000,
        notes="GPFM: DINOv2 ViT-L/14 at 224 px, init_values 1e-5 (TRIDENT; eva adds qkv_bias True, timm's default). "
              "TRIDENT loads majiabo/GPFM's GPFM.pth strictly into timm (eva converts the teacher keys of the GitHub "
              "release instead); we read it with torch.load(weights_only=True), so a file holding more than tensors "
              "is refused. Resize 224 bicubic (no crop), ImageNet stats, CLS, fp16; 224 px at 20x (TRIDENT).",
        cites=(TRIDENT_LOAD, EVA_BACKBONES + "hkust.py", "https://github.com/birkhoffkiki/GPFM"),
    ),
    TeacherSpec(
        name="phikon",
        source="hf-hub:owkin/phikon",
        loader="transformers",
        arch="vit",
        kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "patch_size": 16, "image_size": 224, "add_pooling_layer": False},
        resize="resize",
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 768},
        precision="fp32",
        params=85_800_000,
        notes="Phikon: iBOT ViT-B/16 as a transformers ViTModel without its pooling layer (card and TRIDENT: "
              "add_pooling_layer=False), CLS of last_hidden_state. Resize 224 bilinear, ImageNet stats, fp32 "
              "(TRIDENT). Config values are ViT-B/16's, not read from the hub config.json (not retrievable here): "
              "strict loading refuses a checkpoint that does not fit. 20x TCGA tiles (card).",
        cites=("https://huggingface.co/owkin/phikon", TRIDENT_LOAD, EVA_BACKBONES + "owkin.py"),
    ),
    TeacherSpec(
        name="phikon-v2",
        source="hf-hub:owkin/phikon-v2",
        loader="transformers",
        arch="dinov2",
        kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                "image_size": 224},
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        recipes={"cls": "cls"},
        widths={"cls": 1024},
        precision="fp32",
        params=303_000_000,
        notes="Phikon-v2: DINOv2 ViT-L/16 through AutoModel (a Dinov2Model), CLS of last_hidden_state (card, TRIDENT, "
              "eva). Resize 224 + CenterCrop 224 (torchvision's bilinear), ImageNet stats, fp32 (TRIDENT); the card's "
              "image processor config was not retrievable. Config values are ViT-L/16's at 224 px, not read from the "
              "hub config.json: strict loading refuses a checkpoint that does not fit. 20x tiles (eva docs).",
        cites=("https://huggingface.co/owkin/phikon-v2", TRIDENT_LOAD, EVA_BACKBONES + "owkin.py"),
    ),
    *(TeacherSpec(
        name=f"hibou-{size.lower()}",
        source=f"hf-hub:histai/hibou-{size}",
        loader="transformers",
        arch="dinov2_with_registers",
        kwargs={**dims, "patch_size": 14, "image_size": 224, "num_register_tokens": 4},
        resize="resize",
        interpolation="bicubic",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        recipes={"cls": "pooled"},
        widths={"cls": dims["hidden_size"]},
        precision="fp32",
        params=params,
        notes=f"Hibou-{size}: DINOv2 ViT-{size}/14 with 4 registers. The card and eva load it with "
              "trust_remote_code=True (histai's own DINOv2 code), which we never run: it is built as transformers' "
              "Dinov2WithRegistersModel, the same architecture, and strict loading refuses the checkpoint if its "
              "keys differ (not checkable here: the hub files were not retrievable). TRIDENT (Hibou-L): Resize 224 "
              "bicubic, Hibou mean/std, pooler_output (the layer-normed CLS), fp32; 224 px at 20x.",
        cites=("https://huggingface.co/histai/hibou-" + size, TRIDENT_LOAD, EVA_BACKBONES + "histai.py"),
    ) for size, dims, params in (
        ("B", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}, 86_000_000),
        ("L", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}, 304_000_000),
    )),
    TeacherSpec(
        name="midnight-12k",
        source="hf-hub:kaiko-ai/midnight",
        loader="transformers",
        arch="dinov2",
        kwargs={"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "patch_size": 14,
                "image_size": 224, "use_swiglu_ffn": True},
        interpolation="bilinear",
        mean=HALF,
        std=HALF,
        recipes={"cls": "cls", "cls_mean": "cls_mean"},
        widths={"cls": 1536, "cls_mean": 3072},
        precision="fp16",
        params=1_130_000_000,
        notes="Midnight-12k: DINOv2 ViT-g/14 (SwiGLU FFN) through AutoModel, without remote code as TRIDENT loads it "
              "(eva passes trust_remote_code). Card and TRIDENT: Resize 224 + CenterCrop 224, mean/std 0.5; the card "
              "embeds CLS concatenated with the patch-token mean (3072), TRIDENT defaults to CLS (1536): we cache "
              "both. fp16 (TRIDENT). Config values are DINOv2-giant's at 224 px, not read from the hub config.json: "
              "strict loading refuses a checkpoint that does not fit. Trained on several magnifications; 224 px at "
              "20x as TRIDENT.",
        cites=("https://huggingface.co/kaiko-ai/midnight", TRIDENT_LOAD, EVA_BACKBONES + "kaiko.py"),
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
    TeacherSpec(
        name="demo-texture",
        source="bundled:demo-texture",
        loader="texture",
        arch="texture_scattering",
        kwargs={"width": 384},
        resize="resize",
        interpolation="bilinear",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        recipes={"mean": "mean"},
        widths={"mean": 384},
        precision="fp32",
        stand_in=True,
        notes="Stand-in, not a pathology model: demos and tests only. A fixed scattering-like filter bank on H&E "
              "stain densities (pipeline/texture_bank.py) whose 14 x 14 cells are its tokens, and a linear "
              "projection fitted once on the demo tiles (pipeline/demo/texture_teacher.py), so its features are "
              "texture statistics of high effective rank, unlike the random stand-ins'. Takes RGB in [0, 1].",
    ),
)}


def get_teacher(name: str, specs: Mapping[str, TeacherSpec] | None = None) -> TeacherSpec:
    """The spec named ``name``, from the user's ``specs`` (features.teacher_specs) or the registry; else an
    error that lists the choices."""
    known = {**TEACHERS, **(specs or {})}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownTeacherError(
        f"unknown teacher {name!r}{hint}; choose one of: {', '.join(known)}, "
        "or define it under features.teacher_specs in the config (see README, Teachers and features)"
    )


def create_architecture(spec: TeacherSpec) -> nn.Module:
    """The spec's architecture with its library's random init; inside ``torch.device("meta")`` it costs nothing."""
    return LOADERS[spec.loader].create(spec.arch, spec.kwargs)


def param_count_meta(spec: TeacherSpec) -> int:
    """Parameter count of the architecture, built on the meta device so even 1.1B models are free."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_architecture(spec).parameters())


def describe_teachers(specs: Mapping[str, TeacherSpec] | None = None, defined_in: str = "") -> list[dict]:
    """One row per registry entry, then per user spec (``defined_in`` says where those come from), for the
    ``teachers`` command."""
    rows = [(spec, "registry") for spec in TEACHERS.values()] + [(spec, defined_in) for spec in (specs or {}).values()]
    return [
        {
            "name": spec.name,
            "defined_in": origin,
            "loader": spec.loader,
            "params": param_count_meta(spec) if spec.params is None else spec.params,
            "params_source": "counted" if spec.params is None else "published",
            "widths": dict(spec.widths),
            "recipes": dict(spec.recipes),
            "mpp": spec.target_mpp,
            "field_px": spec.field_px,
            "input_px": spec.input_px,
            "source": spec.source,
            "stand_in": spec.stand_in,
            "cites": list(spec.cites),
        }
        for spec, origin in rows
    ]


@dataclass(frozen=True)
class LoadedTeacher:
    """A built teacher: frozen module, its spec, the content hash of the weights it runs, in a
    ``features`` run the record of how its input is cut from the tile store (``TeacherInput``), and
    ``grid``: k of the spatial recipe it computes beside its spec's recipes (0: none)."""

    module: nn.Module
    spec: TeacherSpec
    weights_sha256: str
    device: torch.device
    input_record: dict | None = None
    grid: int = 0

    @property
    def widths(self) -> dict[str, int]:
        return self.spec.widths

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """What ``embed`` gives per tile: (width,) per recipe, and (k*k, token width) for the grid."""
        shapes = {recipe: (width,) for recipe, width in self.widths.items()}
        if self.grid:
            shapes[GRID] = (self.grid**2, LOADERS[self.spec.loader].shape(self.module).token_width)
        return shapes

    @property
    def field_px(self) -> int:
        """Side of the square, at the tiles' mpp, that ``embed`` takes: the published tile."""
        return self.spec.field_px

    def provenance(self) -> dict:
        """The spec, the hash of the weights and the input record: what a feature store records of its teacher."""
        record = {**self.spec.to_json(), "weights_sha256": self.weights_sha256}
        return record | {"input": self.input_record} if self.input_record else record

    def embed(self, batch_uint8_nhwc: Tensor) -> dict[str, Tensor]:
        """Float32 ``[B, width]`` per recipe (and ``[B, k*k, C]`` for the grid), from uint8 RGB fields of
        ``field_px`` at the teacher's mpp, with the teacher's own preprocessing."""
        return self.forward(self.preprocess(batch_uint8_nhwc))

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """The model alone, on preprocessed NCHW pixels, under the teacher's autocast precision."""
        with torch.inference_mode(), autocast(self.device.type, self.spec.precision):
            outputs = LOADERS[self.spec.loader].forward(self.module, pixels)
        return self.pool(outputs)

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

    def pool(self, outputs: Outputs) -> dict[str, Tensor]:
        """Each recipe from one forward pass's outputs; the grid pools the patch tokens in float32."""
        pooled = {recipe: POOLS[rule](outputs).float() for recipe, rule in self.spec.recipes.items()}
        if self.grid:
            pooled[GRID] = pool_grid(outputs.tokens[:, outputs.prefix:].float(), self.grid)
        return pooled


def build_teacher(
    spec: TeacherSpec | str, device: str | torch.device = "cpu", weights: str | None = None, input_record: dict | None = None,
    grid: int = 0,
) -> LoadedTeacher:
    """The one builder: architecture + weights from ``weights`` or the spec's source, frozen on ``device``;
    ``input_record`` (how a features run cuts its input) is carried into its provenance; ``grid`` k > 0
    adds the spatial recipe (pipeline/grids.py)."""
    spec = get_teacher(spec) if isinstance(spec, str) else spec
    source = parse_source(weights or spec.source)
    loader = LOADERS[spec.loader]
    what = f"teacher {spec.name!r} ({spec.loader} {spec.arch})"
    module, weights_sha256 = build_strict(
        lambda: create_architecture(spec), source, what, hub_files=loader.hub_files,
        load=lambda state: loader.load(spec.arch, spec.kwargs, state, f"{source} for {what}"),
    )
    _check_recipes(module, spec)
    if grid:
        _require_tokens(module, spec)
    module = module.eval().requires_grad_(False).to(device)
    return LoadedTeacher(module=module, spec=spec, weights_sha256=weights_sha256, device=torch.device(device), input_record=input_record, grid=grid)


def require_patch_tokens(spec: TeacherSpec) -> None:
    """Refuse (before any weights are read: on the meta device) a teacher whose outputs have no patch tokens
    to pool into a grid."""
    with torch.device("meta"):
        _require_tokens(create_architecture(spec), spec)


def _require_tokens(module: nn.Module, spec: TeacherSpec) -> None:
    if LOADERS[spec.loader].shape(module).token_width is None:
        raise GridUnavailable(
            f"teacher {spec.name!r} ({spec.loader} {spec.arch}) gives only a pooled embedding, no patch tokens, so it has no "
            f"spatial recipe: leave it out of this run (`features --teachers ...`) and compute it in a run with features.grid: 0"
        )


def _check_recipes(module: nn.Module, spec: TeacherSpec) -> None:
    """Fail at build time, not mid-extraction, when the recipes do not fit the architecture."""
    shape = LOADERS[spec.loader].shape(module)
    rules = set(spec.recipes.values())
    if rules & set(TOKEN_RULES) and shape.token_width is None:
        raise ValueError(f"teacher {spec.name!r}: recipes {spec.recipes} pool tokens, {spec.loader} models give only 'pooled'")
    if rules & {"cls", "cls_mean"} and not shape.has_cls:
        raise ValueError(f"teacher {spec.name!r}: recipes {spec.recipes} need a CLS token, {spec.arch} has none")
    if "pooled" in rules and shape.pooled_width is None:
        raise ValueError(f"teacher {spec.name!r}: recipe rule 'pooled' needs a pooled output, {spec.arch} as built has none")
    # Widths from the pooling code itself, on empty meta tensors of the module's output sizes.
    tokens = torch.empty(1, shape.prefix + 1, shape.token_width, device="meta") if shape.token_width else None
    pooled = torch.empty(1, shape.pooled_width, device="meta") if shape.pooled_width else None
    probe = Outputs(tokens, shape.prefix, pooled)
    built = {recipe: POOLS[rule](probe).shape[-1] for recipe, rule in spec.recipes.items()}
    if built != spec.widths:
        raise ValueError(f"teacher {spec.name!r}: architecture gives widths {built}, spec says {spec.widths}")
