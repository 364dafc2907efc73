"""What `submit` renders from user input can never run as a command of its own: values that would
end their line (newlines, other control characters) are refused naming the option, names are
checked against what Slurm and Kubernetes accept, and paths (which may hold spaces, quotes, `$(...)`,
backticks, `;`, `#` or `%`) are quoted for the shell and for sbatch's own reading of #SBATCH lines.

The rendered script is checked with `bash -n`, and its lines that use the values are run, with
`printf` in place of the programs; tests/test_slurm.py submits such a script to a real Slurm."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from feature_run import write_config
from test_cli_errors import assert_one_error_line, run_cli
from pipeline.submit import SLURM_TEMPLATE, KubernetesOptions, RayStage, SlurmOptions, SubmitError, render_kubernetes, render_sbatch

REPO = Path(__file__).resolve().parent.parent
# A directory name a shell would act on in every way it can, unquoted; "injected" files appear if it does.
HOSTILE_NAME = "a b $(touch injected-1) `touch injected-2`; touch injected-3 'q' \"dq\" #hash 50%x"
LINE_BREAKS = ["gpu\ntouch injected", "gpu\r\ntouch injected", "gpu\rtouch", "a\x00b", "a\tb", "a\x1bb", "a\u2028b"]


def assert_refused(result: subprocess.CompletedProcess, option: str) -> None:
    """One error line naming the option, and nothing rendered."""
    assert_one_error_line(result, option)
    assert result.stdout == ""


@pytest.fixture
def hostile(tmp_path) -> Path:
    """A directory with a hostile name, holding a config whose run directory is inside it."""
    folder = tmp_path / HOSTILE_NAME
    folder.mkdir()
    write_config({"run": str(folder / "run"), "ray": {"num_cpus": 1}}, folder / "run config.yaml")
    return folder


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config({"run": str(tmp_path / "run")}, tmp_path / "run.yaml")


def test_the_issues_partition_is_refused_by_the_cli_as_one_line(config):
    assert_refused(run_cli("submit", "slurm", "tiles", "--config", config, "--partition", "gpu\ntouch injected", "--dry-run"), "--partition")


@pytest.mark.parametrize("value", LINE_BREAKS, ids=repr)
@pytest.mark.parametrize(("option", "field"), [("--partition", "partition"), ("--time", "time"), ("--python", "python")])
def test_a_line_break_in_a_slurm_option_is_refused(config, option, field, value):
    with pytest.raises(SubmitError, match=f"^{option} .*control character"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=config, **{field: value}))


@pytest.mark.parametrize("value", ["gpu;touch injected", "$(touch injected)", "`touch injected`", "gpu 'x'", "gpu#x", ""])
def test_a_partition_is_a_slurm_partition_name(config, value):
    with pytest.raises(SubmitError, match="^--partition .* is not a Slurm partition name"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=config, partition=value))


@pytest.mark.parametrize("value", ["12:00:00;touch injected", "$(touch injected)", "1 day", "-1"])
def test_a_time_limit_is_a_slurm_time(config, value):
    with pytest.raises(SubmitError, match="^--time .* is not a Slurm time limit"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=config, time=value))


def test_slurm_names_and_times_that_slurm_accepts_are_rendered(config):
    for partition, time in [("gpu", "12:00:00"), ("gpu-a100.long,cpu_2", "2-00:00:00"), ("x", "30"), ("debug", "INFINITE")]:
        script = render_sbatch(SlurmOptions(stage=RayStage.tiles, config=config, partition=partition, time=time))
        assert f"#SBATCH --partition={partition}\n" in script and f"#SBATCH --time={time}\n" in script


def test_a_line_break_in_the_run_or_config_path_or_the_working_directory_is_refused(tmp_path, monkeypatch):
    broken_run = write_config({"run": str(tmp_path / "run\ntouch injected")}, tmp_path / "broken-run.yaml")
    with pytest.raises(SubmitError, match=rf"run \(in {re.escape(str(broken_run))}\)"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=broken_run))
    fine = write_config({"run": str(tmp_path / "run")}, tmp_path / "run.yaml")
    folder = tmp_path / "configs\ntouch injected"
    folder.mkdir()
    with pytest.raises(SubmitError, match="--config"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=write_config({"run": str(tmp_path / "run")}, folder / "run.yaml")))
    monkeypatch.chdir(folder)
    with pytest.raises(SubmitError, match="the directory submit runs in"):
        render_sbatch(SlurmOptions(stage=RayStage.tiles, config=fine))


def test_hostile_paths_stay_single_words_of_the_rendered_script(hostile, monkeypatch):
    python = hostile / "bin" / "python"
    config = hostile / "run config.yaml"
    monkeypatch.chdir(hostile)  # --chdir: the directory submit runs in
    script = render_sbatch(SlurmOptions(stage=RayStage.tiles, config=config, python=python, partition="gpu"))
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr

    # No line of its own: the script has the template's lines, its one placeholder line of directives grown to the directives.
    template = SLURM_TEMPLATE.read_text().splitlines()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert len(script.splitlines()) == len(template) - 1 + len(directives)
    assert all(re.fullmatch(r"#SBATCH --[a-z-]+(=\S.*)?", line) for line in directives)
    assert f'#SBATCH --chdir="{escaped_for_sbatch(hostile)}"' in directives
    assert f'#SBATCH --output="{escaped_for_sbatch(hostile / "run" / "slurm").replace("%", "%%")}"/%x-%j.out' in directives

    # The lines that use the values, run with printf in place of the programs: each value is one word, unchanged.
    (assignment,) = [line for line in script.splitlines() if line.startswith("python=")]
    (driver,) = [line for line in script.splitlines() if line.startswith('"$python" -u ')]
    harmless = f"{assignment}\nray_address=HEAD:1\nprintf '%s\\n' {driver}\n"
    ran = subprocess.run(["bash", "-c", harmless], cwd=hostile, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [str(python), "-u", str(REPO / "cli.py"), "tiles", "--config", str(config), "--address", "HEAD:1"]
    assert not list(hostile.parent.rglob("injected*")) and not list(REPO.glob("injected*"))


def escaped_for_sbatch(path: Path) -> str:
    """How sbatch's directive parser needs a value inside double quotes: backslash before \\ and "."""
    return str(path).replace("\\", "\\\\").replace('"', '\\"')


@pytest.mark.parametrize(("field", "value"), [
    ("image", "example.org/pd:1\n    command: [touch, injected]"), ("image", "pd:1 $(touch injected)"), ("image", ""),
    ("pvc", "slides\nkind: Pod"), ("pvc", "Slides"), ("pvc", "slides;x"), ("pvc", "-slides"), ("pvc", ""),
])
def test_kubernetes_image_and_claim_are_checked(config, field, value):
    given = {"image": "example.org/pd:1", "pvc": "slides", field: value}
    with pytest.raises(SubmitError, match=f"^--{field} "):
        render_kubernetes(KubernetesOptions(stage="features", config=config, **given))


def test_the_cli_refuses_a_bad_image_as_one_line(config):
    assert_refused(run_cli("submit", "k8s", "features", "--config", config, "--image", "pd:1\nkind: Pod", "--pvc", "slides", "--dry-run"), "--image")


def test_a_hostile_config_is_carried_verbatim_and_the_manifest_keeps_its_shape(hostile):
    config = hostile / "run config.yaml"
    config.write_text(f"# {HOSTILE_NAME}\nrun: {json.dumps(str(hostile / 'run'))}\n")
    options = KubernetesOptions(stage="features", config=config, image="registry.example.com:5000/team/pd@sha256:" + "0" * 64, pvc="pathdistill-data.v2")
    config_map, manifest = yaml.safe_load_all(render_kubernetes(options))
    assert config_map["data"] == {"config.yaml": config.read_text()}
    assert manifest["kind"] == "RayJob" and set(manifest["spec"]) == set(yaml.safe_load((REPO / "clusters/k8s/rayjob-features.yaml").read_text())["spec"])
    pods = [manifest["spec"]["rayClusterSpec"]["headGroupSpec"], *manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in (group["template"]["spec"] for group in pods):
        assert {c["image"] for c in pod["containers"]} == {options.image}
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == [options.pvc]
