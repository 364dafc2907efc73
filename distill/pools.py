"""Reading a pool of whole chunks (tiles, every teacher's targets and, for a spatial term, its grid) into
buffers that are reused.

The I/O layer under each array is chosen by measurement on the demo store (bench figure 3, its
I/O-layer rows: time to read a pool's chunks into the buffers, over the codec's own decode time):
- tiles through zarr-python, one `get_basic_selection(out=...)` per chunk: 1.41x, against tensorstore
  1.34x (within the noise of a loaded machine: 1.34x and 1.57x the other way round in an earlier run)
  and zarr's async API gathering the pool in one call 1.77x; and only zarr-python decodes the tile
  codecs registered with it;
- targets through tensorstore on the same zarr v3 arrays, the whole pool's reads issued at once:
  1.6x, against 45x for zarr-python a call per chunk and 30x for its async gather. A chunk of targets
  is ~1 KB a row, so zarr-python's ~2 ms per call is almost all of its cost. Grids [n, V, k*k, C]
  are read the same way, beside the targets.
Both verify the stored crc32c checksums; a chunk that fails becomes a StoreDamaged naming its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import tensorstore as ts
import zarr

if TYPE_CHECKING:
    from distill.cohort import Source


def open_tensorstore(array: zarr.Array) -> ts.TensorStore:
    path = Path(array.store_path.store.root) / array.path
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True, open=True).result()


@dataclass(frozen=True)
class ChunkSpan:
    """Where one chunk's rows live: rows [start, end) of `source`'s arrays (one run of the training set),
    global row ids from `first_row`."""

    source: Source
    start: int
    end: int
    first_row: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class PoolBuffers:
    """Stored rows of one pool: allocated once for `rows` rows, refilled pool after pool (no page faults)."""

    tiles: np.ndarray
    targets: dict[str, np.ndarray]
    grids: dict[str, np.ndarray]  # {} without a spatial term

    @classmethod
    def like(cls, source: Source, rows: int) -> PoolBuffers:
        def empty(array: zarr.Array) -> np.ndarray:
            return np.empty((rows, *array.shape[1:]), array.dtype)

        return cls(
            empty(source.tiles), {teacher: empty(array) for teacher, array in source.targets.items()},
            {teacher: empty(array) for teacher, array in source.grids.items()},
        )

    def read(self, spans: Sequence[ChunkSpan]) -> np.ndarray:
        """Fill the buffers with the spans' rows, in order; returns their global row ids. The reads of
        targets and grids are all issued first and run while the tiles decode."""
        offsets = np.cumsum([0, *map(len, spans)])
        pending = []
        for span, offset in zip(spans, offsets):
            for kind, teacher, reader, store in span.source.pool_arrays():
                reader.require_rows(np.array([span.start, span.end - 1]))
                pending.append((getattr(self, kind)[teacher], reader, span, offset, store[span.start : span.end].read()))
        for span, offset in zip(spans, offsets):
            span.source.tile_reader.read(span.start, span.end, out=self.tiles[offset : offset + len(span)])
        for buffer, reader, span, offset, future in pending:
            with reader.reading(span.start, span.end):
                buffer[offset : offset + len(span)] = future.result()
        return np.concatenate([np.arange(s.first_row, s.first_row + len(s)) for s in spans])
