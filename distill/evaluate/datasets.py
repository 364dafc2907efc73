"""Labelled image sets for evaluation: ImageFolder trees (the form public patch benchmarks such as
BACH, CRC-100K, MHIST, BreakHis or PCam take after download) and tile stores with a `label` array.

Images are read on demand. Every set declares its mpp, so that each model can be shown the images at
its own magnification, and carries an identity (a hash of what decides its content) that keys the
embedding cache. Splits are train / val / test; a probe chooses its settings on val and is scored on
test, so a set without val gets one carved from train, and a set without test reports on its val.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import zarr
from PIL import Image

from pipeline.config import EvalDatasetConfig
from pipeline.errors import PathdistillError
from pipeline.stores import FLAG_READ_FAILED, StoreError, open_tile_store

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
CARVED_VAL_FRACTION = 0.2  # of each class's train items, when a set has no val split
CARVE_SEED = 0


class EvaluateError(PathdistillError, ValueError):
    """An evaluation input is missing or malformed; the message names it and says what to do."""


class ImageSource(Protocol):
    """Images read on demand (uint8 RGB [H, W, 3] each), the mpp they were scanned at, and an identity
    for the embedding cache: image files, tile store rows, or the robustness proxy's made-up scans."""

    name: str
    mpp: float
    identity: str

    def __len__(self) -> int: ...

    def read(self, items: np.ndarray) -> list[np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """Images in files, read as RGB."""

    name: str
    mpp: float
    paths: tuple[Path, ...]
    identity: str

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, items: np.ndarray) -> list[np.ndarray]:
        return [read_rgb(self.paths[item]) for item in items]


@dataclass(frozen=True, eq=False)
class StoreTiles:
    """Rows of a tile store; ``store_id`` lets a feature store computed from it stand in for a model."""

    name: str
    mpp: float
    path: Path
    rows: np.ndarray
    store_id: str
    identity: str

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, items: np.ndarray) -> list[np.ndarray]:
        tiles = zarr.open_group(str(self.path), mode="r")["tiles"]
        return list(tiles.oindex[self.rows[np.asarray(items)]])


@dataclass(frozen=True, eq=False)
class LabelledSet:
    """Images with a class index and a split per item."""

    images: ImageFiles | StoreTiles
    classes: tuple[str, ...]
    labels: np.ndarray  # int64 [N], index into classes
    splits: np.ndarray  # str [N], one of SPLITS
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.images.name

    def describe(self) -> dict:
        counts = {split: {c: int(((self.splits == split) & (self.labels == i)).sum()) for i, c in enumerate(self.classes)} for split in SPLITS}
        return {"name": self.name, "mpp": self.images.mpp, "classes": list(self.classes), "counts": counts, "notes": list(self.notes)}


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def open_labelled(entry: EvalDatasetConfig) -> LabelledSet:
    """The dataset an ``evaluate.datasets`` entry describes, checked before any model runs."""
    if not entry.path.exists():
        raise EvaluateError(f"dataset {entry.name!r}: {entry.path} does not exist; download the dataset there or fix its path in evaluate.datasets")
    if entry.split_file is not None and not entry.split_file.is_file():
        raise EvaluateError(f"dataset {entry.name!r}: split file {entry.split_file} does not exist; fix split_file or remove it")
    opened = _open_imagefolder(entry) if entry.kind == "imagefolder" else _open_tile_store(entry)
    splits, notes = _complete_splits(opened.splits, opened.labels, entry.name)
    unseen = sorted(set(opened.labels[splits != "train"].tolist()) - set(opened.labels[splits == "train"].tolist()))
    if unseen:
        names = [opened.classes[i] for i in unseen]
        raise EvaluateError(f"dataset {entry.name!r}: classes {names} have no train items, so no probe can learn them; add train images of them or remove them")
    return LabelledSet(opened.images, opened.classes, opened.labels, splits, opened.notes + notes)


def _open_imagefolder(entry: EvalDatasetConfig) -> LabelledSet:
    if entry.mpp is None:
        raise EvaluateError(
            f"dataset {entry.name!r} has no mpp: set mpp in its evaluate.datasets entry to the micrometres per pixel of its images "
            "(eva's values: BACH 0.42, BreakHis 0.25, CRC-100K 0.5, MHIST 2.0, PCam 1.0)"
        )
    root, notes = entry.path, ()
    if entry.split_file is not None:
        listed = _read_split_file(entry.split_file, entry.name)
        known = {path.relative_to(root).as_posix(): path for folder in _class_folders(root, entry.name) for path in _images_in(folder, entry.name)}
        missing = [item for item in listed if item not in known]
        if missing:
            raise EvaluateError(f"dataset {entry.name!r}: {len(missing)} items of {entry.split_file} are not images under a class folder of {root}, e.g. {missing[:3]}; items are paths like <class>/<image>")
        entries = [(known[item], item.split("/")[0], split) for item, split in listed.items()]
        if len(known) > len(listed):
            notes = (f"{len(known) - len(listed)} images not in {entry.split_file.name} are left out",)
    else:
        split_folders = [root / split for split in SPLITS if (root / split).is_dir()]
        if not split_folders:
            raise EvaluateError(
                f"dataset {entry.name!r}: {root} has no train/, val/ or test/ folder; arrange it as {root}/train/<class>/<image> "
                "(and val/, test/ alike), or set split_file to a CSV with columns item,split"
            )
        entries = [
            (path, folder.name, split_folder.name)
            for split_folder in split_folders
            for folder in _class_folders(split_folder, entry.name)
            for path in _images_in(folder, entry.name)
        ]
    classes = tuple(sorted({label for _, label, _ in entries}))
    paths = tuple(path for path, _, _ in entries)
    labels = np.array([classes.index(label) for _, label, _ in entries], np.int64)
    splits = np.array([split for _, _, split in entries])
    digest = hashlib.sha256(f"{entry.mpp}".encode())
    for path, label, split in entries:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{label}|{split}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return LabelledSet(ImageFiles(entry.name, entry.mpp, paths, digest.hexdigest()), classes, labels, splits, notes)


def _class_folders(folder: Path, name: str) -> list[Path]:
    classes = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not classes:
        raise EvaluateError(f"dataset {name!r}: {folder} has no class folders; put each class's images in {folder}/<class>/")
    return classes


def _images_in(folder: Path, name: str) -> list[Path]:
    images = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not images:
        raise EvaluateError(f"dataset {name!r}: class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
    return images


def _open_tile_store(entry: EvalDatasetConfig) -> LabelledSet:
    try:
        group = open_tile_store(entry.path)
    except StoreError as error:
        raise EvaluateError(f"dataset {entry.name!r}: {error}") from error
    if "label" not in group.array_names():
        raise EvaluateError(f"dataset {entry.name!r}: tile store {entry.path} has no 'label' array; add an int array 'label' [N] (-1: unlabelled), and attrs 'label_names' (and 'label_rule', how labels were made)")
    store_mpp = group.attrs.tiling.target_mpp
    if entry.mpp is not None and not np.isclose(entry.mpp, store_mpp, rtol=1e-3):
        raise EvaluateError(f"dataset {entry.name!r}: mpp {entry.mpp} is declared but the store's tiles are at {store_mpp} um/px; remove mpp from the entry")
    labels = group["label"][:].astype(np.int64)
    if entry.split_file is not None:
        listed = _read_split_file(entry.split_file, entry.name)
        splits = np.full(len(labels), "", dtype=object)
        try:
            for item, split in listed.items():
                splits[int(item)] = split
        except (ValueError, IndexError) as error:
            raise EvaluateError(f"dataset {entry.name!r}: items of {entry.split_file} must be row numbers below {len(labels)} ({error})") from error
    elif "split" in group.array_names():
        codes = group["split"][:]
        if codes.max(initial=0) >= len(SPLITS):
            raise EvaluateError(f"dataset {entry.name!r}: 'split' array of {entry.path} holds {codes.max()}; use 0 train, 1 val, 2 test")
        splits = np.array(SPLITS, dtype=object)[codes]
    else:
        raise EvaluateError(f"dataset {entry.name!r}: tile store {entry.path} has no 'split' array (uint8: 0 train, 1 val, 2 test); add one or set split_file")
    readable = (group["flags"][:] & FLAG_READ_FAILED) == 0
    rows = np.flatnonzero((labels >= 0) & (splits != "") & readable)
    classes = tuple(group.attrs.label_names or [str(i) for i in range(labels.max() + 1)])
    digest = hashlib.sha256(f"{group.attrs.store_id}|{store_mpp}|".encode() + rows.tobytes() + "|".join(splits[rows]).encode())
    images = StoreTiles(entry.name, store_mpp, entry.path, rows, group.attrs.store_id, digest.hexdigest())
    rule = group.attrs.label_rule
    return LabelledSet(images, classes, labels[rows], splits[rows].astype(str), (f"labels: {rule}",) if rule else ())


def _read_split_file(path: Path, name: str) -> dict[str, str]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"item", "split"} <= set(reader.fieldnames or ()):
            raise EvaluateError(f"dataset {name!r}: split file {path} needs a header with columns item,split; it has {reader.fieldnames}")
        listed = {row["item"].strip(): row["split"].strip() for row in reader}
    wrong = sorted({split for split in listed.values() if split not in SPLITS})
    if wrong:
        raise EvaluateError(f"dataset {name!r}: split file {path} has splits {wrong}; use only {', '.join(SPLITS)}")
    return listed


def _complete_splits(splits: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """train / val / test for every item: probes choose settings on val and are scored on test."""
    present = set(splits.tolist())
    if "train" not in present or present == {"train"}:
        raise EvaluateError(f"dataset {name!r} has splits {sorted(present)}: it needs train and at least one of val, test")
    splits, notes = splits.copy(), []
    if "test" not in present:
        splits[splits == "val"] = "test"
        notes.append("no test split: the given val split is the test split")
    if "val" not in set(splits.tolist()):
        rng = np.random.default_rng(CARVE_SEED)
        for label in np.unique(labels[splits == "train"]):
            train = rng.permutation(np.flatnonzero((splits == "train") & (labels == label)))
            splits[train[: int(round(CARVED_VAL_FRACTION * len(train)))]] = "val"
        notes.append(f"val carved from train: {CARVED_VAL_FRACTION:.0%} of each class, seed {CARVE_SEED}")
    return splits, tuple(notes)
