"""Reading tiled TIFF levels by decoding their tiles directly (tifffile + imagecodecs).

OpenSlide paints every region through cairo, which costs more than decoding the JPEG tiles under
it; for TIFF-based slides (generic pyramidal TIFF, Aperio SVS) the level's own tiles can be decoded
and pasted instead. The pixels equal OpenSlide's (same libjpeg-turbo decode, checked in the tests),
except that regions land on whole level pixels, where OpenSlide shifts by a fraction of a pixel
when a level's downsample is not a whole number.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from pipeline.errors import PathdistillError

WHITE = 255  # outside the image, like OpenSlide's transparent pixels composited on white
CACHED_TILES = 384  # decoded tiles kept (~75 MB of 256 px tiles): neighbouring blocks share edge tiles
TILE_HEADER_BYTES = 1 << 16  # room for JPEG tables and markers inside a tile, beyond its pixels


class TiffLevelError(PathdistillError, RuntimeError):
    """A tile of the level could not be read or decoded."""


class TiffLevels:
    """The tiled RGB levels of a TIFF whose shapes match OpenSlide's levels; others are left to OpenSlide."""

    def __init__(self, path: Path, level_dimensions: list[tuple[int, int]]):
        self.tiff = tifffile.TiffFile(path)
        pyramid = self.tiff.series[0].levels if self.tiff.series else []
        self.pages = {
            level: series.pages[0]
            for level, series in enumerate(pyramid[: len(level_dimensions)])
            if _decodable(series.pages[0], level_dimensions[level])
        }
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] whose top-left is level pixel (x, y); white outside the image."""
        page = self.pages[level]
        tile_h, tile_w = page.tilelength, page.tilewidth
        image_h, image_w = page.imagelength, page.imagewidth
        columns = -(-image_w // tile_w)
        out = np.full((height, width, 3), WHITE, np.uint8)
        rows = range(max(0, y) // tile_h, (min(image_h, y + height) - 1) // tile_h + 1)
        columns_hit = range(max(0, x) // tile_w, (min(image_w, x + width) - 1) // tile_w + 1)
        for row in rows:
            for column in columns_hit:
                tile = self._tile(page, row * columns + column)
                top, left = row * tile_h, column * tile_w
                y0, y1 = max(y, top), min(y + height, top + tile_h, image_h)
                x0, x1 = max(x, left), min(x + width, left + tile_w, image_w)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def _tile(self, page: tifffile.TiffPage, index: int) -> np.ndarray:
        key = (page.index, index)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        tile = self._decode(page, index)
        self.cache[key] = tile
        if len(self.cache) > CACHED_TILES:
            self.cache.popitem(last=False)
        return tile

    def _decode(self, page: tifffile.TiffPage, index: int) -> np.ndarray:
        handle = self.tiff.filehandle
        # A damaged byte-count table can claim gigabytes per tile. No real tile takes more bytes than
        # twice its pixels, so the bound changes only damaged counts (a JPEG ends at its own marker).
        most_bytes = 2 * page.tilewidth * page.tilelength * page.samplesperpixel + TILE_HEADER_BYTES
        try:
            handle.seek(page.dataoffsets[index])
            data = handle.read(min(page.databytecounts[index], most_bytes))
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # noqa: BLE001 - any codec failure is a read failure of this tile
            raise TiffLevelError(f"{self.tiff.filename}: tile {index} of level page {page.index}: {error}") from error
        if tile is None:
            raise TiffLevelError(f"{self.tiff.filename}: tile {index} of level page {page.index} is empty")
        return tile[0]

    def close(self) -> None:
        self.tiff.close()


def _decodable(page: tifffile.TiffPage, dimensions: tuple[int, int]) -> bool:
    return page.is_tiled and page.samplesperpixel == 3 and page.bitspersample == 8 and (page.imagewidth, page.imagelength) == tuple(dimensions)
