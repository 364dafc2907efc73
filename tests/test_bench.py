"""The bench's smoke test: `python -m bench --quick` runs every figure on a handful of tiles and writes
its table, JSON and plot. It asserts what was measured and written, never how fast."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1000)  # the subprocess's own 900 s bound decides, not pytest's default 600 s: the quick bench takes 3-5 min beside another test file
def test_quick_bench_writes_every_figure(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "latest.json").read_text())
    assert {row["figure"].split()[0] for row in rows} == {"1", "2", "3", "4", "5", "6", "7", "8"}
    for row in rows:
        if row["target"]:
            assert row["ratio"] is not None and math.isfinite(row["ratio"]) and row["ratio"] > 0, row
            assert row["met"] in (True, False)
    assert (tmp_path / "latest.md").read_text().count("\n") == len(rows) + 2
    assert (tmp_path / "plots" / "memory.png").stat().st_size > 0
    assert "benchmarks" in result.stdout


def test_gpu_bench_without_cuda_says_so_and_exits_0(tmp_path):
    """The GPU figures cannot run here (no CUDA); the command must still end cleanly, writing nothing."""
    result = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA device here" in result.stdout and not list(tmp_path.iterdir())
