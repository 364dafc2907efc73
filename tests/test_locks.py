"""One run per stage and output, with two real processes: while another process holds a stage's lock
the stage refuses at once, naming the holder's pid and host, and does no work; the lock of a killed
process blocks nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distill.embed import embed_tile_store
from distill.export import SCHEMA as STUDENT_SCHEMA
from distill.train import run_distill
from distill_run import TINY_TEACHER, config_for, make_run
from pipeline.config import FeaturesConfig
from pipeline.features.stage import run_features
from pipeline.locks import LockedError, exclusive
from pipeline.stores import RunDir

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from pathlib import Path
from pipeline.locks import exclusive
with exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


@contextmanager
def held_by_another_process(lock_file: Path) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_file)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()


def holder_named(process: subprocess.Popen) -> str:
    return f"pid {process.pid} on host {socket.gethostname()}"


def test_tiles_refuses_at_once_while_another_run_holds_the_run_directory(tmp_path, real_svs):
    run = tmp_path / "run"
    lock_file = RunDir(run).lock("tiles")
    with held_by_another_process(lock_file) as holder:
        result = subprocess.run(
            [sys.executable, "cli.py", "tiles", str(real_svs), "--out", str(run)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
        )
    message = " ".join(result.stderr.split())  # as one line, however the terminal wrapped it
    assert result.returncode == 2 and message.startswith("error: ") and "Traceback" not in result.stderr
    assert str(lock_file) in message and holder_named(holder) in message
    assert sorted(p.name for p in run.iterdir()) == ["locks"]  # no tile store, no QC pictures, no report


def test_features_distill_and_embed_refuse_while_their_lock_is_held(tmp_path, he_pixels):
    run = tmp_path / "run"
    make_run(run, he_pixels)
    config = config_for(run).model_copy(update={"features": FeaturesConfig(teachers=["tiny"], teacher_specs={"tiny": TINY_TEACHER})})
    with held_by_another_process(RunDir(run).lock("features")) as holder:
        with pytest.raises(LockedError, match=holder_named(holder)):
            run_features(config)
    assert not (run / "features" / "tiny.zarr").exists()
    with held_by_another_process(RunDir(run).lock("distill")) as holder:
        with pytest.raises(LockedError, match=holder_named(holder)):
            run_distill(config)
    assert not (run / "student").exists()

    # What embed reads of an exported student before it starts: the lock is taken before any weights are loaded.
    student = tmp_path / "student"
    student.mkdir()
    record = {"schema": STUDENT_SCHEMA, "arch": "vit_tiny_patch16_224", "width": 192, "nested_dims": [16, 192], "input_px": 64, "target_mpp": 0.5}
    (student / "student.json").write_text(json.dumps(record))
    out = tmp_path / "embeddings.zarr"
    with held_by_another_process(Path(f"{out}.lock")) as holder:
        with pytest.raises(LockedError, match=holder_named(holder)):
            embed_tile_store(student, run / "tiles.zarr", out, dim=16)
    assert not out.exists()


def test_the_lock_file_names_its_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    lock_file = RunDir(tmp_path).lock("tiles")
    with held_by_another_process(lock_file) as holder:
        record = json.loads(lock_file.read_text())
        assert (record["pid"], record["host"]) == (holder.pid, socket.gethostname())
        with pytest.raises(LockedError, match="wait for it to finish"):
            with exclusive(lock_file):
                pass
        holder.kill()  # SIGKILL: no clean-up runs; the kernel releases the flock
        holder.wait()
    with exclusive(lock_file):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
