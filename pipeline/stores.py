"""The store contract: what a run directory holds, what each store's attrs say, and how stores are
written and opened. The one module both halves of the project import for data.

Layout rules (docs/design.md): arrays share the row axis; chunks hold whole rows (tiles) and are the read unit; shards
group chunks and are the write unit; a work unit is one shard of rows, so each writer owns whole
shards of every array and never races another. Every chunk carries a crc32c checksum, so a flipped
byte on disk fails the read instead of passing silently. Tiles are stored one JPEG per tile
(``pipeline/tile_codec.py``, a Zarr codec) or lossless; either way the array reads as uint8 pixels.

Attrs are typed: writers build a ``TileStoreAttrs`` or ``FeatureStoreAttrs`` and readers get one
back from ``open_tile_store`` / ``open_feature_store``, which refuse a store of another schema or
version, or whose attrs do not match the schema, naming what to do. Changing what a store holds
means a new schema version here; readers refuse versions they do not know.

Completion is recorded outside Zarr metadata, in ``<store>.progress/``: a worker writes one marker
file per unit after the unit's shards (crash-safe, no file shared between workers), and the driver
folds markers into one ``index.json`` as units finish, so a start reads one index and the few markers
not yet folded rather than one file per unit (``UnitMarkers``). Marker and index name the store id they
belong to, so those of a replaced store never count.

Damage is refused at the boundary where the file is known. Zarr reads a lost shard (or chunk) file
as the fill value, so readers of a finished store check that the stored objects of what they read
exist (``Store.require_intact``, ``UnitReader``); a chunk failing its checksum is a ``StoreDamaged``
naming store, array and rows (``Store.reading``); a write that fails for a full, read-only or
forbidden disk is an ``OutputError`` naming the file (``writing``).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

from pipeline.config import Config, StoreConfig
from pipeline.errors import PathdistillError
from pipeline.files import write_text_atomically
from pipeline.tile_codec import DECODER, READ_WITH, JpegTileCodec

TILES_SCHEMA = "pathdistill.tiles/3"
FEATURES_SCHEMA = "pathdistill.features/2"
FEATURES_SCHEMA_V1 = "pathdistill.features/1"  # still read: the same arrays, no grid
GRID = "grid"  # the array of a feature store's spatial recipe (pipeline/grids.py)
VERSIONED_PACKAGES = ("pathdistill", "zarr", "numcodecs", "imagecodecs", "numpy", "openslide-python", "openslide-bin", "ray", "torch", "timm")

# Bits of the tile store's ``flags`` array.
FLAG_READ_FAILED = 1  # the region could not be read; the tile is blank (zeros)
FLAG_PADDED = 2  # the context margin reaches outside the slide; those pixels are white

# Beside the demo slides: which real image each was made from (written by the demo maker, read by
# the demo evaluation set).
DEMO_SOURCES_FILE = "SOURCES.json"


class StoreError(PathdistillError, ValueError):
    """A store is missing, of the wrong schema, or does not match what the command was given."""


class StoreDamaged(StoreError):
    """A finished store lost a stored object (a shard or chunk file) or holds one that fails its
    checksum: those rows cannot be trusted, and Zarr would read a lost one as zeros."""


class OutputError(PathdistillError, OSError):
    """Output could not be written for a reason only the user can fix: a full disk, a read-only or
    forbidden place, a file size limit. It replaces the OSError it was, and still is one."""


# The OSErrors of a write that the user fixes, and how.
WRITE_FIXES = {
    errno.ENOSPC: "free space there, or write the run elsewhere (--out)",
    errno.EDQUOT: "free space within the quota, or write the run elsewhere (--out)",
    errno.EFBIG: "raise the file size limit (ulimit -f), or write the run elsewhere (--out)",
    errno.EROFS: "remount it read-write, or write the run elsewhere (--out)",
    errno.EACCES: "fix the permissions, or write the run elsewhere (--out)",
    errno.EPERM: "fix the permissions, or write the run elsewhere (--out)",
}


@contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """The write boundary: an OSError of WRITE_FIXES becomes one OutputError naming ``what`` and
    ``path``; any other error is not the user's to fix and propagates as it is."""
    try:
        yield
    except OSError as error:
        if isinstance(error, PathdistillError) or error.errno not in WRITE_FIXES:
            raise
        raise OutputError(f"cannot write {what} {path}: {os.strerror(error.errno)}; {WRITE_FIXES[error.errno]}") from error


@dataclass(frozen=True)
class RunDir:
    """Every path of a run directory, named once."""

    root: Path

    @property
    def tiles(self) -> Path:
        return self.root / "tiles.zarr"

    @property
    def slide_hashes(self) -> Path:
        """The slides' file digests, kept across tile runs (``--overwrite`` included) so that
        unchanged files are not hashed again."""
        return self.root / "slide-hashes.json"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def features(self, teacher: str) -> Path:
        return self.features_dir / f"{teacher}.zarr"

    def teachers_with_features(self) -> list[str]:
        return sorted(path.name.removesuffix(".zarr") for path in self.features_dir.glob("*.zarr"))

    @property
    def qc(self) -> Path:
        return self.root / "qc"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def lock(self, stage: str) -> Path:
        """The file one run of ``stage`` on this run directory holds locked (pipeline/locks.py)."""
        return self.root / "locks" / f"{stage}.lock"

    @classmethod
    def of(cls, config: Config) -> RunDir:
        return cls(config.run.resolve())

    @classmethod
    def of_feature_store(cls, path: Path) -> RunDir:
        """The run a ``features/<teacher>.zarr`` store sits in."""
        return cls(Path(path).parent.parent)


def progress_dir(store_path: Path) -> Path:
    return Path(f"{store_path}.progress")


class _Record:
    """JSON form of a frozen dataclass: fields in declaration order, optional fields left out when None,
    and ``from_dict`` refusing missing or unknown keys."""

    def to_dict(self) -> dict:
        out = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if value is None and item.default is None:
                continue
            out[item.name] = value.to_dict() if isinstance(value, _Record) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, what: str) -> Any:
        names = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        required = {item.name for item in dataclasses.fields(cls) if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING}  # type: ignore[arg-type]
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        if unknown or missing:
            raise StoreError(
                f"{what} does not match this version's schema (unknown keys {unknown}, missing keys {missing}): "
                "it was written by another pathdistill version; rerun the stage that made it with --overwrite"
            )
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class Tiling(_Record):
    """Everything that decides the stored pixels; a tile store made with other values is not reused."""

    target_mpp: float
    tile_px: int
    overlap_px: int
    context_px: int
    mpp_tolerance: float
    allow_upsample: bool
    reader: str
    stored_px: int  # tile_px plus the context margin on both sides
    tissue: dict
    store: dict

    @classmethod
    def from_config(cls, config: Config) -> Tiling:
        return cls(
            **config.tiling.model_dump(),
            stored_px=config.tiling.tile_px + 2 * config.tiling.context_px,
            tissue=config.tissue.model_dump(mode="json"),
            store=config.store.model_dump(),
        )

    def differences(self, other: Tiling) -> list[str]:
        return [
            f"tiling.{key}: store has {value!r}, now {getattr(other, key)!r}"
            for key, value in self.to_dict().items()
            if getattr(other, key) != value
        ]


@dataclass(frozen=True, kw_only=True)
class SlideRecord(_Record):
    """One slide of a tile store: its identity, how it was read, and its rows [start, end)."""

    id: int
    name: str
    path: str
    status: str  # "ok", or "failed" with the reason in ``error``
    error: str | None  # always recorded: None for a slide that was tiled
    traceback: str | None = None
    size: int | None = None  # bytes of the file, and its content hash: the slide's identity
    hash: str | None = None
    vendor: str | None = None
    dimensions: list[int] | None = None
    level_count: int | None = None
    level_downsamples: list[float] | None = None
    mpp: float | None = None  # level-0 micrometres per pixel, and the property it came from
    mpp_source: str | None = None
    read: dict | None = None  # geometry.ReadPlan.as_record()
    reader: str | None = None
    grid_tiles: int | None = None
    tissue_area_fraction: float | None = None
    overview_unread_fraction: float | None = None  # of the overview, when part of it could not be decoded
    qc: str | None = None  # QC picture, relative to the run directory
    n_tiles: int | None = None
    rows: list[int] = field(default_factory=lambda: [0, 0])

    IDENTITY: ClassVar[tuple[str, ...]] = ("path", "size", "hash", "mpp", "mpp_source", "status")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, kw_only=True)
class TileStoreAttrs(_Record):
    """Group attrs of ``tiles.zarr``; labelled sets (evaluation) add label names and how they were made."""

    store_id: str
    n_rows: int
    tiling: Tiling
    slides: list[SlideRecord]
    versions: dict
    created: str
    label_names: list[str] | None = None
    label_rule: str | None = None
    derived_from: dict | None = None

    SCHEMA: ClassVar[str] = TILES_SCHEMA

    @classmethod
    def new(cls, tiling: Tiling, slides: list[SlideRecord], n_rows: int, **labels: Any) -> TileStoreAttrs:
        return cls(store_id=new_store_id(), n_rows=n_rows, tiling=tiling, slides=slides, versions=versions(), created=now(), **labels)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "slides": [slide.to_dict() for slide in self.slides], "schema": self.SCHEMA}

    @classmethod
    def from_dict(cls, data: dict, what: str) -> TileStoreAttrs:
        data = {key: value for key, value in data.items() if key != "schema"}
        parsed = super().from_dict(data, what)
        return dataclasses.replace(
            parsed,
            tiling=Tiling.from_dict(parsed.tiling, f"{what} tiling"),
            slides=[SlideRecord.from_dict(slide, f"{what} slide record") for slide in parsed.slides],
        )


@dataclass(frozen=True, kw_only=True)
class FeatureStoreAttrs(_Record):
    """Group attrs of ``features/<teacher>.zarr``: which tile store, teacher (full provenance), recipes
    (name -> width), views (what each view index is) and grid (k of the ``grid`` array, 0: none) the
    features are of."""

    store_id: str
    n_rows: int
    tile_store_id: str
    teacher: dict
    recipes: dict[str, int]
    views: list[dict]
    versions: dict
    created: str
    grid: int = 0

    SCHEMA: ClassVar[str] = FEATURES_SCHEMA

    @classmethod
    def new(cls, tiles: TileStoreAttrs, teacher: dict, recipes: dict[str, int], views: list[dict], grid: int = 0) -> FeatureStoreAttrs:
        # As JSON stores them (tuples become lists), so attrs compare equal to what is read back.
        teacher, views = json.loads(json.dumps(teacher)), json.loads(json.dumps(views))
        return cls(
            store_id=new_store_id(), n_rows=tiles.n_rows, tile_store_id=tiles.store_id, teacher=teacher,
            recipes=dict(recipes), views=views, versions=versions(), created=now(), grid=grid,
        )

    def to_dict(self) -> dict:
        return {**super().to_dict(), "schema": self.SCHEMA}

    @classmethod
    def from_dict(cls, data: dict, what: str) -> FeatureStoreAttrs:
        return super().from_dict({key: value for key, value in data.items() if key != "schema"}, what)


@dataclass(frozen=True, kw_only=True)
class FeatureStoreAttrsV1(FeatureStoreAttrs):
    """The attrs of a store written before grids (schema /1): read as they are, with grid 0."""

    SCHEMA: ClassVar[str] = FEATURES_SCHEMA_V1

    @classmethod
    def from_dict(cls, data: dict, what: str) -> FeatureStoreAttrs:
        if "grid" in data:
            raise StoreError(f"{what} is a {FEATURES_SCHEMA_V1} store with a grid attr, which that schema does not have; rerun features with --overwrite")
        return super().from_dict(data, what)


Attrs = TypeVar("Attrs", TileStoreAttrs, FeatureStoreAttrs)
ATTRS_OF_SCHEMA = {TILES_SCHEMA: TileStoreAttrs, FEATURES_SCHEMA: FeatureStoreAttrs, FEATURES_SCHEMA_V1: FeatureStoreAttrsV1}


@dataclass(frozen=True, eq=False)
class Store(Generic[Attrs]):
    """An opened store: its path, the Zarr group (read-only unless written through ``write_rows``) and typed attrs."""

    path: Path
    group: zarr.Group
    attrs: Attrs

    def __getitem__(self, name: str) -> zarr.Array:
        return self.group[name]

    def array_names(self) -> list[str]:
        return sorted(self.group.array_keys())

    @property
    def unit_rows(self) -> int:
        """Rows per work unit: the shard (or, unsharded, the chunk) of the first array."""
        first = self.group[self.array_names()[0]]
        return (first.shards or first.chunks)[0]

    def units(self) -> list[tuple[int, int]]:
        return unit_ranges(self.attrs.n_rows, self.unit_rows)

    def markers(self) -> UnitMarkers:
        return UnitMarkers(self.path, self.attrs.store_id)

    def missing_units(self) -> set[int]:
        return set(range(len(self.units()))) - self.markers().done()

    def require_finished(self, stage: str) -> None:
        """Unwritten chunks read as zeros, so an unfinished store would silently feed blanks downstream."""
        missing = self.missing_units()
        if missing:
            raise StoreError(f"{self.path} is unfinished ({len(missing)} of {len(self.units())} units missing); rerun `{stage}` to complete it")

    def missing_objects(self, units: Iterable[int] | None = None, arrays: Iterable[str] | None = None) -> list[dict]:
        """The stored objects of ``units`` (default: all) of ``arrays`` (default: all) that are not on
        disk, or are empty: Zarr reads both as the fill value, so only this tells a lost shard from
        zeros. One stat per object; each entry names its array, rows, unit and file."""
        ranges = self.units()
        chosen = sorted(set(range(len(ranges)) if units is None else units))
        missing = []
        for name in arrays or self.array_names():
            array = self[name]
            for unit in chosen:
                for rows, file in object_files(array, *ranges[unit]):
                    if not _holds_bytes(file):
                        missing.append({"array": name, "rows": list(rows), "unit": unit, "file": str(file)})
        return missing

    def require_intact(self, stage: str, units: Iterable[int] | None = None, arrays: Iterable[str] | None = None) -> None:
        """Refuse to read ``units`` of ``arrays`` when a stored object is missing, naming the first and the fix."""
        missing = self.missing_objects(units, arrays)
        if missing:
            first, more = missing[0], f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StoreDamaged(
                f"{self.path} is damaged: array {first['array']!r} rows [{first['rows'][0]}, {first['rows'][1]}) has no stored object "
                f"({first['file']} is missing or empty){more}; {self.repair(stage, [m['unit'] for m in missing])}"
            )

    @contextmanager
    def reading(self, name: str, start: int, end: int, stage: str) -> Iterator[None]:
        """The read boundary for rows [start, end) of array ``name``: a chunk failing its checksum (Zarr
        raises ValueError) or an I/O error becomes a StoreDamaged naming store, array, rows and the fix."""
        try:
            yield
        except (ValueError, OSError) as error:
            if isinstance(error, PathdistillError):
                raise
            units = range(start // self.unit_rows, (end - 1) // self.unit_rows + 1)
            raise StoreDamaged(
                f"{self.path}: array {name!r} rows [{start}, {end}) cannot be read ({type(error).__name__}: {error}): "
                f"run `inspect-store --verify {self.path}` to list the damage, then {self.repair(stage, units)}"
            ) from error

    def repair(self, stage: str, units: Iterable[int]) -> str:
        """How to rewrite damaged units: once forgotten, a rerun of the stage redoes them."""
        units = set(units)
        return (
            f"run `forget-units {self.path} {describe_units(units)}` and rerun `{stage}` to rewrite "
            f"{'it' if len(units) == 1 else 'them'}, or rerun `{stage} --overwrite`"
        )


class UnitReader:
    """One array of a finished store, for a reader that takes its units in any order over a long run
    (the distiller): each unit's stored objects are checked the first time the unit is read, so a
    lost shard is refused rather than read as zeros, and a failed read names the store, array and rows.

    On first read rather than all at open: a check is one stat per stored object, ~30 us on a local
    disk here (39k units of the tiles array in 1.2 s), so ~12 s per array at 10^8 rows (390k units)
    at every start, and far more on a network file system; on first read it is one stat beside
    decompressing the unit's chunks, and none after the first epoch.
    """

    def __init__(self, store: Store, name: str, stage: str):
        self.store, self.name, self.stage = store, name, stage
        self.array = store[name]
        self.unit_rows = store.unit_rows
        self.intact: set[int] = set()

    def require_rows(self, rows: np.ndarray) -> None:
        """Refuse (StoreDamaged) when a unit holding any of ``rows`` lost a stored object."""
        self._require_units(set(np.unique(np.asarray(rows) // self.unit_rows).tolist()))

    def reading(self, start: int, end: int) -> AbstractContextManager[None]:
        """Store.reading for this array: for reads made by other means (Dask)."""
        return self.store.reading(self.name, start, end, self.stage)

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end), checked."""
        self._require_units(set(range(start // self.unit_rows, (end - 1) // self.unit_rows + 1)))
        with self.reading(start, end):
            return self.array[start:end]

    def read_into(self, start: int, end: int, out: np.ndarray) -> Coroutine[Any, Any, None]:
        """Rows [start, end), checked now, decoded into `out` by the coroutine returned, for zarr's event loop:
        a reader that gathers a pool's chunks in one call lets zarr decode them concurrently (its codecs
        run in threads), where a call per chunk decodes one chunk at a time."""
        self._require_units(set(range(start // self.unit_rows, (end - 1) // self.unit_rows + 1)))
        return self._decode_into(start, end, out)

    async def _decode_into(self, start: int, end: int, out: np.ndarray) -> None:
        with self.reading(start, end):
            wrapped = default_buffer_prototype().nd_buffer.from_numpy_array(out)
            await self.array.async_array.get_orthogonal_selection((slice(start, end),), out=wrapped)

    def _require_units(self, units: set[int]) -> None:
        unchecked = units - self.intact
        if unchecked:
            self.store.require_intact(self.stage, unchecked, [self.name])
            self.intact |= unchecked


def object_files(array: zarr.Array, start: int, end: int) -> Iterator[tuple[tuple[int, int], Path]]:
    """(rows, file) of each stored object (a shard, or a chunk when unsharded) holding rows [start, end)
    of ``array``, its key from the array's own chunk key encoding (``chunk_key_encoding`` in zarr.json)."""
    shape = array.shards or array.chunks
    root = Path(array.store_path.store.root) / array.path
    across = [range(math.ceil(size / step)) for size, step in zip(array.shape[1:], shape[1:])]
    for index in range(start // shape[0], math.ceil(end / shape[0])):
        rows = (index * shape[0], min(array.shape[0], (index + 1) * shape[0]))
        for rest in itertools.product(*across):
            yield rows, root / array.metadata.encode_chunk_key((index, *rest))


def _holds_bytes(file: Path) -> bool:
    try:
        return os.stat(file).st_size > 0
    except (FileNotFoundError, NotADirectoryError):
        return False


def compressors(store: StoreConfig, byte_shuffle: bool = False) -> list:
    """Blosc then a crc32c checksum per chunk. Byte shuffle helps multi-byte values (features), not RGB bytes."""
    return [BloscCodec(cname=store.codec, clevel=store.clevel, shuffle="shuffle" if byte_shuffle else "noshuffle"), Crc32cCodec()]


def tile_encoding(store: StoreConfig) -> dict:
    """The `tiles` array's codecs: one JPEG per tile then crc32c (pipeline/tile_codec.py), or lossless
    Blosc like every other array; either way the array reads as uint8 pixels."""
    if store.tile_codec == "jpeg":
        return dict(serializer=JpegTileCodec(store.jpeg_quality, store.jpeg_subsampling), compressors=[Crc32cCodec()], attributes={"codec": READ_WITH})
    return dict(compressors=compressors(store))


def versions() -> dict[str, str]:
    """Package versions, and the JPEG decoder's (what the teachers' pixels were decoded with)."""
    found = {"jpeg-decoder": DECODER}
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


def create_tile_store(path: Path, attrs: TileStoreAttrs, store: StoreConfig) -> Store[TileStoreAttrs]:
    """Create every array at its final size, then the attrs; the ``schema`` attr marks a finished creation."""
    with writing(path, "the new store"):
        group = zarr.open_group(str(path), mode="w")
        rows, n_rows, side = store.shard_rows, attrs.n_rows, attrs.tiling.stored_px
        shape_of = {
            "tiles": ((n_rows, side, side, 3), "uint8", ["row", "y", "x", "channel"]),
            "coords": ((n_rows, 2), "int64", ["row", "xy"]),
            "slide": ((n_rows,), "int32", ["row"]),
            "tissue": ((n_rows,), "float32", ["row"]),
            "flags": ((n_rows,), "uint8", ["row"]),
        }
        for name, (shape, dtype, dims) in shape_of.items():
            if name == "tiles":
                layout = dict(chunks=(store.chunk_rows, *shape[1:]), shards=(rows, *shape[1:]), **tile_encoding(store))
            else:
                layout = dict(chunks=(rows, *shape[1:]), compressors=compressors(store))
            group.create_array(name, shape=shape, dtype=dtype, fill_value=0, dimension_names=dims, **layout)
        group.attrs.update(attrs.to_dict())
        return Store(Path(path), group, attrs)


def create_feature_store(
    path: Path, attrs: FeatureStoreAttrs, chunk_rows: int, shard_rows: int, store: StoreConfig, grid_width: int = 0,
) -> Store[FeatureStoreAttrs]:
    """One float16 [N, V, D] array per recipe and, when ``attrs.grid`` is k > 0, the ``grid`` array
    float16 [N, V, k*k, grid_width]; rows aligned with the tile store's chunks and shards, every chunk
    whole views, cells and features."""
    if (attrs.grid > 0) != (grid_width > 0) or GRID in attrs.recipes:
        raise ValueError(f"a feature store of grid {attrs.grid} needs a grid width exactly when grid > 0 (got {grid_width}) and no recipe named {GRID!r}")
    layouts = {recipe: ((width,), ["row", "view", "feature"]) for recipe, width in attrs.recipes.items()}
    if attrs.grid:
        layouts[GRID] = ((attrs.grid**2, grid_width), ["row", "view", "cell", "feature"])
    with writing(path, "the new store"):
        group = zarr.open_group(str(path), mode="w")
        for name, (per_view, dims) in layouts.items():
            shape = (attrs.n_rows, len(attrs.views), *per_view)
            group.create_array(
                name, shape=shape, dtype="float16", fill_value=0, compressors=compressors(store, byte_shuffle=True),
                chunks=(chunk_rows, *shape[1:]), shards=(shard_rows, *shape[1:]), dimension_names=dims,
            )
        group.attrs.update(attrs.to_dict())
        return Store(Path(path), group, attrs)


def open_store(path: Path, schema: str | None = None) -> Store:
    """Open a finished pathdistill store read-only with typed attrs, or explain what is wrong with ``path``."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a Zarr store (no zarr.json); check the path, or run the stage that makes it")
    group = zarr.open_group(str(path), mode="r")
    found = group.attrs.get("schema")
    if found is None:
        raise StoreError(f"{path} has no pathdistill schema attribute: its creation was interrupted or it is not ours; rerun the stage with --overwrite")
    if found not in ATTRS_OF_SCHEMA:
        family = str(found).rpartition("/")[0]
        known = [s for s in ATTRS_OF_SCHEMA if s.rpartition("/")[0] == family]
        raise StoreError(
            f"{path} holds schema {found!r}, which this pathdistill does not read"
            + (f" (it reads {known[0]!r}): rerun the stage that made it with --overwrite, or use the pathdistill version that wrote it ({group.attrs.get('versions', {}).get('pathdistill', 'unknown')})" if known else "")
        )
    if schema is not None and found != schema:
        raise StoreError(f"{path} holds schema {found!r}, expected {schema!r}")
    return Store(path, group, ATTRS_OF_SCHEMA[found].from_dict(dict(group.attrs), str(path)))


def open_tile_store(path: Path) -> Store[TileStoreAttrs]:
    return open_store(path, TILES_SCHEMA)


def open_feature_store(path: Path, tiles: Store[TileStoreAttrs] | None = None) -> Store[FeatureStoreAttrs]:
    """A feature store; given ``tiles``, one that belongs to it (any other is refused with the reason)."""
    features = open_store(path)
    if not isinstance(features.attrs, FeatureStoreAttrs):
        raise StoreError(f"{path} holds schema {features.attrs.SCHEMA!r}, expected a feature store ({FEATURES_SCHEMA!r} or {FEATURES_SCHEMA_V1!r})")
    if tiles is None:
        return features
    found, expected = features.attrs.tile_store_id, tiles.attrs.store_id
    if found != expected:
        raise StoreError(f"{path} was computed from tile store {found}, not from this one ({expected}); rerun features for this tile store")
    if features.attrs.n_rows != tiles.attrs.n_rows:
        raise StoreError(f"{path} has {features.attrs.n_rows} rows but the tile store has {tiles.attrs.n_rows}; rerun features")
    decoded_with = features.attrs.versions.get("jpeg-decoder")
    if isinstance(tiles["tiles"].serializer, JpegTileCodec) and decoded_with != DECODER:
        raise StoreError(
            f"{path} holds features of JPEG tiles decoded by {decoded_with!r}, but this process decodes them with {DECODER!r}, "
            "so the pixels read now need not be the ones the teacher saw; install the imagecodecs that computed them, or rerun `features --overwrite`"
        )
    return features


def write_rows(store_path: Path, start: int, columns: dict[str, np.ndarray]) -> None:
    """Write whole shards of rows from ``start``. Chunks of zeros are written too (an array's config is
    fixed when it is opened, hence the open here), so an unwritten chunk always means unfinished work."""
    end = start + len(next(iter(columns.values())))
    with writing(store_path, f"rows [{start}, {end}) of"), zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(str(store_path), mode="r+")
        for name, values in columns.items():
            group[name][start : start + len(values)] = values


def rewrite_attrs(store: Store[Attrs], attrs: Attrs) -> Store[Attrs]:
    """Replace the attrs of an existing store (the same store: same schema and id) in one write of its
    group's zarr.json. zarr-python's LocalStore writes it to a temporary file renamed into place
    (since 3.1.3, https://github.com/zarr-developers/zarr-python/pull/3412), so a crash leaves the old
    attrs or the new ones; arrays, chunks and markers are not touched."""
    if attrs.store_id != store.attrs.store_id or attrs.SCHEMA != store.attrs.SCHEMA:
        raise ValueError(f"rewrite_attrs keeps a store's schema and id; {store.path} is {store.attrs.SCHEMA} {store.attrs.store_id}")
    with writing(store.path, "the attrs of"):
        zarr.open_group(str(store.path), mode="r+").attrs.put(attrs.to_dict())
    return Store(store.path, store.group, attrs)


def unit_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(start, min(n_rows, start + shard_rows)) for start in range(0, n_rows, shard_rows)]


# What the index keeps of a unit's marker, when set: the slides a unit could not open (the tiles
# stage fails them) and its read-failed rows (the distiller leaves them out). The rest (timings) is
# dropped when the marker is folded.
INDEX_FIELDS = ("failed_slides", "read_failed", "read_failed_rows")
UNIT_INDEX_FORMAT = "pathdistill.unit-index/1"
FOLD_SECONDS = 30.0  # how often a driver folds new markers into the index while units finish


@dataclass
class FinishedUnits:
    """The finished units of one store, and for the units that have any, their INDEX_FIELDS."""

    units: set[int] = field(default_factory=set)
    notes: dict[int, dict] = field(default_factory=dict)

    def add(self, unit: int, record: dict) -> None:
        self.units.add(unit)
        note = {key: record[key] for key in INDEX_FIELDS if record.get(key)}
        if note:
            self.notes[unit] = note
        else:
            self.notes.pop(unit, None)

    def discard(self, units: set[int]) -> None:
        self.units -= units
        for unit in units:
            self.notes.pop(unit, None)

    def read_failed(self) -> int:
        """Tiles left blank after read errors, over every finished unit."""
        return sum(note.get("read_failed", 0) for note in self.notes.values())

    def to_index(self, store_id: str) -> dict:
        return {
            "format": UNIT_INDEX_FORMAT, "store_id": store_id, "finished": unit_runs(self.units),
            "notes": {str(unit): note for unit, note in sorted(self.notes.items())},
        }

    @classmethod
    def from_index(cls, index: dict) -> FinishedUnits:
        """From ``to_index``'s form; a KeyError, TypeError or ValueError when it is not that."""
        if index["format"] != UNIT_INDEX_FORMAT:
            raise ValueError(f"format {index['format']!r}, expected {UNIT_INDEX_FORMAT!r}")
        units: set[int] = set()
        for first, end in index["finished"]:
            if not (isinstance(first, int) and isinstance(end, int) and 0 <= first < end):
                raise ValueError(f"bad run of units {[first, end]}")
            units.update(range(first, end))
        notes = {int(unit): dict(note) for unit, note in index["notes"].items()}
        if not set(notes) <= units:
            raise ValueError(f"notes for units not finished: {sorted(set(notes) - units)[:5]}")
        return cls(units, notes)


class UnitMarkers:
    """Which units of a store are finished, for resuming only what is missing, in ``<store>.progress/``.

    Each unit writes ``unit-NNNNNN.json`` after its shards: written atomically by the worker that did
    the unit, so a crash anywhere leaves whole markers and no shared file half-written. The driver
    (one per store: the stage's run lock) ``fold``s them into ``index.json`` every FOLD_SECONDS and at
    the end, one atomic write, then deletes the markers it folded; reading is the index plus the
    markers not yet folded. At 10^8 rows a store has ~390k units: a start reads one small index (the
    finished units as runs) instead of 390k files. An index that is unreadable is refused (the
    finished units are unknown, and units must never count as finished by guess); one naming another
    store id counts nothing, like such a marker, and the next fold replaces it.
    """

    def __init__(self, store_path: Path, store_id: str):
        self.directory = progress_dir(store_path)
        self.index_path = self.directory / "index.json"
        self.store_id = store_id
        self.folded_at = time.monotonic()

    def done(self) -> set[int]:
        return self.read().units

    def read(self) -> FinishedUnits:
        finished = self._read_index()
        for unit, record in self._read_markers().values():
            finished.add(unit, record)
        return finished

    def mark(self, unit: int, record: dict) -> None:
        path = self.directory / f"unit-{unit:06d}.json"
        with writing(path, "the unit marker"):
            write_text_atomically(path, json.dumps({**record, "unit": unit, "store_id": self.store_id}))

    def fold(self, together: dict[int, dict] | None = None) -> FinishedUnits:
        """Fold the markers into the index, then delete them; every finished unit. Re-folding a marker
        left by a crash between the two steps changes nothing. ``together``: unit -> record of units a
        writer finished at once (the bench's grown runs), recorded without a marker file each."""
        self.folded_at = time.monotonic()
        if not together and not any(self.directory.glob("unit-*.json")):
            return self.read()
        with self._exclusive():
            finished, markers = self._read_index(), self._read_markers()
            for unit, record in [*markers.values(), *(together or {}).items()]:
                finished.add(unit, record)
            self._write_index(finished)
            for path in markers:
                path.unlink(missing_ok=True)
        return finished

    def fold_if_due(self) -> None:
        if time.monotonic() - self.folded_at >= FOLD_SECONDS:
            self.fold()

    def forget(self, units: Iterable[int]) -> set[int]:
        """Count ``units`` unfinished again, so that a rerun of the stage rewrites them; those that were finished."""
        with self._exclusive():
            finished, markers = self._read_index(), self._read_markers()
            for unit, record in markers.values():
                finished.add(unit, record)
            forgotten = finished.units & set(units)
            finished.discard(forgotten)
            # Their markers go first: a crash before the index is written then still forgets them.
            for path, (unit, _) in markers.items():
                if unit in forgotten:
                    path.unlink(missing_ok=True)
            self._write_index(finished)
            for path in markers:
                path.unlink(missing_ok=True)
        return forgotten

    def _read_index(self) -> FinishedUnits:
        try:
            text = self.index_path.read_text()
        except FileNotFoundError:
            return FinishedUnits()
        try:
            index = json.loads(text)
            if index["store_id"] != self.store_id:
                return FinishedUnits()
            return FinishedUnits.from_index(index)
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(
                f"{self.index_path} is damaged ({type(error).__name__}: {error}), so which units are finished is unknown; "
                "delete it and rerun the stage that writes the store to redo every unit, or rerun that stage with --overwrite"
            ) from error

    def _read_markers(self) -> dict[Path, tuple[int, dict]]:
        """Marker file -> (unit, record), for this store id (markers of a replaced store never count)."""
        found = {}
        for marker in self.directory.glob("unit-*.json"):
            try:
                record = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record.get("store_id") == self.store_id:
                found[marker] = (int(record["unit"]), record)
        return found

    def _write_index(self, finished: FinishedUnits) -> None:
        with writing(self.index_path, "the unit index"):
            write_text_atomically(self.index_path, json.dumps(finished.to_index(self.store_id)))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Folds and forgets of one store one at a time (a forget while a stage runs, say); readers need
        no lock, as the index is replaced whole."""
        lock = self.directory / "index.lock"
        with writing(lock, "the unit index lock"):
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = lock.open("a")
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def unit_runs(units: Iterable[int]) -> list[list[int]]:
    """Sorted units as runs [first, end): 390k finished units of one store are one run."""
    runs: list[list[int]] = []
    for unit in sorted(units):
        if runs and runs[-1][1] == unit:
            runs[-1][1] = unit + 1
        else:
            runs.append([unit, unit + 1])
    return runs


def describe_units(units: Iterable[int]) -> str:
    """``0,4-6``: units as ``forget-units`` takes them."""
    return ",".join(str(first) if end == first + 1 else f"{first}-{end - 1}" for first, end in unit_runs(units))


def parse_units(text: str) -> set[int]:
    """The units of ``describe_units``' form, or a StoreError naming the part that is not."""
    units: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdigit() and (last.isdigit() or not dash)) or int(last or first) < int(first):
            raise StoreError(f"units {text!r}: {part!r} is not a unit or a range like 4-6; give units as 0,4-6")
        units.update(range(int(first), int(last or first) + 1))
    return units


def forget_units(path: Path, units: set[int]) -> set[int]:
    """Forget finished units of the store at ``path`` (a damaged one, say), so that a rerun of the
    stage that made it rewrites them; the units that were finished."""
    store = open_store(path)
    count = len(store.units())
    beyond = sorted(unit for unit in units if unit >= count)
    if beyond:
        raise StoreError(f"{path} has units 0-{count - 1}; there is no unit {beyond[0]}")
    return store.markers().forget(units)


def tile_unit_record(start: int, flags: np.ndarray) -> dict:
    """What a tile unit's marker says of its rows [start, start + len(flags)): its read-failed rows."""
    rows = (start + np.flatnonzero(flags & FLAG_READ_FAILED)).tolist()
    return {"rows": len(flags), "read_failed": len(rows), "read_failed_rows": rows}


def slide_of_row(attrs: TileStoreAttrs) -> np.ndarray:
    """int32 [N]: the slide id of each row, from the slide records (a slide's rows are contiguous)
    rather than from the ``slide`` array, which at 10^8 rows is ~390k chunk files; -1 where no record
    holds a row."""
    slides = np.full(attrs.n_rows, -1, np.int32)
    for slide in attrs.slides:
        slides[slide.rows[0] : slide.rows[1]] = slide.id
    return slides


def read_failed_mask(tiles: Store[TileStoreAttrs], stage: str = "tiles") -> np.ndarray:
    """bool [N]: rows of a finished tile store whose region could not be read (blank tiles), from the
    unit index rather than the ``flags`` array; a unit whose marker (from an earlier version) has a
    count but not the rows has its flags read."""
    mask = np.zeros(tiles.attrs.n_rows, bool)
    ranges = tiles.units()
    flags = UnitReader(tiles, "flags", stage)
    for unit, note in tiles.markers().read().notes.items():
        if "read_failed_rows" in note:
            mask[note["read_failed_rows"]] = True
        elif note.get("read_failed"):
            start, end = ranges[unit]
            mask[start:end] = (flags.read(start, end) & FLAG_READ_FAILED).astype(bool)
    return mask


def remove_store(path: Path) -> None:
    """Delete a store and its markers (only on an explicit overwrite)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(progress_dir(path), ignore_errors=True)
