"""The store contract: typed attrs round-trip through Zarr, and stores of other schemas or versions are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from distill_run import synthetic_slide, synthetic_tile_attrs

from pipeline.config import Config
from pipeline.stores import (
    FEATURES_SCHEMA, TILES_SCHEMA, FeatureStoreAttrs, RunDir, StoreConfig, StoreError, Tiling, TileStoreAttrs,
    create_feature_store, create_tile_store, open_feature_store, open_store, open_tile_store, write_rows,
)

STORE = StoreConfig(chunk_rows=4, shard_rows=8)


def small_tile_store(path, n_rows: int = 12):
    slides = [synthetic_slide(0, "a", (0, 5)), synthetic_slide(1, "gone", (5, 5), status="failed"), synthetic_slide(2, "b", (5, n_rows))]
    attrs = synthetic_tile_attrs(n_rows, 32, slides, store=STORE)
    store = create_tile_store(path, attrs, STORE)
    write_rows(path, 0, {"tiles": np.full((n_rows, 32, 32, 3), 7, np.uint8), "slide": np.repeat([0, 2], [5, n_rows - 5]).astype(np.int32)})
    return store


def test_typed_attrs_round_trip_through_zarr(tmp_path):
    written = small_tile_store(tmp_path / "tiles.zarr")
    opened = open_tile_store(tmp_path / "tiles.zarr")
    assert opened.attrs == written.attrs and isinstance(opened.attrs.tiling, Tiling)
    assert [s.name for s in opened.attrs.slides if s.ok] == ["a", "b"] and opened.attrs.slides[1].error == "synthetic failure"
    raw = json.loads((tmp_path / "tiles.zarr" / "zarr.json").read_text())["attributes"]
    assert raw["schema"] == TILES_SCHEMA and list(raw) == ["store_id", "n_rows", "tiling", "slides", "versions", "created", "schema"]
    assert "vendor" not in raw["slides"][0] and raw["slides"][0]["error"] is None  # unset optional fields are left out, error never
    assert opened.units() == [(0, 8), (8, 12)] and opened.missing_units() == {0, 1}
    with pytest.raises(StoreError, match=r"tiles.zarr is unfinished \(2 of 2 units missing\); rerun `tiles`"):
        opened.require_finished("tiles")

    teacher = {"name": "t", "kwargs": {"size": (1, 2)}}  # a tuple is stored as a list: attrs compare as read back
    attrs = FeatureStoreAttrs.new(opened.attrs, teacher, {"cls": 6}, [{"name": "identity"}])
    create_feature_store(tmp_path / "features" / "t.zarr", attrs, 4, 8, STORE)
    features = open_feature_store(tmp_path / "features" / "t.zarr", opened)
    assert features.attrs == attrs and features.attrs.teacher["kwargs"]["size"] == [1, 2]
    assert features["cls"].shape == (12, 1, 6) and open_store(tmp_path / "features" / "t.zarr").attrs.SCHEMA == FEATURES_SCHEMA


def test_a_feature_store_of_another_tile_store_is_refused(tmp_path):
    first = small_tile_store(tmp_path / "one.zarr")
    second = small_tile_store(tmp_path / "two.zarr")
    create_feature_store(tmp_path / "f.zarr", FeatureStoreAttrs.new(first.attrs, {"name": "t"}, {"cls": 2}, [{"name": "identity"}]), 4, 8, STORE)
    with pytest.raises(StoreError, match="was computed from tile store .* not from this one"):
        open_feature_store(tmp_path / "f.zarr", second)


def test_other_versions_and_damaged_attrs_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "tiles.zarr"
    small_tile_store(path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["schema"] = "pathdistill.tiles/2"  # the lossless-only schema before the JPEG tile codec
    with pytest.raises(StoreError, match=r"schema 'pathdistill.tiles/2', which this pathdistill does not read \(it reads 'pathdistill.tiles/3'\): rerun the stage that made it with --overwrite"):
        open_tile_store(path)
    group.attrs["schema"] = TILES_SCHEMA
    with pytest.raises(StoreError, match=r"expected a feature store \('pathdistill.features/2' or 'pathdistill.features/1'\)"):
        open_feature_store(path)
    tiling = dict(group.attrs["tiling"])
    group.attrs["tiling"] = {**tiling, "colour_space": "lab"}
    with pytest.raises(StoreError, match=r"tiling does not match this version's schema \(unknown keys \['colour_space'\]"):
        open_tile_store(path)
    group.attrs["tiling"] = tiling
    del group.attrs["n_rows"]
    with pytest.raises(StoreError, match=r"missing keys \['n_rows'\]"):
        open_tile_store(path)


def test_tiling_differences_name_each_changed_setting():
    base = Tiling.from_config(Config())
    other = Tiling.from_config(Config.model_validate({"tiling": {"target_mpp": 0.25, "context_px": 16}}))
    assert base.differences(other) == [
        "tiling.target_mpp: store has 0.5, now 0.25", "tiling.context_px: store has 0, now 16", "tiling.stored_px: store has 224, now 256",
    ]
    assert base.differences(base) == []


def test_run_dir_names_every_path(tmp_path):
    run = RunDir(tmp_path)
    assert run.tiles == tmp_path / "tiles.zarr" and run.features("uni2-h") == tmp_path / "features" / "uni2-h.zarr"
    assert RunDir.of_feature_store(run.features("uni2-h")) == run and run.report == tmp_path / "report.json"
    assert run.slide_hashes == tmp_path / "slide-hashes.json"
    small_tile_store(run.tiles)
    tiles = open_tile_store(run.tiles)
    for name in ("b", "a"):
        create_feature_store(run.features(name), FeatureStoreAttrs.new(tiles.attrs, {"name": name}, {"cls": 2}, [{"name": "identity"}]), 4, 8, STORE)
    assert run.teachers_with_features() == ["a", "b"]
    assert RunDir.of(Config(run=tmp_path)).root == tmp_path.resolve()
    assert isinstance(tiles.attrs, TileStoreAttrs)
