"""The run configuration: one YAML file, validated; unknown keys are errors.

Command-line flags override the file through ``load_config(path, overrides)``, where overrides are
dotted keys (``{"tiling.target_mpp": 0.25}``), so every command treats its flags the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.geometry import MPP_TOLERANCE
from pipeline.errors import PathdistillError
from pipeline.tile_codec import Subsampling

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(PathdistillError, ValueError):
    """The configuration file or a flag is invalid; the message says which key and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilingConfig(Strict):
    target_mpp: float = Field(0.5, gt=0, description="micrometres per pixel of the stored tiles")
    tile_px: int = Field(224, gt=0, description="tile side at the target mpp")
    overlap_px: int = Field(0, ge=0, description="overlap between neighbouring tiles, at the target mpp")
    context_px: int = Field(0, ge=0, description="margin stored around each tile (for cropped views)")
    mpp_tolerance: float = Field(MPP_TOLERANCE, ge=0, lt=1, description="relative mpp difference treated as equal")
    allow_upsample: bool = Field(False, description="allow targets finer than the slide's base level")
    reader: Literal["auto", "openslide"] = Field("auto", description="auto: decode tiled TIFF/SVS levels directly, OpenSlide for the rest")

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingConfig:
        if self.overlap_px >= self.tile_px:
            raise ValueError(f"overlap_px ({self.overlap_px}) must be smaller than tile_px ({self.tile_px})")
        return self


class TissueConfig(Strict):
    mask_mpp: float = Field(4.0, gt=0, description="resolution of the tissue mask")
    min_fraction: float = Field(0.25, ge=0, le=1, description="tiles with less tissue than this are dropped")
    saturation_range: tuple[float, float] = Field((0.04, 0.15), description="bounds on the Otsu saturation threshold")
    min_object_um2: float = Field(10_000.0, ge=0, description="tissue specks smaller than this are dropped")
    min_hole_um2: float = Field(10_000.0, ge=0, description="holes smaller than this are filled")


class StoreConfig(Strict):
    chunk_rows: int = Field(16, gt=0, description="tiles per chunk (the read unit)")
    shard_rows: int = Field(256, gt=0, description="tiles per shard (the write unit); a multiple of chunk_rows")
    tile_codec: Literal["jpeg", "lossless"] = Field("jpeg", description="tiles: jpeg (one JPEG per tile, decoded pixels are the stored ones; bench figure 6) or lossless (Blosc `codec` at `clevel`)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of tile_codec jpeg")
    jpeg_subsampling: Subsampling = Field("4:4:4", description="JPEG chroma subsampling of tile_codec jpeg (4:2:0 costs H&E colour detail)")
    codec: Literal["zstd", "lz4"] = Field("zstd", description="Blosc compressor of the lossless arrays (features, tile metadata, tiles when lossless)")
    clevel: int = Field(1, ge=0, le=9)

    @model_validator(mode="after")
    def _shard_holds_whole_chunks(self) -> StoreConfig:
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        return self


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; none starts a local Ray")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local Ray (none: all)")


class FeaturesConfig(Strict):
    teachers: list[str] = Field(default_factory=lambda: ["demo-vit", "demo-convnet"], description="registry names or names defined in teacher_specs")
    teacher_specs: dict[str, dict[str, Any]] | Path | None = Field(None, description="teachers defined here: name -> TeacherSpec fields (pipeline/teachers.py), or a YAML file of them")
    weights: dict[str, str] = Field(default_factory=dict, description="teacher -> local weights file, replacing its source")
    off_scale: list[str] = Field(default_factory=list, description="teachers allowed to run at the tile store's mpp when it is not the one they were published at (recorded in the feature store's provenance)")
    views: list[str] = Field(default_factory=lambda: ["identity"], description="identity, rot90, rot180, rot270, flip, flip_rot90, flip_rot180, flip_rot270, 'dihedral' (all 8), or crop:DX,DY (needs tiling.context_px)")
    batch_size: int = Field(32, gt=0, description="tiles per forward pass")
    pools: list[list[str]] | None = Field(None, description="teacher groups given separate actor pools (when they do not fit on one device together); none: one pool")
    actors: int | None = Field(None, gt=0, description="actors per pool; none: one per GPU, or one per 2 CPUs without GPUs")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each actor reserves (1 on GPU clusters)")
    threads_per_actor: int = Field(2, gt=0, description="torch CPU threads per actor")
    overlap: bool = Field(True, description="each actor reads the next unit and writes the previous one while a unit is in the forward pass (false: one unit at a time)")
    grid: int = Field(0, ge=0, description="k > 0: every teacher also stores recipe `grid` [N, V, k*k, C], its patch tokens (prefix tokens excluded) average-pooled to k x k on each view's pixels (pipeline/grids.py); 0: no spatial recipe")

    @model_validator(mode="after")
    def _teacher_specs_valid(self) -> FeaturesConfig:
        if self.teacher_specs is not None:  # checked with the config, so a bad spec fails before any work
            from pipeline.teacher_specs import parse_teacher_specs

            parse_teacher_specs(self.teacher_specs)
        return self


class AugmentTerm(Strict):
    """One student-side augmentation: the share of samples it is applied to, and the weight of its loss term."""

    p: float = Field(0.0, ge=0, le=1, description="probability that a training sample gets this augmentation (0: off)")
    weight: float = Field(1.0, ge=0, description="weight of its loss term (the nested loss over the samples it changed) beside the exact-view term")


class HedJitter(AugmentTerm):
    sigma: float = Field(0.05, ge=0, le=1, description="Tellez et al.'s HED jitter: each of the H, E, DAB densities (skimage rgb2hed units) scaled by U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma), per sample")


class ColourJitter(AugmentTerm):
    brightness: float = Field(0.1, ge=0, description="factor U(max(0, 1 - b), 1 + b), as torchvision's ColorJitter")
    contrast: float = Field(0.1, ge=0, description="factor U(max(0, 1 - c), 1 + c)")
    saturation: float = Field(0.1, ge=0, description="factor U(max(0, 1 - s), 1 + s)")
    hue: float = Field(0.02, ge=0, le=0.5, description="hue shift U(-h, h), in turns")


class BlurJitter(AugmentTerm):
    sigma: tuple[float, float] = Field((0.1, 1.5), description="Gaussian blur sigma U(low, high) px; kernel 2 ceil(3 sigma) + 1")

    @model_validator(mode="after")
    def _ordered(self) -> BlurJitter:
        if not 0 < self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"sigma {list(self.sigma)} must be [low, high] with 0 < low <= high")
        return self


class JpegJitter(AugmentTerm):
    quality: tuple[int, int] = Field((50, 95), description="JPEG quality drawn uniformly from low..high (inclusive)")

    @model_validator(mode="after")
    def _ordered(self) -> JpegJitter:
        if not 1 <= self.quality[0] <= self.quality[1] <= 100:
            raise ValueError(f"quality {list(self.quality)} must be [low, high] with 1 <= low <= high <= 100")
        return self


class LocalCrops(Strict):
    n: int = Field(0, ge=0, description="local crops of every training sample (0: off), each regressing the sample's full-view target (DINO's local-to-global)")
    px: int = Field(96, gt=0, description="side the crops are resized to; below the tile px the student needs student_kwargs.dynamic_img_size: true")
    scale: tuple[float, float] = Field((0.25, 0.5), description="crop area as a share of the tile area, U(low, high); square crops at a uniform position")
    weight: float = Field(1.0, ge=0, description="weight of the local-crop loss term")

    @model_validator(mode="after")
    def _ordered(self) -> LocalCrops:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {list(self.scale)} must be [low, high] with 0 < low <= high <= 1")
        return self


class AugmentConfig(Strict):
    """Student-side augmentations against the clean cached target (distill/augment.py); all off by default."""

    hed: HedJitter = HedJitter()
    colour: ColourJitter = ColourJitter()
    blur: BlurJitter = BlurJitter()
    jpeg: JpegJitter = JpegJitter()
    local_crops: LocalCrops = LocalCrops()

    @property
    def enabled(self) -> bool:
        return any(getattr(self, kind).p > 0 for kind in ("hed", "colour", "blur", "jpeg")) or self.local_crops.n > 0


class DistillConfig(Strict):
    student: str = Field("vit_tiny_patch16_224", description="timm architecture of the student")
    student_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm create_model kwargs")
    init: str = Field("random:0", description="random:SEED, hf-hub:org/name, or a checkpoint file")
    runs: list[Path] = Field(default_factory=list, description="run directories whose tile and feature stores are composed into one training set, split by slide across all of them (none: the run itself); the student is written to RUN/student")
    teachers: list[str] | None = Field(None, description="teachers to distil (default: every store in RUN/features)")
    recipes: dict[str, str] = Field(default_factory=dict, description="teacher -> recipe (default: the first recipe)")
    nested_dims: list[int] | None = Field(None, description="default: powers of two from 16 to D, plus D")
    head: Literal["mlp", "linear"] = Field("mlp", description="each (teacher, m) head: mlp (LayerNorm, Linear, GELU, Linear) or linear (one Linear, LitePath's projector)")
    head_hidden: int | None = Field(None, gt=0, description="hidden width of the mlp heads (none: each teacher's target width, so a head's predictions are not confined to a narrower affine subspace)")
    tied_heads: bool = False
    teacher_weights: dict[str, float] = Field(default_factory=dict)
    dim_weights: dict[int, float] = Field(default_factory=dict)
    alpha: float = Field(0.9, ge=0, description="weight of (1 - cosine)")
    beta: float = Field(0.1, ge=0, description="weight of smooth-L1")
    spatial_weight: float = Field(0.0, ge=0, description="weight of the spatial (grid) loss beside the summary loss; 0: off (> 0 needs feature stores made with features.grid)")
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="masked-token regression: share of grid cells whose patches the student sees masked; 0: off")
    masked_weight: float = Field(1.0, ge=0, description="weight of the masked-cell regression term (distill.mask_ratio > 0; needs a ViT student)")
    koleo_weight: float = Field(0.0, ge=0, description="weight of the KoLeo regulariser on every prefix z[:m], beside the distillation loss (0: off; distill/koleo.py)")
    ema: float | None = Field(None, gt=0, lt=1, description="decay of an exponential moving average of the student and heads, validated beside them and kept in checkpoints (none: off; e.g. 0.999)")
    export_ema: bool = Field(False, description="export the EMA student and heads instead of the trained ones (needs ema)")
    standardize: Literal["phi-s", "zscore"] = "phi-s"
    standardize_sample: int = Field(4096, gt=1, description="rows sampled to fit the target standardizer")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    accumulation: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(30, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    val_slides: int = Field(1, ge=0, description="slides held out for validation")
    val_rows: int | None = Field(2048, gt=0, description="validation rows evaluated, each in every view of the stores, from evenly spaced chunks of the held-out slides (none: all)")
    eval_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0, description="steps between reads of the losses from the device (one host sync each); every step is still logged")
    pool_chunks: int = Field(8, gt=0, description="chunks loaded and shuffled together: more chunks, more slides per batch, more memory per reading thread")
    loader_workers: int = Field(1, ge=0, description="background loading workers")
    compile: bool = Field(False, description="torch.compile the student (needs a C compiler for inductor; pays off on GPUs over long runs)")
    augment: AugmentConfig = Field(AugmentConfig(), description="student-side augmentations, each its own loss term beside the exact-view one (distill/augment.py)")

    @model_validator(mode="after")
    def _head_and_ema_settings_agree(self) -> DistillConfig:
        if self.head == "linear" and self.head_hidden is not None:
            raise ValueError(f"head_hidden {self.head_hidden} is the hidden width of mlp heads; linear heads have none: remove head_hidden or set head: mlp")
        if self.export_ema and self.ema is None:
            raise ValueError("export_ema exports the EMA student, but ema is off: set distill.ema to a decay (e.g. 0.999) or export_ema: false")
        return self


class EvalDatasetConfig(Strict):
    name: str = Field(description="short name for tables, plots and the embedding cache")
    kind: Literal["imagefolder", "tile_store"] = Field(description="imagefolder: PATH/{train,val,test}/<class>/<image> (or PATH/<class>/<image> with split_file); tile_store: a tiles.zarr with a 'label' array")
    path: Path = Field(description="the dataset's folder or tile store")
    mpp: float | None = Field(None, gt=0, description="micrometres per pixel of its images; required for imagefolder (a tile store's own target mpp by default)")
    split_file: Path | None = Field(None, description="CSV with columns item,split (train, val or test); item: image path relative to PATH, or tile store row")


class EvaluateConfig(Strict):
    datasets: list[EvalDatasetConfig] = Field(default_factory=list, description="labelled sets; empty: the demo labelled set built from RUN/tiles.zarr (distill/evaluate/demo_set.py)")
    student: Path | None = Field(None, description="exported student directory (none: RUN/student)")
    students: list[Path] = Field(default_factory=list, description="more exported students evaluated beside `student` (e.g. one trained with augmentations), each labelled by its directory name (its run's name for RUN/student)")
    dims: list[int] | None = Field(None, description="student widths to evaluate (none: its nested dims)")
    teachers: list[str] | None = Field(None, description="registry teachers to compare with, weights from features.weights (none: features.teachers)")
    feature_stores: list[Path] = Field(default_factory=list, description="feature stores already computed, each evaluated on the labelled tile store it was computed from")
    probes: list[Literal["logreg", "knn", "linear"]] = Field(default_factory=lambda: ["logreg", "knn", "linear"], description="logistic regression (C chosen on val), kNN (cosine), eva's linear layer (AdamW)")
    seeds: int = Field(3, gt=0, description="runs of each seeded probe, reported as mean and std")
    knn_k: int = Field(20, gt=0, description="neighbours of the kNN probe")
    logreg_c: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], description="inverse regularisation strengths tried; the best on val is kept")
    linear_steps: int = Field(1000, gt=0, description="AdamW steps of the linear probe (eva: 12,500), early-stopped on val loss")
    linear_lr: float = Field(3e-4, gt=0, description="learning rate of the linear probe (eva: 3e-4)")
    linear_batch: int = Field(256, gt=0, description="batch size of the linear probe (eva: 256)")
    retrieval_k: list[int] = Field(default_factory=lambda: [1, 5], description="k of top-k same-class retrieval (test queries against train)")
    pairs: Path | None = Field(None, description="paired tiles for robustness: PATH/<condition>/<image>, the same file names under every condition; none: a stain/scanner proxy made from tiles of the first dataset")
    pairs_mpp: float | None = Field(None, gt=0, description="micrometres per pixel of the paired tiles")
    pair_tiles: int = Field(64, gt=1, description="tiles of the robustness pairs (sampled when there are more)")
    pair_k: list[int] = Field(default_factory=lambda: [1, 3, 5, 10], description="k of the PLISM top-k pair retrieval")
    fidelity_rows: int | None = Field(None, gt=0, description="held-out rows fidelity is re-measured on (none: the run's distill.val_rows, which reproduces its final validation)")
    batch_size: int = Field(32, gt=0, description="images per forward pass")


class Config(Strict):
    run: Path = Field(Path("runs/demo"), description="the run directory")
    slides: list[Path] = Field(default_factory=list, description="slide files, folders, or manifests (CSV/YAML: path, mpp)")
    tiling: TilingConfig = TilingConfig()
    tissue: TissueConfig = TissueConfig()
    store: StoreConfig = StoreConfig()
    ray: RayConfig = RayConfig()
    features: FeaturesConfig = FeaturesConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @property
    def training_runs(self) -> list[Path]:
        """The runs distill trains on: distill.runs, or the run itself."""
        return list(self.distill.runs) or [self.run]


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (default: the demo config), apply dotted-key overrides, validate."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{path}: {problems}") from error
