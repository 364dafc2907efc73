"""The lossy tile codec: each tile of a chunk stored as its own JPEG, inside the `tiles` array.

A Zarr v3 array-to-bytes codec (``pathdistill.jpeg``), so the array still reads as uint8 pixels
[rows, S, S, 3] and every reader (features, the distill loader, evaluate, Dask views through
``da.from_zarr``, inspect-store) decodes it without knowing. A chunk's bytes are a little-endian
uint32 table ``[n_tiles, end_0, ..., end_{n-1}]`` (each end an offset past the table) followed by the
tiles' JPEGs; the crc32c codec after it checksums the whole chunk as it does for lossless chunks.

Exactness: the teachers are fed the *decoded stored* pixels, and the student is shown the same
ones, so both must decode alike. One decoder is used everywhere (libjpeg-turbo through
``imagecodecs.jpeg8_decode``, default settings): the same bytes give the same pixels.
Its version is recorded with every store (``DECODER``, in the attrs' ``versions``), and feature
stores of a JPEG tile store are refused when read with another decoder version (``pipeline/stores.py``).

Registered with zarr's codec registry when this module is imported (``pipeline.stores`` imports it)
and as the ``zarr.codecs`` entry point of the installed package; a plain zarr without pathdistill
fails with ``Unknown codec: 'pathdistill.jpeg'``, and the array's attributes say what to install.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

NAME = "pathdistill.jpeg"
DECODER = f"imagecodecs {imagecodecs.__version__}, {imagecodecs.jpeg8_version()}"
READ_WITH = "per-tile JPEG (pathdistill.jpeg codec): read with pathdistill installed (pip install pathdistill; `import pipeline.stores` registers the codec)"
Subsampling = Literal["4:4:4", "4:2:0"]
SUBSAMPLING_ARGUMENT = {"4:4:4": "444", "4:2:0": "420"}  # imagecodecs' spelling; its default is 4:2:0


def encode_tile(tile: np.ndarray, quality: int, subsampling: Subsampling) -> bytes:
    return imagecodecs.jpeg8_encode(tile, level=quality, subsampling=SUBSAMPLING_ARGUMENT[subsampling])


def decode_tile(data: np.ndarray | bytes, out: np.ndarray | None = None) -> np.ndarray:
    """The one JPEG decoder of the project (store reads and the bench's decode floor)."""
    return imagecodecs.jpeg8_decode(data, out=out)


@dataclass(frozen=True)
class JpegTileCodec(ArrayBytesCodec):
    """uint8 chunks [rows, S, S, 3] <-> a table of ends and one JPEG per tile."""

    quality: int = 90
    subsampling: Subsampling = "4:4:4"

    is_fixed_size = False

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100 or self.subsampling not in SUBSAMPLING_ARGUMENT:
            raise ValueError(f"{NAME}: quality must be 1..100 and subsampling one of {list(SUBSAMPLING_ARGUMENT)}, got {self.quality!r}, {self.subsampling!r}")

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> JpegTileCodec:
        _, configuration = parse_named_configuration(data, NAME)
        return cls(**configuration)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": NAME, "configuration": {"quality": self.quality, "subsampling": self.subsampling}}

    def validate(self, *, shape: tuple[int, ...], dtype: object, chunk_grid: object) -> None:
        if len(shape) != 4 or shape[-1] != 3 or dtype.to_native_dtype() != np.uint8:  # type: ignore[attr-defined]
            raise ValueError(f"{NAME} stores uint8 RGB tiles [rows, S, S, 3], not {dtype} {list(shape)}")

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        tiles = np.ascontiguousarray(chunk_array.as_numpy_array())
        encoded = [encode_tile(tile, self.quality, self.subsampling) for tile in tiles]
        table = np.array([len(encoded), *np.cumsum([len(data) for data in encoded])], dtype="<u4")
        return chunk_spec.prototype.buffer.from_bytes(table.tobytes() + b"".join(encoded))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        data = chunk_bytes.as_numpy_array()
        count = int(data[:4].view("<u4")[0])
        if count != chunk_spec.shape[0]:
            raise ValueError(f"{NAME} chunk holds {count} tiles, the array's chunk {chunk_spec.shape[0]}")
        ends = data[4 : 4 * (count + 1)].view("<u4")
        payload = data[4 * (count + 1) :]
        tiles = np.empty(chunk_spec.shape, dtype=np.uint8)
        for index, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            try:
                decode_tile(payload[start:end], out=tiles[index])
            except (imagecodecs.Jpeg8Error, ValueError) as error:  # ValueError: the store's read boundary names rows and fix
                raise ValueError(f"{NAME}: tile {index} of the chunk does not decode ({error})") from error
        return chunk_spec.prototype.nd_buffer.from_numpy_array(tiles)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable: JPEG sizes depend on the pixels


register_codec(NAME, JpegTileCodec)
