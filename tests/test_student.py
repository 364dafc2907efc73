"""The nested student: embedding prefixes, heads, initialisation from checkpoints, export and reload."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from distill import load_student
from distill.export import StudentError, export_student, load_emulator, load_heads
from distill.standardize import fit_standardizer
from distill.student import NestedHeads, Student, default_nested_dims
from hub_cache import cached_snapshot, use_offline_cache
from pipeline.config import DistillConfig
from pipeline.weights import WeightsError

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, depth=2)  # D = 192
META = dict(input_px=32, target_mpp=0.5)
PATHOLOGY_STATS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))  # not timm's default


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """A timm model with a classifier, standing in for a pretrained checkpoint."""
    torch.manual_seed(3)
    return timm.create_model(ARCH, num_classes=10, **TINY).eval()


def backbone_output(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


def test_default_nested_dims_are_powers_of_two_from_16_plus_the_width():
    assert default_nested_dims(384) == [16, 32, 64, 128, 256, 384]
    assert default_nested_dims(768) == [16, 32, 64, 128, 256, 512, 768]
    assert default_nested_dims(256) == [16, 32, 64, 128, 256]
    assert default_nested_dims(8) == [8]


def test_pathryoshka_s_student_has_a_384_wide_embedding():
    student = Student("vit_small_patch14_reg4_dinov2", dict(img_size=224))
    assert (student.width, student.nested_dims) == (384, [16, 32, 64, 128, 256, 384])


def test_embed_returns_prefixes_of_z_and_refuses_dims_beyond_d(images):
    student = Student(ARCH, TINY).eval()
    with torch.no_grad():
        z = student(images)
        assert z.shape == (4, 192)
        assert torch.equal(student.embed(images, dim=16), z[:, :16])
        assert torch.equal(student.embed(images), z)
        with pytest.raises(ValueError, match=r"dim=193 .*D=192"):
            student.embed(images, dim=193)
        with pytest.raises(ValueError, match="dim=0"):
            student.embed(images, dim=0)


def test_nested_dims_must_increase_within_the_width():
    with pytest.raises(ValueError, match="nested dims"):
        Student(ARCH, TINY, nested_dims=[16, 256])
    with pytest.raises(ValueError, match="nested dims"):
        Student(ARCH, TINY, nested_dims=[64, 32])


def test_preprocess_normalises_uint8_tiles_with_the_student_s_stats():
    student = Student(ARCH, TINY, **PATHOLOGY_STATS)
    tiles = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = tiles.permute(0, 3, 1, 2).float().div_(255)  # the formula training has always used
    mean = torch.tensor(PATHOLOGY_STATS["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PATHOLOGY_STATS["std"]).view(1, 3, 1, 1)
    assert torch.equal(student.preprocess(tiles), (pixels - mean) / std)
    default = Student(ARCH, TINY)  # timm's pretrained config names the stats unless they are given
    assert (default.mean, default.std) == (default.backbone.pretrained_cfg["mean"], default.backbone.pretrained_cfg["std"])


def test_random_init_is_seeded():
    first, again, other = (Student(ARCH, TINY, init=f"random:{seed}") for seed in (1, 1, 2))
    assert torch.equal(first.backbone.pos_embed, again.backbone.pos_embed)
    assert not torch.equal(first.backbone.pos_embed, other.backbone.pos_embed)


@pytest.mark.parametrize("tied, kind", [(False, "mlp"), (True, "mlp"), (False, "linear"), (True, "linear")])
def test_nested_heads_map_each_prefix_to_each_teacher(tied, kind):
    heads = NestedHeads({"uni": 24, "virchow": 40}, [16, 64, 192], hidden=32 if kind == "mlp" else None, tied=tied, kind=kind)
    z = torch.randn(5, 192, requires_grad=True)
    predictions = heads(z)
    assert {key: p.shape for key, p in predictions.items()} == {
        (teacher, m): (5, width) for teacher, width in [("uni", 24), ("virchow", 40)] for m in [16, 64, 192]
    }
    predictions["uni", 16].sum().backward()
    assert z.grad[:, :16].abs().sum() > 0 and not z.grad[:, 16:].any()  # a head sees only its prefix
    head_parameters = sum(p.numel() for p in heads.parameters())
    one_head_per_teacher = sum(p.numel() for p in NestedHeads({"uni": 24, "virchow": 40}, [192], 32 if kind == "mlp" else None, kind=kind).parameters())
    assert (head_parameters == one_head_per_teacher) == tied


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_tied_heads_use_the_first_m_input_weights(kind):
    heads = NestedHeads({"uni": 24}, [16, 192], hidden=32 if kind == "mlp" else None, tied=True, kind=kind)
    heads(torch.randn(5, 192))["uni", 16].sum().backward()
    head = heads.head("uni", 16)
    first_layer = (head.fc1 if kind == "mlp" else head).weight.grad
    assert first_layer[:, :16].abs().sum() > 0 and not first_layer[:, 16:].any()


def test_mlp_heads_are_as_wide_as_their_target_by_default_and_linear_heads_are_one_layer():
    widths = {"uni": 24, "virchow": 40}
    heads = NestedHeads(widths, [16, 192])
    assert heads.hidden == widths and heads.record() == {"kind": "mlp", "hidden": widths, "tied": False}
    for teacher, width in widths.items():
        for m in (16, 192):
            head = heads.head(teacher, m)
            assert (head.fc1.weight.shape, head.fc2.weight.shape) == ((width, m), (width, width))
    assert NestedHeads(widths, [16], hidden=8).hidden == {"uni": 8, "virchow": 8}  # an int still sets every head
    linear = NestedHeads(widths, [16, 192], kind="linear")
    assert linear.record() == {"kind": "linear", "hidden": None, "tied": False}
    assert [tuple(p.shape) for p in linear.head("virchow", 16).parameters()] == [(40, 16), (40,)]
    with pytest.raises(ValueError, match="linear heads have no hidden layer"):
        NestedHeads(widths, [16], hidden=8, kind="linear")
    with pytest.raises(ValueError, match="head_hidden 8 is the hidden width of mlp heads"):
        DistillConfig(head="linear", head_hidden=8)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_init_from_a_checkpoint_file_loads_its_backbone(tmp_path, source, images, suffix):
    path = tmp_path / f"source{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # a training checkpoint, classifier included
    student = Student(ARCH, TINY, init=str(path)).eval()
    assert torch.equal(backbone_output(student.backbone, images), backbone_output(source, images))


def test_init_resamples_position_embeddings_to_the_student_size(tmp_path, source):
    path = tmp_path / "source.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    student = Student(ARCH, dict(TINY, img_size=64), init=str(path))
    assert student.backbone.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(student.backbone.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's entry
    assert torch.equal(student.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_init_from_the_hugging_face_cache_offline(tmp_path, monkeypatch, source, images):
    safetensors.torch.save_file(source.state_dict(), cached_snapshot(tmp_path, "pathdistill/tiny-vit") / "model.safetensors")
    use_offline_cache(monkeypatch, tmp_path)
    student = Student(ARCH, TINY, init="hf-hub:pathdistill/tiny-vit").eval()  # the classifier in the repo is dropped
    assert torch.equal(backbone_output(student.backbone, images), backbone_output(source, images))


def test_init_from_a_checkpoint_with_wrong_keys_names_them(tmp_path, source):
    weights = source.state_dict()
    del weights["cls_token"]
    weights["adapter.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(weights, path)
    with pytest.raises(WeightsError, match=r"wrong\.safetensors.*does not fit") as error:
        Student(ARCH, TINY, init=str(path))
    assert "cls_token" in str(error.value) and "adapter.weight" in str(error.value)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny student exported with tied heads, and the objects it was exported from."""
    student = Student(ARCH, TINY, nested_dims=[16, 64, 192], **PATHOLOGY_STATS).eval()
    rng = np.random.default_rng(0)
    standardizers = {
        "uni": fit_standardizer(rng.normal(size=(200, 24)), "phi-s"),
        "virchow": fit_standardizer(rng.normal(size=(200, 40)), "zscore"),
    }
    heads = NestedHeads({"uni": 24, "virchow": 40}, student.nested_dims, hidden=32, tied=True)
    directory = tmp_path_factory.mktemp("run") / "student"
    export_student(student, directory, META, standardizers, heads)
    return directory, student, standardizers, heads


def test_export_writes_what_is_needed_to_use_the_student(exported):
    directory, student, _, _ = exported
    record = json.loads((directory / "student.json").read_text())
    assert record["arch"] == ARCH and record["timm_kwargs"] == TINY
    assert (record["width"], record["nested_dims"]) == (192, [16, 64, 192])
    assert record["teachers"] == {
        "uni": {"width": 24, "standardizer": "phi-s"},
        "virchow": {"width": 40, "standardizer": "zscore"},
    }
    assert {key: record[key] for key in META} == META
    assert (record["mean"], record["std"]) == (list(student.mean), list(student.std))
    weights = safetensors.torch.load_file(directory / "student.safetensors")
    assert weights.keys() == student.backbone.state_dict().keys()


def test_export_then_load_gives_the_same_embeddings(exported, images):
    directory, student, _, _ = exported
    loaded = load_student(directory / "student.json")
    assert not loaded.training and loaded.nested_dims == [16, 64, 192]
    assert (loaded.mean, loaded.std) == (student.mean, student.std) == (PATHOLOGY_STATS["mean"], PATHOLOGY_STATS["std"])
    with torch.no_grad():
        for dim in (16, 64, 192):
            assert torch.equal(loaded.embed(images, dim=dim), student.embed(images, dim=dim))


def test_plain_timm_loads_the_exported_backbone(exported, images):
    directory, student, _, _ = exported
    weights = str(directory / "student.safetensors")
    backbone = timm.create_model(
        ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=weights), **TINY
    ).eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), student(images))


def test_exported_heads_and_standardizers_reload(exported):
    directory, _, standardizers, heads = exported
    loaded_heads, loaded_standardizers = load_heads(directory)
    z, targets = torch.randn(3, 192), torch.randn(3, 40)
    with torch.no_grad():
        assert all(torch.equal(loaded_heads(z)[key], p) for key, p in heads(z).items())
    assert {name: s.kind for name, s in loaded_standardizers.items()} == {"uni": "phi-s", "virchow": "zscore"}
    assert torch.equal(loaded_standardizers["virchow"](targets), standardizers["virchow"](targets))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_heads_of_either_kind_export_and_load_back(tmp_path, kind, images):
    student = Student(ARCH, TINY, nested_dims=[16, 192]).eval()
    standardizers = {"uni": fit_standardizer(np.random.default_rng(0).normal(size=(50, 24)), "phi-s")}
    heads = NestedHeads({"uni": 24}, student.nested_dims, kind=kind)
    export_student(student, tmp_path, META, standardizers, heads)
    assert json.loads((tmp_path / "student.json").read_text())["heads"] == heads.record()
    loaded, _ = load_heads(tmp_path)
    assert loaded.record() == heads.record() and loaded.state_dict().keys() == heads.state_dict().keys()
    emulator = load_emulator(tmp_path)
    with torch.no_grad():
        expected = standardizers["uni"].inverse(heads.head("uni", 16)(student.embed(images, dim=16)))
    assert torch.equal(emulator.emulate(images, "uni", 16), expected)


def test_a_student_exported_before_head_kinds_loads_as_mlp_heads(exported, tmp_path):
    """Older exports record `heads: {hidden: INT, tied}`: one hidden width for every head, no kind."""
    directory, _, _, heads = exported
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    record = json.loads((old / "student.json").read_text())
    record["heads"] = {"hidden": 32, "tied": True}
    (old / "student.json").write_text(json.dumps(record))
    loaded, _ = load_heads(old)
    assert loaded.record() == {"kind": "mlp", "hidden": {"uni": 32, "virchow": 32}, "tied": True}
    z = torch.randn(3, 192)
    with torch.no_grad():
        assert all(torch.equal(loaded(z)[key], p) for key, p in heads(z).items())
    load_emulator(old)


def test_export_refuses_incomplete_meta(exported, tmp_path):
    _, student, standardizers, heads = exported
    without_mpp = {key: value for key, value in META.items() if key != "target_mpp"}
    with pytest.raises(ValueError, match="target_mpp"):
        export_student(student, tmp_path / "other", without_mpp, standardizers, heads)
    with pytest.raises(ValueError, match=r"must not set \['mean'\]"):  # the student's own stats are written
        export_student(student, tmp_path / "other", {**META, "mean": [0.5, 0.5, 0.5]}, standardizers, heads)
    assert not (tmp_path / "other" / "student.json").exists()


@pytest.mark.parametrize("arch, kwargs, px", [(ARCH, TINY, 32), ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 2}, 224)])
def test_timm_loads_the_export_with_its_training_input(tmp_path, arch, kwargs, px):
    """timm's own route (local-dir: plus resolve_model_data_config) gives the training input: not the
    architecture's defaults (518 px for a DINOv2 ViT, crop_pct 0.9 for a ViT-Ti)."""
    student = Student(arch, kwargs, **PATHOLOGY_STATS).eval()
    heads = NestedHeads({"uni": 8}, student.nested_dims, hidden=16)
    standardizers = {"uni": fit_standardizer(np.random.default_rng(0).normal(size=(50, 8)), "zscore")}
    export_student(student, tmp_path, {**META, "input_px": px}, standardizers, heads)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, px, px) and config["crop_pct"] == 1.0
    assert (tuple(config["mean"]), tuple(config["std"])) == (PATHOLOGY_STATS["mean"], PATHOLOGY_STATS["std"])
    recorded = json.loads((tmp_path / "config.json").read_text())["pathdistill"]
    assert recorded["nested_dims"] == student.nested_dims and recorded["target_mpp"] == META["target_mpp"]
    assert os.path.samefile(tmp_path / "model.safetensors", tmp_path / "student.safetensors")
    pixels = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(pixels), student(pixels))


def test_emulate_maps_the_student_into_each_teacher_s_space(exported, images):
    directory, student, standardizers, heads = exported
    emulator = load_emulator(directory)
    with torch.no_grad():
        expected = standardizers["virchow"].inverse(heads.head("virchow", 64)(student.embed(images, dim=64)))
    assert torch.allclose(emulator.emulate(images, "virchow", 64), expected)
    assert emulator.emulate(images, "uni", 16).shape == (len(images), 24)
    with pytest.raises(StudentError, match="not distilled from 'gigapath'"):
        emulator.emulate(images, "gigapath", 64)
    with pytest.raises(StudentError, match=r"dim=50 has no head"):
        emulator.emulate(images, "uni", 50)
