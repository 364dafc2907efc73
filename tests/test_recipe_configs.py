"""The shipped recipe configs would run as they are once their weights are cached: each loads, every
teacher and the student build (on the meta device: no weights, nothing read from the hub) with the
published sizes, and the tiling, views, recipes, dims and heads fit together as the stages check them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

from distill.spatial import draw_masked_cells
from distill.student import NestedHeads
from distill.train import build_student
from pipeline.config import Config, load_config
from pipeline.grids import pool_grid
from pipeline.stores import Tiling
from pipeline.teacher_input import plan_teacher_inputs
from pipeline.teacher_loaders import LOADERS
from pipeline.teacher_specs import parse_teacher_specs
from pipeline.teachers import POOLS, create_architecture, get_teacher
from pipeline.views import expand_views
from pipeline.weights import HubCheckpoint, parse_source

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The student's published size, in millions of parameters as the papers round them: Pathryoshka-B 87M
# and -S 22M (https://www.sciencestack.ai/paper/2511.23204), H0-mini 86M (https://huggingface.co/bioptimus/H0-mini).
PUBLISHED_MILLIONS = {"pathryoshka-b.yaml": 87, "pathryoshka-s.yaml": 22, "h0-mini.yaml": 86}


@pytest.fixture(scope="module", params=sorted(PUBLISHED_MILLIONS))
def recipe(request) -> tuple[str, Config]:
    return request.param, load_config(CONFIGS / request.param)


def teacher_specs(config: Config) -> dict:
    user_specs = parse_teacher_specs(config.features.teacher_specs)
    return {name: get_teacher(name, user_specs) for name in config.features.teachers}


def meta_student(config: Config):
    """The configured student on the meta device; its init replaced by random weights, which load nothing."""
    with torch.device("meta"):
        return build_student(config.distill.model_copy(update={"init": "random:0"}), config.tiling.tile_px)


def meta_tiles(config: Config) -> torch.Tensor:
    return torch.empty(2, 3, config.tiling.tile_px, config.tiling.tile_px, device="meta")


def test_every_recipe_config_is_tested():
    assert {path.name for path in CONFIGS.glob("*.yaml")} - {"demo.yaml", "evaluate-crc.yaml"} == set(PUBLISHED_MILLIONS)


def test_teachers_build_and_give_the_recipes_distill_names(recipe):
    name, config = recipe
    settings = config.distill
    specs = teacher_specs(config)
    distilled = settings.teachers or list(specs)
    assert set(distilled) <= set(specs), f"{name}: distill.teachers must be computed by features"
    assert set(settings.recipes) == set(settings.teacher_weights) == set(distilled)
    for teacher, spec in specs.items():
        assert not spec.stand_in and spec.source.startswith("hf-hub:")
        with torch.device("meta"):
            model = create_architecture(spec)
        outputs = LOADERS[spec.loader].forward(model, torch.empty(2, 3, spec.input_px, spec.input_px, device="meta"))
        assert {recipe: POOLS[rule](outputs).shape[-1] for recipe, rule in spec.recipes.items()} == spec.widths
        if config.features.grid:  # the spatial recipe as features computes it
            patch_tokens = outputs.tokens[:, outputs.prefix :]
            assert pool_grid(patch_tokens, config.features.grid).shape == (2, config.features.grid**2, patch_tokens.shape[-1])
        if teacher in distilled:
            assert settings.recipes[teacher] in spec.recipes


def test_the_tiling_holds_every_teacher_at_its_published_scale(recipe):
    _, config = recipe
    tiling = Tiling.from_config(config)
    views = expand_views(config.features.views, tiling.context_px, tiling.tile_px)
    plans = plan_teacher_inputs(list(teacher_specs(config).values()), tiling, views, config.features.off_scale)
    assert plans and not any(plan.off_scale for plan in plans.values())


def test_student_has_the_published_size_and_heads_for_every_target(recipe):
    name, config = recipe
    settings = config.distill
    init = parse_source(settings.init)  # a pretrained init is the timm checkpoint of the student's own architecture
    assert isinstance(init, HubCheckpoint) and init.repo == timm.models.get_pretrained_cfg(settings.student).hf_hub_id
    student = meta_student(config)
    assert round(sum(p.numel() for p in student.parameters()) / 1e6) == PUBLISHED_MILLIONS[name]
    assert student.nested_dims == settings.nested_dims and student.nested_dims[-1] == student.width
    z = student(meta_tiles(config))
    assert z.shape == (2, student.width)
    crops = settings.augment.local_crops
    if crops.n:  # local crops reach the student at their own side
        assert student(torch.empty(2, 3, crops.px, crops.px, device="meta")).shape == (2, student.width)
    specs = teacher_specs(config)
    widths = {t: specs[t].widths[recipe_name] for t, recipe_name in settings.recipes.items()}
    with torch.device("meta"):
        heads = NestedHeads(widths, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    predictions = heads(z)
    assert {key: p.shape for key, p in predictions.items()} == {
        (t, m): (2, width) for t, width in widths.items() for m in student.nested_dims
    }


def test_spatial_terms_have_their_grid_and_heads(recipe):
    """A grid is cached exactly when a spatial or masked term uses it; the student's patch tokens pool to
    the teachers' cells (masked when mask_ratio asks), and a spatial head fits each teacher's token width."""
    _, config = recipe
    settings, k = config.distill, config.features.grid
    assert bool(k) == (settings.spatial_weight > 0 or settings.mask_ratio > 0)
    if not k:
        return
    student = meta_student(config)
    with torch.device("meta"):
        masked_cells = draw_masked_cells(2, k, settings.mask_ratio, torch.device("meta")) if settings.mask_ratio else None
        token_widths = {}
        for teacher, spec in teacher_specs(config).items():
            model = create_architecture(spec)
            token_widths[teacher] = LOADERS[spec.loader].forward(model, torch.empty(1, 3, spec.input_px, spec.input_px)).tokens.shape[-1]
        heads = NestedHeads(token_widths, student.nested_dims, settings.head_hidden, settings.tied_heads, settings.head)
    z, tokens = student.forward_tokens(meta_tiles(config), masked_cells)
    cells = pool_grid(tokens, k)
    assert z.shape == (2, student.width) and cells.shape == (2, k * k, student.width)
    assert {key: p.shape for key, p in heads(cells).items()} == {
        (t, m): (2, k * k, width) for t, width in token_widths.items() for m in student.nested_dims
    }


def test_the_header_names_every_checkpoint_to_download(recipe):
    """A user caches exactly what the header lists before running offline."""
    name, config = recipe
    repos = {parse_source(spec.source).repo for spec in teacher_specs(config).values()} | {parse_source(config.distill.init).repo}
    header = "\n".join(re.findall(r"^#.*$", (CONFIGS / name).read_text(), re.M))
    assert all(repo in header for repo in repos), f"{name}: the header must name {sorted(repos)}"
