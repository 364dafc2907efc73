"""Training checkpoints: everything needed to continue a run bit for bit, in files torch loads safely.

A checkpoint is a dict of tensors and plain containers (no pickled objects), so it loads with
`torch.load(weights_only=True)`; it is written to a temporary file and renamed, so a kill at any
moment leaves the previous checkpoint intact, and only the newest KEEP are kept. A full, read-only
or forbidden disk is an OutputError naming the checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.files import atomic_path
from pipeline.stores import writing

KEEP = 2
PATTERN = "step-*.pt"


def save_checkpoint(directory: Path, step: int, state: dict) -> Path:
    path = directory / f"step-{step:08d}.pt"
    with writing(path, "checkpoint"):
        directory.mkdir(parents=True, exist_ok=True)
        # Into a Python file: torch's own writer turns a full disk into a RuntimeError, a file object keeps the OSError.
        with atomic_path(path) as temporary, temporary.open("wb") as handle:
            torch.save(state, handle)
        for old in sorted(directory.glob(PATTERN))[:-KEEP]:
            old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob(PATTERN))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every random stream training may draw from (the loader has its own seeded ones)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": [version, list(python_state), gauss_next],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
