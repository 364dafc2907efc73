"""Spatial distillation, the student side: the student's patch tokens and grid, masked patches, PHI-S on
grid cells, the spatial and masked loss terms and their weights, and a short run on a real store with
grids (tests/distill_run.py, features.grid = 2) through validation, export and evaluate's fidelity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from distill.data import open_distill_data, validation_batches
from distill.evaluate.fidelity import fidelity
from distill.export import load_heads, load_spatial_heads
from distill.losses import nested_distill_loss, spatial_distill_loss
from distill.spatial import SpatialHeads, draw_masked_cells, grid_sample
from distill.standardize import fit_standardizer
from distill.student import NestedHeads, Student
from distill.train import Distiller, build_student, run_distill, spatial_heads
from distill_run import STUDENT, TEACHERS, config_for, make_run
from pipeline.config import ConfigError, DistillConfig
from pipeline.grids import pool_grid, view_grid
from pipeline.views import DIHEDRAL, apply_view

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=64, depth=2)  # 4 x 4 patches of 16 px, D = 192
SPATIAL = dict(spatial_weight=0.5, mask_ratio=0.25, masked_weight=2.0)
TRAINING = dict(steps=30, batch_size=16, lr=2e-3, warmup_steps=5, eval_every=15, checkpoint_every=15, pool_chunks=4, precision="fp32")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, he_pixels):
    run_dir = tmp_path_factory.mktemp("spatial") / "run"
    make_run(run_dir, he_pixels, views=["identity", "rot90", "flip"], grid=2)
    return run_dir


@pytest.mark.parametrize("arch, kwargs, tokens", [
    (ARCH, dict(TINY, reg_tokens=4), 16),  # prefix: class token and 4 registers
    (ARCH, dict(TINY, dynamic_img_size=True, class_token=False, global_pool="avg"), 16),
    ("resnet10t", {}, 4),  # a CNN's final 2 x 2 feature map
])
def test_forward_tokens_gives_z_exactly_and_the_patch_tokens_alone(arch, kwargs, tokens, images):
    student = Student(arch, kwargs).eval()
    with torch.no_grad():
        z, patch_tokens = student.forward_tokens(images)
        assert torch.equal(z, student(images))
        assert patch_tokens.shape == (3, tokens, student.width)
        if arch == ARCH:
            features = student.backbone.forward_features(images)
            assert torch.equal(patch_tokens, features[:, student.backbone.num_prefix_tokens :])


@pytest.mark.parametrize("k", [2, 3])  # 3 does not divide the 4 x 4 patches: overlapping cells
def test_the_student_grid_of_a_view_is_the_view_of_its_grid(k):
    """A tokenwise-equivariant student (each token a function of its patch's mean colour alone: no
    blocks, no position embedding): pooling its tokens on a view's pixels gives the view's grid."""
    student = Student(ARCH, dict(img_size=64, depth=0, pos_embed="none", class_token=False, global_pool="avg")).eval()
    with torch.no_grad():
        proj = student.backbone.patch_embed.proj
        proj.weight.copy_(proj.weight.mean(dim=(2, 3), keepdim=True).expand_as(proj.weight))  # sees the patch's mean only
        tiles = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
        grid = pool_grid(student.forward_tokens(tiles.permute(0, 3, 1, 2))[1], k)
        for name in DIHEDRAL:
            view = {"name": name}
            seen = apply_view(tiles, view, 64).permute(0, 3, 1, 2).contiguous()
            torch.testing.assert_close(pool_grid(student.forward_tokens(seen)[1], k), view_grid(grid, view), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(view_grid(grid, {"name": "rot90"}), grid)  # the views do move the cells


@pytest.mark.parametrize("kwargs", [TINY, dict(TINY, dynamic_img_size=True)])  # patches [B, T, C], or [B, H, W, C]
def test_masking_replaces_exactly_the_patches_of_the_masked_cells(kwargs, images):
    student = Student(ARCH, kwargs, mask_token=True).eval()
    with torch.no_grad():
        student.mask_token.normal_()
        patches = student.backbone.patch_embed(images)
        masked_cells = torch.zeros(3, 9, dtype=torch.bool)
        masked_cells[0, 0] = masked_cells[1, 4] = True  # k = 3 on 4 x 4 patches: cell i spans [floor(4i/3), ceil(4(i+1)/3))
        masked = student.mask_patches(patches, masked_cells).reshape(3, 4, 4, -1)
        expected = torch.zeros(3, 4, 4, dtype=torch.bool)
        expected[0, 0:2, 0:2] = True  # cell (0, 0)
        expected[1, 1:3, 1:3] = True  # the middle cell (1, 1)
        replaced = (masked == student.mask_token).all(-1)
        assert torch.equal(replaced, expected)
        assert torch.equal(masked[~expected], patches.reshape(3, 4, 4, -1)[~expected])

        z, tokens = student.forward_tokens(images)
        unmasked = student.forward_tokens(images, torch.zeros(3, 9, dtype=torch.bool))
        assert torch.equal(unmasked[0], z) and torch.equal(unmasked[1], tokens)  # the masked path is timm's forward_features
        changed = (student.forward_tokens(images, masked_cells)[1] - tokens).abs().amax(dim=(1, 2))
        assert changed[0] > 0 and changed[1] > 0 and changed[2] == 0  # attention carries the mask to every token of its image


def test_masked_cells_are_drawn_per_sample_in_the_asked_share():
    torch.manual_seed(0)
    cells = draw_masked_cells(64, 4, 0.25, torch.device("cpu"))
    assert cells.shape == (64, 16) and (cells.sum(1) == 4).all()
    assert len({tuple(row.tolist()) for row in cells}) > 50  # not one pattern for every sample
    assert (draw_masked_cells(8, 2, 0.01, torch.device("cpu")).sum(1) == 1).all()  # at least one cell


def test_students_that_cannot_mask_or_pool_their_tokens_are_refused(grid_run):
    with pytest.raises(ConfigError, match="not a timm VisionTransformer.*distill.mask_ratio: 0"):
        build_student(DistillConfig(student="resnet10t", mask_ratio=0.25), 64)
    settings = DistillConfig(student="mobilenetv3_small_050", spatial_weight=1.0)  # tokens 288 wide, z 1024
    data = open_distill_data([grid_run], settings)
    with pytest.raises(ConfigError, match="patch tokens 288 wide but an embedding of D=1024.*distill.spatial_weight: 0"):
        spatial_heads(data, build_student(settings, 64), settings, None)


def test_phi_s_fitted_on_grid_cells_standardizes_every_dim_alike(grid_run):
    data = open_distill_data([grid_run], DistillConfig(**STUDENT, spatial_weight=1.0))
    sample = grid_sample(data, "alpha", 512, seed=0)
    assert sample.shape == (128 * 3 * 4, 40)  # 512 / k^2 rows, each with its 3 views x 4 cells
    standardized = fit_standardizer(sample, "phi-s")(torch.from_numpy(sample)).double()
    assert standardized.mean(0).abs().max() < 1e-4
    variances = standardized.var(0, unbiased=False)
    assert variances.min() > 0.99 and variances.max() < 1.01
    assert fit_standardizer(sample, "zscore")(torch.from_numpy(sample)).var(0).max() > 0.9  # a z-score fits it too, dim by dim


def test_spatial_loss_is_a_weighted_mean_over_teachers_and_dims_of_per_cell_terms():
    torch.manual_seed(0)
    heads = NestedHeads({"uni": 24, "virchow": 40}, [16, 64], hidden=8)
    cells = torch.randn(4, 9, 64)
    predictions = heads(cells)
    perfect = {"uni": predictions["uni", 16].detach(), "virchow": predictions["virchow", 16].detach()}
    total, parts = spatial_distill_loss(cells, heads, perfect, dim_weights={64: 0.0})
    assert total.item() == pytest.approx(0, abs=1e-6) and parts["uni", 64]["loss"] > 0
    grids = {t: torch.randn(4, 9, w) for t, w in heads.teacher_widths.items()}
    weights = dict(teacher_weights={"uni": 3.0}, dim_weights={16: 0.5})
    total, parts = spatial_distill_loss(cells, heads, grids, **weights)
    weight = {(t, m): weights["teacher_weights"].get(t, 1.0) * weights["dim_weights"].get(m, 1.0) for t, m in parts}
    expected = sum(weight[key] * part["loss"] for key, part in parts.items()) / sum(weight.values())
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    cosine = torch.nn.functional.cosine_similarity(predictions["uni", 16], grids["uni"], dim=-1).mean()
    assert parts["uni", 16]["cos"].item() == pytest.approx(cosine.item(), rel=1e-5)

    where = torch.zeros(4, 9, dtype=torch.bool)
    where[:, 2] = True
    only, _ = spatial_distill_loss(cells, heads, grids, where=where)
    elsewhere = {t: torch.where(where[..., None], g, torch.randn_like(g)) for t, g in grids.items()}
    assert spatial_distill_loss(cells, heads, elsewhere, where=where)[0].item() == pytest.approx(only.item(), rel=1e-6)
    assert spatial_distill_loss(cells, heads, elsewhere)[0].item() != pytest.approx(spatial_distill_loss(cells, heads, grids)[0].item())


def test_the_distiller_adds_each_term_times_its_weight(grid_run):
    settings = DistillConfig(**STUDENT, nested_dims=[16, 192], head_hidden=32, **SPATIAL)
    data = open_distill_data([grid_run], settings)
    batch = next(iter(validation_batches(data, 8, 16)))
    rows = len(batch)
    torch.manual_seed(0)
    student = build_student(settings, data.tile_px)
    heads = NestedHeads(data.widths, student.nested_dims, 32)
    standardizers = {t: fit_standardizer(np.random.default_rng(0).normal(size=(64, w)), "zscore") for t, w in data.widths.items()}
    spatial = SpatialHeads(data.grid, NestedHeads(data.grid_widths, student.nested_dims, 32), {
        t: fit_standardizer(grid_sample(data, t, 256, 0), "phi-s") for t in data.grid_widths
    })

    def total(**weights) -> tuple[torch.Tensor, dict]:
        model = Distiller(student, heads, standardizers, settings.model_copy(update=weights), spatial)
        torch.manual_seed(5)  # the masked cells drawn
        with torch.no_grad():
            return model(*model.inputs(batch), model.grid_targets(batch))

    model = Distiller(student, heads, standardizers, settings, spatial)
    images, targets = model.inputs(batch)
    grids = model.grid_targets(batch)
    assert set(grids) == set(TEACHERS) and grids["alpha"].shape == (rows, 4, 40)
    with torch.no_grad():
        z, tokens = student.forward_tokens(images)
        summary, _ = nested_distill_loss(z, heads, targets)
        grid_term, _ = spatial_distill_loss(spatial.cells(tokens), spatial.heads, grids)
        torch.manual_seed(5)
        masked_cells = draw_masked_cells(rows, 2, 0.25, images.device)
        masked_term, _ = spatial_distill_loss(spatial.cells(student.forward_tokens(images, masked_cells)[1]), spatial.heads, grids, where=masked_cells)
    loss, parts, _ = total()
    assert loss.item() == pytest.approx((summary + 0.5 * grid_term + 2.0 * masked_term).item(), rel=1e-5)
    assert total(spatial_weight=0.0)[0].item() == pytest.approx((summary + 2.0 * masked_term).item(), rel=1e-5)
    assert total(mask_ratio=0.0, spatial_weight=1.5)[0].item() == pytest.approx((summary + 1.5 * grid_term).item(), rel=1e-5)
    assert {key[0] for key in parts if len(key) == 3} == {"grid", "masked"}
    assert {key for key in parts if len(key) == 2} == {(t, m) for t in TEACHERS for m in (16, 192)}


@pytest.fixture(scope="module")
def spatial_trained(grid_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    summary = run_distill(config_for(grid_run, **TRAINING, **SPATIAL))
    torch.set_num_threads(threads)
    return grid_run, summary


def test_a_spatial_run_logs_validates_and_exports_its_grid_terms(spatial_trained):
    run_dir, summary = spatial_trained
    student_dir = run_dir / "student"
    records = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert set(train[-1]) == {"kind", "step", "loss", "lr", "samples_per_s", "slides", "loss_by_dim", "grid_loss_by_dim", "masked_loss_by_dim", "grad_norm"}
    assert set(train[-1]["grid_loss_by_dim"]) == set(TEACHERS) and set(train[-1]["masked_loss_by_dim"]["beta"]) == {"16", "64", "192"}
    assert [r["step"] for r in evals] == [0, 15, 30]
    for teacher in TEACHERS:  # the synthetic grids are linear in cell colours: learnt in a few steps
        before, after = evals[0]["grid_val"][teacher]["192"], evals[-1]["grid_val"][teacher]["192"]
        assert after["cos"] > before["cos"] + 0.2 and after["r2"] > before["r2"]
    assert summary["final_grid_val"] == evals[-1]["grid_val"] and summary["final_val"] == evals[-1]["val"]
    assert "Spatial targets" in (student_dir / "report.md").read_text()

    record = json.loads((student_dir / "student.json").read_text())
    assert record["grid"]["k"] == 2 and record["grid"]["teachers"]["alpha"] == {"width": 40, "standardizer": "phi-s"}
    assert record["final_grid_val"] == summary["final_grid_val"]
    head_tensors = safetensors.torch.load_file(student_dir / "heads.safetensors")
    assert "mask_token" in head_tensors and any(key.startswith("grid_heads.") for key in head_tensors)
    assert "mask_token" not in safetensors.torch.load_file(student_dir / "student.safetensors")
    timm.create_model(f"local-dir:{student_dir}", pretrained=True)  # plain timm still loads the backbone
    load_heads(student_dir)
    spatial = load_spatial_heads(student_dir)
    checkpoint = torch.load(student_dir / "checkpoints" / "step-00000030.pt", weights_only=True)
    for teacher in TEACHERS:
        assert torch.equal(spatial.standardizers[teacher].rotation, checkpoint["spatial"]["standardizers"][teacher]["rotation"])

    found = fidelity(None, student_dir, None)
    assert found["grid"]["run"] == summary["final_grid_val"]
    for teacher in TEACHERS:  # re-measured by the same code on the same rows: the run's own figure
        assert found["grid"]["recomputed"][teacher]["192"]["cos"] == pytest.approx(summary["final_grid_val"][teacher]["192"]["cos"], abs=1e-4)


def test_a_spatial_run_resumes_with_new_weights_but_not_with_a_term_switched_off(spatial_trained):
    run_dir, _ = spatial_trained
    with pytest.raises(ConfigError, match=r"trained with a mask token .*restore the setting"):
        run_distill(config_for(run_dir, **TRAINING, **{**SPATIAL, "mask_ratio": 0.0}), resume=True, accept_changes=True)
    with pytest.raises(ConfigError, match=r"distill.spatial_weight: 0.5 -> 1.0"):
        run_distill(config_for(run_dir, **TRAINING, **{**SPATIAL, "spatial_weight": 1.0}), resume=True)
