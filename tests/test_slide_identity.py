"""Slide inputs: manifests are checked (their columns and their mpp)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.tiles.slides import discover_slides
from test_tile_stage import REPO


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
