"""Figure 6: bytes per tile on disk for tile and feature stores, and the codec choice as size against read speed.

Each codec's decode speed is a ratio to copying the same raw bytes in memory (the floor of any read).
"""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
from numcodecs import Blosc

from bench.common import Row, timed
from pipeline.inspect_store import directory_bytes
from pipeline.stores import RunDir, open_feature_store, open_tile_store

FIGURE = "6 stores"
TILE_CODECS = {
    "blosc-zstd-1 (default)": Blosc("zstd", 1, Blosc.NOSHUFFLE),
    "blosc-zstd-5": Blosc("zstd", 5, Blosc.NOSHUFFLE),
    "blosc-lz4-1": Blosc("lz4", 1, Blosc.NOSHUFFLE),
    "blosc-zstd-1 bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
}
FEATURE_CODECS = {
    "blosc-zstd-1 shuffle (default)": Blosc("zstd", 1, Blosc.SHUFFLE),
    "blosc-zstd-1 noshuffle": Blosc("zstd", 1, Blosc.NOSHUFFLE),
    "blosc-lz4-1 shuffle": Blosc("lz4", 1, Blosc.SHUFFLE),
}


def codec_rows(kind: str, sample: np.ndarray, codecs: dict) -> list[Row]:
    raw = np.ascontiguousarray(sample)
    copy_seconds = timed(lambda: raw.copy(), repeat=3)
    rows = []
    for name, codec in codecs.items():
        encoded = codec.encode(raw)
        seconds = timed(lambda: codec.decode(encoded), repeat=3)
        rows.append(Row(FIGURE, f"{kind} codec {name}: decode", raw.nbytes / seconds / 2**20, "MiB/s", "memory copy of the raw bytes", copy_seconds / seconds, note=f"{raw.nbytes / len(encoded):.2f}x smaller than raw"))
    if kind == "tiles":  # lossy, per tile: what the teachers would see is no longer the scanner's pixels
        encoded_tiles = [imagecodecs.jpeg_encode(tile, level=90) for tile in raw]
        seconds = timed(lambda: [imagecodecs.jpeg_decode(data) for data in encoded_tiles], repeat=3)
        size = sum(len(data) for data in encoded_tiles)
        rows.append(Row(FIGURE, "tiles codec JPEG q90 (lossy): decode", raw.nbytes / seconds / 2**20, "MiB/s", "memory copy of the raw bytes", copy_seconds / seconds, note=f"{raw.nbytes / size:.2f}x smaller than raw; changes pixels"))
    return rows


def measure(run_dir: Path, quick: bool) -> list[Row]:
    run = RunDir(run_dir)
    tiles = open_tile_store(run.tiles)
    n_rows = tiles.attrs.n_rows
    rows = [Row(FIGURE, "tile store on disk", directory_bytes(run.tiles) / n_rows / 1024, "KiB/tile", "raw uint8 pixels", tiles["tiles"].nbytes / directory_bytes(run.tiles), note="ratio = times smaller than raw")]
    sample = tiles["tiles"][: 32 if quick else 256]
    rows += codec_rows("tiles", sample, TILE_CODECS)
    stores = [open_feature_store(run.features(teacher)) for teacher in run.teachers_with_features()]
    for store in stores:
        raw = sum(store[name].nbytes for name in store.array_names())
        rows.append(Row(FIGURE, f"feature store {store.path.stem} on disk", directory_bytes(store.path) / n_rows, "bytes/tile", "raw float16", raw / directory_bytes(store.path), note=f"recipes {store.attrs.recipes}"))
    if stores:
        rows += codec_rows("features", stores[0][stores[0].array_names()[0]][: 256 if quick else 4096], FEATURE_CODECS)
    return rows
