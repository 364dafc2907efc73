"""Finding slides, identifying them by content, and reading pixels from them with OpenSlide."""

from __future__ import annotations

import csv
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import yaml

from pipeline.config import ConfigError
from pipeline.errors import PathdistillError
from pipeline.tiles.tiff_levels import WHITE, TiffLevelError, TiffLevels

TIFF_SUFFIXES = (".svs", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
MANIFEST_SUFFIXES = (".csv", ".yaml", ".yml")
HASH_SAMPLES = 16
HASH_BLOCK = 1 << 20
UNTILED_PIECE_PX = 256  # piece size for re-reading a failed region of a level that names no tile size


class SlideReadError(PathdistillError, RuntimeError):
    """A region could not be read, even after reopening the slide."""


@dataclass(frozen=True)
class SlideSource:
    """A slide to tile: its path and, when the file lacks it, the level-0 mpp to use."""

    path: Path
    mpp_override: float | None = None


def discover_slides(entries: list[Path]) -> list[SlideSource]:
    """Expand files, folders (their slide files, sorted) and manifests (CSV/YAML: path[, mpp]).

    A missing slide file is kept, so that it is recorded as a failed slide; a missing folder or
    manifest is an error, since nothing can be said about what it held.
    """
    sources: list[SlideSource] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            sources += [SlideSource(p) for p in sorted(entry.iterdir()) if p.suffix.lower() in SLIDE_SUFFIXES]
        elif entry.suffix.lower() in MANIFEST_SUFFIXES:
            sources += _read_manifest(entry)
        else:
            sources.append(SlideSource(entry))
    return sources


def _read_manifest(manifest: Path) -> list[SlideSource]:
    if not manifest.is_file():
        raise ConfigError(f"slide manifest {manifest} does not exist; fix the path in the config or command line")
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = yaml.safe_load(manifest.read_text()) or []
    sources = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("path"):
            raise ConfigError(f"{manifest}: entry {number} has no 'path'; each entry needs path and optionally mpp")
        path = Path(row["path"])
        if not path.is_absolute():
            path = manifest.parent / path
        mpp = row.get("mpp")
        sources.append(SlideSource(path, float(mpp) if mpp not in (None, "") else None))
    return sources


def content_hash(path: Path) -> str:
    """A fast identity of a slide's bytes: size plus evenly spaced 1 MiB samples (head and tail included).

    Hashing every byte of a multi-gigabyte slide costs seconds per slide; the samples catch a
    replaced, re-scanned or truncated file, which is what reruns must notice.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as handle:
        if size <= HASH_SAMPLES * HASH_BLOCK:
            digest.update(handle.read())
        else:
            for offset in np.linspace(0, size - HASH_BLOCK, HASH_SAMPLES).astype(np.int64):
                handle.seek(int(offset))
                digest.update(handle.read(HASH_BLOCK))
    return "blake2b-sampled:" + digest.hexdigest()


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


def _grid_pieces(start: int, length: int, tile: int) -> list[tuple[int, int]]:
    """[start, start + length) cut at the multiples of ``tile``, as (begin, end) pairs."""
    edges = [start, *range((start // tile + 1) * tile, start + length, tile), start + length]
    return list(itertools.pairwise(edges))
