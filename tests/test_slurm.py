"""`submit slurm` on a real single-node Slurm cluster started here: the rendered sbatch script starts
Ray over the allocation, runs `features` against it and stops it. The store equals a local run's, and
resubmitting the script redoes only the units left undone.

The set-up installs Debian's slurm-wlm and munge when they are missing (as root; CI installs them in
.ci/run), runs munged, slurmctld and slurmd in the foreground with their config, keys, sockets and
state in a temporary directory, and stops them by their own PIDs at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr

from feature_run import TEACHER, assert_same_features, copy_tiles, make_reference, small_slide, write_config
from pipeline.run_report import read_report
from pipeline.stores import forget_units
from pipeline.submit import RayStage, SlurmOptions, render_sbatch
from test_submit_values import HOSTILE_NAME

REPO = Path(__file__).resolve().parent.parent
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    env: dict[str, str]  # the environment that points Slurm's commands at this cluster

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, check=True).stdout

    def node_state(self) -> str:
        return subprocess.run(["sinfo", "--noheader", "--format=%T"], env=self.env, capture_output=True, text=True).stdout.strip()

    def sbatch(self, script: Path) -> str:
        return subprocess.run(["sbatch", "--parsable", str(script)], env=self.env, capture_output=True, text=True, check=True).stdout.strip()

    def wait_for_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """The job's fields once it has finished (scontrol keeps finished jobs for MinJobAge)."""
        deadline = time.monotonic() + timeout
        while True:
            # A value runs to the next " Key=" (paths, StdOut among them, may hold spaces).
            fields = dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", self.scontrol("show", "job", "--oneliner", job_id).strip()))
            if fields["JobState"] in FINISHED_STATES:
                return fields
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env)
                pytest.fail(f"Slurm job {job_id} still {fields['JobState']} after {timeout:.0f} s (cancelled)")
            time.sleep(2)


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """slurm-wlm and munge, installed with apt-get when missing (as CI does in .ci/run)."""
    if all(shutil.which(tool, path=TOOL_PATH) for tool in SLURM_TOOLS):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed; installing slurm-wlm and munge and running their daemons needs root")
    apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], env=apt, check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "slurm-wlm", "munge"], env=apt, check=True, capture_output=True)


@pytest.fixture(scope="module")
def slurm_cluster(slurm_installed, tmp_path_factory) -> Iterator[SlurmCluster]:
    """One Slurm node on this machine; config, key, sockets and state in a temp dir; stopped by PID at the end."""
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root")
    folder = tmp_path_factory.mktemp("slurm")
    for name in ("state", "spool"):
        (folder / name).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = folder / "munge.socket"
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, munge_socket))
    # Jobs take their node-local scratch from SLURM_TMPDIR (as on many sites): a short path, removed at the end.
    scratch = Path(tempfile.mkdtemp(prefix="slurm-scratch-"))
    env = {**os.environ, "PATH": TOOL_PATH, "SLURM_CONF": str(conf), "SLURM_TMPDIR": str(scratch)}
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(subprocess.Popen([
            shutil.which("munged", path=TOOL_PATH), "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munge.seed'}",
        ]))
        wait_until(munge_socket.exists, 30, "munged did not create its socket", folder / "munged.log")
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(subprocess.Popen([shutil.which(daemon, path=TOOL_PATH), "-D", "-f", str(conf)], env=env))
        cluster = SlurmCluster(env)
        wait_until(lambda: cluster.node_state() == "idle", 60, "the Slurm node did not become idle", folder / "slurmctld.log")
        yield cluster
        subprocess.run(["scancel", "--user=root"], env=env)
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def slurm_conf(folder: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    controller_port, node_port = free_port(), free_port()
    return f"""\
ClusterName=pathdistill-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={controller_port}
SlurmdPort={node_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, timeout: float, problem: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{problem} within {timeout} s; {log}:\n{log.read_text() if log.exists() else '(no log)'}")
        time.sleep(0.5)


def test_submit_slurm_features_equals_a_local_run_and_resumes(slurm_cluster, tmp_path, slide_factory, he_pixels):
    """Submitted from, and writing to, a directory whose name a shell would act on (spaces, quotes,
    `$(...)`, backticks, `;`, `#`, `%`): sbatch and bash both take it as the one path it is."""
    reference_config, reference = make_reference(tmp_path, small_slide(slide_factory, he_pixels, "slurm.tiff"))
    folder = tmp_path / HOSTILE_NAME
    folder.mkdir()
    run = folder / "slurm-run"
    # A run path relative to the directory submitted from: the job finds the run only if it runs there (--chdir).
    config = write_config({**copy_tiles(reference_config, run), "run": run.name}, folder / "slurm run.yaml")

    submitted = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "submit", "slurm", "features", "--config", str(config), "--nodes", "1", "--gpus-per-node", "0"],
        cwd=folder, env=slurm_cluster.env, capture_output=True, text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stderr).group(1)
    # Not scontrol's StdOut: it shows the path with its own expansion of %-patterns, which misreads the %% of a literal %.
    log = run / "slurm" / f"pathdistill-features-{job_id}.out"
    assert_job_succeeded(slurm_cluster.wait_for_job(job_id, timeout=300), log)
    assert "1 Ray nodes alive" in log.read_text()
    assert not list(tmp_path.rglob("injected*")) and not list(REPO.glob("injected*"))
    assert f"Ray logs: {slurm_cluster.env['SLURM_TMPDIR']}/ray-{job_id}/session_latest/logs" in log.read_text()
    assert read_report(run)[-1]["units_run"] == 6
    assert_same_features(run, reference)

    # As if the job had died before units 2 and 4 were done: resubmitting the rendered script redoes just those.
    store = zarr.open_group(str(run / "features" / f"{TEACHER}.zarr"), mode="r+")
    forget_units(run / "features" / f"{TEACHER}.zarr", {2, 4})
    for unit in (2, 4):
        for recipe in store.array_keys():
            store[recipe][unit * 8 : unit * 8 + 8] = 0
    again = slurm_cluster.sbatch(run / "slurm" / "features.sbatch")  # from another directory: the script changes into its own
    assert_job_succeeded(slurm_cluster.wait_for_job(again, timeout=300), run / "slurm" / f"pathdistill-features-{again}.out")
    assert read_report(run)[-1]["units_run"] == 2
    assert_same_features(run, reference)


def assert_job_succeeded(job: dict[str, str], log: Path) -> None:
    """The job's state and exit code say it succeeded (else: its log)."""
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text() if log.is_file() else job


def test_rendered_script_is_bash_with_the_runs_values(tmp_path):
    config = write_config({"run": str(tmp_path / "run")}, tmp_path / "run.yaml")
    options = SlurmOptions(stage=RayStage.tiles, config=config, nodes=4, gpus_per_node=2, partition="gpu", time="12:00:00", python=Path("/opt/env/bin/python"))
    script = render_sbatch(options)
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    directives = re.findall(r"^#SBATCH (\S+)$", script, re.MULTILINE)
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=2", "--partition=gpu", "--time=12:00:00", "--exclusive", "--requeue"} <= set(directives)
    assert f"--output=\"{tmp_path / 'run' / 'slurm'}\"/%x-%j.out" in directives and f"--chdir=\"{Path.cwd()}\"" in directives
    assert "python=/opt/env/bin/python\n" in script and "gpus_per_node=2\n" in script
    assert f"\"$python\" -u {REPO / 'cli.py'} tiles --config {config} --address \"$ray_address\"\n" in script
    assert not re.search(r"@[a-z_]+@", script)  # every placeholder filled


def test_dry_run_prints_and_writes_nothing_and_sbatch_must_exist(tmp_path):
    config = write_config({"run": str(tmp_path / "run")}, tmp_path / "run.yaml")
    args = [sys.executable, "cli.py", "submit", "slurm", "features", "--config", str(config), "--cpus-per-node", "8"]
    printed = subprocess.run([*args, "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == render_sbatch(SlurmOptions(stage=RayStage.features, config=config, cpus_per_node=8))
    assert "#SBATCH --cpus-per-task=8\n" in printed.stdout and "--exclusive" not in printed.stdout
    assert not (tmp_path / "run").exists()
    no_sbatch = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)})
    message = " ".join(no_sbatch.stderr.split())  # as one line, however the terminal wrapped it
    assert no_sbatch.returncode == 2 and "sbatch was not found on PATH" in message and "--dry-run" in message
