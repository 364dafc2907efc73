"""Figure 6: bytes per tile on disk for tile and feature stores, and the tile codec choice as size,
fidelity and decode speed.

Tile codecs are compared as real tile stores (``create_tile_store`` + ``write_rows``) of the same
tiles of the real SVS (data/demo/cmu_small_region.svs, read at the demo settings): bytes per tile of
the `tiles` array on disk against the lossless store, PSNR of the decoded store against the read
pixels, and tiles/s read through zarr against the decode floor: the same codec on the same bytes
(each chunk's Blosc frame, or each tile's JPEG) decoded in a plain loop, spread over as many threads
as zarr's pool may use. The two are timed in alternating pairs; the ratio is the median of the pairs'.

The alternative representation of JPEG tiles, a variable-length bytes array of one JPEG per row
decoded by the reader, is measured the same way against the same floor (docs/design.md says why the
codec inside the `tiles` array was kept).
"""

from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning

from bench.common import Row, timed
from pipeline.config import Config, StoreConfig, TilingConfig, TissueConfig
from pipeline.geometry import ReadPlan
from pipeline.inspect_store import directory_bytes
from pipeline.stores import RunDir, Tiling, TileStoreAttrs, create_tile_store, open_feature_store, open_tile_store, write_rows
from pipeline.tile_codec import decode_tile, encode_tile
from pipeline.tiles.slide_identity import identify_slide
from pipeline.tiles.slide_tiles import plan_slide, read_tiles
from pipeline.tiles.slides import SlideReader, SlideSource

FIGURE = "6 stores"
DEFAULT = StoreConfig()
TILE_STORES = {
    "lossless blosc-zstd-1": StoreConfig(tile_codec="lossless"),
    "lossless blosc-lz4-1": StoreConfig(tile_codec="lossless", codec="lz4"),
    **{f"JPEG 4:4:4 q{q}": StoreConfig(tile_codec="jpeg", jpeg_quality=q) for q in (80, 85, 90, 95)},
    "JPEG 4:2:0 q90": StoreConfig(tile_codec="jpeg", jpeg_quality=90, jpeg_subsampling="4:2:0"),
}
LOSSLESS = "lossless blosc-zstd-1"
TARGET_PSNR = 37.0
FEATURE_CODECS = {
    "blosc-zstd-1 shuffle (default)": Blosc("zstd", 1, Blosc.SHUFFLE),
    "blosc-zstd-1 noshuffle": Blosc("zstd", 1, Blosc.NOSHUFFLE),
    "blosc-lz4-1 shuffle": Blosc("lz4", 1, Blosc.SHUFFLE),
}
THREADS = os.cpu_count() or 1  # zarr's pool (asyncio's default executor) may use every core


def svs_tiles(svs: Path, quick: bool) -> np.ndarray:
    """The tissue tiles of the real SVS at the demo's tiling, as read (before any store codec)."""
    tiling, tissue = TilingConfig(), TissueConfig()
    plan = plan_slide(0, SlideSource(svs), identify_slide(svs, {}), tiling, tissue, None)
    coords = plan.coords[: 32 if quick else None]
    with SlideReader(svs) as reader:
        tiles, _ = read_tiles(reader, ReadPlan(**plan.record.read), coords, tuple(plan.record.dimensions))
    return tiles


def psnr(decoded: np.ndarray, original: np.ndarray) -> float:
    mse = np.mean((decoded.astype(np.float64) - original) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def tile_store(path: Path, tiles: np.ndarray, store: StoreConfig) -> zarr.Array:
    """A real tile store of ``tiles`` (the `tiles` array only), written as the tile stage writes it."""
    shutil.rmtree(path, ignore_errors=True)
    attrs = TileStoreAttrs.new(Tiling.from_config(Config(store=store)), [], len(tiles))
    create_tile_store(path, attrs, store)
    write_rows(path, 0, {"tiles": tiles})
    return zarr.open_array(str(path / "tiles"), mode="r")


def floor_decoder(tiles: np.ndarray, store: StoreConfig):
    """The decode floor: the store's codec alone (no zarr, no checksum) decoding the same bytes chunk
    by chunk into one reused buffer, the chunks spread over a thread pool."""
    starts = range(0, len(tiles), store.chunk_rows)
    out = np.empty_like(tiles)
    if store.tile_codec == "jpeg":
        encoded = [[encode_tile(tile, store.jpeg_quality, store.jpeg_subsampling) for tile in tiles[start : start + store.chunk_rows]] for start in starts]

        def decode(start: int, chunk: list[bytes]) -> None:
            for index, data in enumerate(chunk):
                decode_tile(data, out=out[start + index])
    else:
        blosc = Blosc(store.codec, store.clevel, Blosc.NOSHUFFLE)
        encoded = [blosc.encode(np.ascontiguousarray(tiles[start : start + store.chunk_rows])) for start in starts]

        def decode(start: int, chunk: bytes) -> None:
            blosc.decode(chunk, out=out[start : start + store.chunk_rows])
    return lambda pool: list(pool.map(decode, starts, encoded))


def vlen_jpeg_array(path: Path, tiles: np.ndarray, store: StoreConfig) -> zarr.Array:
    """The alternative: a variable-length bytes array of one JPEG per row, sharded like `tiles`."""
    shutil.rmtree(path, ignore_errors=True)
    with warnings.catch_warnings():  # zarr warns that this data type has no Zarr v3 specification yet: one reason it is not used
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        array = zarr.create_array(
            str(path), shape=(len(tiles),), dtype=VariableLengthBytes(), chunks=(store.chunk_rows,), shards=(store.shard_rows,), compressors=[Crc32cCodec()],
        )
    encoded = np.empty(len(tiles), dtype=object)
    encoded[:] = [encode_tile(tile, store.jpeg_quality, store.jpeg_subsampling) for tile in tiles]
    array[:] = encoded
    return zarr.open_array(str(path), mode="r")


def decode_rows(array: zarr.Array, out: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """A reader of the vlen array: read the bytes through zarr, decode each row into a reused buffer."""
    list(pool.map(lambda item: decode_tile(item[1], out=out[item[0]]), enumerate(array[:])))
    return out


def paired_against_floor(measured, floor, repeat: int, passes: int) -> tuple[float, float, float]:
    """Best seconds per pass of each, timed alternately, and the median of the pairs' speed ratios
    (measured against floor): on a loaded machine a pair sees the same load, the best times need not."""
    pairs = [(timed(lambda: [measured() for _ in range(passes)]), timed(lambda: [floor() for _ in range(passes)])) for _ in range(repeat)]
    return min(m for m, _ in pairs) / passes, min(f for _, f in pairs) / passes, float(np.median([f / m for m, f in pairs]))


def tile_codec_rows(tiles: np.ndarray, work: Path, quick: bool) -> list[Row]:
    rows, sizes, fidelity, n = [], {}, {}, len(tiles)
    repeat, passes = (2, 1) if quick else (5, -(-256 // n))  # each timing decodes >= 256 tiles
    default = next(name for name, store in TILE_STORES.items() if store == DEFAULT)
    with ThreadPoolExecutor(THREADS) as pool:
        for name, store in TILE_STORES.items():
            path = work / f"codec-{name.replace(' ', '-')}.zarr"
            array = tile_store(path, tiles, store)
            sizes[name], fidelity[name] = directory_bytes(path / "tiles") / n, psnr(array[:], tiles)
            floor, out = floor_decoder(tiles, store), default_buffer_prototype().nd_buffer.from_numpy_array(np.empty_like(tiles))
            through_zarr, raw, ratio = paired_against_floor(lambda: array.get_basic_selection(slice(0, n), out=out), lambda: floor(pool), repeat, passes)
            rows.append(Row(
                FIGURE, f"tiles {name}{' (default)' if name == default else ''}: read through zarr", n / through_zarr, "tiles/s",
                f"decode floor ({n / raw:,.0f} tiles/s, {THREADS} threads)", ratio,
                note=f"{sizes[name] / 1024:.1f} KiB/tile, {sizes[name] / sizes[LOSSLESS]:.3f}x the lossless store; PSNR {fidelity[name]:.1f} dB",
            ))
        rows.append(Row(FIGURE, f"tiles {default} (default): size per tile", sizes[default] / 1024, "KiB/tile", f"{LOSSLESS} store ({sizes[LOSSLESS] / 1024:.1f} KiB/tile)", sizes[default] / sizes[LOSSLESS], "<= 0.25", note=f"{n} tissue tiles of the real SVS"))
        rows.append(Row(FIGURE, f"tiles {default} (default): PSNR against the read pixels", fidelity[default], "dB", f"{TARGET_PSNR:g} dB", fidelity[default] / TARGET_PSNR, ">= 1.0"))
        path = work / "codec-vlen-jpeg.zarr"
        alternative, floor = vlen_jpeg_array(path, tiles, DEFAULT), floor_decoder(tiles, DEFAULT)
        out = np.empty_like(tiles)
        through_vlen, raw, ratio = paired_against_floor(lambda: decode_rows(alternative, out, pool), lambda: floor(pool), repeat, passes)
        rows.append(Row(
            FIGURE, f"tiles {default} as a vlen-bytes array, decoded by the reader", n / through_vlen, "tiles/s", f"decode floor ({n / raw:,.0f} tiles/s)", ratio,
            note=f"{directory_bytes(path) / n / 1024:.1f} KiB/tile; the alternative representation, not used",
        ))
    return rows


def feature_codec_rows(sample: np.ndarray) -> list[Row]:
    raw = np.ascontiguousarray(sample)
    copy_seconds = timed(lambda: raw.copy(), repeat=3)
    rows = []
    for name, codec in FEATURE_CODECS.items():
        encoded = codec.encode(raw)
        seconds = timed(lambda: codec.decode(encoded), repeat=3)
        rows.append(Row(FIGURE, f"features codec {name}: decode", raw.nbytes / seconds / 2**20, "MiB/s", "memory copy of the raw bytes", copy_seconds / seconds, note=f"{raw.nbytes / len(encoded):.2f}x smaller than raw"))
    return rows


def measure(run_dir: Path, svs: Path, work: Path, quick: bool) -> list[Row]:
    run = RunDir(run_dir)
    tiles = open_tile_store(run.tiles)
    n_rows, codec = tiles.attrs.n_rows, tiles.attrs.tiling.store["tile_codec"]
    rows = [Row(FIGURE, f"tile store on disk ({codec})", directory_bytes(run.tiles) / n_rows / 1024, "KiB/tile", "raw uint8 pixels", tiles["tiles"].nbytes / directory_bytes(run.tiles), note="ratio = times smaller than raw")]
    rows += tile_codec_rows(svs_tiles(svs, quick), work, quick)
    stores = [open_feature_store(run.features(teacher)) for teacher in run.teachers_with_features()]
    for store in stores:
        raw = sum(store[name].nbytes for name in store.array_names())
        rows.append(Row(FIGURE, f"feature store {store.path.stem} on disk", directory_bytes(store.path) / n_rows, "bytes/tile", "raw float16", raw / directory_bytes(store.path), note=f"recipes {store.attrs.recipes}"))
    if stores:
        rows += feature_codec_rows(stores[0][stores[0].array_names()[0]][: 256 if quick else 4096])
    return rows
