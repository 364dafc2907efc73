"""The tile stage end to end on real slide files, a real local Ray and Zarr on disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import zarr

from feature_run import finished_units
from pipeline.config import Config, RayConfig, StoreConfig, TilingConfig, TissueConfig
from pipeline.run_report import read_report
from pipeline.geometry import ReadPlan, resize_area
from pipeline.stores import FLAG_READ_FAILED, StoreError
from pipeline.tiles.slide_tiles import read_tiles
from pipeline.tiles.slides import OpenSlides, SlideReader
from pipeline.tiles.stage import run_tiles

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("local_ray")
TISSUE = np.s_[1000:2024, 800:1824]  # 1024 px squares of the real slide that hold tissue
OTHER_TISSUE = np.s_[1900:2924, 800:1824]


def config(run: Path, slides: list[Path], **tiling) -> Config:
    min_fraction, tile_codec = tiling.pop("min_fraction", 0.25), tiling.pop("tile_codec", "jpeg")
    return Config(
        run=run, slides=slides, tiling=TilingConfig(**tiling), tissue=TissueConfig(min_fraction=min_fraction),
        store=StoreConfig(chunk_rows=8, shard_rows=32, tile_codec=tile_codec), ray=RayConfig(num_cpus=2),
    )


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in group.array_keys()}


def test_real_svs_gives_the_grid_count(tmp_path, real_svs):
    """2220 x 2967 px at 0.499 um/px: 9 x 13 tiles of 224 px at 0.5; 4 x 6 tiles of 449 px at 1.0."""
    full = run_tiles(config(tmp_path / "a", [real_svs], min_fraction=0.0))
    assert full.n_rows == 9 * 13
    record = full.slides[0]
    assert (record.mpp, record.mpp_source, record.read["resized"]) == (0.499, "openslide.mpp-x", False)
    coarse = run_tiles(config(tmp_path / "b", [real_svs], min_fraction=0.0, target_mpp=1.0))
    assert coarse.n_rows == 4 * 6 and coarse.slides[0].read["read_px"] == 449
    stored = arrays(tmp_path / "b" / "tiles.zarr")
    assert stored["tiles"].shape == (24, 224, 224, 3)
    assert stored["coords"][:, 0].max() == 3 * 449 and not stored["flags"].any()
    with_tissue = run_tiles(config(tmp_path / "c", [real_svs]))
    assert 20 < with_tissue.n_rows < 117
    assert (tmp_path / "c" / "qc" / "00000_cmu_small_region.png").is_file()
    assert read_report(tmp_path / "c")[-1]["rows"] == with_tissue.n_rows


def test_lower_level_read_equals_level0_area_resize(tmp_path, slide_factory):
    """A 0.25 um/px pyramid tiled at 0.5 (level 1 as is) and at 0.75 (level 1 resized) matches level 0 resized.

    The slide has odd dimensions, so OpenSlide's level-1 downsample is fractional (2.0003), the case
    where OpenSlide shifts regions by sub-pixel amounts.
    """
    slide = slide_factory("pyramid.tiff", mpp=0.25, levels=3, quality=99)
    for target, factor in ((0.5, 2), (0.75, 3)):
        summary = run_tiles(config(tmp_path / str(target), [slide], target_mpp=target, tile_px=128, min_fraction=0.0, tile_codec="lossless"))
        record = summary.slides[0]
        assert record.read["level"] == 1 and record.read["resized"] == (target == 0.75)
        stored = arrays(tmp_path / str(target) / "tiles.zarr")
        with SlideReader(slide) as reader:
            again, _ = read_tiles(reader, ReadPlan(**record.read), stored["coords"], tuple(record.dimensions))
            assert np.array_equal(again, stored["tiles"])  # one call over all rows = units of 32 rows
            textured = np.argsort(stored["tiles"].reshape(summary.n_rows, -1).std(axis=1))[-3:]
            for row in textured:
                x, y = (int(v) for v in stored["coords"][row])

                def error_against_level0(shift: int) -> float:
                    level0 = reader.read((x + shift, y + shift), 0, (128 * factor, 128 * factor))
                    return float(np.abs(resize_area(level0, 128).astype(int) - stored["tiles"][row]).mean())

                # Near-lossless JPEG and the fractional downsample leave a few grey levels; one pixel of misalignment costs far more.
                assert error_against_level0(0) < 4.0 and error_against_level0(0) < error_against_level0(1) / 2, (target, row)


def test_each_bad_input_is_recorded_and_the_rest_finishes(tmp_path, slide_factory, he_pixels, real_svs):
    good = slide_factory("good.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "random.svs").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (bad / "notes.tiff").write_text("not a slide at all\n")
    full = real_svs.read_bytes()
    (bad / "truncated.svs").write_bytes(full[: len(full) // 3])
    blank = slide_factory("blank.tiff", np.full((1024, 1024, 3), 243, np.uint8), mpp=0.5, levels=2)
    tiny = slide_factory("tiny.tiff", he_pixels[:160, :160], mpp=0.5, levels=1)
    no_mpp = slide_factory("no_mpp.tiff", he_pixels[TISSUE], mpp=None, levels=2)
    slides = [good, bad / "random.svs", bad / "notes.tiff", bad / "truncated.svs", blank, tiny, no_mpp, bad / "missing.svs"]
    summary = run_tiles(config(tmp_path / "run", slides))
    status = {Path(s.path).name: (s.status, s.error or "") for s in summary.slides}
    assert status["good.tiff"][0] == "ok" and summary.n_rows == summary.slides[0].n_tiles > 0
    expected_reasons = {
        "random.svs": "OpenSlide cannot open",
        "notes.tiff": "OpenSlide cannot open",
        "truncated.svs": "",  # fails one way or another; the reason is whatever OpenSlide or the reader said
        "blank.tiff": "no tissue",
        "tiny.tiff": "smaller than one tile",
        "no_mpp.tiff": "no microns-per-pixel",
        "missing.svs": "file not found",
    }
    for name, reason in expected_reasons.items():
        assert status[name][0] == "failed" and reason in status[name][1] and status[name][1], (name, status[name])
    failures = {Path(f["path"]).name for f in read_report(tmp_path / "run")[-1]["failures"]}
    assert failures == set(expected_reasons)
    store_slides = zarr.open_group(str(tmp_path / "run" / "tiles.zarr"), mode="r").attrs["slides"]
    assert [s["status"] for s in store_slides] == [s.status for s in summary.slides]

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,mpp\n{no_mpp},0.5\n")
    overridden = run_tiles(config(tmp_path / "override", [manifest]))
    assert overridden.slides[0].status == "ok" and overridden.slides[0].mpp_source == "override"


def test_a_region_that_fails_to_read_is_blank_and_flagged(tmp_path, slide_factory, he_pixels):
    """Zero the bytes of one JPEG tile in the level that is read: its tiles are flagged, the rest are read."""
    slide = slide_factory("damaged.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    with tifffile.TiffFile(slide) as tiff:
        page = tiff.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # tile row 1, column 1 of 4 x 4 (256 px tiles)
    with open(slide, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)
    summary = run_tiles(config(tmp_path / "run", [slide], tile_px=128, min_fraction=0.0))
    assert summary.slides[0].status == "ok" and summary.n_rows == 64
    stored = arrays(tmp_path / "run" / "tiles.zarr")
    flagged = (stored["flags"] & FLAG_READ_FAILED).astype(bool)
    inside_damaged = np.all((stored["coords"] >= 256) & (stored["coords"] < 512), axis=1)
    assert np.array_equal(flagged, inside_damaged) and flagged.sum() == 4
    assert not stored["tiles"][flagged].any() and stored["tiles"][~flagged].mean(axis=(1, 2, 3)).min() > 50
    assert summary.read_failed_tiles == 4


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def test_changed_settings_or_slides_are_refused_until_overwrite(tmp_path, slide_factory, he_pixels):
    slide = slide_factory("refuse.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    run_tiles(config(tmp_path / "run", [slide]))
    store = tmp_path / "run" / "tiles.zarr"
    before = tree_digest(store)
    with pytest.raises(StoreError, match=r"tiling.target_mpp: store has 0.5, now 1.0[\s\S]*--overwrite"):
        run_tiles(config(tmp_path / "run", [slide], target_mpp=1.0))
    slide_factory("refuse.tiff", he_pixels[OTHER_TISSUE], mpp=0.5, levels=2)  # a re-scan under the same name
    with pytest.raises(StoreError, match=r"refuse.tiff changed: .*hash"):
        run_tiles(config(tmp_path / "run", [slide]))
    assert tree_digest(store) == before
    replaced = run_tiles(config(tmp_path / "run", [slide], target_mpp=1.0), overwrite=True)
    assert zarr.open_group(str(store), mode="r").attrs["tiling"]["target_mpp"] == 1.0 and replaced.n_rows > 0


def test_rerun_after_kill_gives_the_same_store(tmp_path, slide_factory, he_pixels):
    """kill -9 of the driver and its Ray mid-run; the rerun does only the missing units; arrays are identical."""
    mosaic = np.tile(he_pixels, (3, 3, 1))
    slide = slide_factory("mosaic.tiff", mosaic, mpp=0.25, levels=3)
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text(json.dumps({
        "run": str(tmp_path / "killed"), "slides": [str(slide)], "tissue": {"min_fraction": 0.0},
        "store": {"chunk_rows": 8, "shard_rows": 16}, "ray": {"num_cpus": 1},
    }))
    command = [sys.executable, str(REPO / "cli.py"), "tiles", "--config", str(yaml_config)]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = tmp_path / "killed" / "tiles.zarr"
    deadline = time.time() + 120
    while time.time() < deadline and finished_units(store) < 2:
        time.sleep(0.05)
    for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        victim.kill()  # SIGKILL: the driver, its raylet, GCS and workers, none gets to clean up
    process.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=0)
    done_before = finished_units(store)
    summary_first = run_tiles(Config.model_validate_json(json.dumps(json.loads(yaml_config.read_text()))))
    assert 2 <= done_before < summary_first.units_total
    assert summary_first.units_run == summary_first.units_total - done_before
    reference = Config.model_validate({**json.loads(yaml_config.read_text()), "run": str(tmp_path / "whole")})
    run_tiles(reference)
    killed, whole = arrays(tmp_path / "killed" / "tiles.zarr"), arrays(tmp_path / "whole" / "tiles.zarr")
    assert killed.keys() == whole.keys()
    for name in whole:
        assert np.array_equal(killed[name], whole[name]), name
    attrs = [zarr.open_group(str(tmp_path / run / "tiles.zarr"), mode="r").attrs.asdict() for run in ("killed", "whole")]
    for a in attrs:
        for volatile in ("store_id", "created"):
            a.pop(volatile)
    assert attrs[0] == attrs[1]


def test_inspect_store_reads_and_verifies_without_writing(tmp_path, real_svs):
    run_tiles(config(tmp_path / "run", [real_svs]))
    store = tmp_path / "run" / "tiles.zarr"
    before = tree_digest(store)

    def inspect(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "cli.py"), "inspect-store", str(store), *flags], cwd=REPO, capture_output=True, text=True)

    described = json.loads(inspect("--json", "--verify").stdout)
    assert described["schema"] == "pathdistill.tiles/3" and described["verify"]["ok"]
    assert described["slides"][0]["mpp_source"] == "openslide.mpp-x"
    assert described["arrays"]["tiles"]["shards"] == [32, 224, 224, 3]
    assert described["arrays"]["tiles"]["codecs"] == ["jpeg-q90-4:4:4", "crc32c"]
    assert described["tiles_on_disk"].startswith("tiles stored as JPEG q90 4:4:4: ") and described["arrays"]["tiles"]["stored_bytes_per_row"] > 0
    assert described["units"]["marked_done"] == described["units"]["total"]
    human = inspect()
    assert human.returncode == 0 and "cmu_small_region" in human.stdout + human.stderr
    assert tree_digest(store) == before

    shard = store / "tiles" / "c" / "0" / "0" / "0" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    result = inspect("--json", "--verify")
    report = json.loads(result.stdout)["verify"]
    assert result.returncode == 1 and not report["ok"]
    assert [c["array"] for c in report["corrupt_chunks"]] == ["tiles"]
    (store / "flags" / "c" / "0").unlink()  # a lost chunk file of a finished unit
    report = json.loads(inspect("--json", "--verify").stdout)["verify"]
    assert [(m["array"], m["rows"], m["unit"], m["finished"]) for m in report["missing_chunks"]] == [("flags", [0, 32], 0, True)]


def test_direct_tiff_decoding_gives_openslides_pixels(real_svs, slide_factory, he_pixels):
    """Tiled TIFF/SVS levels decoded with tifffile equal OpenSlide's regions, inside, at and beyond the edges."""
    even = slide_factory("even.tiff", he_pixels[:2048, :2048], mpp=0.25, levels=3)
    for path, level in ((real_svs, 0), (even, 1), (even, 2)):
        with SlideReader(path) as direct, SlideReader(path, direct=False) as through_openslide:
            assert direct.backend(level) == "tifffile" and through_openslide.backend(level) == "openslide"
            downsample = int(direct.slide.level_downsamples[level])
            width, height = direct.slide.level_dimensions[level]
            for x, y, w, h in ((0, 0, 300, 200), (width - 150, height - 100, 300, 200), (-40, 10, 100, 100), (37, 53, 511, 257)):
                location0 = (x * downsample, y * downsample)
                assert np.array_equal(direct.read(location0, level, (w, h)), through_openslide.read(location0, level, (w, h))), (path.name, level, x, y)


def test_open_slides_keep_a_reader_until_its_file_changes(tmp_path, slide_factory, he_pixels):
    """A unit reuses the reader (and its decoded tiles) of the unit before; a replaced or deleted file is
    opened again, so it reads as it is now; only the most recent slides stay open."""
    first = slide_factory("kept-open.tiff", he_pixels[TISSUE], mpp=0.5, levels=1)
    second = slide_factory("other-open.tiff", he_pixels[OTHER_TISSUE], mpp=0.5, levels=1)
    with OpenSlides(keep=1) as slides:
        reader = slides.get(first, direct=True)
        before = reader.read((0, 0), 0, (64, 64))
        assert slides.get(first, direct=True) is reader and reader.tiff.cache
        slide_factory("kept-open.tiff", he_pixels[OTHER_TISSUE], mpp=0.5, levels=1)  # replaced in place
        again = slides.get(first, direct=True)
        assert again is not reader and not np.array_equal(again.read((0, 0), 0, (64, 64)), before)
        slides.get(second, direct=True)
        assert list(slides.readers) == [(second, True)]  # the first one was closed
        second.unlink()
        with pytest.raises(FileNotFoundError):
            slides.get(second, direct=True)


def test_read_tiles_fills_every_row_of_a_reused_buffer(slide_factory, he_pixels):
    """A worker's unit buffer holds the last unit's pixels: rows read, failed and of a slide that could
    not be opened are all overwritten, so the stored bytes equal a fresh read."""
    slide = slide_factory("buffer.tiff", he_pixels[TISSUE], mpp=0.5, levels=1)
    with tifffile.TiffFile(slide) as tiff:
        offset, count = tiff.pages[0].dataoffsets[5], tiff.pages[0].databytecounts[5]
    with open(slide, "r+b") as handle:  # one undecodable JPEG tile: some rows fail to read
        handle.seek(offset)
        handle.write(b"\0" * count)
    plan = ReadPlan(level=0, level_downsample=1.0, level_mpp=0.5, read_px=128, step_px=128, context_read_px=0, tile_px=128, context_px=0, resized=False, effective_mpp=0.5)
    coords = np.array([(x, y) for y in range(0, 1024, 128) for x in range(0, 1024, 128)])
    with SlideReader(slide) as reader:
        fresh_tiles, fresh_flags = read_tiles(reader, plan, coords, (1024, 1024))
        used = (np.full_like(fresh_tiles, 7), np.full_like(fresh_flags, 7))
        read_tiles(reader, plan, coords, (1024, 1024), out=used)
    assert (fresh_flags & FLAG_READ_FAILED).sum() == 4
    assert np.array_equal(used[0], fresh_tiles) and np.array_equal(used[1], fresh_flags)
    blank = (np.full_like(fresh_tiles, 7), np.full_like(fresh_flags, 7))
    read_tiles(None, plan, coords, (1024, 1024), out=blank)
    assert not blank[0].any() and (blank[1] == FLAG_READ_FAILED).all()
