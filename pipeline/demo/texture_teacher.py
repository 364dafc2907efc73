"""Makes pipeline/stand_ins/demo-texture.safetensors, the demo-texture stand-in's weights, from the demo tiles.

    python -m pipeline.demo.texture_teacher runs/demo/tiles.zarr

The filter bank (pipeline/texture_bank.py) is fixed; only the output projection is fitted, once, in closed
form: the principal axes of the bank's tile-mean features over the demo tiles, axis k scaled by
variance_k ** -FLATTEN. FLATTEN 0 keeps the bank's own spread, in which tissue amount and stain strength
still hold most of the variance; 0.5 would whiten, giving the noisiest statistics as much variance as the
plainest. In between, the variance is shared by many texture statistics, as in a trained model's features.
Rerun on the same tiles, it gives the same projection up to floating-point rounding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.effective_rank import effective_rank
from pipeline.stores import open_tile_store
from pipeline.texture_bank import TextureTeacher
from pipeline.weights import STAND_IN_WEIGHTS

NAME = "demo-texture"
WIDTH = 384
FLATTEN = 0.15
BATCH = 32


def bank_summaries(teacher: TextureTeacher, tiles: np.ndarray) -> np.ndarray:
    """The bank's tile-mean features [N, C] of uint8 RGB tiles [N, H, W, 3], in float64."""
    with torch.inference_mode():
        return np.concatenate([
            teacher.bank(torch.from_numpy(tiles[i : i + BATCH]).permute(0, 3, 1, 2).float().div(255)).mean(1).double().numpy()
            for i in range(0, len(tiles), BATCH)
        ])


def fit_projection(teacher: TextureTeacher, summaries: np.ndarray, flatten: float = FLATTEN) -> None:
    """Set the projection to the top principal axes of ``summaries``, scaled as the module docstring says and
    then by one factor that gives the projected features unit mean variance per dim."""
    mean = summaries.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov(summaries - mean, rowvar=False))
    order = np.argsort(variances)[::-1][: teacher.num_features]
    variances, axes = np.clip(variances[order], 1e-12, None), axes[:, order]
    axes *= np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(axes.shape[1])])  # a fixed sign per axis
    scaled = variances ** (1 - 2 * flatten)
    weight = (axes * variances ** -flatten).T / np.sqrt(scaled.mean())
    with torch.no_grad():
        teacher.projection.weight.copy_(torch.from_numpy(weight))
        teacher.projection.bias.copy_(torch.from_numpy(-weight @ mean))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiles", type=Path, help="the demo tile store (make tiles: runs/demo/tiles.zarr)")
    parser.add_argument("--out", type=Path, default=STAND_IN_WEIGHTS / f"{NAME}.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tiles = open_tile_store(args.tiles)["tiles"][:]
    teacher = TextureTeacher(width=WIDTH)
    summaries = bank_summaries(teacher, tiles)
    fit_projection(teacher, summaries)
    projected = summaries @ teacher.projection.weight.detach().double().numpy().T
    print(f"{len(tiles)} tiles: effective rank (90% variance) {effective_rank(summaries)} of the bank's {summaries.shape[1]} features, "
          f"{effective_rank(projected)} of the {WIDTH} projected ones")
    save_file({key: value.contiguous() for key, value in teacher.state_dict().items()}, args.out, metadata={"tiles": str(args.tiles), "rows": str(len(tiles))})


if __name__ == "__main__":
    main()
