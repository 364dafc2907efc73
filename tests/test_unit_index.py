"""Which units of a store are finished: markers folded into one index, units forgotten on request,
and an index that cannot be trusted refused or ignored, never counted as finished."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli_errors import run_cli
from test_stores import STORE, small_tile_store

from pipeline.stores import (
    FLAG_READ_FAILED, FOLD_SECONDS, StoreError, describe_units, forget_units, open_tile_store, parse_units, read_failed_mask, slide_of_row,
    tile_unit_record, write_rows,
)


def finished_tile_store(path, n_rows: int = 20):
    """Three units of 8 rows, every one marked as the tiles stage marks it; rows 3 and 17 read-failed."""
    small_tile_store(path, n_rows)
    flags = np.zeros(n_rows, np.uint8)
    flags[[3, 17]] = FLAG_READ_FAILED
    write_rows(path, 0, {"flags": flags})
    store = open_tile_store(path)
    for unit, (start, end) in enumerate(store.units()):
        record = {"start": start, **tile_unit_record(start, flags[start:end]), "read_seconds": 0.5}
        if unit == 1:
            record["failed_slides"] = [{"slide": 2, "error": "vanished"}]
        store.markers().mark(unit, record)
    return store


def test_folding_keeps_what_readers_need_in_one_index_and_removes_the_markers(tmp_path):
    store = finished_tile_store(tmp_path / "tiles.zarr")
    markers = store.markers()
    before = markers.read()
    assert before.units == {0, 1, 2} and before.read_failed() == 2
    folded = markers.fold()
    progress = tmp_path / "tiles.zarr.progress"
    assert sorted(p.name for p in progress.iterdir()) == ["index.json", "index.lock"]
    index = json.loads((progress / "index.json").read_text())
    assert index["store_id"] == store.attrs.store_id and index["finished"] == [[0, 3]]
    assert index["notes"] == {
        "0": {"read_failed": 1, "read_failed_rows": [3]},
        "1": {"failed_slides": [{"slide": 2, "error": "vanished"}]},
        "2": {"read_failed": 1, "read_failed_rows": [17]},
    }  # timings and row counts are not kept
    assert folded == before == markers.read() and store.missing_units() == set()
    store.require_finished("tiles")

    # While units finish, the driver folds only every FOLD_SECONDS.
    store.markers().mark(0, {"start": 0})
    markers.fold_if_due()
    assert (progress / "unit-000000.json").exists()
    markers.folded_at -= FOLD_SECONDS
    markers.fold_if_due()
    assert not (progress / "unit-000000.json").exists() and 0 not in markers.read().notes  # its new record replaced the old
    store.markers().mark(0, {"start": 0, **tile_unit_record(0, np.array([0, 0, 0, FLAG_READ_FAILED], np.uint8))})
    markers.fold()

    # A marker written again after its fold (a retried unit, or a crash before the delete) changes nothing.
    store.markers().mark(2, {"start": 16, **tile_unit_record(16, np.array([0, FLAG_READ_FAILED, 0, 0], np.uint8))})
    assert markers.read() == before and markers.fold() == before and not list(progress.glob("unit-*.json"))


def test_the_distiller_s_row_facts_come_from_records_and_the_index(tmp_path):
    store = finished_tile_store(tmp_path / "tiles.zarr")
    store.markers().fold()
    assert np.array_equal(slide_of_row(store.attrs), store["slide"][:])
    assert np.flatnonzero(read_failed_mask(store)).tolist() == [3, 17]

    # A marker of an earlier version has the count but not the rows: that unit's flags are read.
    progress = tmp_path / "tiles.zarr.progress"
    store.markers().forget({2})
    (progress / "unit-000002.json").write_text(json.dumps({"unit": 2, "store_id": store.attrs.store_id, "start": 16, "read_failed": 1}))
    assert np.flatnonzero(read_failed_mask(store)).tolist() == [3, 17]


def test_forgotten_units_are_unfinished_again_and_the_cli_does_it(tmp_path):
    path = tmp_path / "tiles.zarr"
    store = finished_tile_store(path)
    store.markers().mark(2, {"start": 16})  # not yet folded: forgotten too
    assert forget_units(path, {0, 2}) == {0, 2} and store.missing_units() == {0, 2}
    assert forget_units(path, {0}) == set()  # already unfinished
    assert not list((tmp_path / "tiles.zarr.progress").glob("unit-*.json"))
    with pytest.raises(StoreError, match=r"has units 0-2; there is no unit 7"):
        forget_units(path, {1, 7})

    damaged = store.repair("tiles", [1, 4, 5, 6])
    assert f"`forget-units {path} 1,4-6`" in damaged and "rerun `tiles`" in damaged
    assert parse_units("1,4-6") == {1, 4, 5, 6} and describe_units({2}) == "2"
    for bad in ("1,x", "4-", "6-4", ""):
        with pytest.raises(StoreError, match="give units as 0,4-6"):
            parse_units(bad)

    done = run_cli("forget-units", path, "1")
    assert done.returncode == 0 and "1 of the 1 units given were finished and are now forgotten" in done.stderr, done.stderr
    assert store.missing_units() == {0, 1, 2}


def test_an_index_that_cannot_be_trusted_never_counts_as_finished(tmp_path):
    store = finished_tile_store(tmp_path / "tiles.zarr")
    markers = store.markers()
    markers.fold()
    index_path = tmp_path / "tiles.zarr.progress" / "index.json"
    good = json.loads(index_path.read_text())

    # Of another store (copied over, say): it counts nothing, and the next fold replaces it.
    index_path.write_text(json.dumps({**good, "store_id": "another-store"}))
    assert store.missing_units() == {0, 1, 2}
    markers.mark(1, {"start": 8})
    assert markers.fold().units == {1} and json.loads(index_path.read_text())["store_id"] == store.attrs.store_id

    for damaged in ('{"format": "pathdistill.unit-index/1", "store_id": ', json.dumps({**good, "finished": [[2, 1]]}),
                    json.dumps({**good, "format": "pathdistill.unit-index/9"}), json.dumps({**good, "notes": {"7": {"read_failed": 1}}})):
        index_path.write_text(damaged)
        with pytest.raises(StoreError, match=r"index.json is damaged .* which units are finished is unknown; delete it .* --overwrite"):
            store.require_finished("tiles")
    assert open_tile_store(tmp_path / "tiles.zarr").attrs == store.attrs and STORE.shard_rows == 8
