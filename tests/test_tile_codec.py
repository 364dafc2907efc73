"""The JPEG tile codec (pipeline/tile_codec.py): real H&E tiles in real Zarr stores on disk.

The exactness rule: teachers are fed the decoded stored pixels and the student is shown the same
ones, so features of a JPEG store are the teacher's forward on `store["tiles"][rows]` (not on the
pixels before coding), and the distill loader's tiles are those pixels, bit for bit.
"""

from __future__ import annotations

import functools
import json
import shutil
import tomllib
from importlib import import_module
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.registry import get_codec_class

from distill.data import BlockShuffleLoader, open_distill_data
from distill_run import STUDENT, make_run, synthetic_slide, synthetic_tile_attrs, tissue_tiles
from pipeline.config import ConfigError, DistillConfig, StoreConfig, load_config
from pipeline.embedding import ActorSettings, EmbedWorker, prepare_feature_store
from pipeline.inspect_store import directory_bytes
from pipeline.stores import StoreError, create_tile_store, open_feature_store, open_tile_store, write_rows
from pipeline.teachers import build_teacher
from pipeline.tile_codec import DECODER, NAME, JpegTileCodec

REPO = Path(__file__).resolve().parent.parent
TEACHER = "demo-vit"
IDENTITY = [{"name": "identity"}]


def tile_store(path: Path, tiles: np.ndarray, store: StoreConfig) -> zarr.Array:
    """A finished-looking tile store of ``tiles`` (one slide), as the tile stage writes it."""
    attrs = synthetic_tile_attrs(len(tiles), tiles.shape[1], [synthetic_slide(0, "s", (0, len(tiles)))], store=store)
    create_tile_store(path, attrs, store)
    write_rows(path, 0, {"tiles": tiles})
    return zarr.open_array(str(path / "tiles"), mode="r")


def psnr(decoded: np.ndarray, original: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((decoded.astype(np.float64) - original) ** 2)))


@pytest.fixture(scope="module")
def he_tiles(he_pixels) -> np.ndarray:
    return tissue_tiles(he_pixels, 24, 224)


@pytest.fixture(scope="module")
def made(tmp_path_factory, he_pixels) -> tuple[Path, dict]:
    """A distiller's run (tests/distill_run.py) on a JPEG tile store; its synthetic teachers saw the decoded pixels."""
    run = tmp_path_factory.mktemp("made")
    return run, make_run(run, he_pixels)


def test_a_jpeg_store_reads_as_uint8_pixels_close_to_the_source_and_a_quarter_of_lossless(tmp_path, he_tiles):
    jpeg = tile_store(tmp_path / "jpeg.zarr", he_tiles, StoreConfig(chunk_rows=8, shard_rows=16))
    lossless = tile_store(tmp_path / "lossless.zarr", he_tiles, StoreConfig(chunk_rows=8, shard_rows=16, tile_codec="lossless"))
    decoded = jpeg[:]
    assert decoded.dtype == np.uint8 and decoded.shape == he_tiles.shape  # 24 rows: the last shard is half full
    assert np.array_equal(lossless[:], he_tiles) and not np.array_equal(decoded, he_tiles)
    assert psnr(decoded, he_tiles) >= 37
    assert directory_bytes(tmp_path / "jpeg.zarr" / "tiles") <= directory_bytes(tmp_path / "lossless.zarr" / "tiles") / 4
    assert np.array_equal(jpeg[5:13], decoded[5:13]) and np.array_equal(zarr.open_array(str(tmp_path / "jpeg.zarr" / "tiles"))[:], decoded)  # same bytes, same pixels
    four_two_zero = tile_store(tmp_path / "420.zarr", he_tiles, StoreConfig(chunk_rows=8, shard_rows=16, jpeg_subsampling="4:2:0"))
    assert psnr(four_two_zero[:], he_tiles) < psnr(decoded, he_tiles) - 3  # why 4:4:4 is the default


def test_the_store_records_codec_quality_and_decoder(tmp_path, he_tiles):
    tile_store(tmp_path / "t.zarr", he_tiles[:8], StoreConfig(chunk_rows=8, shard_rows=8, jpeg_quality=85))
    meta = json.loads((tmp_path / "t.zarr" / "tiles" / "zarr.json").read_text())
    [sharding] = meta["codecs"]
    assert sharding["configuration"]["codecs"] == [{"name": NAME, "configuration": {"quality": 85, "subsampling": "4:4:4"}}, {"name": "crc32c"}]
    assert "pip install pathdistill" in meta["attributes"]["codec"]  # what a reader without the codec sees in zarr.json
    store = open_tile_store(tmp_path / "t.zarr")
    assert store.attrs.tiling.store["tile_codec"] == "jpeg" and store.attrs.tiling.store["jpeg_quality"] == 85
    assert store.attrs.versions["jpeg-decoder"] == DECODER and "libjpeg_turbo" in DECODER


def test_the_codec_is_found_by_name_in_zarrs_registry_and_the_package_entry_point():
    assert get_codec_class(NAME) is JpegTileCodec
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["zarr.codecs"][NAME]
    module, _, name = declared.partition(":")
    assert getattr(import_module(module), name) is JpegTileCodec


def test_the_codec_refuses_arrays_that_are_not_rgb_tiles(tmp_path):
    with pytest.raises(ValueError, match=r"pathdistill.jpeg stores uint8 RGB tiles"):
        zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 8, 8), chunks=(2, 8, 8), dtype="uint8", serializer=JpegTileCodec())
    with pytest.raises(ConfigError, match="jpeg_quality"):
        load_config(overrides={"store.jpeg_quality": 0})
    with pytest.raises(ConfigError, match="tile_codec"):
        load_config(overrides={"store.tile_codec": "webp"})


def test_features_of_a_jpeg_store_are_the_teachers_forward_on_the_decoded_pixels(tmp_path, he_tiles):
    tile_store(tmp_path / "tiles.zarr", he_tiles[:8], StoreConfig(chunk_rows=8, shard_rows=8))
    tiles = open_tile_store(tmp_path / "tiles.zarr")
    threads = torch.get_num_threads()
    try:
        worker = EmbedWorker(str(tiles.path), {TEACHER: functools.partial(build_teacher, TEACHER)}, ActorSettings(batch_size=8, threads_per_actor=1), IDENTITY)
        out = tmp_path / "features" / f"{TEACHER}.zarr"
        store_id, _ = prepare_feature_store(out, tiles, worker.provenance()[TEACHER], worker.shapes()[TEACHER], IDENTITY, StoreConfig(chunk_rows=8, shard_rows=8), overwrite=False)
        worker.run_unit(0, 0, 8, {TEACHER: (str(out), store_id)})
        teacher = build_teacher(TEACHER)
        on_decoded, on_source = (teacher.embed(torch.from_numpy(np.ascontiguousarray(pixels))) for pixels in (tiles["tiles"][:8], he_tiles[:8]))
    finally:
        torch.set_num_threads(threads)
    features = open_feature_store(out, tiles)
    for recipe in features.attrs.recipes:
        stored = features[recipe][:, 0].astype(np.float32)
        to_decoded = np.abs(stored - on_decoded[recipe].numpy()).max()
        to_source = np.abs(stored - on_source[recipe].numpy()).max()
        assert to_decoded <= 2e-3 and to_source > 5 * to_decoded, (recipe, to_decoded, to_source)  # float16 rounding only; ~1e-3 against ~1.5e-2


def test_features_decoded_with_another_jpeg_decoder_are_refused(tmp_path, made):
    shutil.copytree(made[0], tmp_path, dirs_exist_ok=True)
    tiles = open_tile_store(tmp_path / "tiles.zarr")
    group = zarr.open_group(str(tmp_path / "features" / "alpha.zarr"), mode="r+")
    group.attrs["versions"] = {**group.attrs["versions"], "jpeg-decoder": "imagecodecs 2020.1.1, libjpeg_turbo 2.0.0/8.0"}
    with pytest.raises(StoreError, match=r"decoded by 'imagecodecs 2020.1.1.*but this process decodes them with .*install the imagecodecs that computed them, or rerun `features --overwrite`"):
        open_feature_store(tmp_path / "features" / "alpha.zarr", tiles)
    assert open_feature_store(made[0] / "features" / "alpha.zarr", open_tile_store(made[0] / "tiles.zarr")).attrs.n_rows == tiles.attrs.n_rows  # the same decoder reads it


def test_the_distill_loader_shows_the_decoded_stored_pixels(made, he_pixels):
    run, written = made
    decoded = zarr.open_array(str(run / "tiles.zarr" / "tiles"), mode="r")[:]
    assert open_tile_store(run / "tiles.zarr").attrs.tiling.store["tile_codec"] == "jpeg"
    assert not np.array_equal(decoded[:4], tissue_tiles(he_pixels, 4, 64))  # coding changed the pixels (rows 0-3 are not blanked)
    data = open_distill_data([run], DistillConfig(**STUDENT))
    for batch in islice(BlockShuffleLoader(data, data.rows_of(data.split.train), 16, pool_chunks=3, workers=2, seed=0), 6):
        assert np.array_equal(batch.tiles, decoded[batch.rows])
        assert np.array_equal(batch.targets["alpha"], written["targets"]["alpha"][batch.rows, 0])
