"""Teacher registry and builder: published architectures (meta device), stand-ins, and every weight source."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_cache import cached_snapshot
from pipeline.teachers import (
    TEACHERS,
    TeacherSpec,
    UnknownTeacherError,
    build_teacher,
    create_architecture,
    describe_teachers,
    get_teacher,
    param_count_meta,
)
from pipeline.weights import WeightsError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Published figures (model cards / papers, cited in each entry's notes): parameters, width per
# recipe, and prefix tokens (CLS + registers) the patch mean must skip.
PUBLISHED = {
    "uni": (303e6, {"cls": 1024}, 1),
    "uni2-h": (681e6, {"cls": 1536}, 9),
    "virchow2": (631e6, {"cls": 1280, "cls_mean": 2560}, 5),
    "h-optimus-0": (1.13e9, {"cls": 1536}, 5),
    "h-optimus-1": (1.13e9, {"cls": 1536}, 5),
    "h0-mini": (86e6, {"cls": 768, "cls_mean": 1536}, 5),
    "prov-gigapath": (1.13e9, {"cls": 1536}, 1),
}
WIDTH_FACTOR = {"cls": 1, "mean": 1, "cls_mean": 2}


@pytest.fixture(scope="module")
def demo_vit():
    return build_teacher("demo-vit")


@pytest.fixture(scope="module")
def demo_convnet():
    return build_teacher("demo-convnet")


def tiles(n: int, px: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_real_entry_is_checked_against_published_figures():
    real = {name for name, spec in TEACHERS.items() if not spec.stand_in}
    assert real == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_architecture_matches_published_figures(name):
    spec = get_teacher(name)
    params, widths, prefix = PUBLISHED[name]
    with torch.device("meta"):
        model = create_architecture(spec)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02)
    assert spec.params == pytest.approx(params, rel=0.02)
    built = {recipe: WIDTH_FACTOR[rule] * model.num_features for recipe, rule in spec.recipes.items()}
    assert built == widths == spec.widths
    assert model.num_prefix_tokens == prefix
    # The forward pass keeps its shape too: prefix tokens + (input_px / patch)^2 patch tokens.
    tokens = model.forward_features(torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
    patch = model.patch_embed.patch_size[0]
    assert tokens.shape == (2, prefix + (spec.input_px // patch) ** 2, model.num_features)
    assert spec.source.startswith("hf-hub:") and spec.target_mpp == 0.5 and not spec.stand_in


def test_param_count_meta_counts_a_giant_model():
    assert param_count_meta(get_teacher("h-optimus-0")) == pytest.approx(1.13e9, rel=0.02)


def test_specs_serialise_to_json_and_back():
    for spec in TEACHERS.values():
        round_trip = json.loads(json.dumps(spec.to_json()))
        assert TeacherSpec(**round_trip).to_json() == round_trip


def test_spec_rejects_inconsistent_entries():
    demo = get_teacher("demo-vit")
    with pytest.raises(ValueError, match="recipe rules"):
        dataclasses.replace(demo, recipes={"cls": "max"}, widths={"cls": 192})
    with pytest.raises(ValueError, match="stand_in"):
        dataclasses.replace(demo, stand_in=False)
    with pytest.raises(ValueError, match="widths"):
        dataclasses.replace(demo, widths={"cls": 192})
    with pytest.raises(ValueError, match="'demo-vit': weight source 'random:x'"):
        dataclasses.replace(demo, source="random:x")
    with pytest.raises(ValueError, match="field_px 0 must be a positive"):
        dataclasses.replace(demo, field_px=0)
    unset = {key: value for key, value in demo.to_json().items() if key != "field_px"}
    assert TeacherSpec(**{**unset, "resize": "resize_center_crop", "resize_px": 256}).field_px == 256  # the tile its resize keeps


def test_stand_ins_are_deterministic(demo_vit):
    batch = tiles(4)
    rebuilt = build_teacher("demo-vit")
    assert rebuilt.weights_sha256 == demo_vit.weights_sha256
    a, b = demo_vit.embed(batch), rebuilt.embed(batch)
    assert all(torch.equal(a[recipe], b[recipe]) for recipe in a)
    reseeded = build_teacher(dataclasses.replace(demo_vit.spec, source="random:99"))
    assert reseeded.weights_sha256 != demo_vit.weights_sha256


@pytest.mark.parametrize("fixture", ["demo_vit", "demo_convnet"])
def test_stand_in_embeddings_have_spec_shapes(fixture, request):
    teacher = request.getfixturevalue(fixture)
    out = teacher.embed(tiles(3, px=300))
    assert {recipe: tuple(v.shape) for recipe, v in out.items()} == {r: (3, w) for r, w in teacher.spec.widths.items()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training


def test_stand_ins_differ_in_family_and_width(demo_vit, demo_convnet):
    assert type(demo_vit.module).__name__ == "VisionTransformer"
    assert type(demo_convnet.module).__name__ == "ConvNeXt"
    assert demo_vit.spec.widths["cls"] != demo_convnet.spec.widths["mean"]
    assert demo_vit.spec.stand_in and demo_convnet.spec.stand_in
    out = demo_vit.embed(tiles(2))
    assert torch.equal(out["cls_mean"][:, :192], out["cls"])


def test_pool_skips_cls_and_registers(demo_vit):
    teacher = demo_vit  # CLS + 4 registers
    tokens = torch.ones(2, 5 + 196, 192)
    tokens[:, 0] = 7.0
    tokens[:, 1:5] = 100.0
    out = teacher.pool(tokens)
    assert torch.equal(out["cls"], torch.full((2, 192), 7.0))
    assert torch.equal(out["cls_mean"], torch.cat([torch.full((2, 192), 7.0), torch.ones(2, 192)], dim=1))


def test_preprocess_resizes_crops_and_normalises_with_spec_stats(demo_convnet):
    teacher = demo_convnet  # resize 256 + centre crop 224, H-optimus mean/std
    batch = torch.full((2, 300, 400, 3), 128, dtype=torch.uint8)
    pixels = teacher.preprocess(batch)
    assert pixels.shape == (2, 3, 224, 224)
    mean, std = torch.tensor(teacher.spec.mean), torch.tensor(teacher.spec.std)
    expected = ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels, expected)
    with pytest.raises(ValueError, match="uint8 RGB"):
        teacher.preprocess(batch.permute(0, 3, 1, 2))


def test_cls_recipe_on_a_cnn_fails_at_build():
    spec = dataclasses.replace(get_teacher("demo-convnet"), recipes={"cls": "cls"}, widths={"cls": 320})
    with pytest.raises(ValueError, match="CLS token"):
        build_teacher(spec)


def test_local_safetensors_and_pth_load(tmp_path, demo_vit):
    state = demo_vit.module.state_dict()
    safe, pickled = tmp_path / "model.safetensors", tmp_path / "model.pth"
    save_file(state, safe)
    torch.save(state, pickled)
    for path in (safe, pickled):
        # Loaded into another seed's stand-in, so equality below proves the file's weights arrived.
        loaded = build_teacher(dataclasses.replace(demo_vit.spec, source="random:7"), weights=str(path))
        assert loaded.weights_sha256 == sha256(path)
        assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in state.items())
    # The stand-in's hash is that of its safetensors export, so the saved file keeps its identity.
    assert demo_vit.weights_sha256 == sha256(safe)


def test_mismatched_state_dict_names_keys(tmp_path, demo_vit, demo_convnet):
    path = tmp_path / "convnet.safetensors"
    save_file(demo_convnet.module.state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_teacher("demo-vit", weights=str(path))
    n_missing, n_unexpected = len(demo_vit.module.state_dict()), len(demo_convnet.module.state_dict())
    message = str(err.value)
    assert str(path) in message
    assert f"{n_missing} missing keys ['blocks.0.attn.proj.bias'" in message
    assert f"{n_unexpected} unexpected keys ['head.norm.bias'" in message


def test_unknown_teacher_names_input_and_choices():
    with pytest.raises(UnknownTeacherError) as err:
        get_teacher("virchow3")
    message = str(err.value)
    assert "'virchow3'" in message and "add a TeacherSpec" in message
    assert all(name in message for name in TEACHERS)


def test_describe_lists_every_teacher_with_labels(demo_vit):
    rows = {row["name"]: row for row in describe_teachers()}
    assert rows.keys() == TEACHERS.keys()
    assert rows["virchow2"]["widths"] == {"cls": 1280, "cls_mean": 2560}
    assert rows["demo-vit"]["stand_in"] and rows["demo-vit"]["params_source"] == "counted"
    assert rows["demo-vit"]["params"] == sum(p.numel() for p in demo_vit.module.parameters())
    assert not rows["uni"]["stand_in"] and rows["uni"]["params_source"] == "published"
    assert (rows["prov-gigapath"]["field_px"], rows["prov-gigapath"]["mpp"]) == (256, 0.5) and rows["uni"]["field_px"] == 224


# The hub runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import,
# exactly as the CLI will, so nothing here patches library internals.
HUB_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file
from pipeline.teachers import TeacherSpec, build_teacher
from pipeline.weights import WeightsError
spec_json, saved_path = sys.argv[1:]
teacher = build_teacher(TeacherSpec(**json.loads(spec_json)))
saved, state = load_file(saved_path), teacher.module.state_dict()
result = {"sha": teacher.weights_sha256, "same": saved.keys() == state.keys()
          and all(torch.equal(v, state[k]) for k, v in saved.items())}
try:
    build_teacher("uni")
except WeightsError as err:
    result["missing"] = str(err)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """A Hugging Face cache holding only ``localorg/tiny``, weights alone (the spec, not a config.json, names
    the architecture), used with HF_HUB_OFFLINE=1."""
    home = tmp_path_factory.mktemp("hf")
    spec = dataclasses.replace(get_teacher("demo-vit"), name="tiny-hub", source="hf-hub:localorg/tiny", stand_in=False)
    weights = cached_snapshot(home / "hub", "localorg/tiny") / "model.safetensors"
    save_file(build_teacher(dataclasses.replace(spec, source="random:3", stand_in=True)).module.state_dict(), weights)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps(spec.to_json()), str(weights)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), weights


def test_hub_source_loads_offline_from_cache(offline_hub):
    result, weights = offline_hub
    assert result["same"]
    assert result["sha"] == sha256(weights)


def test_hub_source_not_cached_names_repo_and_fix(offline_hub):
    message = offline_hub[0]["missing"]
    assert "hf-hub:MahmoodLab/UNI" in message and "`hf download MahmoodLab/UNI`" in message
    assert "HF_HUB_OFFLINE" in message
