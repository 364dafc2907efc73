"""The CLI's error contract, through the real `python cli.py`: a project error is one line
`error: MESSAGE` on stderr that names the input, exit code 2 and no traceback; any other
exception is a bug and keeps its traceback."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import yaml
from distill_run import TINY_TEACHER, make_run
from typer.testing import CliRunner

import distill
import pipeline
from cli import app
from distill.evaluate.datasets import EvaluateError
from distill.export import StudentError
from pipeline.config import ConfigError
from pipeline.errors import PathdistillError
from pipeline.stores import StoreError

REPO = Path(__file__).resolve().parent.parent


def run_python(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return run_python("cli.py", *args)


def assert_one_error_line(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0]


def test_embed_with_a_missing_student(tmp_path):
    missing = tmp_path / "no-student"
    assert_one_error_line(run_cli("embed", "--student", missing, "--tiles", tmp_path / "t.zarr", "--out", tmp_path / "o.zarr", "--dim", 16), str(missing))


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_one_error_line(run_cli("tiles", "--config", missing), str(missing), "--config")


def test_config_with_an_unknown_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("tiling:\n  tile_pxx: 224\n")
    assert_one_error_line(run_cli("tiles", "--config", config), str(config), "tiling.tile_pxx")


def test_unknown_teacher_fails_before_the_tile_store_is_needed(tmp_path):
    result = run_cli("features", "--out", tmp_path / "run", "--teachers", "no-such-teacher")
    assert_one_error_line(result, "'no-such-teacher'", "demo-vit")
    assert not (tmp_path / "run").exists()


def test_inspect_store_on_a_directory_that_is_not_a_store(tmp_path):
    assert_one_error_line(run_cli("inspect-store", tmp_path), str(tmp_path), "not a Zarr store")


def test_typer_cli_runner_gets_the_same_behaviour(tmp_path):
    result = CliRunner().invoke(app, ["inspect-store", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path} is not a Zarr store")


def test_an_error_raised_in_a_ray_task_is_reported_by_its_own_message():
    """Ray re-raises it as RayTaskError(StoreError), whose str is the remote traceback: the line shows the original."""
    program = (
        "import ray, typer\nfrom cli import ReportErrors\nfrom pipeline.config import RayConfig\n"
        "from pipeline.ray_runtime import ray_session\nfrom pipeline.stores import StoreError\n"
        "app = typer.Typer(cls=ReportErrors)\n"
        "@ray.remote\ndef refuse():\n    raise StoreError('runs/x/tiles.zarr is unfinished; rerun `tiles` first')\n"
        "@app.command()\ndef remote():\n    with ray_session(RayConfig(num_cpus=1)):\n        ray.get(refuse.remote())\n"
        "@app.command()\ndef fine():\n    pass\n"
        "app()\n"
    )
    result = run_python("-c", program, "remote")
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line == "error: runs/x/tiles.zarr is unfinished; rerun `tiles` first"
    assert "Traceback" not in result.stderr


def test_other_exceptions_keep_their_traceback():
    """A bug is not reported as a user error: it propagates out of the wrapper, traceback and all."""
    program = (
        "import typer\nfrom cli import ReportErrors\n"
        "app = typer.Typer(cls=ReportErrors)\n"
        "@app.command()\ndef broken():\n    raise RuntimeError('a bug, not an input error')\n"
        "@app.command()\ndef fine():\n    pass\n"
        "app()\n"
    )
    result = run_python("-c", program, "broken")
    assert result.returncode not in (0, 2)
    assert "Traceback" in result.stderr and "RuntimeError" in result.stderr
    assert "error: a bug" not in result.stderr


def project_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in a module of pipeline/ or distill/."""
    found = []
    for package in (pipeline, distill):
        for module_info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(module_info.name)
            found += [
                value for value in vars(module).values()
                if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == module.__name__
            ]
    return found


def test_every_project_error_derives_from_the_base():
    classes = project_exception_classes()
    assert len(classes) >= 14  # the walk found them: a vacuous pass would prove nothing
    assert [c.__qualname__ for c in classes if not issubclass(c, PathdistillError)] == []


def test_input_errors_are_still_value_errors():
    """Callers that caught ValueError before the common base keep catching these."""
    assert all(issubclass(error, ValueError) for error in (ConfigError, StoreError, StudentError, EvaluateError))



def test_missing_teacher_weights_are_one_line_from_inside_the_actor(tmp_path, he_pixels):
    """Teachers are built inside Ray actors: a weights file that is not there still reaches the user as one line."""
    make_run(tmp_path / "run", he_pixels)
    config = tmp_path / "weights.yaml"
    config.write_text(yaml.safe_dump({
        "run": str(tmp_path / "run"), "ray": {"num_cpus": 1},
        "features": {
            "teachers": ["tiny"], "teacher_specs": {"tiny": TINY_TEACHER}, "weights": {"tiny": str(tmp_path / "absent.safetensors")},
            "actors": 1, "threads_per_actor": 1,
        },
    }))
    result = run_cli("features", "--config", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "absent.safetensors does not exist" in errors[0], result.stderr
