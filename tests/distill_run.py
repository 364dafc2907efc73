"""A small run directory for the distiller tests: a real tile store cut from real H&E pixels (JPEG
coded, the default) and feature stores of synthetic teachers of its decoded pixels, written with the
store module's own functions.

A synthetic teacher is a fixed random two-layer map of the tile's 4 x 4 grid of mean colours: it
depends on where colours are, so every dihedral view and crop has its own target, and a small ViT
with 16 px patches can learn it. With ``grid`` k > 0 each teacher's store also holds a synthetic grid:
a fixed random linear map of the mean colours of k x k cells of the view's pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
import zarr

from pipeline.config import Config
from pipeline.stores import (
    FLAG_PADDED, FLAG_READ_FAILED, GRID, FeatureStoreAttrs, SlideRecord, StoreConfig, Tiling, TileStoreAttrs, UnitMarkers,
    create_feature_store, create_tile_store, tile_unit_record, unit_ranges, write_rows,
)
from pipeline.views import apply_view, expand_views

TEACHERS = {"alpha": 40, "beta": 24}  # name -> width of its first recipe
SLIDE_ROWS = (100, 90, 110, 84)  # rows per slide; the last slide is held out by default
CHUNK_ROWS, SHARD_ROWS = 8, 32
READ_FAILED_ROWS = (5, 6, 150, 330)  # blank tiles in train and validation slides
PADDED_ROWS = (7, 200)  # flagged, but readable: they are trained on
STUDENT = {"student": "vit_tiny_patch16_224", "student_kwargs": {"img_size": 64, "depth": 2}}


def synthetic_teacher(tiles: np.ndarray, seed: int, width: int) -> np.ndarray:
    """float32 [n, width] from uint8 tiles [n, px, px, 3]."""
    n, px = tiles.shape[:2]
    cells = tiles.reshape(n, 4, px // 4, 4, px // 4, 3).mean(axis=(2, 4)).reshape(n, 48) / 255
    rng = np.random.default_rng(seed)
    hidden = np.tanh((cells - 0.8) @ rng.normal(size=(48, 64)) * 1.5)
    return (hidden @ rng.normal(size=(64, width)) / 4 + rng.normal(size=width)).astype(np.float32)


def synthetic_grid(tiles: np.ndarray, seed: int, k: int, width: int) -> np.ndarray:
    """float32 [n, k*k, width] from uint8 tiles [n, px, px, 3]: cells row-major, as pipeline/grids.py lays them out."""
    n, px = tiles.shape[:2]
    cells = tiles.reshape(n, k, px // k, k, px // k, 3).mean(axis=(2, 4)).reshape(n, k * k, 3) / 255
    return (cells @ np.random.default_rng(100 + seed).normal(size=(3, width))).astype(np.float32)


def tissue_tiles(he_pixels: np.ndarray, count: int, side: int) -> np.ndarray:
    """The first `count` cells of a side x side grid over the pixels, skipping nearly white ones."""
    rows, cols = he_pixels.shape[0] // side, he_pixels.shape[1] // side
    grid = he_pixels[: rows * side, : cols * side].reshape(rows, side, cols, side, 3).swapaxes(1, 2).reshape(-1, side, side, 3)
    tissue = grid[grid.mean(axis=(1, 2, 3)) < 225]
    assert len(tissue) >= count, f"only {len(tissue)} tissue tiles of {side} px"
    return np.ascontiguousarray(tissue[:count])


def synthetic_slide(id: int, name: str, rows: tuple[int, int], status: str = "ok", path: str | None = None) -> SlideRecord:
    """The record of a slide that exists only in a test store."""
    return SlideRecord(id=id, name=name, path=path or f"synthetic/{name}", status=status, error=None if status == "ok" else "synthetic failure", rows=[int(rows[0]), int(rows[1])])


def synthetic_tile_attrs(n_rows: int, tile_px: int, slides: list[SlideRecord], context_px: int = 0, store: StoreConfig | None = None, **labels) -> TileStoreAttrs:
    """Tile store attrs for tiles at 0.5 um/px made by a test, not by the tile stage."""
    config = Config.model_validate({"tiling": {"tile_px": tile_px, "context_px": context_px}, "store": (store or StoreConfig()).model_dump()})
    return TileStoreAttrs.new(Tiling.from_config(config), slides, n_rows, **labels)


def make_run(
    run_dir: Path, he_pixels: np.ndarray, tile_px: int = 64, context_px: int = 0, views: list[str] | None = None,
    teachers: dict[str, int] = TEACHERS, slide_rows: tuple[int, ...] = SLIDE_ROWS, grid: int = 0,
) -> dict:
    """Write RUN/tiles.zarr and RUN/features/<teacher>.zarr (recipes `cls` and `mean`, and a `grid` of k = `grid`
    cells a side of the teacher's width when grid > 0); return what tests check against.
    Slide paths are under the run's name, so slides of two runs are different slides unless a test says otherwise."""
    n_rows, stored_px = sum(slide_rows), tile_px + 2 * context_px
    store = StoreConfig(chunk_rows=CHUNK_ROWS, shard_rows=SHARD_ROWS)
    tiles = tissue_tiles(he_pixels, n_rows, stored_px)
    flags = np.zeros(n_rows, np.uint8)
    flags[list(READ_FAILED_ROWS)] = FLAG_READ_FAILED
    flags[list(PADDED_ROWS)] = FLAG_PADDED
    tiles[list(READ_FAILED_ROWS)] = 0
    starts = np.cumsum((0, *slide_rows))
    slides = [synthetic_slide(i, f"slide-{i}", (s, e), path=f"{run_dir.name}/slide-{i}") for i, (s, e) in enumerate(zip(starts[:-1], starts[1:]))]
    slides.insert(2, synthetic_slide(9, "unreadable", (starts[2], starts[2]), status="failed", path=f"{run_dir.name}/unreadable"))
    slide_of_row = np.repeat(np.arange(len(slide_rows), dtype=np.int32), slide_rows)
    tile_attrs = synthetic_tile_attrs(n_rows, tile_px, slides, context_px, store)
    tile_path = run_dir / "tiles.zarr"
    create_tile_store(tile_path, tile_attrs, store)
    write_rows(tile_path, 0, {
        "tiles": tiles, "coords": np.zeros((n_rows, 2), np.int64), "slide": slide_of_row,
        "tissue": np.ones(n_rows, np.float32), "flags": flags,
    })
    mark_all(tile_path, tile_attrs.store_id, n_rows, flags=flags)
    tiles = zarr.open_array(str(tile_path / "tiles"), mode="r")[:]  # the decoded stored pixels: what every teacher sees
    view_records = expand_views(views or ["identity"], context_px, tile_px)
    targets = write_synthetic_features(run_dir, tiles, tile_attrs, view_records, teachers, grid)
    return {"tiles": tiles, "targets": targets, "flags": flags, "slide": slide_of_row, "views": view_records, "tile_attrs": tile_attrs}


def write_synthetic_features(
    run_dir: Path, tiles: np.ndarray, tile_attrs: TileStoreAttrs, views: list[dict], teachers: dict[str, int] = TEACHERS, grid: int = 0,
) -> dict[str, np.ndarray]:
    """RUN/features/<teacher>.zarr of the synthetic teachers for these (stored) tiles, in the tile store's
    chunks and shards; returns each teacher's `cls` targets [n, V, width]."""
    tile_px, n_rows = tile_attrs.tiling.tile_px, tile_attrs.n_rows
    store = StoreConfig(**tile_attrs.tiling.store)
    targets = {}
    for seed, (teacher, width) in enumerate(teachers.items()):
        per_view = [synthetic_teacher(np.ascontiguousarray(apply_view(tiles, view, tile_px)), seed, width) for view in views]
        targets[teacher] = np.stack(per_view, axis=1).astype(np.float16)
        spec = {"name": teacher, "input_px": tile_px, "mean": [0.5] * 3, "std": [0.5] * 3, "target_mpp": 0.5, "stand_in": True}
        path = run_dir / "features" / f"{teacher}.zarr"
        attrs = FeatureStoreAttrs.new(tile_attrs, spec, {"cls": width, "mean": 8}, views, grid=grid)
        create_feature_store(path, attrs, store.chunk_rows, store.shard_rows, store, grid_width=width if grid else 0)
        columns = {"cls": targets[teacher], "mean": np.zeros((n_rows, len(views), 8), np.float16)}
        if grid:
            columns[GRID] = np.stack([synthetic_grid(np.ascontiguousarray(apply_view(tiles, view, tile_px)), seed, grid, width) for view in views], axis=1).astype(np.float16)
        write_rows(path, 0, columns)
        mark_all(path, attrs.store_id, n_rows, shard_rows=store.shard_rows)
    return targets


def mark_all(path: Path, store_id: str, n_rows: int, flags: np.ndarray | None = None, shard_rows: int = SHARD_ROWS) -> None:
    """Every unit finished; a tile store's markers (given its ``flags``) name their read-failed rows, as the tiles stage's do."""
    for unit, (start, end) in enumerate(unit_ranges(n_rows, shard_rows)):
        record = tile_unit_record(start, flags[start:end]) if flags is not None else {}
        UnitMarkers(path, store_id).mark(unit, {"start": start, "end": end, **record})


# A registry-free teacher published for make_run's 64 px tiles at 0.5 um/px, so that `features` on such a
# run passes the scale check (the demo stand-ins take 224 px fields).
TINY_TEACHER = {
    "source": "random:0", "stand_in": True, "arch": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "depth": 1},
    "target_mpp": 0.5, "input_px": 64, "resize": "resize", "resize_px": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
    "recipes": {"cls": "cls"}, "widths": {"cls": 192},
}


def config_for(run_dir: Path, **distill) -> Config:
    return Config.model_validate({"run": str(run_dir), "distill": {**STUDENT, "head_hidden": 64, "nested_dims": [16, 64, 192], **distill}})


def write_config(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path
