"""kaiko's eva, the field's evaluation tool, loads the exported student with its own timm wrapper
(eva.vision.models.wrappers.TimmModel) and gets the student's embedding, by both routes an eva config
can take: the export directory through timm's local-dir:, or the architecture plus checkpoint_path and
model_kwargs. eva runs in a subprocess: importing it takes tens of seconds (lightning, monai) and
changes os.environ (LD_LIBRARY_PATH, KMP_*), which must not leak into the Ray workers of later tests."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

from distill import load_student
from distill.export import export_student
from distill.standardize import fit_standardizer
from distill.student import NestedHeads, Student

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, depth=2)  # D = 192
PATHOLOGY_STATS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
NOT_IMPORTABLE = 3  # the subprocess's exit code when eva cannot be imported

# argv: student dir, inputs file, outputs file. Writes eva's output for each route.
EVA_EMBED = f"""
import json, sys
from pathlib import Path
import safetensors.torch, torch
try:
    from eva.vision.models.wrappers import TimmModel
except ImportError as error:
    print(error)
    sys.exit({NOT_IMPORTABLE})
student_dir, inputs, outputs = map(Path, sys.argv[1:])
record = json.loads((student_dir / "student.json").read_text())
routes = {{
    "local_dir": TimmModel(model_name=f"local-dir:{{student_dir}}", pretrained=True),
    "checkpoint_path": TimmModel(
        model_name=record["arch"], checkpoint_path=str(student_dir / "model.safetensors"), model_kwargs=record["timm_kwargs"]
    ),
}}
pixels = safetensors.torch.load_file(inputs)["pixels"]
with torch.no_grad():
    safetensors.torch.save_file({{route: model.eval()(pixels).contiguous() for route, model in routes.items()}}, outputs)
"""


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    student = Student(ARCH, TINY, **PATHOLOGY_STATS).eval()
    heads = NestedHeads({"uni": 8}, student.nested_dims, hidden=16)
    standardizers = {"uni": fit_standardizer(np.random.default_rng(0).normal(size=(50, 8)), "zscore")}
    export_student(student, directory, dict(input_px=32, target_mpp=0.5), standardizers, heads)
    return directory


def test_eva_s_timm_wrapper_gives_the_student_s_embedding_at_every_nested_width(student_dir, tmp_path):
    student = load_student(student_dir)
    tiles = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels = student.preprocess(tiles).contiguous()  # the permute in preprocess leaves a strided view
    safetensors.torch.save_file({"pixels": pixels}, tmp_path / "inputs.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", EVA_EMBED, str(student_dir), str(tmp_path / "inputs.safetensors"), str(tmp_path / "eva.safetensors")],
        capture_output=True, text=True, timeout=540,
    )
    if result.returncode == NOT_IMPORTABLE:
        pytest.skip(f"kaiko-eva is not importable ({result.stdout.strip()}): pip install -e '.[dev]' installs it")
    assert result.returncode == 0, result.stderr[-3000:]
    by_route = safetensors.torch.load_file(tmp_path / "eva.safetensors")
    assert set(by_route) == {"local_dir", "checkpoint_path"}
    nested_dims = json.loads((student_dir / "config.json").read_text())["pathdistill"]["nested_dims"]
    assert nested_dims[-1] == student.width == 192 and len(nested_dims) > 1
    with torch.no_grad():
        for route, z in by_route.items():
            assert z.shape == (len(tiles), student.width), route
            for m in nested_dims:  # eva sees the full embedding; a nested width is its first m dims
                assert torch.allclose(z[:, :m], student.embed(pixels, dim=m), rtol=0, atol=1e-6), (route, m)
