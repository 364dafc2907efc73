"""The exported student: backbone weights that plain timm loads, and what is needed to use them.

RUN/student/
  student.safetensors  the backbone's state dict in timm's key names
  model.safetensors    the same file (a hard link) under the name timm and the Hugging Face hub use
  config.json          timm's config: architecture, model_args, and a pretrained_cfg whose input is
                       exactly the training input (input_size, crop_pct 1.0, mean, std), so that
                         timm.create_model("local-dir:RUN/student", pretrained=True)
                       and timm.data.resolve_model_data_config give the student as it was trained;
                       its "pathdistill" entry records the nested dims, width, target mpp and
                       the composition of the training set (each run's path, stores, slides, rows)
  student.json         pathdistill.student/1: arch, timm_kwargs, width D, nested_dims M, input px,
                       target mpp, input mean/std, teachers (target width, standardizer kind), heads
                       (kind, hidden width per teacher, tied; a student exported before head kinds
                       existed records one hidden int and no kind, and loads as MLP heads), and from
                       training the split and composition (distill/cohort.py) and which weights were
                       exported (trained or EMA)
  heads.safetensors    heads and standardizers: to continue training, or to emulate the teachers
                       (``load_emulator(path).emulate(x, teacher, dim)``) from the student alone;
                       with spatial distillation also the spatial heads and grid standardizers
                       (``grid_heads.``, ``grid_standardizers.``, ``load_spatial_heads``) and the
                       mask token (``mask_token``), which is no timm backbone weight
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from distill.spatial import SpatialHeads
from distill.standardize import Standardizer
from distill.student import NestedHeads, Student
from pipeline.errors import PathdistillError
from pipeline.files import atomic_path, write_text_atomically
from pipeline.weights import WeightsError

SCHEMA = "pathdistill.student/1"
TIMM_WEIGHTS = "model.safetensors"  # the file names timm's local-dir: and the Hugging Face hub read
TIMM_CONFIG = "config.json"
TIMM_INTERPOLATION = "bicubic"  # only for inputs larger than the student's: tiles at its mpp and px are not resampled
REQUIRED_META = ("input_px", "target_mpp")
TIMM_RECORD_KEYS = ("width", "nested_dims", "input_px", "target_mpp", "composition")  # student.json keys repeated in config.json


class StudentError(PathdistillError, ValueError):
    """The path given holds no usable exported student, or the student cannot do what was asked."""


def export_student(
    student: Student,
    out_dir: str | Path,
    meta: Mapping[str, Any],
    standardizers: Mapping[str, Standardizer],
    heads: NestedHeads,
    spatial: SpatialHeads | None = None,
) -> Path:
    """Write the three files (each atomically, student.json last) and return the path of student.json.
    `meta` must hold REQUIRED_META and may add JSON-able keys (teacher specs, training config, ...)."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"export meta lacks {missing}: the student cannot be used without them")
    if set(standardizers) != set(heads.teacher_widths):
        raise ValueError(f"standardizers for {sorted(standardizers)} but heads for {sorted(heads.teacher_widths)}")
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "arch": student.arch,
        "timm_kwargs": student.timm_kwargs,
        "width": student.width,
        "nested_dims": student.nested_dims,
        "mean": list(student.mean),
        "std": list(student.std),
        "teachers": {name: {"width": s.width, "standardizer": s.kind} for name, s in standardizers.items()},
        "heads": heads.record(),
    }
    if spatial is not None:
        record["grid"] = {
            "k": spatial.k, "teachers": {name: {"width": s.width, "standardizer": s.kind} for name, s in spatial.standardizers.items()},
            "heads": spatial.heads.record(),
        }
    clashing = sorted(set(meta) & set(record))
    if clashing:
        raise ValueError(f"export meta must not set {clashing}: export writes them from the student")
    record.update(meta)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tensors(student.backbone.state_dict(), out_dir / "student.safetensors")
    _link_or_copy(out_dir / "student.safetensors", out_dir / TIMM_WEIGHTS)
    _save_timm_config(student, record, out_dir / TIMM_CONFIG)
    head_state = nn.ModuleDict({"heads": heads, "standardizers": nn.ModuleDict(standardizers)}).state_dict()
    if spatial is not None:
        head_state.update({f"grid_{key}": value for key, value in spatial.state_dict().items()})  # grid_heads., grid_standardizers.
    if student.mask_token is not None:
        head_state["mask_token"] = student.mask_token
    _save_tensors(head_state, out_dir / "heads.safetensors")
    json_path = out_dir / "student.json"
    write_text_atomically(json_path, json.dumps(record, indent=2) + "\n")
    return json_path


def load_student(path: str | Path) -> Student:
    """The exported student (directory or its student.json) in eval mode, ready for embed(x, dim=m)."""
    directory, record = read_student_json(path)
    weights = directory / "student.safetensors"
    try:
        return Student(
            record["arch"], record["timm_kwargs"], record["nested_dims"], init=str(weights), mean=record["mean"], std=record["std"]
        ).eval()
    except (ValueError, WeightsError) as error:  # weights missing, or not those student.json describes
        raise StudentError(f"the student in {directory} cannot be loaded: {error}; export it again") from error


def load_heads(path: str | Path) -> tuple[NestedHeads, dict[str, Standardizer]]:
    """The heads and the per-teacher standardizers exported next to the student."""
    directory, record = read_student_json(path)
    tensors = safetensors.torch.load_file(directory / "heads.safetensors")
    widths = {name: teacher["width"] for name, teacher in record["teachers"].items()}
    heads = NestedHeads(widths, record["nested_dims"], **record["heads"])
    heads.load_state_dict(_under(tensors, "heads."))
    standardizers = {name: Standardizer.from_state(_under(tensors, f"standardizers.{name}.")) for name in widths}
    return heads.eval(), standardizers


def load_spatial_heads(path: str | Path) -> SpatialHeads | None:
    """The spatial heads and grid standardizers exported next to the student; None if it had none."""
    directory, record = read_student_json(path)
    if "grid" not in record:
        return None
    tensors = safetensors.torch.load_file(directory / "heads.safetensors")
    grid = record["grid"]
    standardizers = {name: Standardizer.from_state(_under(tensors, f"grid_standardizers.{name}.")) for name in grid["teachers"]}
    heads = NestedHeads({name: teacher["width"] for name, teacher in grid["teachers"].items()}, record["nested_dims"], **grid["heads"])
    heads.load_state_dict(_under(tensors, "grid_heads."))
    return SpatialHeads(grid["k"], heads, standardizers).eval()


@dataclass(frozen=True)
class TeacherEmulator:
    """The student with its heads and standardizers: predictions in each teacher's own feature space."""

    student: Student
    heads: NestedHeads
    standardizers: dict[str, Standardizer]

    def emulate(self, images: Tensor, teacher: str, dim: int) -> Tensor:
        """What ``teacher`` would output for normalised ``images``, predicted from the first ``dim`` dims
        of the student's embedding: student -> head (teacher, dim) -> inverse standardizer."""
        if teacher not in self.standardizers:
            raise StudentError(f"the student was not distilled from {teacher!r}; it emulates {sorted(self.standardizers)}")
        if dim not in self.heads.nested_dims:
            raise StudentError(f"dim={dim} has no head; the student's heads are at its nested dims {self.heads.nested_dims}")
        with torch.inference_mode():
            z = self.student.embed(images, dim=dim)
            return self.standardizers[teacher].inverse(self.heads.head(teacher, dim)(z))


def load_emulator(path: str | Path) -> TeacherEmulator:
    heads, standardizers = load_heads(path)
    return TeacherEmulator(load_student(path), heads, standardizers)


def read_student_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(export directory, student.json contents) for a directory or its student.json."""
    path = Path(path)
    json_path = path / "student.json" if path.is_dir() else path
    if not json_path.is_file():
        raise StudentError(f"no exported student at {path}: give a student/ directory or its student.json")
    try:
        record = json.loads(json_path.read_text())
    except ValueError as error:  # not UTF-8 or not JSON: e.g. the .safetensors file given for student.json
        raise StudentError(f"{json_path} is not a student.json ({error}): give a student/ directory or its student.json") from error
    if record.get("schema") != SCHEMA:
        raise StudentError(f"{json_path} has schema {record.get('schema')!r}, this code reads {SCHEMA}: give a student exported by distill")
    return json_path.parent, record


def _under(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def _save_timm_config(student: Student, record: Mapping[str, Any], path: Path) -> None:
    """timm's config.json (as timm's save_for_hf writes it), with the exact training input, so that no
    loader falls back to the architecture's defaults (e.g. 518 px for a DINOv2 ViT built at 224)."""
    px = record["input_px"]
    source_cfg = student.backbone.pretrained_cfg
    config = {
        "architecture": student.arch,
        "num_classes": 0,
        "num_features": student.width,
        "model_args": student.timm_kwargs,
        "pretrained_cfg": {
            **{key: source_cfg[key] for key in ("first_conv", "classifier", "fixed_input_size") if key in source_cfg},
            "input_size": [3, px, px],
            "crop_pct": 1.0,
            "crop_mode": "center",
            "interpolation": TIMM_INTERPOLATION,
            "mean": list(student.mean),
            "std": list(student.std),
            "num_classes": 0,
        },
        # composition: the runs a distilled student was trained on (absent for a student exported by other code)
        "pathdistill": {"schema": SCHEMA, **{key: record[key] for key in TIMM_RECORD_KEYS if key in record}},
    }
    write_text_atomically(path, json.dumps(config, indent=2) + "\n")


def _link_or_copy(source: Path, dest: Path) -> None:
    with atomic_path(dest) as temporary:
        try:
            os.link(source, temporary)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, temporary)


def _save_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(contiguous, temporary, metadata={"format": "pt"})
