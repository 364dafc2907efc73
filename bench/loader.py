"""Figures 3 and 4: the distiller's loader against the floors and the per-sample readers others use,
and cached-target training against running the teachers online.

Floors and baselines, all on the same rows of the same run, run interleaved with the loader:
- decode floor: the chunks the loader reads (tiles and every target), each decoded once by its
  array's own codec from bytes already in memory, by 1 and 2 threads, with no I/O, checksums,
  shuffling or batching; the loader with 1 and 2 reading threads is measured against it;
- per-sample Zarr: one read per sample and array, the usual map-style Dataset;
- per-tile HDF5: TRIDENT/CLAM files (one per slide, chunks of one row, no compression), one read per sample;
- the I/O layers the pool reader could use (zarr-python per chunk, zarr's async API gathering a
  pool in one call, tensorstore) on the same chunks, tiles and targets apart: why distill/pools.py
  reads tiles with zarr-python and targets with tensorstore;
- two processes reading as DDP ranks 0 and 1 of 2: the rows each reads, against the epoch.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bench.common import Row, interleaved, timed
from distill.data import BlockShuffleLoader, DistillData, open_distill_data
from distill.pools import open_tensorstore
from distill.train import run_distill
from pipeline.config import Config, DistillConfig
from pipeline.tile_codec import JpegTileCodec, decode_tile, encode_tile

FIGURE_LOADER, FIGURE_CACHED = "3 loader", "4 cached vs online"


def loader_work(data: DistillData, samples: int, settings: DistillConfig, workers: int, rank: int = 0, world: int = 1):
    """Reading `samples` rows with a fresh loader (its buffers and read-ahead threads included)."""
    keep = np.ones(len(data.slide_of_row), bool)

    def consume() -> None:
        seen = 0
        loader = BlockShuffleLoader(data, keep, settings.batch_size, settings.pool_chunks, workers, seed=0, rank=rank, world=world)
        for batch in loader:
            seen += len(batch)
            if seen >= samples:
                break

    return consume


def loader_rate(data: DistillData, samples: int, settings: DistillConfig) -> float:
    """Samples/s of a fresh loader with the run's own reading threads, best of two."""
    return samples / timed(loader_work(data, samples, settings, settings.loader_workers), repeat=2)


class JpegChunks:
    """A chunk of tiles as the JPEG tile codec stores it, in memory: one JPEG per tile, same encoder and decoder."""

    def __init__(self, codec: JpegTileCodec):
        self.codec = codec

    def encode(self, tiles: np.ndarray) -> list[bytes]:
        return [encode_tile(tile, self.codec.quality, self.codec.subsampling) for tile in tiles]

    def decode(self, encoded: list[bytes]) -> list[np.ndarray]:
        return [decode_tile(data) for data in encoded]


def in_memory_codec(array: zarr.Array):
    """What decodes `array`'s chunks outside Zarr: the JPEG tile codec's own decoder, or the numcodecs
    twin of its Blosc compressor (a new codec adds its decoder here)."""
    if isinstance(array.serializer, JpegTileCodec):
        return JpegChunks(array.serializer)
    codec = array.compressors[0]
    if isinstance(codec, BloscCodec):
        return Blosc(codec.cname.value, codec.clevel, {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[codec.shuffle.value])
    raise NotImplementedError(f"bench/loader.py has no in-memory decoder for {codec!r}")


def decode_floor_work(arrays: list[zarr.Array], chunks: np.ndarray, threads: int):
    """Decoding every chunk of every array from in-memory bytes, by `threads` threads."""
    encoded = []
    for array in arrays:
        codec, rows = in_memory_codec(array), array.chunks[0]
        encoded += [(codec, codec.encode(np.ascontiguousarray(array[c * rows : (c + 1) * rows]))) for c in chunks]
    executor = ThreadPoolExecutor(threads)
    return lambda: list(executor.map(lambda item: item[0].decode(item[1]), encoded))


def io_layer_works(arrays: list[zarr.Array], pools: list[np.ndarray]) -> dict[str, object]:
    """Reading the pools' chunks of `arrays` into reused buffers through each candidate I/O layer
    (tensorstore only where it decodes the arrays' codecs: not the JPEG tile codec)."""
    rows = arrays[0].chunks[0]
    buffers = [np.empty((rows * max(map(len, pools)), *a.shape[1:]), a.dtype) for a in arrays]
    wrap = default_buffer_prototype().nd_buffer.from_numpy_array
    tensorstore_reads = not any(isinstance(a.serializer, JpegTileCodec) for a in arrays)
    stores = [open_tensorstore(a) for a in arrays] if tensorstore_reads else []

    def per_chunk() -> None:
        for pool in pools:
            for array, buffer in zip(arrays, buffers):
                for i, c in enumerate(pool):
                    array.get_basic_selection(slice(c * rows, (c + 1) * rows), out=wrap(buffer[i * rows : (i + 1) * rows]))

    async def gather(pool) -> None:
        await asyncio.gather(*(
            array.async_array.get_orthogonal_selection((slice(c * rows, (c + 1) * rows),), out=wrap(buffer[i * rows : (i + 1) * rows]))
            for array, buffer in zip(arrays, buffers) for i, c in enumerate(pool)
        ))

    def tensorstore_batch() -> None:
        for pool in pools:
            futures = [(buffer, i, store[int(c) * rows : (int(c) + 1) * rows].read()) for store, buffer in zip(stores, buffers) for i, c in enumerate(pool)]
            for buffer, i, future in futures:
                buffer[i * rows : (i + 1) * rows] = future.result()

    works = {"zarr-python, a call per chunk": per_chunk, "zarr async API, a pool per call": lambda: [sync(gather(p)) for p in pools]}
    return works | ({"tensorstore, a pool per batch": tensorstore_batch} if tensorstore_reads else {})


def rank_epoch(run_dir: str, settings: dict, rank: int) -> tuple[np.ndarray, int, float]:
    """One DDP rank's first epoch of the loader, in its own process: (row ids, rows owned, seconds)."""
    data = open_distill_data([Path(run_dir)], DistillConfig(**settings))
    keep = np.ones(len(data.slide_of_row), bool)
    loader = BlockShuffleLoader(data, keep, 16, settings["pool_chunks"], 1, seed=0, rank=rank, world=2)
    own = int(sum(loader.rows_in_chunk[chunks].sum() for _, chunks in loader.epoch_pools(0)))
    seen, began = [], time.perf_counter()
    for batch in loader:
        seen.append(batch.rows)
        if sum(map(len, seen)) >= own:
            break
    return np.concatenate(seen)[:own], own, time.perf_counter() - began


def two_ranks(run_dir: Path, settings: DistillConfig) -> tuple[list[np.ndarray], list[int], float]:
    """Each rank's rows of its epoch, the rows it owns, and the slower rank's seconds, two processes at once."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        found = pool.starmap(rank_epoch, [(str(run_dir), settings.model_dump(mode="json"), rank) for rank in (0, 1)])
    return [rows for rows, _, _ in found], [own for _, own, _ in found], max(seconds for *_, seconds in found)


def per_sample_rate(read_one, rows: np.ndarray) -> float:
    return len(rows) / timed(lambda: [read_one(int(row)) for row in rows])


def hdf5_like_trident(tiles: zarr.Array, targets: list[zarr.Array], rows: int, folder: Path) -> Path:
    """The same rows as TRIDENT/CLAM keep them: HDF5, chunks of one row, no compression."""
    path = folder / "trident_like.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("imgs", data=tiles[:rows], chunks=(1, *tiles.shape[1:]))
        for index, target in enumerate(targets):
            values = target[:rows]
            handle.create_dataset(f"features_{index}", data=values, chunks=(1, *values.shape[1:]))
    return path


def measure(tiled: Config, work: Path, quick: bool, demo_teacher_rates: dict[str, float], real_teacher_rates: dict[str, float]) -> list[Row]:
    settings = tiled.distill
    data = open_distill_data(tiled.training_runs, settings)
    tiles, targets = data.sources[0].tiles, list(data.sources[0].targets.values())
    n_rows = len(data.slide_of_row)
    chunks = np.arange(n_rows // tiles.chunks[0])  # the whole chunks: every one the loader reads in an epoch
    samples = len(chunks) * tiles.chunks[0]
    repeat = 1 if quick else 3
    works = {f"loader, {t} thread(s)": loader_work(data, samples, settings, t) for t in (1, 2)}
    works |= {f"floor, {t} thread(s)": decode_floor_work([tiles, *targets], chunks, t) for t in (1, 2)}
    seconds = interleaved(works, repeat)
    rate = {name: samples / s for name, s in seconds.items()}
    rng = np.random.default_rng(0)
    random_rows = rng.choice(n_rows, size=min(n_rows, 256 if quick else 1024), replace=False)
    zarr_per_sample = per_sample_rate(lambda row: [tiles[row], *(t[row] for t in targets)], random_rows)
    h5_path = hdf5_like_trident(tiles, targets, samples, work)
    with h5py.File(h5_path, "r") as handle:
        datasets = [handle["imgs"], *(handle[f"features_{i}"] for i in range(len(targets)))]
        hdf5_per_sample = per_sample_rate(lambda row: [d[row] for d in datasets], random_rows[random_rows < samples])
    pools = [p for p in np.array_split(rng.permutation(chunks), max(1, len(chunks) // settings.pool_chunks))]
    layers = {}
    for part, arrays in (("tiles", [tiles]), ("targets", targets)):
        layer_seconds = interleaved({"floor": decode_floor_work(arrays, chunks, 1), **io_layer_works(arrays, pools)}, repeat)
        layers[part] = {name: s / layer_seconds["floor"] for name, s in layer_seconds.items() if name != "floor"}
    ranked = settings.model_copy(update={"pool_chunks": max(1, min(settings.pool_chunks, -(-n_rows // tiles.chunks[0]) // 2))})  # two ranks need two pools
    rank_rows, owned, slower = two_ranks(tiled.run.resolve(), ranked)
    if set(rank_rows[0].tolist()) & set(rank_rows[1].tolist()) or sorted(np.concatenate(rank_rows).tolist()) != list(range(n_rows)):
        raise AssertionError(f"the two ranks' epochs are not disjoint halves of the {n_rows} rows")
    ddp = sum(owned) / slower
    shutil.rmtree(tiled.run / "student", ignore_errors=True)  # a fresh student: the tile store may be new too
    short = settings.model_copy(update={"steps": 10 if quick else 40, "eval_every": 1000, "checkpoint_every": 1000})
    summary = run_distill(tiled.model_copy(update={"distill": short}))
    speed = summary["speed"]
    loader = rate["loader, 1 thread(s)"]
    rows = [
        Row(FIGURE_LOADER, f"block-shuffle loader, {t} reading thread(s) (tiles + targets)", rate[f"loader, {t} thread(s)"], "samples/s",
            f"decode floor, {t} thread(s) ({rate[f'floor, {t} thread(s)']:,.0f}/s)", rate[f"loader, {t} thread(s)"] / rate[f"floor, {t} thread(s)"], ">= 0.8")
        for t in (1, 2)
    ]
    rows += [
        Row(FIGURE_LOADER, "loader vs per-sample Zarr reads", loader, "samples/s", f"per-sample zarr ({zarr_per_sample:,.0f}/s)", loader / zarr_per_sample, ">= 10"),
        Row(FIGURE_LOADER, "loader vs per-tile HDF5 (TRIDENT/CLAM layout)", loader, "samples/s", f"per-tile h5py ({hdf5_per_sample:,.0f}/s)", loader / hdf5_per_sample),
        Row(FIGURE_LOADER, "loader vs the training step", loader, "samples/s", f"student step on in-memory batches ({speed['step']:,.1f}/s)", loader / speed["step"], ">= 1.0", "> 1: the step never waits for data"),
        Row(FIGURE_LOADER, "2 processes as DDP ranks 0 and 1: rows the busier rank reads", max(owned), "rows", f"the epoch ({n_rows} rows)", max(owned) / n_rows, "<= 0.6",
            f"ranks read {owned[0]} + {owned[1]} rows, disjoint, union the epoch; {ddp:,.0f} samples/s together (pools of {ranked.pool_chunks} chunks: halves up to one pool)"),
    ]
    rows += [
        Row(FIGURE_LOADER, f"I/O layer for {part}: {name}", cost, "x the decode time", "decode floor, 1 thread", 1 / cost, note="information: the chosen layer is distill/pools.py's")
        for part, by_layer in layers.items() for name, cost in by_layer.items()
    ]
    return rows + [
        cached_vs_online(speed, demo_teacher_rates, "the demo stand-in teachers"),
        cached_vs_online(speed, real_teacher_rates, "real teacher architectures (figure 5)"),
    ]


def cached_vs_online(speed: dict, teacher_rates: dict[str, float], which: str) -> Row:
    """Seconds per 1,000 samples: cached = training as run; online = the same step plus every teacher's
    bare forward on the same tiles, measured in this run (reading slides online is not even counted,
    which flatters the online side)."""
    cached = 1000 / speed["training"]
    online = 1000 / speed["step"] + sum(1000 / rate for rate in teacher_rates.values())
    return Row(
        FIGURE_CACHED, f"cached targets vs online {which}", cached, "s per 1,000 samples", f"online ({online:,.1f} s): step + {' + '.join(teacher_rates)}",
        online / cached, ">= 5",
    )
