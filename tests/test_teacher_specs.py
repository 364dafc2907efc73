"""Teachers defined in YAML: validated like the registry, listed by `teachers`, and run through `features`
offline for each library (timm, transformers, open_clip) on tiny models saved in the hub's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import ray
import timm
import torch
import yaml
import zarr
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torchvision import transforms
from transformers import AutoModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from typer.testing import CliRunner

from cli import app
from feature_run import settings, small_slide, write_config
from hub_cache import cached_snapshot, use_offline_cache
from pipeline.config import ConfigError, load_config
from pipeline.features.stage import run_features
from pipeline.stores import Tiling
from pipeline.teacher_input import plan_teacher_input
from pipeline.teacher_specs import TeacherSpecError, parse_teacher_specs
from pipeline.teachers import TeacherSpec, UnknownTeacherError, build_teacher, get_teacher
from pipeline.tiles.stage import run_tiles

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
HF_CFG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 16, "image_size": 224, "num_register_tokens": 4}
# What a user writes under features.teacher_specs, one teacher per library.
SPECS = {
    "my-timm": {
        "source": "hf-hub:localorg/my-timm", "arch": "vit_tiny_patch16_224", "kwargs": {"depth": 2},
        "target_mpp": 0.5, "input_px": 224, "interpolation": "bicubic", **IMAGENET,
        "recipes": {"cls": "cls", "mean": "mean"}, "widths": {"cls": 192, "mean": 192},
    },
    "my-hf": {
        "source": "hf-hub:localorg/my-hf", "loader": "transformers", "arch": "dinov2_with_registers", "kwargs": HF_CFG,
        "target_mpp": 0.5, "input_px": 224, "interpolation": "bilinear", **IMAGENET,
        "recipes": {"cls": "cls", "cls_mean": "cls_mean", "pooler": "pooled"}, "widths": {"cls": 32, "cls_mean": 64, "pooler": 32},
    },
    "my-clip": {
        "source": "hf-hub:localorg/my-clip", "loader": "open_clip", "arch": "ViT-B-32", "kwargs": CLIP_CFG,
        "target_mpp": 0.5, "input_px": 224, "interpolation": "bicubic", **OPENAI,
        "recipes": {"embedding": "pooled"}, "widths": {"embedding": 24},
    },
}


def seeded(make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return make().eval()


def save_hub_models(cache: Path) -> dict[str, Path]:
    """Each tiny model in its library's hub layout (config + safetensors), as `push_to_hub` leaves a repo."""
    folders = {name: cached_snapshot(cache, f"localorg/{name}") for name in SPECS}
    vit = seeded(lambda: timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=0))
    save_file(vit.state_dict(), folders["my-timm"] / "model.safetensors")
    pretrained_cfg = {"input_size": [3, 224, 224], "crop_pct": 1.0, "interpolation": "bicubic", **IMAGENET, "num_classes": 0}
    (folders["my-timm"] / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": {"depth": 2}, "pretrained_cfg": pretrained_cfg}))
    seeded(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_CFG))).save_pretrained(folders["my-hf"])
    clip = seeded(lambda: open_clip.create_model("ViT-B-32", pretrained=None, **CLIP_CFG))
    save_file(clip.state_dict(), folders["my-clip"] / "open_clip_model.safetensors")
    preprocess = {"interpolation": "bicubic", "resize_mode": "shortest", **OPENAI}
    (folders["my-clip"] / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": preprocess}))
    return folders


def own_forward(name: str, folder: Path, tiles: np.ndarray) -> dict[str, np.ndarray]:
    """What each library's own loading and preprocessing make of the tiles: the model card route."""
    images = [Image.fromarray(tile) for tile in tiles]
    with torch.inference_mode():
        if name == "my-timm":
            model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            transform = create_transform(**resolve_data_config(model=model))
            tokens = model.forward_features(torch.stack([transform(image) for image in images]))
            return {"cls": tokens[:, 0].numpy(), "mean": tokens[:, model.num_prefix_tokens:].mean(1).numpy()}
        if name == "my-hf":
            model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
            transform = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(**IMAGENET)])
            out = model(pixel_values=torch.stack([transform(image) for image in images]))
            cls, patches = out.last_hidden_state[:, 0], out.last_hidden_state[:, 1 + HF_CFG["num_register_tokens"]:]
            return {"cls": cls.numpy(), "cls_mean": torch.cat([cls, patches.mean(1)], -1).numpy(), "pooler": out.pooler_output.numpy()}
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        return {"embedding": model.eval().encode_image(torch.stack([transform(image) for image in images])).numpy()}


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """The hub cache holding the three tiny repos, offline, for this process and the Ray workers it starts."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    folders = save_hub_models(cache)
    with pytest.MonkeyPatch.context() as patch:
        use_offline_cache(patch, cache)
        patch.setenv("HF_HUB_CACHE", str(cache))  # read at import by the Ray workers
        patch.setenv("HF_HUB_OFFLINE", "1")
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            yield folders
        finally:
            ray.shutdown()


def test_each_library_s_teacher_runs_through_features_offline_as_its_own_loader_would(offline_hub, tmp_path, slide_factory, he_pixels):
    slide = small_slide(slide_factory, he_pixels, "yaml-teachers.tiff")
    config_file = write_config(settings(tmp_path / "run", slide, teachers=list(SPECS), teacher_specs=SPECS), tmp_path / "mine.yaml")
    config = load_config(config_file)
    run_tiles(config)
    run_features(config)
    tiles = zarr.open_group(str(config.run / "tiles.zarr"), mode="r")["tiles"][:]
    for name, folder in offline_hub.items():
        store = zarr.open_group(str(config.run / "features" / f"{name}.zarr"), mode="r")
        spec = get_teacher(name, parse_teacher_specs(SPECS))
        given = plan_teacher_input(spec, Tiling.from_config(config), [{"name": "identity"}]).as_record()  # as the stage records it
        provenance = json.loads(json.dumps(build_teacher(spec, input_record=given).provenance()))  # as stored: tuples become lists
        assert store.attrs["teacher"] == provenance  # the YAML spec and the weights' hash are the store's provenance
        assert store.attrs["teacher"]["loader"] == spec.loader and store.attrs["teacher"]["source"] == f"hf-hub:localorg/{name}"
        expected = own_forward(name, folder, tiles)
        assert sorted(expected) == sorted(store.array_keys())
        for recipe, values in expected.items():
            stored = store[recipe][:, 0]
            assert stored.shape == values.shape == (48, spec.widths[recipe])
            np.testing.assert_allclose(stored, values.astype(np.float16), rtol=2e-3, atol=2e-3, err_msg=f"{name} {recipe}")


def test_a_spec_file_is_listed_with_where_it_is_written(tmp_path):
    spec_file = tmp_path / "teachers.yaml"
    spec_file.write_text(yaml.safe_dump({"my-hf": SPECS["my-hf"]}))
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"features": {"teacher_specs": str(spec_file), "teachers": ["my-hf"]}}))
    result = CliRunner().invoke(app, ["teachers", "--json", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["my-hf"]["defined_in"] == str(spec_file) and rows["my-hf"]["loader"] == "transformers"
    assert rows["my-hf"]["params_source"] == "counted" and rows["my-hf"]["params"] == sum(
        p.numel() for p in Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_CFG)).parameters())
    new = {"virchow", "kaiko-vitl14", "lunit-vits8", "gpfm", "phikon", "phikon-v2", "hibou-b", "hibou-l", "midnight-12k"}
    assert new <= rows.keys() and all(rows[name]["defined_in"] == "registry" and rows[name]["cites"] for name in new)
    table = CliRunner().invoke(app, ["teachers"], env={"COLUMNS": "400"})
    assert "hf-hub:kaiko-ai/midnight" in table.output and "https://huggingface.co/kaiko-ai/midnight" in table.output


def test_an_unknown_key_is_refused_naming_key_teacher_and_file(tmp_path):
    spec_file = tmp_path / "teachers.yaml"
    spec_file.write_text(yaml.safe_dump({"my-timm": {**SPECS["my-timm"], "colour": "blue"}}))
    with pytest.raises(TeacherSpecError, match=rf"teacher spec 'my-timm' in {spec_file}: unknown key 'colour'"):
        parse_teacher_specs(spec_file)
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"features": {"teacher_specs": {"my-timm": {**SPECS["my-timm"], "mpp": 0.5}}}}))
    with pytest.raises(ConfigError, match=rf"{config_file}: .*teacher spec 'my-timm' in features.teacher_specs: unknown key 'mpp'"):
        load_config(config_file)


@pytest.mark.parametrize("change, problem", [
    ({"widths": {"cls": 192}}, r"widths \['cls'\] must name exactly the recipes \['cls', 'mean'\]"),
    ({"loader": "keras"}, r"loader 'keras' must be one of \['timm', 'transformers', 'open_clip', 'texture'\]"),
    ({"recipes": {"cls": "max", "mean": "mean"}}, r"recipe rules \['max', 'mean'\] must be among"),
    ({"mean": [0.5, 0.5]}, r"mean\.2: Field required"),
    ({"source": "hf_hub:org/x"}, r"weight source 'hf_hub:org/x' is none of"),
    ({"name": "other"}, r"remove the key 'name'"),
])
def test_a_spec_is_checked_as_a_registry_entry_is(change, problem):
    with pytest.raises(TeacherSpecError, match=rf"teacher spec 'my-timm' in features.teacher_specs: .*{problem}"):
        parse_teacher_specs({"my-timm": {**SPECS["my-timm"], **change}})


def test_scale_and_input_size_are_written_out_and_registry_names_are_not_reused():
    for key in ("target_mpp", "input_px"):
        fields = {k: v for k, v in SPECS["my-timm"].items() if k != key}
        with pytest.raises(TeacherSpecError, match=rf"write out \['{key}'\]"):
            parse_teacher_specs({"my-timm": fields})
    with pytest.raises(TeacherSpecError, match="'uni' is a registry entry; give yours another name"):
        parse_teacher_specs({"uni": SPECS["my-timm"]})


def test_a_yaml_spec_equals_the_same_spec_written_in_python():
    parsed = parse_teacher_specs(SPECS)
    assert parsed["my-clip"] == TeacherSpec(name="my-clip", **{**SPECS["my-clip"], "mean": tuple(OPENAI["mean"]), "std": tuple(OPENAI["std"])})
    assert get_teacher("my-hf", parsed) is parsed["my-hf"]
    with pytest.raises(UnknownTeacherError, match="my-timm, my-hf, my-clip"):
        get_teacher("my-vit", parsed)


def test_a_recipe_the_library_cannot_give_fails_at_build():
    clip = parse_teacher_specs({"c": {**SPECS["my-clip"], "source": "random:0", "stand_in": True, "recipes": {"cls": "cls"}, "widths": {"cls": 32}}})["c"]
    with pytest.raises(ValueError, match="open_clip models give only 'pooled'"):
        build_teacher(clip)
    no_pooler = {**SPECS["my-hf"], "source": "random:0", "stand_in": True, "arch": "vit", "kwargs": {**HF_CFG, "add_pooling_layer": False}}
    with pytest.raises(ValueError, match="recipe rule 'pooled' needs a pooled output"):
        build_teacher(parse_teacher_specs({"v": no_pooler})["v"])


def test_the_readme_example_is_a_valid_config(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("<!-- teacher-yaml -->")[1].split("```yaml")[1].split("```")[0]
    assert len(example.strip().splitlines()) == 5
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(example)
    spec = parse_teacher_specs(load_config(config_file).features.teacher_specs)["my-vit"]
    assert spec.source.startswith("hf-hub:") and spec.target_mpp == 0.5 and spec.input_px == 224 and not spec.stand_in
