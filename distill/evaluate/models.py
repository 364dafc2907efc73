"""The models evaluate compares, each shown images the way it expects, and the embedding cache.

* The exported student is embedded once at full width; its nested dims are prefixes of that.
* A registry teacher (with its weights) applies its own resize and normalisation.
* A feature store already computed stands in for its teacher on the tile store it was made from.

An image reaches a model as the model's field of view: the centred square of ``tile_px`` pixels at
the model's mpp, cut from the image at the image's mpp and resampled to ``tile_px`` (area filter
down, bicubic up). For the student that is the tile it was distilled on; for a teacher its published
tile (``TeacherSpec.field_px``, the rule of pipeline/teacher_input.py), so Prov-GigaPath gets 256 px at
0.5 um/px and crops the central 224 as published. An image smaller than that field is used whole and
so is seen at another mpp; the mpp each item was seen at is kept with its embedding.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from distill.evaluate.datasets import EvaluateError, ImageSource, StoreTiles
from distill.export import StudentError, load_student, read_student_json
from pipeline.console import progress_bar
from pipeline.files import atomic_path
from pipeline.geometry import resize_area
from pipeline.stores import StoreError, open_feature_store
from pipeline.teachers import TEACHERS, UnknownTeacherError, build_teacher, get_teacher


class Embedder(Protocol):
    """A model that embeds uint8 tiles [B, tile_px, tile_px, 3] at ``mpp``: {output: [B, width]}."""

    name: str
    identity: str
    mpp: float
    tile_px: int
    stand_in: bool
    widths: dict[str, list[int]]  # output -> the widths evaluated (prefixes of the output)

    def embed(self, tiles: Tensor) -> dict[str, Tensor]: ...


@dataclass(frozen=True, eq=False)
class Embeddings:
    outputs: dict[str, np.ndarray]  # output -> float32 [N, width]
    seen_mpp: np.ndarray  # float64 [N]: the mpp each item was shown at


class StudentEmbedder:
    """An exported student, labelled `name` in tables and plots; its one output, z, is evaluated at each nested dim."""

    def __init__(self, directory: Path, dims: list[int] | None = None, name: str = "student"):
        self.name = name
        try:
            directory, record = read_student_json(directory)
        except StudentError as error:
            raise EvaluateError(f"{error}; run `make distill` first, or set evaluate.student to an exported student directory") from error
        self.student = load_student(directory)
        width = self.student.width
        dims = sorted(set(dims or record["nested_dims"]))
        outside = [m for m in dims if not 1 <= m <= width]
        if outside:
            raise EvaluateError(f"evaluate.dims {outside} are outside the student's embedding (1..{width}); nested dims: {record['nested_dims']}")
        self.record = record
        self.widths = {"z": dims}
        self.mpp, self.tile_px = float(record["target_mpp"]), int(record["input_px"])
        # Distilled only from stand-ins, the student is a stand-in too, and is labelled so.
        teachers = record["teachers"]
        self.stand_in = bool(teachers) and all(name in TEACHERS and TEACHERS[name].stand_in for name in teachers)
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
        digest.update(hashlib.sha256((directory / "student.safetensors").read_bytes()).digest())
        self.identity = digest.hexdigest()

    def embed(self, tiles: Tensor) -> dict[str, Tensor]:
        with torch.inference_mode():
            return {"z": self.student(self.student.preprocess(tiles))}


class TeacherEmbedder:
    """A registry teacher; each of its recipes is an output evaluated at full width."""

    def __init__(self, name: str, weights: str | None = None):
        self.teacher = build_teacher(name, "cpu", weights)
        spec = self.teacher.spec
        self.name, self.stand_in = spec.name, spec.stand_in
        self.mpp, self.tile_px = spec.target_mpp, spec.field_px
        self.widths = {recipe: [width] for recipe, width in spec.widths.items()}
        self.identity = hashlib.sha256(json.dumps(self.teacher.provenance(), sort_keys=True).encode()).hexdigest()

    def embed(self, tiles: Tensor) -> dict[str, Tensor]:
        return self.teacher.embed(tiles)


def check_teacher_names(names: list[str]) -> None:
    """Unknown teachers fail before any model is built."""
    for name in names:
        try:
            get_teacher(name)
        except UnknownTeacherError as error:
            raise EvaluateError(f"evaluate.teachers: {error}") from error


class StoredFeatures:
    """A feature store as a model: the identity view's rows of the tile store it was computed from."""

    def __init__(self, path: Path):
        try:
            attrs = open_feature_store(path).attrs
        except StoreError as error:
            raise EvaluateError(f"evaluate.feature_stores: {error}") from error
        views = attrs.views
        if {"name": "identity"} not in views:
            raise EvaluateError(f"feature store {path} has no identity view (views: {views}); compute features with the identity view")
        teacher = attrs.teacher
        self.path, self.view = Path(path), views.index({"name": "identity"})
        self.name, self.stand_in = f"{teacher['name']} (stored)", bool(teacher.get("stand_in"))
        self.identity, self.tile_store_id = attrs.store_id, attrs.tile_store_id
        self.widths = {recipe: [width] for recipe, width in attrs.recipes.items()}

    def rows(self, tiles: StoreTiles) -> Embeddings:
        group = open_feature_store(self.path)
        outputs = {recipe: group[recipe].oindex[tiles.rows, self.view].astype(np.float32) for recipe in self.widths}
        return Embeddings(outputs, np.full(len(tiles), tiles.mpp))


def fit_to_model(image: np.ndarray, image_mpp: float, model_mpp: float, tile_px: int) -> tuple[np.ndarray, float]:
    """The model's field of view of ``image`` as a ``tile_px`` square, and the mpp it is seen at."""
    field = round(tile_px * model_mpp / image_mpp)
    side = min(field, *image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    if side > tile_px:
        square = resize_area(square, tile_px)
    elif side < tile_px:
        square = np.asarray(Image.fromarray(square).resize((tile_px, tile_px), Image.Resampling.BICUBIC))
    return square, image_mpp * side / tile_px


def cached_embeddings(model: Embedder, images: ImageSource, cache_dir: Path, batch_size: int) -> Embeddings:
    """Every output of ``model`` for every image, computed once per (model, image set) identity pair."""
    path = cache_dir / f"{_slug(model.name)}-{model.identity[:12]}" / f"{_slug(images.name)}-{images.identity[:12]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return Embeddings({key.removeprefix("output:"): stored[key] for key in stored.files if key.startswith("output:")}, stored["seen_mpp"])
    outputs: dict[str, list[np.ndarray]] = {}
    seen_mpp = np.zeros(len(images))
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(f"{model.name} on {images.name}", total=len(images), rate="")
        for first in range(0, len(images), batch_size):
            items = np.arange(first, min(first + batch_size, len(images)))
            fitted = [fit_to_model(image, images.mpp, model.mpp, model.tile_px) for image in images.read(items)]
            seen_mpp[items] = [mpp for _, mpp in fitted]
            embedded = model.embed(torch.from_numpy(np.stack([tile for tile, _ in fitted])))
            for output, values in embedded.items():
                outputs.setdefault(output, []).append(values.float().numpy())
            progress.update(task, advance=len(items), rate=f"{(first + len(items)) / (time.perf_counter() - started):.0f} img/s")
    result = Embeddings({output: np.concatenate(parts) for output, parts in outputs.items()}, seen_mpp)
    with atomic_path(path) as temporary, temporary.open("wb") as handle:  # a handle: np.savez adds no suffix
        np.savez(handle, seen_mpp=seen_mpp, **{f"output:{output}": values for output, values in result.outputs.items()})
    return result


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
