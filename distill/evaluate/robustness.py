"""Robustness in the manner of PLISM (owkin/plism-benchmark): the same tiles seen under different
staining and scanning conditions should embed alike.

For two conditions A and B holding the same n tiles in the same order:
* cosine: the mean over tiles of cos(a_i, b_i);
* top-k: A and B stacked (2n rows); a row is a hit when the same tile under the other condition is
  among its k nearest rows by cosine (itself excluded); the share of hits over all 2n rows, which
  averages the two directions.
Pairs of conditions are grouped as PLISM groups slide pairs (cross-scanner: same staining;
cross-staining: same scanner; cross-both), and a group's value is the median over its pairs. The
leaderboard score is the mean of the median cosine over all pairs and the median top-10 of the three
groups.

Pairs come from a paired dataset (PATH/<condition>/<image>, the same file names under every
condition; its pairs form one group, "all"), or from a proxy: real tiles under made-up conditions,
stains (HED jitter) times scanners (blur and JPEG re-compression). The proxy imitates staining and
scanning differences; it is not PLISM's data and its numbers are not comparable to PLISM's.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from skimage.color import hed2rgb, rgb2hed

from distill.evaluate.datasets import IMAGE_SUFFIXES, EvaluateError, ImageFiles, ImageSource
from distill.evaluate.probes import nearest

# Staining protocols as scales of the haematoxylin, eosin and DAB optical densities (HED jitter, fixed
# per condition as one protocol stains a whole slide), and scanners as optics (blur sigma px) + codec (JPEG quality).
PROXY_STAINS: dict[str, tuple[float, float, float] | None] = {"as-scanned": None, "more-H-less-E": (1.6, 0.7, 1.0), "less-H-more-E": (0.7, 1.6, 1.0)}
PROXY_SCANNERS: dict[str, tuple[float, int] | None] = {"as-scanned": None, "blur1.0-jpeg50": (1.0, 50)}
PROXY_VERSION = "stains x scanners v1"  # change with the proxy, so cached embeddings are not reused
LEADERBOARD_K = 10
GROUPS = ("cross-scanner", "cross-staining", "cross-both")


@dataclass(frozen=True, eq=False)
class PairSet:
    """The same ``n_tiles`` tiles under each condition; item = condition index * n_tiles + tile."""

    images: ImageSource
    conditions: tuple[str, ...]
    n_tiles: int
    groups: dict[tuple[int, int], str]  # condition pair -> group
    source: str  # what the pairs are, said in the report


@dataclass(frozen=True, eq=False)
class ProxyImages:
    """Tiles of ``base`` under the proxy conditions, made on reading, at the base images' mpp."""

    base: ImageSource
    tiles: np.ndarray  # items of base
    conditions: tuple[tuple[str, str], ...]  # (stain, scanner)

    @property
    def name(self) -> str:
        return f"{self.base.name}-proxy-pairs"

    @property
    def mpp(self) -> float:
        return self.base.mpp

    @property
    def identity(self) -> str:
        return hashlib.sha256(f"{self.base.identity}|{PROXY_VERSION}|{self.conditions}|".encode() + self.tiles.tobytes()).hexdigest()

    def __len__(self) -> int:
        return len(self.tiles) * len(self.conditions)

    def read(self, items: np.ndarray) -> list[np.ndarray]:
        conditions, tiles = np.divmod(np.asarray(items), len(self.tiles))
        images = self.base.read(self.tiles[tiles])
        return [rescan(restain(image, PROXY_STAINS[self.conditions[c][0]]), PROXY_SCANNERS[self.conditions[c][1]]) for image, c in zip(images, conditions)]


def restain(image: np.ndarray, scales: tuple[float, float, float] | None) -> np.ndarray:
    """Scale the haematoxylin, eosin and DAB optical densities of an RGB image."""
    if scales is None:
        return image
    return (np.clip(hed2rgb(rgb2hed(image) * np.asarray(scales)), 0, 1) * 255).round().astype(np.uint8)


def rescan(image: np.ndarray, optics: tuple[float, int] | None) -> np.ndarray:
    """Gaussian blur of sigma px, then JPEG at the given quality."""
    if optics is None:
        return image
    sigma, quality = optics
    encoded = io.BytesIO()
    Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)).save(encoded, "JPEG", quality=quality)
    return np.asarray(Image.open(encoded).convert("RGB"))


def proxy_pairs(base: ImageSource, n_tiles: int, seed: int = 0) -> PairSet:
    """The proxy on up to ``n_tiles`` items of ``base``, sampled with ``seed``."""
    tiles = np.sort(np.random.default_rng(seed).permutation(len(base))[:n_tiles])
    conditions = tuple(itertools.product(PROXY_STAINS, PROXY_SCANNERS))
    groups = {}
    for (a, (stain_a, scanner_a)), (b, (stain_b, scanner_b)) in itertools.combinations(enumerate(conditions), 2):
        groups[a, b] = {(False, True): "cross-scanner", (True, False): "cross-staining", (True, True): "cross-both"}[stain_a != stain_b, scanner_a != scanner_b]
    source = (
        f"proxy (not PLISM data): {len(tiles)} tiles of {base.name} under {len(PROXY_STAINS)} stains (HED jitter) "
        f"x {len(PROXY_SCANNERS)} scanners (blur + JPEG): {', '.join(f'{s}/{c}' for s, c in conditions)}"
    )
    return PairSet(ProxyImages(base, tiles, conditions), tuple(f"{s}/{c}" for s, c in conditions), len(tiles), groups, source)


def paired_folder(path: Path, mpp: float | None, n_tiles: int) -> PairSet:
    """PATH/<condition>/<image>: the first ``n_tiles`` names (sorted) found under every condition."""
    if not path.is_dir():
        raise EvaluateError(f"evaluate.pairs: {path} is not a folder; give PATH/<condition>/<image> with the same names under every condition")
    if mpp is None:
        raise EvaluateError(f"evaluate.pairs {path} has no mpp: set evaluate.pairs_mpp to the micrometres per pixel of its tiles")
    folders = sorted(folder for folder in path.iterdir() if folder.is_dir())
    names = {folder.name: sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for folder in folders}
    if len(folders) < 2 or not all(names.values()):
        raise EvaluateError(f"evaluate.pairs: {path} needs at least two condition folders, each with images; found {({k: len(v) for k, v in names.items()})}")
    first = names[folders[0].name]
    unmatched = {condition: len(set(first) ^ set(found)) for condition, found in names.items() if found != first}
    if unmatched:
        raise EvaluateError(f"evaluate.pairs: condition folders of {path} must hold the same file names; names not shared with {folders[0].name}: {unmatched}")
    chosen = first[:n_tiles]
    paths = tuple(folder / name for folder in folders for name in chosen)
    digest = hashlib.sha256(f"{mpp}|".encode() + "|".join(map(str, paths)).encode())
    for image in paths:
        digest.update(f"{image.stat().st_size}|{image.stat().st_mtime_ns}".encode())
    images = ImageFiles(f"{path.name}-pairs", mpp, paths, digest.hexdigest())
    groups = {pair: "all" for pair in itertools.combinations(range(len(folders)), 2)}
    return PairSet(images, tuple(folder.name for folder in folders), len(chosen), groups, f"paired dataset {path}: {len(chosen)} tiles x {len(folders)} conditions")


def pair_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tiles of the cosine between a tile's two embeddings."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).mean())


def pair_top_k(a: np.ndarray, b: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Share of the 2n stacked rows whose partner is among their k nearest other rows."""
    n = len(a)
    stacked = np.concatenate([a, b])
    neighbours = nearest(stacked, stacked, min(max(ks), 2 * n - 1), exclude_self=True)
    is_partner = neighbours == ((np.arange(2 * n) + n) % (2 * n))[:, None]
    return {f"top{k}": float(is_partner[:, :k].any(axis=1).mean()) for k in sorted(ks)}


def robustness(embeddings: np.ndarray, pairs: PairSet, ks: list[int]) -> dict:
    """Per condition pair cosine and top-k; their medians per group; PLISM's leaderboard score."""
    by_condition = embeddings.reshape(len(pairs.conditions), pairs.n_tiles, -1)
    per_pair = [
        {"a": pairs.conditions[a], "b": pairs.conditions[b], "group": group,
         "cosine": pair_cosine(by_condition[a], by_condition[b]), **pair_top_k(by_condition[a], by_condition[b], ks)}
        for (a, b), group in pairs.groups.items()
    ]
    metrics = ["cosine", *(f"top{k}" for k in sorted(ks))]
    medians = {
        group: {metric: float(np.median([p[metric] for p in per_pair if group in ("all", p["group"])])) for metric in metrics}
        for group in ("all", *sorted({p["group"] for p in per_pair} - {"all"}))
    }
    top = f"top{LEADERBOARD_K}"
    score = None
    if top in metrics and all(group in medians for group in GROUPS):
        score = float(np.mean([medians["all"]["cosine"], *(medians[group][top] for group in GROUPS)]))
    return {"groups": medians, "score": score, "pairs": per_pair}
