"""``submit``: render the ``clusters/`` templates for one run and hand them to Slurm or Kubernetes.

The stages themselves do not change on a cluster: the rendered sbatch script or RayJob only starts a
Ray cluster and runs ``python cli.py STAGE --config C`` against it. What varies per run (nodes,
GPUs, image, claim, config) comes from validated options; everything else stays in the files under
``clusters/``, which users can read and edit.

No value given to ``submit`` can become a command of its own. A newline in a value would end the
#SBATCH line or shell word it is rendered into, so every rendered value is refused if it holds a
control character, naming its option; names (partition, time limit, image, claim) must have the
form Slurm or Kubernetes gives them; paths, which may hold anything else, are shell-quoted where
bash reads them and quoted for sbatch's own parser on #SBATCH lines. Manifests are written by the
YAML library, which quotes what needs it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from enum import Enum
from importlib.metadata import version
from pathlib import Path
from string import Template

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import DEMO_CONFIG, Config, load_config
from pipeline.console import console
from pipeline.errors import PathdistillError

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "clusters"
SLURM_TEMPLATE = CLUSTERS / "slurm" / "ray-stage.sbatch"
K8S_DIR = CLUSTERS / "k8s"
# Inside the image (clusters/Dockerfile): the code lives in /app, the shared claim is mounted at
# /data, the pods' working directory, so relative paths of a config land on the claim.
IMAGE_CLI = "/app/cli.py"
POD_CONFIG_DIR = "/etc/pathdistill"
RAY_VERSION = version("ray")  # the image and the manifests' rayVersion must match it
MAX_RAYJOB_NAME = 47  # KubeRay derives cluster and pod names from it and refuses longer names
# The forms of the names submit renders (https://slurm.schedmd.com/sbatch.html for --partition and --time;
# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/ for the claim).
PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"), "a Slurm partition name (letters, digits, _ . -; several separated by commas)"
TIME_LIMIT = re.compile(r"(\d+-)?\d+(:\d+){0,2}|infinite|unlimited", re.IGNORECASE), "a Slurm time limit (MINUTES, HH:MM:SS, D-HH:MM:SS, ...)"
IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*"), "an image reference (REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST)"
CLAIM = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"), "a PersistentVolumeClaim name (lower-case letters, digits, - and ., at most 253)"


class SubmitError(PathdistillError, RuntimeError):
    """Rendering or submitting failed; the message says what to do."""


class RayStage(str, Enum):
    """Stages that run on a Ray cluster (Slurm allocation or KubeRay RayJob)."""

    tiles = "tiles"
    features = "features"


class KubernetesStage(str, Enum):
    """Ray stages as RayJobs, plus ``distill`` as a plain Job on one GPU node."""

    tiles = "tiles"
    features = "features"
    distill = "distill"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Path = Field(DEMO_CONFIG, description="the run configuration, read at submission")


class SlurmOptions(Options):
    stage: RayStage
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: int | None = Field(None, ge=1, description="none: whole nodes (--exclusive)")
    partition: str | None = None
    time: str | None = Field(None, description="Slurm time limit, e.g. 12:00:00; none: the partition's")
    python: Path = Field(Path(sys.executable), description="the interpreter (with this project installed) on every node")


class KubernetesOptions(Options):
    stage: KubernetesStage
    image: str = Field(description="an image built from clusters/Dockerfile")
    pvc: str = Field(description="a ReadWriteMany claim holding slides and runs")
    workers: int = Field(1, ge=1, description="Ray worker pods (Ray stages)")
    gpus_per_worker: int | None = Field(None, ge=0, description="none: the manifest's value")


# --- Slurm ----------------------------------------------------------------------------------------


class ScriptTemplate(Template):
    """Placeholders are ``@name@``, so the script's own ``$VAR`` and ``${VAR}`` pass through untouched."""

    delimiter = "@"
    pattern = r"@(?:(?P<named>[a-z_]+)@|(?P<escaped>(?!))|(?P<braced>(?!))|(?P<invalid>(?!)))"


def render_sbatch(options: SlurmOptions) -> str:
    return _sbatch(options, _load(options))


def submit_slurm(options: SlurmOptions) -> tuple[str, Path]:
    """Write the rendered script to ``RUN/slurm/STAGE.sbatch`` and sbatch it: (job id, script)."""
    config = _load(options)
    script = _slurm_dir(config) / f"{options.stage.value}.sbatch"
    sbatch = _tool("sbatch", "Slurm's sbatch")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(_sbatch(options, config))
    return _run([sbatch, "--parsable", str(script)]).strip().split(";")[0], script


def _sbatch(options: SlurmOptions, config: Config) -> str:
    partition = None if options.partition is None else _named(options.partition, "--partition", PARTITION)
    time = None if options.time is None else _named(options.time, "--time", TIME_LIMIT)
    chdir = _directive_path(Path.cwd(), "the directory submit runs in")
    output = _directive_path(_slurm_dir(config), f"run (in {options.config})").replace("%", "%%")  # %% is a literal %
    python, cli = _shell_word(options.python, "--python"), _shell_word(REPO / "cli.py", "the pathdistill checkout")
    config_file = _shell_word(options.config.resolve(), "--config")
    _warn_idle_gpus(config, options.stage.value, options.gpus_per_node)
    directives = [
        f"--job-name=pathdistill-{options.stage.value}",
        f"--nodes={options.nodes}",
        "--ntasks-per-node=1",
        *(["--exclusive", "--mem=0"] if options.cpus_per_node is None else [f"--cpus-per-task={options.cpus_per_node}"]),
        *([f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node else []),
        *([f"--partition={partition}"] if partition is not None else []),
        *([f"--time={time}"] if time is not None else []),
        f"--chdir={chdir}",  # the config's relative paths mean what they mean here
        f"--output={output}/%x-%j.out",
        "--open-mode=append",  # a requeued job adds to its log
        "--requeue",
    ]
    return ScriptTemplate(SLURM_TEMPLATE.read_text()).substitute(
        sbatch_directives="\n".join(f"#SBATCH {line}" for line in directives),
        python=python,
        gpus_per_node=options.gpus_per_node,
        cli=cli,
        stage=options.stage.value,
        config=config_file,
    )


def _slurm_dir(config: Config) -> Path:
    return config.run.resolve() / "slurm"


def _directive_path(path: Path, option: str) -> str:
    """A path as one argument of an #SBATCH line. sbatch reads those lines itself, not bash: it splits
    them at whitespace, groups quoted text, takes a backslash as escaping the next character and an
    unquoted ``#`` as a comment (get_argument in
    https://github.com/SchedMD/slurm/blob/master/src/common/proc_args.c). Double quotes with ``\\`` and
    ``"`` escaped keep any path one argument."""
    text = _one_line(path, option)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- Kubernetes -----------------------------------------------------------------------------------


def render_kubernetes(options: KubernetesOptions) -> str:
    """A ConfigMap holding the run config, then the RayJob (or the distill Job) that mounts it."""
    config = _load(options)
    image, claim = _named(options.image, "--image", IMAGE), _named(options.pvc, "--pvc", CLAIM)
    stage = options.stage.value
    name = _resource_name(f"pathdistill-{stage}-{config.run.name}")
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "labels": {"app.kubernetes.io/name": "pathdistill"}},
        "data": {"config.yaml": options.config.read_text()},
    }
    pod_config = f"{POD_CONFIG_DIR}/config.yaml"
    if options.stage is KubernetesStage.distill:
        manifest = yaml.safe_load((K8S_DIR / "job-distill.yaml").read_text())
        driver_pod = worker_pod = manifest["spec"]["template"]["spec"]
        driver_pod["containers"][0]["command"] = ["python", IMAGE_CLI, stage, "--config", pod_config]
        pods = [driver_pod]
    else:
        manifest = yaml.safe_load((K8S_DIR / f"rayjob-{stage}.yaml").read_text())
        # "auto": the cluster Ray Jobs runs the driver in (RAY_ADDRESS), never a Ray of its own
        manifest["spec"]["entrypoint"] = shlex.join(["python", IMAGE_CLI, stage, "--config", pod_config, "--address", "auto"])
        cluster = manifest["spec"]["rayClusterSpec"]
        cluster["rayVersion"] = RAY_VERSION
        (workers,) = cluster["workerGroupSpecs"]
        workers["replicas"] = workers["minReplicas"] = workers["maxReplicas"] = options.workers
        driver_pod, worker_pod = cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]
        pods = [driver_pod, worker_pod]
    manifest["metadata"]["name"] = name
    for pod in pods:
        _use_image_and_claim(pod, image, claim)
    if options.gpus_per_worker is not None:
        _set_gpus(worker_pod, options.gpus_per_worker)
    _warn_idle_gpus(config, stage, _gpus(worker_pod))
    driver_pod["volumes"].append({"name": "run-config", "configMap": {"name": config_map["metadata"]["name"]}})
    driver_pod["containers"][0]["volumeMounts"].append({"name": "run-config", "mountPath": POD_CONFIG_DIR, "readOnly": True})
    return yaml.dump_all([config_map, manifest], Dumper=ManifestDumper, sort_keys=False, width=4096)  # no folded lines


def submit_kubernetes(options: KubernetesOptions) -> str:
    """``kubectl apply`` the rendered manifests; returns kubectl's report."""
    kubectl = _tool("kubectl", "kubectl (pointed at your cluster)")
    return _run([kubectl, "apply", "-f", "-"], stdin=render_kubernetes(options))


class ManifestDumper(yaml.SafeDumper):
    """Writes multi-line strings (the carried config) as literal blocks, the way people write them."""


ManifestDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


def _resource_name(text: str) -> str:
    """A DNS-1123 label KubeRay accepts: lower case, digits and dashes, at most 47 characters."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())[:MAX_RAYJOB_NAME].strip("-")


def _use_image_and_claim(pod: dict, image: str, claim: str) -> None:
    for container in pod["containers"]:
        container["image"] = image
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = claim


def _set_gpus(pod: dict, gpus: int) -> None:
    """GPU limits (requests follow) and the GPU-node toleration, or neither for CPU pods."""
    resources = pod["containers"][0]["resources"]
    tolerations = [t for t in pod.get("tolerations", []) if t.get("key") != "nvidia.com/gpu"]
    for section in ("limits", "requests"):
        resources[section].pop("nvidia.com/gpu", None)
        if gpus:
            resources[section]["nvidia.com/gpu"] = gpus
    if gpus:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod["tolerations"] = tolerations
    else:
        pod.pop("tolerations", None)


def _gpus(pod: dict) -> int:
    return int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


# --- shared ---------------------------------------------------------------------------------------


def _load(options: Options) -> Config:
    """The run config, validated now, so mistakes surface at submission rather than in a queue."""
    return load_config(options.config)


def _one_line(value: object, option: str) -> str:
    """``value`` as text, refused if it holds a newline or another control character: rendered into a
    script or manifest, it would end its line there and start one of its own."""
    text = str(value)
    if any(unicodedata.category(character) in ("Cc", "Zl", "Zp") for character in text):
        raise SubmitError(f"{option} {text!r} holds a control character (a newline, tab, ...), which would end its line in what submit renders: give it without one")
    return text


def _named(value: str, option: str, form: tuple[re.Pattern, str]) -> str:
    """``value`` if it is a whole name of ``form`` (pattern, what it describes); else SubmitError naming ``option``."""
    pattern, described = form
    if not pattern.fullmatch(_one_line(value, option)):
        raise SubmitError(f"{option} {value!r} is not {described}")
    return value


def _shell_word(value: object, option: str) -> str:
    """``value`` as one bash word, whatever it holds besides control characters."""
    return shlex.quote(_one_line(value, option))


def _warn_idle_gpus(config: Config, stage: str, gpus: int) -> None:
    if stage == "features" and gpus and not config.features.gpus_per_actor:
        console.print(
            f"[yellow]warning:[/yellow] {gpus} GPU(s) per node requested, but features.gpus_per_actor is 0 in the config, "
            "so the teachers would run on CPU; set features.gpus_per_actor: 1"
        )


def _tool(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SubmitError(f"{name} was not found on PATH; run this where {what} is available, or pass --dry-run to print what would be submitted")
    return found


def _run(command: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if done.returncode:
        raise SubmitError(f"`{shlex.join(command)}` failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
