"""The Zarr stores both halves of the project share: their schemas, layout and completion markers.

Layout rules (see DESIGN.md): arrays share the row axis; chunks hold whole rows (tiles) and are the
read unit; shards group chunks and are the write unit; a work unit is one shard of rows, so each
writer owns whole shards of every array and never races another. Every chunk carries a crc32c
checksum, so a flipped byte on disk fails the read instead of passing silently.

Completion is recorded outside Zarr metadata, as one marker file per unit in ``<store>.progress/``,
written after the unit's shards; a marker names the store id it belongs to, so markers of a
replaced store never count.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.config import StoreConfig
from pipeline.errors import PathdistillError
from pipeline.files import write_text_atomically

TILES_SCHEMA = "pathdistill.tiles/1"
FEATURES_SCHEMA = "pathdistill.features/1"
VERSIONED_PACKAGES = ("pathdistill", "zarr", "numcodecs", "numpy", "openslide-python", "openslide-bin", "ray", "torch", "timm")


class StoreError(PathdistillError, ValueError):
    """A store is missing, of the wrong schema, or does not match what the command was given."""


def compressors(store: StoreConfig, byte_shuffle: bool = False) -> list:
    """Blosc then a crc32c checksum per chunk. Byte shuffle helps multi-byte values (features), not RGB bytes."""
    return [BloscCodec(cname=store.codec, clevel=store.clevel, shuffle="shuffle" if byte_shuffle else "noshuffle"), Crc32cCodec()]


def versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_store_id() -> str:
    return str(uuid.uuid4())


def create_tile_store(path: Path, n_rows: int, tile_side: int, store: StoreConfig, attrs: dict) -> zarr.Group:
    """Create every array at its final size, then the attrs; the ``schema`` attr marks a finished creation."""
    group = zarr.open_group(str(path), mode="w")
    rows = store.shard_rows
    shape_of = {
        "tiles": ((n_rows, tile_side, tile_side, 3), "uint8", ["row", "y", "x", "channel"]),
        "coords": ((n_rows, 2), "int64", ["row", "xy"]),
        "slide": ((n_rows,), "int32", ["row"]),
        "tissue": ((n_rows,), "float32", ["row"]),
        "flags": ((n_rows,), "uint8", ["row"]),
    }
    for name, (shape, dtype, dims) in shape_of.items():
        if name == "tiles":
            chunking = dict(chunks=(store.chunk_rows, *shape[1:]), shards=(rows, *shape[1:]))
        else:
            chunking = dict(chunks=(rows, *shape[1:]))
        group.create_array(
            name, shape=shape, dtype=dtype, fill_value=0, compressors=compressors(store), dimension_names=dims, **chunking
        )
    group.attrs.update({**attrs, "schema": TILES_SCHEMA})
    return group


def create_feature_store(
    path: Path, tile_attrs: dict, chunk_rows: int, shard_rows: int, store: StoreConfig,
    teacher: dict, recipes: dict[str, int], views: list[dict],
) -> zarr.Group:
    """One float16 [N, V, D] array per recipe, rows aligned with the tile store's chunks and shards."""
    n_rows = tile_attrs["n_rows"]
    group = zarr.open_group(str(path), mode="w")
    for recipe, width in recipes.items():
        shape = (n_rows, len(views), width)
        group.create_array(
            recipe, shape=shape, dtype="float16", fill_value=0, compressors=compressors(store, byte_shuffle=True),
            chunks=(chunk_rows, *shape[1:]), shards=(shard_rows, *shape[1:]), dimension_names=["row", "view", "feature"],
        )
    group.attrs.update({
        "store_id": new_store_id(),
        "n_rows": n_rows,
        "tile_store_id": tile_attrs["store_id"],
        "teacher": teacher,
        "recipes": recipes,
        "views": views,
        "versions": versions(),
        "created": now(),
        "schema": FEATURES_SCHEMA,
    })
    return group


def open_feature_store(path: Path, tiles: zarr.Group) -> zarr.Group:
    """A finished feature store that belongs to ``tiles``; any other is refused with the reason."""
    features = open_store(path, FEATURES_SCHEMA)
    found, expected = features.attrs["tile_store_id"], tiles.attrs["store_id"]
    if found != expected:
        raise StoreError(f"{path} was computed from tile store {found}, not from this one ({expected}); rerun features for this tile store")
    if features.attrs["n_rows"] != tiles.attrs["n_rows"]:
        raise StoreError(f"{path} has {features.attrs['n_rows']} rows but the tile store has {tiles.attrs['n_rows']}; rerun features")
    return features


def open_store(path: Path, schema: str | None = None) -> zarr.Group:
    """Open a finished pathdistill store read-only, or explain what is wrong with ``path``."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a Zarr store (no zarr.json); check the path, or run the stage that makes it")
    group = zarr.open_group(str(path), mode="r")
    found = group.attrs.get("schema")
    if found is None:
        raise StoreError(f"{path} has no pathdistill schema attribute: its creation was interrupted or it is not ours; rerun the stage with --overwrite")
    if schema is not None and found != schema:
        raise StoreError(f"{path} holds schema {found!r}, expected {schema!r}")
    return group


def write_rows(store_path: Path, start: int, columns: dict[str, np.ndarray]) -> None:
    """Write whole shards of rows from ``start``. Chunks of zeros are written too (an array's config is
    fixed when it is opened, hence the open here), so an unwritten chunk always means unfinished work."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(str(store_path), mode="r+")
        for name, values in columns.items():
            group[name][start : start + len(values)] = values


def unit_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(start, min(n_rows, start + shard_rows)) for start in range(0, n_rows, shard_rows)]


class UnitMarkers:
    """One JSON file per finished unit, beside the store, for resuming only what is missing."""

    def __init__(self, store_path: Path, store_id: str):
        self.directory = Path(f"{store_path}.progress")
        self.store_id = store_id

    def done(self) -> set[int]:
        finished = set()
        for marker in self.directory.glob("unit-*.json"):
            try:
                record = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record.get("store_id") == self.store_id:
                finished.add(int(record["unit"]))
        return finished

    def mark(self, unit: int, record: dict) -> None:
        write_text_atomically(self.directory / f"unit-{unit:06d}.json", json.dumps({**record, "unit": unit, "store_id": self.store_id}))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def remove_store(path: Path) -> None:
    """Delete a store and its markers (only on an explicit overwrite)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(f"{path}.progress", ignore_errors=True)
