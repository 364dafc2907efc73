"""`distill`: train a nested (Matryoshka) student on cached teacher features, on one node.

run_distill reads top to bottom like nanoGPT's train.py: open and check the stores, split slides,
fit one target standardizer per teacher, build student + nested heads + AdamW, then per step: the
learning rate from the schedule, `accumulation` micro-batches forward and backward, gradient
clipping (the pre-clip norm is logged), an AdamW step, the EMA update (distill.ema); validation on
held-out slides every eval_every steps, a checkpoint every checkpoint_every steps; at the end export,
plots and report.

Several GPUs of one node: run the same code under torchrun. Each rank reads only its own pools of
the epoch (BlockShuffleLoader) in batches of batch_size / world size, so the global batch stays
batch_size; DDP averages the gradients, and rank 0 alone validates and writes files.

The loop never waits on the device for a number: each step's losses and gradient norm stay on the
device and are read (one host sync, one all-reduce) every log_every steps and at validation and
checkpoint steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Iterable
from contextlib import closing, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distill.augment import Augmented, augment, augment_generator, augment_loss, check_crops_fit
from distill.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint
from distill.data import BlockShuffleLoader, DistillData, Rows, open_distill_data, target_sample, validation_batches
from distill.ema import EMA
from distill.export import export_student
from distill.koleo import nested_koleo
from distill.losses import Parts, nested_distill_loss, spatial_distill_loss
from distill.scores import HeldOutScores
from distill.spatial import SpatialHeads, draw_masked_cells, grid_sample, validate_grid
from distill.standardize import Standardizer, fit_standardizer
from distill.student import NestedHeads, Student
from distill.train_log import MetricsLog, describe_changes, grad_norm_summary, plot_metrics, write_report
from pipeline.config import Config, ConfigError, DistillConfig
from pipeline.console import console, progress_bar
from pipeline.files import write_text_atomically
from pipeline.locks import exclusive
from pipeline.precision import autocast
from pipeline.run_report import append_stage_record
from pipeline.stores import RunDir, StoreError, now
from pipeline.weights import WeightsError

SUMMARY = "summary.json"  # the finished run's summary, returned again when a finished run is resumed
SPEED_SAMPLES = 512  # samples the loader is timed on, alone, for the report
SPEED_STEPS = 5  # training steps timed alone, on one in-memory batch, for the report
# The distill settings a resumed run may change without being told to: how long it runs, how often it
# validates and saves, how many threads read ahead, and where its runs are (`runs`: the checkpoint's data
# identity, every run's tile store id, must still match). None changes what a step computes, except that a
# new `steps` re-times the cosine decay from the resumed step on (and export_ema changes only which
# weights are exported at the end). Any other change (lr, warmup, batch size, accumulation, seed, loss
# weights, student, dims, teachers, recipes, ...) means the checkpoint was trained differently from
# what the config now says: it is refused, naming each difference, unless accepted with --resume-with-changes. Every change, allowed or accepted, is kept in the run's settings
# history (checkpoints, summary.json, report.md, student.json) from the step it took effect.
CHANGEABLE_ON_RESUME = frozenset({"steps", "eval_every", "checkpoint_every", "log_every", "loader_workers", "runs", "export_ema"})


@dataclass(frozen=True)
class World:
    """This process among torchrun's processes; a plain run is rank 0 of 1."""

    rank: int
    size: int
    device: torch.device

    @classmethod
    def from_env(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        if size > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank() if size > 1 else 0, size, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(values)
            values /= self.size
        return values

    def close(self) -> None:
        if self.size > 1:
            dist.destroy_process_group()


class Distiller(nn.Module):
    """Student, nested heads and per-teacher target standardizers as one module: `inputs` turns rows
    into the student's pixels and standardized targets (`grid_targets`: grids; `augmented`: augmented
    copies of the pixels, distill/augment.py); `forward` returns the loss, so DDP sees every trained
    parameter used inside forward, with what is logged of it: the distillation parts per (teacher, m)
    and the other terms' unweighted values by name (e.g. "koleo").

    With `spatial` heads the loss adds distill.spatial_weight x the spatial term and, when
    distill.mask_ratio > 0, distill.masked_weight x the masked-cell term, on a second forward of the
    same images with cells masked; their parts are keyed ("grid", teacher, m) and ("masked", teacher, m).
    Given augmented inputs it adds each augmentation's weighted term, parts keyed ("augment", term)."""

    def __init__(
        self, student: Student, heads: NestedHeads, standardizers: dict[str, Standardizer], settings: DistillConfig,
        spatial: SpatialHeads | None = None,
    ):
        super().__init__()
        self.student, self.heads = student, heads
        self.standardizers = nn.ModuleDict(standardizers)
        self.spatial = spatial
        self.loss_weights = dict(
            teacher_weights=settings.teacher_weights, dim_weights=settings.dim_weights, alpha=settings.alpha, beta=settings.beta
        )
        self.spatial_weight, self.mask_ratio, self.masked_weight = settings.spatial_weight, settings.mask_ratio, settings.masked_weight
        self.koleo_weight = settings.koleo_weight
        self.augment = settings.augment

    def inputs(self, batch: Rows) -> tuple[Tensor, dict[str, Tensor]]:
        device = next(self.parameters()).device
        images = self.student.preprocess(to_device(batch.tiles, device))
        targets = {t: self.standardizers[t](to_device(y, device)) for t, y in batch.targets.items()}
        return images, targets

    def grid_targets(self, batch: Rows) -> dict[str, Tensor]:
        """Each teacher's standardized grid [B, k*k, C]; {} without spatial heads."""
        if self.spatial is None:
            return {}
        device = next(self.parameters()).device
        return self.spatial.targets({t: to_device(grid, device) for t, grid in batch.grids.items()})

    def augmented(self, batch: Rows, generator: torch.Generator) -> Augmented:
        """The rows' augmented copies, drawn from `generator`; the rows and their targets stay as they are."""
        return augment(self.student.pixels(to_device(batch.tiles, next(self.parameters()).device)), self.augment, generator)

    def forward(
        self, images: Tensor, targets: dict[str, Tensor], grids: dict[str, Tensor] | None = None, augmented: Augmented | None = None,
    ) -> tuple[Tensor, Parts, dict[str, Tensor]]:
        z, tokens = self.student.forward_tokens(images) if self.spatial is not None else (self.student(images), None)
        loss, parts = nested_distill_loss(z, self.heads, targets, **self.loss_weights)
        terms = {}
        if self.spatial is not None:
            spatial, spatial_parts = spatial_distill_loss(self.spatial.cells(tokens), self.spatial.heads, grids, **self.loss_weights)
            loss = loss + self.spatial_weight * spatial
            parts.update({("grid", *key): part for key, part in spatial_parts.items()})
        if self.spatial is not None and self.mask_ratio > 0:
            masked_cells = draw_masked_cells(len(images), self.spatial.k, self.mask_ratio, images.device)
            _, masked_tokens = self.student.forward_tokens(images, masked_cells)
            masked, masked_parts = spatial_distill_loss(
                self.spatial.cells(masked_tokens), self.spatial.heads, grids, **self.loss_weights, where=masked_cells
            )
            loss = loss + self.masked_weight * masked
            parts.update({("masked", *key): part for key, part in masked_parts.items()})
        if augmented is not None:
            extra, extra_parts = augment_loss(
                lambda pixels: self.student(self.student.normalise(pixels)), self.heads, augmented, targets, self.augment, self.loss_weights
            )
            loss = loss + extra
            parts.update(extra_parts)
        if self.koleo_weight:
            terms["koleo"] = nested_koleo(z, self.heads.nested_dims)
            loss = loss + self.koleo_weight * terms["koleo"]
        return loss, parts, {name: value.detach() for name, value in terms.items()}


def to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """A host array on `device`. On CUDA through pinned memory and a non-blocking copy: torch's caching
    host allocator keeps the pinned block until the copy has run, so the loop does not wait for it."""
    tensor = torch.from_numpy(values)
    if not torch.cuda.is_available():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def run_distill(config: Config, resume: bool = False, accept_changes: bool = False) -> dict:
    """Train RUN/student/ from RUN/tiles.zarr and RUN/features/; `resume` continues from the newest
    checkpoint exactly as if the run had not stopped, with the settings it was trained with (see
    CHANGEABLE_ON_RESUME; `accept_changes` lets any of them change). Returns the run's summary (rank 0;
    {} on others). Rank 0 holds the run's distill lock, so a second run on this directory is refused at once."""
    world = World.from_env()
    with exclusive(RunDir.of(config).lock("distill")) if world.is_main else nullcontext():
        return _distill(config, resume, accept_changes, world)


def _distill(config: Config, resume: bool, accept_changes: bool, world: World) -> dict:
    started = time.perf_counter()
    settings = config.distill
    run = RunDir.of(config)
    out_dir = run.student
    if settings.batch_size % world.size:
        raise ConfigError(f"distill.batch_size {settings.batch_size} must be a multiple of the {world.size} processes")
    data = open_distill_data(config.training_runs, settings)
    found = latest_checkpoint(out_dir / "checkpoints")
    if found and not resume:
        raise StoreError(f"{out_dir} holds checkpoints of an earlier run: resume it (--resume), or move {out_dir} away to start over")
    checkpoint = load_checkpoint(found) if found else None
    if checkpoint and checkpoint["data"] != data_identity(data):
        raise StoreError(f"{found} was trained on other data ({checkpoint['data']}); move {out_dir} away to start over")
    if checkpoint:
        require_same_parameters(checkpoint, found, data, settings)
    history = settings_history(settings, found, checkpoint, accept_changes)
    if world.is_main and history[-1]["changed"] and checkpoint:
        console.print(f"resuming {found.name} with changed settings: {describe_changes(history[-1]['changed'])}")
    if checkpoint and checkpoint["step"] >= settings.steps and (out_dir / SUMMARY).is_file():
        world.close()  # resuming a finished run is a no-op: its export, plots and report stay as they were
        if world.is_main:
            console.print(f"{out_dir} already finished its {settings.steps} steps; nothing to do")
        return json.loads((out_dir / SUMMARY).read_text()) if world.is_main else {}

    seed_everything(settings.seed)
    student = build_student(settings, data.tile_px)
    heads = NestedHeads(data.widths, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    if checkpoint:
        standardizers = {t: Standardizer.from_state(state) for t, state in checkpoint["standardizers"].items()}
    else:
        standardizers = {
            t: fit_standardizer(target_sample(data, t, settings.standardize_sample, settings.seed), settings.standardize)
            for t in data.recipes
        }
    spatial = spatial_heads(data, student, settings, checkpoint) if data.grid_widths else None
    model = Distiller(student, heads, standardizers, settings, spatial).to(world.device)
    if settings.compile:
        compile_student(model)
    optimizer = make_optimizer(model, settings)
    loader = training_loader(data, settings, world, checkpoint["loader"] if checkpoint else None)
    step = 0
    if checkpoint:
        model.student.load_state_dict(checkpoint["student"])
        model.heads.load_state_dict(checkpoint["heads"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        restore_rng(checkpoint["rng"])
        step = checkpoint["step"]
        if world.is_main:
            console.print(f"resuming {out_dir} from {found.name} (step {step} of {settings.steps})")
    ema = EMA(model, settings.ema) if settings.ema else None
    if ema and checkpoint and "ema" in checkpoint:  # a checkpoint saved without EMA starts it from the resumed weights
        ema.load_state_dict(checkpoint["ema"])
    # The buffers (standardizers) are equal on every rank and never change: no need to sync them every step.
    training = DistributedDataParallel(model, forward_sync_buffers=False) if world.size > 1 else model
    log = MetricsLog(out_dir / "metrics.jsonl", keep_through=step if checkpoint else -1) if world.is_main else None
    if log and not checkpoint:
        log.append({"kind": "split", "step": 0, **data.split.as_record()})
        (out_dir / "split.json").write_text(json.dumps(data.split.as_record(), indent=2) + "\n")

    def evaluate() -> None:
        scores, rows = validate(model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
        record = {"kind": "eval", "step": step, "rows": rows, "val": scores}
        if spatial:
            record["grid_val"] = validate_grid(model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
        if ema:
            record["ema"], _ = validate(ema.model, validation_batches(data, settings.batch_size, settings.val_rows), settings.precision)
        log.append(record)

    first_step, loop_started = step, time.perf_counter()
    unread: list[tuple[int, float, int, Tensor]] = []  # (step, lr, distinct slides, [grad norm, loss, terms, parts] on the device) not yet logged
    stretch_started = loop_started
    with progress_bar() if world.is_main else nullcontext() as bar, closing(iter(loader)) as batches:
        task = bar.add_task("distill", total=settings.steps, completed=step, rate="") if bar else None
        if log and step == 0 and data.split.val:
            evaluate()
        while step < settings.steps:
            lr = learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logged = 0.0  # becomes [total, *other terms, *part losses] of the step, averaged over its micro-batches
            slides = []
            for micro in range(settings.accumulation):
                last = micro == settings.accumulation - 1
                batch = next(batches)
                slides.append(batch.slides)
                generator = augment_generator(settings.augment, settings.seed, step, micro, world.rank)
                with training.no_sync() if world.size > 1 and not last else nullcontext():
                    loss, parts, terms = forward_backward(training, model, batch, settings, generator)
                logged = logged + torch.stack([loss, *terms.values(), *(part["loss"] for part in parts.values())]).float() / settings.accumulation
            grad_norm = optimizer_step(model, optimizer, settings)
            if ema:
                ema.update(model)
            step += 1
            unread.append((step, lr, len(np.unique(np.concatenate(slides))), torch.cat([grad_norm.float().reshape(1), logged])))
            validating = bool(data.split.val) and (step % settings.eval_every == 0 or step == settings.steps)
            saving = step % settings.checkpoint_every == 0 or step == settings.steps
            if bar:
                bar.update(task, completed=step)
            if not (validating or saving or step % settings.log_every == 0):
                continue
            values = world.mean(torch.stack([losses for *_, losses in unread])).tolist()  # the one host sync
            samples_per_s = len(unread) * settings.batch_size * settings.accumulation / (time.perf_counter() - stretch_started)
            if world.is_main:
                for (logged_step, logged_lr, distinct, _), (norm, total, *rest) in zip(unread, values):
                    log.append({
                        "kind": "train", "step": logged_step, "loss": total, "lr": logged_lr, "samples_per_s": samples_per_s,
                        "slides": distinct, **losses_by_term(parts, rest[len(terms):]), "grad_norm": norm, **dict(zip(terms, rest)),
                    })
                bar.update(task, rate=f"loss {values[-1][1]:.4f}, {samples_per_s:.0f} samples/s")
                if validating:
                    evaluate()
                if saving:
                    save_checkpoint(out_dir / "checkpoints", step, checkpoint_state(step, model, optimizer, loader, data, history, ema))
            unread, stretch_started = [], time.perf_counter()
    trained_seconds = time.perf_counter() - loop_started
    world.close()
    if not world.is_main:
        return {}

    records = log.read()
    last_eval = next((r for r in reversed(records) if r["kind"] == "eval"), {})
    exported, weights = (ema.model, "ema") if settings.export_ema else (model, "trained")
    final_val = last_eval.get("ema" if settings.export_ema else "val", {})  # the exported weights' scores
    final_grid_val = last_eval.get("grid_val", {})
    export_student(exported.student, out_dir, export_meta(data, settings, history, final_val, final_grid_val, weights), standardizers, exported.heads, exported.spatial)
    speed = {
        **measure_speeds(model, training_loader(data, settings, World(0, 1, world.device)), settings),
        "training": (step - first_step) * settings.batch_size * settings.accumulation / trained_seconds if step > first_step else 0.0,
        "loader_workers": settings.loader_workers,
    }
    plot_metrics(records, out_dir / "plots", settings.grad_clip)
    summary = {
        "student_dir": str(out_dir),
        "student": {
            "arch": student.arch, "timm_kwargs": student.timm_kwargs, "width": student.width,
            "nested_dims": student.nested_dims, "params": sum(p.numel() for p in student.parameters()),
        },
        "teachers": {
            t: {"recipe": data.recipes[t], "width": w, "stand_in": data.teacher_specs[t].get("stand_in")} for t, w in data.widths.items()
        },
        "settings": settings.model_dump(mode="json"),
        "settings_history": history,
        "input_px": data.tile_px,
        "target_mpp": data.tiling.target_mpp,
        "views": len(data.views),
        "world_size": world.size,
        "data": data.describe(),
        "split": data.split.as_record(),
        "composition": data.composition(),
        "rows": {"train": loader.rows_per_epoch, "val": int(data.rows_of(data.split.val).sum())},
        "loader": {"pool_chunks": settings.pool_chunks, "workers": settings.loader_workers, "slides_per_batch": loader.mix.as_record()},
        "steps": step,
        "resumed_from": first_step,
        "final_val": final_val,
        "final_grid_val": final_grid_val,
        "exported_weights": weights,
        "final_val_by_weights": {name: last_eval[key] for name, key in (("trained", "val"), ("ema", "ema")) if key in last_eval},
        "grad_norm": grad_norm_summary(records, settings.grad_clip),
        "speed": speed,
        "wall_seconds": time.perf_counter() - started,
    }
    write_report(out_dir / "report.md", summary)
    write_text_atomically(out_dir / SUMMARY, json.dumps(summary, indent=2, default=str))
    append_stage_record(run.root, {
        "stage": "distill",
        "finished": now(),
        "student_dir": str(out_dir),
        "rows": summary["rows"],
        "steps": step,
        "resumed_from": first_step,
        "wall_seconds": round(summary["wall_seconds"], 3),
        "samples_per_second": round(speed["training"], 2),
        "loader_samples_per_second": round(speed["loader"], 2),
        "step_samples_per_second": round(speed["step"], 2),
        "final_val": final_val,
        "final_grid_val": final_grid_val,
    })
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_student(settings: DistillConfig, tile_px: int) -> Student:
    """The configured student, refused with the key to fix when it cannot take these tiles or dims, or
    cannot mask patches when distill.mask_ratio asks it to."""
    try:
        student = Student(settings.student, settings.student_kwargs, settings.nested_dims, settings.init, mask_token=settings.mask_ratio > 0)
    except (ValueError, WeightsError) as error:
        raise ConfigError(f"distill.student / nested_dims / init: {error}") from error
    if set(settings.dim_weights) - set(student.nested_dims):
        raise ConfigError(f"distill.dim_weights names dims {sorted(settings.dim_weights)}; the nested dims are {student.nested_dims}")
    patch_embed = getattr(student.backbone, "patch_embed", None)
    if getattr(patch_embed, "strict_img_size", False) and tuple(patch_embed.img_size) != (tile_px, tile_px):
        raise ConfigError(
            f"student {settings.student} takes {tuple(patch_embed.img_size)} px images but the tiles are {tile_px} px: "
            f"set distill.student_kwargs.img_size: {tile_px} (or dynamic_img_size: true)"
        )
    check_crops_fit(settings.augment, patch_embed, tile_px)
    return student


def spatial_heads(data: DistillData, student: Student, settings: DistillConfig, checkpoint: dict | None) -> SpatialHeads:
    """The checkpoint's spatial heads, or new ones whose grid standardizers are fitted on a sample of cells.
    The student's cell tokens give every head its first m dims, so they must be D wide as z is."""
    token_width = student.backbone.num_features  # timm: the width of forward_features' tokens or feature map
    if token_width != student.width:
        raise ConfigError(
            f"student {settings.student} has patch tokens {token_width} wide but an embedding of D={student.width}: "
            "its nested dims cannot index its grid cells; choose a student whose tokens are D wide (a ViT) or set "
            "distill.spatial_weight: 0 and distill.mask_ratio: 0"
        )
    if checkpoint:
        spatial = SpatialHeads.from_state(checkpoint["spatial"])
        if spatial.k != data.grid or {t: s.width for t, s in spatial.standardizers.items()} != data.grid_widths:
            raise StoreError(f"the checkpoint's spatial heads are for a {spatial.k} x {spatial.k} grid, the feature stores hold {data.grid} x {data.grid}: move RUN/student away to start over")
        return spatial
    heads = NestedHeads(data.grid_widths, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    standardizers = {
        t: fit_standardizer(grid_sample(data, t, settings.standardize_sample, settings.seed), settings.standardize) for t in data.grid_widths
    }
    return SpatialHeads(data.grid, heads, standardizers)


def require_same_parameters(checkpoint: dict, found: Path, data: DistillData, settings: DistillConfig) -> None:
    """A resumed run goes on with the parameters it trained: the spatial and masked terms can be
    reweighted (distill.spatial_weight, masked_weight, mask_ratio within (0, 1)), not switched on or off."""
    for what, trained, asked in (
        ("spatial heads (distill.spatial_weight or mask_ratio > 0)", "spatial" in checkpoint, bool(data.grid_widths)),
        ("a mask token (distill.mask_ratio > 0)", "mask_token" in checkpoint["student"], settings.mask_ratio > 0),
    ):
        if trained != asked:
            raise ConfigError(
                f"{found} was trained {'with' if trained else 'without'} {what} and the config now asks for the opposite: "
                f"restore the setting to resume, or move {found.parent.parent} away to start over"
            )


def losses_by_term(keys: Iterable[tuple], values: Iterable[float]) -> dict[str, dict[str, dict[str, float]]]:
    """A step's logged part losses by term: {"loss_by_dim": {teacher: {m: loss}}} for the summary parts
    (keyed (teacher, m)), and "grid_loss_by_dim" / "masked_loss_by_dim" for the spatial ones (keyed
    ("grid" | "masked", teacher, m)), and "augment_loss": {term: loss} for the augmentations' (keyed
    ("augment", term), a name where the summary parts have a dim)."""
    terms: dict[str, dict] = {}
    for key, value in zip(keys, values):
        if isinstance(key[-1], str):  # ("augment", term): distill/augment.py's terms
            terms.setdefault("augment_loss", {})[key[1]] = value
            continue
        name = "loss_by_dim" if len(key) == 2 else f"{key[0]}_loss_by_dim"
        teacher, m = key[-2:]
        terms.setdefault(name, {}).setdefault(teacher, {})[str(m)] = value
    return terms


def training_loader(data: DistillData, settings: DistillConfig, world: World, state: dict | None = None) -> BlockShuffleLoader:
    """This rank's loader: its own pools, in batches of its share of the global batch."""
    return BlockShuffleLoader(
        data, data.rows_of(data.split.train), settings.batch_size // world.size, settings.pool_chunks, settings.loader_workers,
        settings.seed, state, world.rank, world.size,
    )


def compile_student(model: Distiller) -> None:
    """torch.compile the student in place (``nn.Module.compile``): its parameters and state_dict keys stay
    as they are, so checkpoints, resume and export do not see it. The first steps pay for compiling
    (minutes for a ViT on a CPU; validation compiles once more): it pays off on GPUs over long runs."""
    model.student.compile()


def make_optimizer(model: nn.Module, settings: DistillConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings, none on biases and norms (as nanoGPT);
    fused (one kernel for every parameter instead of a loop over them) when the parameters are on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, fused=all(p.is_cuda for p in params))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state, keeping this machine's kernel choice: load_state_dict would take the
    saved ``fused`` flag too, and a run saved on a GPU may resume on a CPU or the other way round."""
    fused = [group["fused"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, fused, strict=True):
        group["fused"] = keep


def learning_rate(step: int, settings: DistillConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to zero at `steps`. A pure function of
    the step, so the schedule needs no state of its own in checkpoints."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def forward_backward(
    training: nn.Module, model: Distiller, batch: Rows, settings: DistillConfig, generator: torch.Generator | None = None,
) -> tuple[Tensor, Parts, dict[str, Tensor]]:
    """Loss of one micro-batch (with Distiller.forward's parts and terms), its gradient added (scaled for
    accumulation); `training` is `model` or its DDP wrapper; with a `generator` (augment_generator) the
    batch is also augmented."""
    images, targets = model.inputs(batch)
    grids = model.grid_targets(batch)
    augmented = model.augmented(batch, generator) if generator is not None else None
    with autocast(images.device.type, settings.precision):
        loss, parts, terms = training(images, targets, grids, augmented)
    (loss / settings.accumulation).backward()
    return loss.detach(), parts, terms


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, settings: DistillConfig) -> Tensor:
    """Clip the gradient to norm grad_clip, step, clear; returns the norm before clipping, on the device."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()


@torch.no_grad()
def validate(model: Distiller, batches: Iterable[Rows], precision: str) -> tuple[dict, int]:
    """Per teacher and nested dim, between each head's output and the standardized target (the space
    the loss works in): the mean cosine over rows, and R^2 = 1 - SSE / SST summed over all dims, SST
    around the validation mean (distill/scores.py); and in the teacher's own space, `cos_raw`, the mean
    cosine between the inverse-standardized output and the stored target. Returns ({teacher: {m: {"cos",
    "cos_raw", "r2"}}}, rows), a row counted once per view it is shown in."""
    was_training = model.training
    model.eval()
    scores = HeldOutScores()
    for batch in batches:
        images, targets = model.inputs(batch)
        with autocast(images.device.type, precision):
            predictions = model.heads(model.student(images))
        raw = {key: model.standardizers[key[0]].inverse(prediction.float()) for key, prediction in predictions.items()}
        scores.add(predictions, targets, raw, {t: to_device(y, images.device) for t, y in batch.targets.items()})
    model.train(was_training)
    return scores.result(), scores.samples


def data_identity(data: DistillData) -> dict:
    """What a checkpoint must have been trained on to be resumed."""
    return {
        "tile_store_ids": [source.tile_attrs.store_id for source in data.sources], "recipes": data.recipes,
        "val_slides": [[s.tile_store_id, s.record.id] for s in data.split.val],
    }


def settings_history(settings: DistillConfig, found: Path | None, checkpoint: dict | None, accept_changes: bool) -> list[dict]:
    """The settings each stretch of the run is trained with, oldest first: {"from_step", "settings",
    "changed": {key: [before, now]}}. Resuming with settings other than the checkpoint's adds a stretch,
    refused (ConfigError naming each difference) if a key outside CHANGEABLE_ON_RESUME changed and
    `accept_changes` is not set."""
    current = settings.model_dump(mode="json")
    if checkpoint is None:
        return [{"from_step": 0, "settings": current, "changed": {}}]
    if "settings_history" not in checkpoint:
        raise StoreError(f"{found} does not record the settings it was trained with (an older pathdistill wrote it); move {found.parent.parent} away to start over")
    history, step = checkpoint["settings_history"], checkpoint["step"]
    trained = history[-1]["settings"]
    changed = {key: [trained.get(key), value] for key, value in current.items() if trained.get(key) != value}
    if not changed:
        return history
    refused = {key: change for key, change in changed.items() if key not in CHANGEABLE_ON_RESUME}
    if refused and not accept_changes:
        differences = "; ".join(f"distill.{key}: {before!r} -> {value!r}" for key, (before, value) in refused.items())
        raise ConfigError(
            f"{found} was trained with other settings than the config now gives: {differences} (checkpoint value -> now). "
            f"Restore them to resume as trained, or resume with --resume-with-changes to train on with the new ones from step {step} "
            "(recorded in the run's settings history)"
        )
    if settings.steps < step:
        raise ConfigError(f"distill.steps {settings.steps} is below step {step} of {found}: a run cannot end before where it stands")
    return [*history, {"from_step": step, "settings": current, "changed": changed}]


def checkpoint_state(
    step: int, model: Distiller, optimizer: torch.optim.Optimizer, loader: BlockShuffleLoader, data: DistillData, history: list[dict],
    ema: EMA | None = None,
) -> dict:
    """Everything a resumed run continues from (the EMA's whole state too, when on), and the settings history it was trained with."""
    return {
        **({"ema": ema.state_dict()} if ema else {}),
        "step": step,
        "student": model.student.state_dict(),
        "heads": model.heads.state_dict(),
        "standardizers": {t: s.state_dict() for t, s in model.standardizers.items()},
        **({"spatial": model.spatial.state()} if model.spatial else {}),
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "rng": rng_state(),
        "data": data_identity(data),
        "settings_history": history,
    }


def export_meta(data: DistillData, settings: DistillConfig, history: list[dict], final_val: dict, final_grid_val: dict, weights: str) -> dict:
    """student.json's training record; `weights` says which were exported ("trained" or "ema") and `final_val` is theirs."""
    return {
        "exported_weights": weights,
        "input_px": data.tile_px,
        "target_mpp": data.tiling.target_mpp,
        "distilled_from": {t: {"recipe": data.recipes[t], "spec": data.teacher_specs[t]} for t in data.recipes},
        "views": data.views,
        "composition": data.composition(),
        "split": data.split.as_record(),
        "final_val": final_val,
        "final_grid_val": final_grid_val,
        "distill": settings.model_dump(mode="json"),
        "distill_history": history,
    }


def measure_speeds(model: Distiller, loader: BlockShuffleLoader, settings: DistillConfig) -> dict[str, float]:
    """Samples/s of the loader alone (from the start, with its worker threads) and of the training
    step alone (augmentations, forward, backward, AdamW on a copy of the model, one batch already in memory)."""
    count = max(1, SPEED_SAMPLES // settings.batch_size)
    clock = time.perf_counter()
    with closing(iter(loader)) as batches:
        batch = next(batches)
        for _ in islice(batches, count - 1):
            pass
    loader_rate = count * settings.batch_size / (time.perf_counter() - clock)
    copied = copy.deepcopy(model)  # a compiled student's copy runs compiled, on its own parameters
    optimizer = make_optimizer(copied, settings)
    for index in range(SPEED_STEPS + 1):  # the first step warms up
        if index == 1:
            clock = time.perf_counter()
        forward_backward(copied, copied, batch, settings, augment_generator(settings.augment, settings.seed, index, 0, 0))
        optimizer_step(copied, optimizer, settings)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"loader": loader_rate, "step": SPEED_STEPS * settings.batch_size / (time.perf_counter() - clock)}
