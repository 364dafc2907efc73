"""Slide identity on real slide files, a real local Ray and Zarr stores on disk: each slide file is
tiled once, a copy is recorded as a duplicate, an edit anywhere in a file is caught on rerun, the
digest cache spares unchanged files, manifests are checked, and a DICOM folder is one slide."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from dicom_slide import write_dicom_slide
from pipeline.config import ConfigError
from pipeline.run_report import read_report
from pipeline.stores import RunDir, StoreError, open_tile_store
from pipeline.tiles.slides import discover_slides
from pipeline.tiles.stage import run_tiles
from test_tile_stage import REPO, TISSUE, config, tree_digest

pytestmark = pytest.mark.usefixtures("local_ray")
MiB = 1 << 20


def statuses(summary) -> list[tuple[str, str, str]]:
    return [(Path(s.path).name, s.status, s.error or "") for s in summary.slides]


def test_a_slide_listed_twice_under_any_path_is_tiled_once(tmp_path, slide_factory, he_pixels):
    folder = tmp_path / "slides"
    folder.mkdir()
    slide = folder / "once.tiff"
    shutil.copyfile(slide_factory("once.tiff", he_pixels[TISSUE], mpp=0.5, levels=2), slide)
    link = tmp_path / "link.tiff"
    link.symlink_to(slide)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp\n{slide},\n{link},\n")
    summary = run_tiles(config(tmp_path / "run", [manifest, folder, folder]))
    assert [(s.path, s.status) for s in summary.slides] == [(str(slide), "ok")] and summary.n_rows == summary.slides[0].n_tiles
    record = read_report(tmp_path / "run")[-1]
    assert any(f"slide {slide} is listed more than once (again as {link})" in line for line in record["warnings"])
    assert record["warnings"] == summary.warnings and len(summary.warnings) == 3


def test_a_copy_with_identical_bytes_is_a_duplicate_and_not_tiled(tmp_path, slide_factory, he_pixels):
    slide = slide_factory("original.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    copy = tmp_path / "copy.tiff"
    shutil.copyfile(slide, copy)
    summary = run_tiles(config(tmp_path / "run", [slide, copy]))
    original, duplicate = summary.slides
    assert original.ok and summary.n_rows == original.n_tiles > 0
    assert (duplicate.status, duplicate.hash, duplicate.n_tiles) == ("failed", original.hash, None)
    assert duplicate.error.startswith(f"duplicate of {slide}")
    assert not list((tmp_path / "run" / "qc").glob("*copy*"))  # not planned at all
    assert np.all(zarr.open_group(str(tmp_path / "run" / "tiles.zarr"), mode="r")["slide"][:] == original.id)


def large_slide(slide_factory, he_pixels: np.ndarray, name: str) -> Path:
    """A pyramidal TIFF of real pixels far larger than the 16 sampled MiB the old identity read."""
    slide = slide_factory(name, np.tile(he_pixels, (3, 3, 1)), mpp=0.25, levels=3, quality=95)
    assert slide.stat().st_size > 24 * MiB
    return slide


def outside_old_samples(size: int) -> int:
    """An offset in the middle of the widest gap between the 16 evenly spaced 1 MiB blocks the old
    sampled hash read: an edit there went unnoticed."""
    starts = np.linspace(0, size - MiB, 16).astype(np.int64)
    gaps = starts[1:] - (starts[:-1] + MiB)
    widest = int(np.argmax(gaps))
    assert gaps[widest] > 0
    return int(starts[widest] + MiB + gaps[widest] // 2)


def test_one_edited_byte_anywhere_in_a_slide_refuses_the_rerun(tmp_path, slide_factory, he_pixels):
    slide = large_slide(slide_factory, he_pixels, "edited.tiff")
    settings = config(tmp_path / "run", [slide], target_mpp=1.0)
    run_tiles(settings)
    store = tmp_path / "run" / "tiles.zarr"
    before = tree_digest(store)
    with open(slide, "r+b") as handle:
        handle.seek(outside_old_samples(slide.stat().st_size))
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreError, match=rf"slide {slide} changed: hash 'sha256:\w+' -> 'sha256:\w+'[\s\S]*--overwrite"):
        run_tiles(settings)
    assert tree_digest(store) == before


def test_the_digest_cache_spares_unchanged_files_and_a_touched_file_is_rehashed(tmp_path, slide_factory, he_pixels):
    slide = slide_factory("cached.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    settings = config(tmp_path / "run", [slide])
    first = run_tiles(settings)
    cache = RunDir(tmp_path / "run").slide_hashes
    entry = json.loads(cache.read_text())["files"][str(slide)]
    assert (first.hashed_files, first.hashed_bytes) == (1, slide.stat().st_size) == (1, entry["size"])
    assert first.slides[0].hash == "sha256:" + entry["sha256"]

    again = run_tiles(settings)
    assert (again.hashed_files, again.hashed_bytes, again.units_run) == (0, 0, 0)
    assert json.loads(cache.read_text())["files"][str(slide)] == entry

    stat = slide.stat()
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched: same bytes, new mtime
    touched = run_tiles(settings)
    assert (touched.hashed_files, touched.units_run) == (1, 0) and touched.slides[0].hash == first.slides[0].hash
    assert json.loads(cache.read_text())["files"][str(slide)]["mtime_ns"] == stat.st_mtime_ns + 5_000_000_000
    assert [r["hashed_files"] for r in read_report(tmp_path / "run")] == [1, 0, 1]


def test_identify_reads_no_bytes_of_a_file_whose_digest_is_cached(tmp_path, slide_factory, he_pixels, monkeypatch):
    from pipeline.tiles import slide_identity

    slide = slide_factory("spied.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    calls = []

    def counting(path):
        calls.append(Path(path))
        return real(path)

    real = slide_identity.sha256_file
    monkeypatch.setattr(slide_identity, "sha256_file", counting)
    cache = slide_identity.DigestCache(tmp_path / "slide-hashes.json")
    first = slide_identity.identify_slide(slide, cache.for_slide(slide))
    cache.save([first])
    reread = slide_identity.DigestCache(tmp_path / "slide-hashes.json")
    second = slide_identity.identify_slide(slide, reread.for_slide(slide))
    assert calls == [slide] and second == slide_identity.SlideIdentity(first.files, 0, 0)


@pytest.mark.parametrize("text, column", [("path,mmp\na.tiff,0.5\n", "mmp"), ("file,mpp\na.tiff,0.5\n", "file")])
def test_a_manifest_column_that_is_not_path_or_mpp_is_refused(tmp_path, text, column):
    manifest = tmp_path / "slides.csv"
    manifest.write_text(text)
    with pytest.raises(ConfigError, match=rf"slide manifest {manifest}, its header: unknown column '{column}'; the accepted columns are path, mpp"):
        discover_slides([manifest])
    listed = tmp_path / "slides.yaml"
    listed.write_text(f"- path: a.tiff\n  {column}: 0.5\n")
    with pytest.raises(ConfigError, match=rf"slide manifest {listed}, entry 1: unknown column '{column}'"):
        discover_slides([listed])


@pytest.mark.parametrize("mpp", ["-0.5", "0", "abc", "nan"])
def test_a_manifest_mpp_that_is_not_a_positive_number_is_refused_in_one_line(tmp_path, mpp):
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp\na.tiff,0.25\nb.tiff,{mpp}\n")
    with pytest.raises(ConfigError, match=rf"slide manifest {manifest}, line 3: mpp '{mpp}' is not a positive number .* leave it empty"):
        discover_slides([manifest])
    if mpp == "abc":  # the command line prints it as one line and exits 2, before any Ray starts
        result = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), "tiles", str(manifest), "--out", str(tmp_path / "run")],
            cwd=REPO, capture_output=True, text=True,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.strip()]
        assert line.startswith("error: slide manifest") and "line 3" in line
        assert not (tmp_path / "run").exists()


def test_a_dicom_folder_is_one_slide_and_its_files_are_its_identity(tmp_path, he_pixels):
    folder = write_dicom_slide(tmp_path / "case-17", he_pixels[TISSUE], mpp=0.5, levels=2)
    copy = shutil.copytree(folder, tmp_path / "case-17-copy")
    summary = run_tiles(config(tmp_path / "run", [folder, folder / "level-1.dcm", copy]))
    assert [(s.name, s.status) for s in summary.slides] == [("case-17", "ok"), ("case-17-copy", "failed")]
    slide, duplicate = summary.slides
    assert slide.vendor == "dicom" and slide.level_count == 2 and slide.mpp == 0.5 and slide.n_tiles > 0
    assert slide.path == str(folder / "level-0.dcm") and slide.hash.startswith("sha256-files:")
    assert slide.size == sum(f.stat().st_size for f in folder.iterdir())
    assert duplicate.error.startswith(f"duplicate of {folder / 'level-0.dcm'}")
    assert len(summary.warnings) == 1

    level1 = folder / "level-1.dcm"  # a file OpenSlide reads, but not the one it is opened through
    edited = bytearray(level1.read_bytes())
    edited[len(edited) // 2] ^= 0xFF
    level1.write_bytes(bytes(edited))
    with pytest.raises(StoreError, match=r"case-17/level-0.dcm changed: .*hash"):
        run_tiles(config(tmp_path / "run", [folder, copy]))


def test_a_store_of_the_previous_schema_is_refused_until_overwrite(tmp_path, slide_factory, he_pixels):
    slide = slide_factory("old.tiff", he_pixels[TISSUE], mpp=0.5, levels=2)
    settings = config(tmp_path / "run", [slide])
    run_tiles(settings)
    store = tmp_path / "run" / "tiles.zarr"
    zarr.open_group(str(store), mode="r+").attrs["schema"] = "pathdistill.tiles/2"
    message = r"holds schema 'pathdistill.tiles/2', which this pathdistill does not read \(it reads 'pathdistill.tiles/3'\): rerun the stage that made it with --overwrite"
    with pytest.raises(StoreError, match=message):
        run_tiles(settings)
    with pytest.raises(StoreError, match=message):
        open_tile_store(store)
    run_tiles(settings, overwrite=True)
    assert open_tile_store(store).attrs.slides[0].hash.startswith("sha256:")
