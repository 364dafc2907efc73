"""Finding slides (files, folders, manifests; a folder of DICOM files is one slide) and reading pixels from them."""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import yaml

from pipeline.config import ConfigError
from pipeline.errors import PathdistillError
from pipeline.tiles.tiff_levels import WHITE, TiffLevelError, TiffLevels

TIFF_SUFFIXES = (".svs", ".tif", ".tiff")
DICOM_SUFFIX = ".dcm"
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", DICOM_SUFFIX)
MANIFEST_SUFFIXES = (".csv", ".yaml", ".yml")
MANIFEST_COLUMNS = ("path", "mpp")
UNTILED_PIECE_PX = 256  # piece size for re-reading a failed region of a level that names no tile size


class SlideReadError(PathdistillError, RuntimeError):
    """A region could not be read, even after reopening the slide."""


@dataclass(frozen=True)
class SlideSource:
    """A slide to tile: the file OpenSlide opens and, when the file lacks it, the level-0 mpp to use."""

    path: Path
    mpp_override: float | None = None

    @property
    def name(self) -> str:
        """A DICOM slide is its folder (its files are named after levels); any other slide is its file."""
        return self.path.parent.name if is_dicom(self.path) else self.path.stem


@dataclass(frozen=True)
class SlideList:
    """The slides to tile, each file once, and a line per entry that named a file already listed."""

    sources: list[SlideSource]
    repeats: list[str]


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() == DICOM_SUFFIX


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_dicom(p))


def slide_files(path: Path) -> list[Path]:
    """Every file a slide's pixels come from: OpenSlide reads a DICOM slide from all the .dcm files of its folder."""
    return dicom_files(path.parent) if is_dicom(path) and path.parent.is_dir() else [path]


def discover_slides(entries: list[Path]) -> SlideList:
    """Expand files, folders (their slide files, sorted) and manifests (CSV/YAML: path[, mpp]).

    A folder's .dcm files are one slide, opened through the first of them (OpenSlide finds the rest).
    A missing slide file is kept, so that it is recorded as a failed slide; a missing folder or
    manifest is an error, since nothing can be said about what it held. A file listed again (under
    the same path, through a symlink, or as another .dcm file of the same folder) is tiled once.
    """
    found: list[SlideSource] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            dicom = [p for p in files if is_dicom(p)]
            found += [SlideSource(p) for p in files if p not in dicom[1:]]
        elif entry.suffix.lower() in MANIFEST_SUFFIXES:
            found += _read_manifest(entry)
        else:
            found.append(SlideSource(entry))
    return _each_file_once(found)


def _canonical(path: Path) -> Path:
    """The one path a slide is known by: resolved, and for DICOM the first .dcm file of its folder."""
    path = path.resolve()
    return next(iter(slide_files(path)), path)


def _each_file_once(found: list[SlideSource]) -> SlideList:
    """Each file at its first place in the list, with the mpp any of its entries gives (two that differ are an error)."""
    first: dict[Path, SlideSource] = {}
    repeats = []
    for source in found:
        path = _canonical(source.path)
        if path not in first:
            first[path] = SlideSource(path, source.mpp_override)
            continue
        given = sorted({first[path].mpp_override, source.mpp_override} - {None})
        if len(given) > 1:
            raise ConfigError(f"slide {path} is listed more than once with different mpp {given}; list it once, with its mpp")
        first[path] = SlideSource(path, given[0] if given else None)
        repeats.append(f"slide {path} is listed more than once (again as {source.path}); it is tiled once")
    return SlideList(list(first.values()), repeats)


def _read_manifest(manifest: Path) -> list[SlideSource]:
    """Rows of ``path`` (relative to the manifest's folder, or absolute) and optionally ``mpp``; any
    other column is refused, since a misspelt ``mpp`` would otherwise be silently ignored."""
    if not manifest.is_file():
        raise ConfigError(f"slide manifest {manifest} does not exist; fix the path in the config or command line")
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            _check_columns(manifest, "its header", reader.fieldnames or [])
            rows = [(f"line {reader.line_num}", row) for row in reader]
    else:
        entries = yaml.safe_load(manifest.read_text()) or []
        if not isinstance(entries, list):
            raise ConfigError(f"slide manifest {manifest} must be a list of entries (path and optionally mpp)")
        rows = [(f"entry {number}", row) for number, row in enumerate(entries, start=1)]
    sources = []
    for where, row in rows:
        if isinstance(row, dict):
            _check_columns(manifest, where, list(row))
        if not isinstance(row, dict) or not row.get("path"):
            raise ConfigError(f"slide manifest {manifest}, {where}: no 'path'; each entry needs path and optionally mpp")
        path = Path(str(row["path"]))
        if not path.is_absolute():
            path = manifest.parent / path
        sources.append(SlideSource(path, _manifest_mpp(manifest, where, row.get("mpp"))))
    return sources


def _check_columns(manifest: Path, where: str, columns: list) -> None:
    accepted = ", ".join(MANIFEST_COLUMNS)
    if None in columns:  # csv.DictReader's key for values beyond the header
        raise ConfigError(f"slide manifest {manifest}, {where}: more values than the header has columns; the accepted columns are {accepted}")
    unknown = [column for column in columns if column not in MANIFEST_COLUMNS]
    if unknown:
        raise ConfigError(f"slide manifest {manifest}, {where}: unknown column {', '.join(map(repr, unknown))}; the accepted columns are {accepted}")


def _manifest_mpp(manifest: Path, where: str, value: object) -> float | None:
    """A manifest's mpp: empty means the slide's own; anything else must be a positive number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        mpp = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(
            f"slide manifest {manifest}, {where}: mpp {value!r} is not a positive number of micrometres per "
            "pixel; fix it, or leave it empty to use the slide's own"
        )
    return mpp


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA on white: transparent pixels are outside the scanned area."""
    if rgba[..., 3].min() == 255:  # the usual case inside a slide: nothing to composite
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


class SlideReader:
    """One open slide. Tiled TIFF levels are decoded directly (``direct``); the rest is read through
    OpenSlide, reopened once after an error since OpenSlide errors latch."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = Path(path)
        self.slide = openslide.OpenSlide(str(self.path))
        self.tiff = self._tiff_levels() if direct and self.path.suffix.lower() in TIFF_SUFFIXES else None

    def _tiff_levels(self) -> TiffLevels | None:
        try:
            return TiffLevels(self.path, self.slide.level_dimensions)
        except Exception:  # noqa: BLE001 - a TIFF that tifffile cannot parse is still OpenSlide's to read
            return None

    def backend(self, level: int) -> str:
        """Which reader serves ``level``: recorded with the slide, since it decides sub-pixel placement."""
        return "tifffile" if self.tiff is not None and level in self.tiff.pages else "openslide"

    def read(self, location0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of ``size`` level pixels whose top-left is ``location0`` at level 0."""
        if self.backend(level) == "tifffile":
            downsample = self.slide.level_downsamples[level]
            x, y = (int(round(v / downsample)) for v in location0)
            try:
                return self.tiff.read(level, x, y, *size)
            except TiffLevelError as error:
                raise SlideReadError(str(error)) from error
        try:
            return self._read_once(location0, level, size)
        except openslide.OpenSlideError:
            self.reopen()
        try:
            return self._read_once(location0, level, size)
        except openslide.OpenSlideError as error:
            self.reopen()
            raise SlideReadError(f"{self.path}: region {location0} level {level} size {size}: {error}") from error

    def read_tolerant(self, location0: tuple[int, int], level: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``read``, but what cannot be decoded comes back white and True in a bool mask [h, w]: one
        undecodable JPEG tile must not cost a whole overview strip.

        A failed region is read again one piece of the level's tile grid at a time, so the unread part
        is exactly the undecodable tiles (for OpenSlide at a fractional downsample, a piece may touch a
        neighbouring tile).
        """
        width, height = size
        try:
            return self.read(location0, level, size), np.zeros((height, width), bool)
        except SlideReadError:
            pass
        downsample = self.slide.level_downsamples[level]
        x, y = (int(round(v / downsample)) for v in location0)
        pixels = np.full((height, width, 3), WHITE, np.uint8)
        unread = np.zeros((height, width), bool)
        tile_width, tile_height = self._tile_size(level)
        for top, bottom in _grid_pieces(y, height, tile_height):
            for left, right in _grid_pieces(x, width, tile_width):
                piece = np.s_[top - y : bottom - y, left - x : right - x]
                try:
                    pixels[piece] = self.read((round(left * downsample), round(top * downsample)), level, (right - left, bottom - top))
                except SlideReadError:
                    unread[piece] = True
        return pixels, unread

    def _tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the level's own tiles, the unit in which it fails to decode."""
        properties = self.slide.properties
        return tuple(int(properties.get(f"openslide.level[{level}].tile-{side}", UNTILED_PIECE_PX)) for side in ("width", "height"))

    def _read_once(self, location0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return rgba_to_rgb(np.asarray(self.slide.read_region(location0, level, size)))

    def reopen(self) -> None:
        self.slide.close()
        self.slide = openslide.OpenSlide(str(self.path))

    def close(self) -> None:
        self.slide.close()
        if self.tiff is not None:
            self.tiff.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlides:
    """Slides kept open from one unit to the next, with the level tiles they decoded: the next unit of
    a slide then neither opens it again nor decodes again the JPEG tiles it shares with the previous
    unit. At most ``keep`` are open (a unit that spans a slide boundary needs two). A file that
    changed or vanished since it was opened is opened again, so a unit reads each slide as it is now.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.readers: OrderedDict[tuple[Path, bool], tuple[tuple[int, ...], SlideReader]] = OrderedDict()

    def get(self, path: Path, direct: bool) -> SlideReader:
        """An open reader of ``path``; raises what opening it raises (OSError, OpenSlideError)."""
        key = (Path(path), direct)
        status = os.stat(key[0])
        found = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        fingerprint, reader = self.readers.pop(key, (None, None))
        if fingerprint != found:
            if reader is not None:
                reader.close()
            reader = SlideReader(key[0], direct)
        self.readers[key] = (found, reader)
        while len(self.readers) > self.keep:
            self.readers.popitem(last=False)[1][1].close()
        return reader

    def close(self) -> None:
        while self.readers:
            self.readers.popitem()[1][1].close()

    def __enter__(self) -> OpenSlides:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _grid_pieces(start: int, length: int, tile: int) -> list[tuple[int, int]]:
    """[start, start + length) cut at the multiples of ``tile``, as (begin, end) pairs."""
    edges = [start, *range((start // tile + 1) * tile, start + length, tile), start + length]
    return list(itertools.pairwise(edges))
