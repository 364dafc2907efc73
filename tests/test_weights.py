"""The one weight loader of teachers and student: source strings, safe reading, the hub cache, one error."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.utils import httpx
from safetensors.torch import save_file

import pipeline.weights
from distill.student import Student
from hub_cache import REVISION, cached_snapshot, use_offline_cache
from pipeline.teachers import build_teacher, get_teacher
from pipeline.weights import (
    HubCheckpoint,
    LocalFile,
    RandomInit,
    WeightsError,
    build_strict,
    parse_source,
    read_state_dict,
    state_dict_for,
)

ARCH, TINY = "vit_tiny_patch16_224", dict(img_size=32, depth=2)
DEMO = get_teacher("demo-vit")


def tiny_vit() -> torch.nn.Module:
    return timm.create_model(ARCH, num_classes=0, **TINY)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    loaded = module.state_dict()
    return loaded.keys() == state.keys() and all(torch.equal(loaded[key], value) for key, value in state.items())


class NotATensor:
    pass


@pytest.mark.parametrize("text, parsed", [
    ("random:7", RandomInit(7)),
    ("hf-hub:MahmoodLab/UNI", HubCheckpoint("MahmoodLab/UNI")),
    ("hf-hub:bioptimus/H0-mini@v1.0", HubCheckpoint("bioptimus/H0-mini", "v1.0")),
    ("hf-hub:majiabo/GPFM/GPFM.pth", HubCheckpoint("majiabo/GPFM", filename="GPFM.pth")),
    ("hf-hub:org/name/sub/weights.safetensors@abc", HubCheckpoint("org/name", "abc", "sub/weights.safetensors")),
    ("checkpoints/model.pth", LocalFile(Path("checkpoints/model.pth"))),
])
def test_each_kind_of_source_parses_and_prints_back(text, parsed):
    assert parse_source(text) == parsed
    assert str(parsed) == text


@pytest.mark.parametrize("text, problem", [
    ("random:x", "seed must be a non-negative integer"),
    ("random:-1", "seed must be a non-negative integer"),
    ("hf-hub:UNI", "must read hf-hub:ORG/NAME"),
    ("hf-hub:org/name@", "must read hf-hub:ORG/NAME"),
    ("hf-hub:org/name/config.json", "must read hf-hub:ORG/NAME, with /FILE"),
    ("hf_hub:org/name", "is none of random:SEED, bundled:NAME, hf-hub:ORG/NAME"),
    ("weights.txt", r"is none of .*\.safetensors / \.bin / \.pth / \.pt file"),
])
def test_malformed_sources_are_refused_before_anything_is_read(text, problem):
    with pytest.raises(WeightsError, match=problem):
        parse_source(text)


def test_random_weights_are_timm_s_init_under_the_seed_and_leave_the_caller_s_rng_alone():
    torch.manual_seed(123)
    caller_state = torch.random.get_rng_state()
    module, digest = build_strict(tiny_vit, RandomInit(5), "a tiny vit")
    assert torch.equal(torch.random.get_rng_state(), caller_state)
    torch.manual_seed(5)  # the exact stream stand-in features were computed with, so they never move
    assert same_weights(module, tiny_vit().state_dict())
    assert digest == build_strict(tiny_vit, RandomInit(5), "a tiny vit")[1] != build_strict(tiny_vit, RandomInit(6), "")[1]


def test_random_weights_keep_their_hash_once_saved_as_safetensors(tmp_path):
    module, digest = build_strict(tiny_vit, RandomInit(5), "a tiny vit")
    path = tmp_path / "saved.safetensors"
    save_file(module.state_dict(), path)
    reloaded, file_digest = build_strict(tiny_vit, parse_source(str(path)), "a tiny vit")
    assert digest == file_digest == sha256(path)
    assert same_weights(reloaded, module.state_dict())


def test_a_missing_file_is_named_alike_by_teacher_and_student(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsError, match="absent.safetensors does not exist"):
        state_dict_for(parse_source(str(path)))
    with pytest.raises(WeightsError, match="absent.safetensors does not exist"):
        build_teacher("demo-vit", weights=str(path))
    with pytest.raises(WeightsError, match="absent.safetensors does not exist"):
        Student(ARCH, TINY, init=str(path))


def test_a_pickle_holding_objects_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"payload": NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(WeightsError, match="weights_only"):
        build_teacher("demo-vit", weights=str(path))
    with pytest.raises(WeightsError, match="weights_only"):
        Student(ARCH, TINY, init=str(path))


def test_a_training_checkpoint_is_read_as_its_weights(tmp_path):
    state = tiny_vit().state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 3}, path)
    assert same_weights(build_strict(tiny_vit, LocalFile(path), "a tiny vit")[0], state)
    torch.save({"weights": state, "epoch": 3}, path)  # tensors, but not where a state dict lives
    with pytest.raises(WeightsError, match=r"not a state dict: 2 entries are not tensors \['epoch', 'weights'\]"):
        read_state_dict(path)


@pytest.fixture
def cached_demo_vit(tmp_path, monkeypatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """An offline hub cache whose repo localorg/tiny holds weights of demo-vit's architecture (seed 3)."""
    weights = build_teacher(dataclasses.replace(DEMO, source="random:3")).module.state_dict()
    path = cached_snapshot(tmp_path, "localorg/tiny") / "model.safetensors"
    save_file(weights, path)
    use_offline_cache(monkeypatch, tmp_path)
    return path, weights


def test_a_cached_hub_checkpoint_loads_as_a_teacher_and_as_a_student(cached_demo_vit):
    path, weights = cached_demo_vit
    teacher = build_teacher("demo-vit", weights="hf-hub:localorg/tiny")
    assert same_weights(teacher.module, weights) and teacher.weights_sha256 == sha256(path)
    student = Student(DEMO.arch, DEMO.kwargs, init=f"hf-hub:localorg/tiny@{REVISION}")
    assert same_weights(student.backbone, weights)


def test_a_hub_source_naming_its_file_reads_that_file_only(cached_demo_vit):
    path, weights = cached_demo_vit
    renamed = path.with_name("GPFM.pth")
    torch.save(weights, renamed)  # a pickle of tensors: read with weights_only, as a local .pth is
    teacher = build_teacher("demo-vit", weights="hf-hub:localorg/tiny/GPFM.pth")
    assert same_weights(teacher.module, weights) and teacher.weights_sha256 == sha256(renamed)
    with pytest.raises(WeightsError, match=r"no weights \(other.safetensors\) for hf-hub:localorg/tiny/other.safetensors"):
        build_teacher("demo-vit", weights="hf-hub:localorg/tiny/other.safetensors")


def test_a_repo_missing_from_the_cache_fails_alike_for_teacher_and_student(cached_demo_vit):
    for build in (
        lambda: build_teacher("demo-vit", weights="hf-hub:localorg/absent"),
        lambda: Student(ARCH, TINY, init="hf-hub:localorg/absent"),
    ):
        with pytest.raises(WeightsError) as error:
            build()
        message = str(error.value)
        assert "hf-hub:localorg/absent" in message and "`hf download localorg/absent`" in message
        assert "HF_HUB_OFFLINE is set" in message


def test_a_gated_repo_says_to_accept_its_terms(monkeypatch):
    def refuse(repo, filename, revision=None):
        response = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/{repo}"))
        raise GatedRepoError(f"{repo} is gated", response=response)

    monkeypatch.setattr(pipeline.weights, "hf_hub_download", refuse)  # what the hub answers an account without access
    with pytest.raises(WeightsError, match=r"hf-hub:MahmoodLab/UNI is gated .* https://huggingface.co/MahmoodLab/UNI"):
        build_teacher("uni")
