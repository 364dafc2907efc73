"""The Kubernetes manifests, static (clusters/k8s/) and rendered by `submit k8s`, against the pinned
KubeRay v1.7.0 CRD schemas (vendored in tests/kuberay-crds-v1.7.0/, see its README.md), strictly: a
key the schema does not declare is an error, as `kubeconform -strict` would have it (the CRDs
themselves allow unknown keys). The commands the manifests run go through cli.py's own argument
parsing, so every flag they use exists."""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import jsonschema
import pytest
import typer
import yaml

from cli import app
from pipeline.config import load_config
from pipeline.submit import K8S_DIR, POD_CONFIG_DIR, KubernetesOptions, KubernetesStage, render_kubernetes

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "tests" / "kuberay-crds-v1.7.0"
# sha256 of each CRD file as KubeRay v1.7.0 publishes it (stored here gzip-compressed).
CRD_SHA256 = {
    "ray.io_rayjobs.yaml.gz": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayclusters.yaml.gz": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
}
RAY_VERSION = version("ray")
STATIC = sorted(K8S_DIR.glob("*.yaml"))
# The ObjectMeta keys these manifests may use (the CRDs leave top-level metadata undescribed).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def strict(schema):
    """A copy in which every object that lists its properties allows no others.

    Objects marked x-kubernetes-preserve-unknown-fields, or declaring additionalProperties (maps),
    stay as the CRD has them.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        result["additionalProperties"] = False
    return result


def crd_text(file_name: str) -> bytes:
    return gzip.decompress((CRDS / file_name).read_bytes())


def crd_schema(file_name: str) -> dict:
    crd = yaml.load(crd_text(file_name), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1-2 MB each
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    return schema


RAY_JOB = crd_schema("ray.io_rayjobs.yaml.gz")
RAY_CLUSTER = crd_schema("ray.io_rayclusters.yaml.gz")
# A Job's pod template is the same PodTemplateSpec KubeRay's CRD spells out in full for its head group.
POD_TEMPLATE = RAY_CLUSTER["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
JOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "batch/v1"},
        "kind": {"const": "Job"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["template"],
            "properties": {
                "backoffLimit": {"type": "integer", "minimum": 0},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "template": POD_TEMPLATE,
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
CONFIG_MAP = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "data"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": OBJECT_META,
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
SCHEMAS = {"RayJob": RAY_JOB, "RayCluster": RAY_CLUSTER, "Job": JOB, "ConfigMap": CONFIG_MAP}


def problems(manifest: dict) -> list[str]:
    """Every schema violation, plus rayStartParams values that are not strings, as readable lines."""
    validator = jsonschema.Draft7Validator(SCHEMAS[manifest["kind"]])
    found = [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}" for error in validator.iter_errors(manifest)]
    for path, params in ray_start_params(manifest):
        found += [f"{path}.{key}: {value!r} is not a string" for key, value in params.items() if not isinstance(value, str)]
    return found


def ray_start_params(manifest: dict) -> list[tuple[str, dict]]:
    if manifest["kind"] not in ("RayJob", "RayCluster"):
        return []
    cluster = cluster_spec(manifest)
    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"workerGroupSpecs.{i}", group) for i, group in enumerate(cluster.get("workerGroupSpecs", []))]
    return [(f"{path}.rayStartParams", group.get("rayStartParams", {})) for path, group in groups]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def commands(manifest: dict) -> list[list[str]]:
    """The pathdistill command lines a manifest runs (RayJob entrypoint, Job container command)."""
    if manifest["kind"] == "RayJob":
        return [shlex.split(manifest["spec"]["entrypoint"])]
    if manifest["kind"] == "Job":
        return [container["command"] for container in manifest["spec"]["template"]["spec"]["containers"]]
    return []


def parse_with_cli(argv: list[str]) -> dict:
    """Parse ``python /app/cli.py COMMAND ARGS`` exactly as cli.py would, without running it."""
    assert argv[:2] == ["python", "/app/cli.py"], argv
    name, *args = argv[2:]
    group = typer.main.get_command(app)
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"cli.py has no command {name!r}"
    return command.make_context(name, args).params


def assert_joins_the_ray_cluster(manifest: dict, argv: list[str]) -> None:
    """A RayJob's driver must use the cluster Ray Jobs started it in, not start a Ray of its own."""
    if manifest["kind"] == "RayJob":
        assert parse_with_cli(argv)["address"] == "auto"


def render(stage: str, tmp_path: Path, **options) -> list[dict]:
    """The rendered documents for a GPU run named "cluster"."""
    config = tmp_path / "run.yaml"
    config.write_text("run: runs/cluster\nfeatures:\n  gpus_per_actor: 1\n")
    text = render_kubernetes(KubernetesOptions(stage=stage, config=config, image="example.org/pd:1", pvc="slides", **options))
    return list(yaml.safe_load_all(text))


def test_the_vendored_crds_are_kuberay_v1_7_0s_files():
    assert {name: hashlib.sha256(crd_text(name)).hexdigest() for name in CRD_SHA256} == CRD_SHA256


@pytest.mark.parametrize("path", STATIC, ids=lambda p: p.name)
def test_static_manifests_validate_strictly_and_run_real_commands(path):
    manifest = yaml.safe_load(path.read_text())
    assert problems(manifest) == []
    if manifest["kind"] in ("RayJob", "RayCluster"):
        assert cluster_spec(manifest)["rayVersion"] == RAY_VERSION
        assert cluster_spec(manifest)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for argv in commands(manifest):
        assert parse_with_cli(argv)["config"] == Path("/app/configs/demo.yaml")
        assert_joins_the_ray_cluster(manifest, argv)


def test_the_static_set_is_what_the_issue_asks_for():
    kinds = {path.name: yaml.safe_load(path.read_text())["kind"] for path in STATIC}
    assert kinds == {"rayjob-tiles.yaml": "RayJob", "rayjob-features.yaml": "RayJob", "raycluster.yaml": "RayCluster", "job-distill.yaml": "Job"}
    features = yaml.safe_load((K8S_DIR / "rayjob-features.yaml").read_text())["spec"]
    assert features["shutdownAfterJobFinishes"] and features["ttlSecondsAfterFinished"] > 0 and features["backoffLimit"] > 0
    (gpu_group,) = features["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_dockerfile_builds_on_the_projects_ray():
    dockerfile = (REPO / "clusters" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}\n" in dockerfile and "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile


@pytest.mark.parametrize("stage", [stage.value for stage in KubernetesStage])
def test_rendered_manifests_validate_strictly_and_carry_the_run(stage, tmp_path):
    config_map, manifest = render(stage, tmp_path, workers=3, gpus_per_worker=2)
    assert problems(config_map) == [] and problems(manifest) == []
    assert manifest["metadata"]["name"] == f"pathdistill-{stage}-cluster"
    carried = tmp_path / "carried.yaml"
    carried.write_text(config_map["data"]["config.yaml"])
    assert load_config(carried).features.gpus_per_actor == 1  # the config the pods read is the one given

    (argv,) = commands(manifest)
    assert argv[2] == stage and parse_with_cli(argv)["config"] == Path(f"{POD_CONFIG_DIR}/config.yaml")
    assert_joins_the_ray_cluster(manifest, argv)
    if stage == "distill":
        pods = gpu_pods = [manifest["spec"]["template"]["spec"]]
    else:
        cluster = cluster_spec(manifest)
        (workers,) = cluster["workerGroupSpecs"]
        assert cluster["rayVersion"] == RAY_VERSION
        assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (3, 3, 3)
        gpu_pods = [workers["template"]["spec"]]
        pods = [cluster["headGroupSpec"]["template"]["spec"], *gpu_pods]
    driver = pods[0]
    assert {"name": "run-config", "mountPath": POD_CONFIG_DIR, "readOnly": True} in driver["containers"][0]["volumeMounts"]
    assert {"name": "run-config", "configMap": {"name": config_map["metadata"]["name"]}} in driver["volumes"]
    for pod in pods:
        assert {c["image"] for c in pod["containers"]} == {"example.org/pd:1"}
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == ["slides"]
        assert all(c["workingDir"] == "/data" for c in pod["containers"])
    for pod in gpu_pods:
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 2
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_cpu_only_workers_have_no_gpu_keys(tmp_path):
    _, manifest = render("features", tmp_path, gpus_per_worker=0)
    assert problems(manifest) == []
    pod = cluster_spec(manifest)["workerGroupSpecs"][0]["template"]["spec"]
    assert "tolerations" not in pod
    assert all("nvidia.com/gpu" not in section for section in pod["containers"][0]["resources"].values())


def test_strict_validation_rejects_what_the_crd_alone_lets_through():
    manifest = yaml.safe_load((K8S_DIR / "rayjob-features.yaml").read_text())
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["entrypointt"] = misspelt["spec"].pop("entrypoint")
    nested = copy.deepcopy(manifest)
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    integer = copy.deepcopy(manifest)
    integer["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("'entrypointt' was unexpected" in p for p in problems(misspelt))
    assert any("'volumeMount' was unexpected" in p for p in problems(nested))
    assert any("num-cpus" in p and "not a string" in p for p in problems(integer))


def test_cli_prints_the_rendered_manifest_and_needs_kubectl_to_submit(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run: runs/cluster\n")
    args = [sys.executable, "cli.py", "submit", "k8s", "tiles", "--config", str(config), "--image", "example.org/pd:1", "--pvc", "slides"]
    printed = subprocess.run([*args, "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    options = KubernetesOptions(stage="tiles", config=config, image="example.org/pd:1", pvc="slides")
    assert printed.stdout == render_kubernetes(options)
    no_kubectl = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)})
    message = " ".join(no_kubectl.stderr.split())  # as one line, however the terminal wrapped it
    assert no_kubectl.returncode == 2 and "kubectl was not found on PATH" in message and "--dry-run" in message
