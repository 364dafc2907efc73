"""The nested distillation loss: its value, its weights, its gradients, and that a student learns with it."""

from __future__ import annotations

import pytest
import torch

from distill.losses import nested_distill_loss
from distill.student import NestedHeads, Student

WIDTHS = {"uni": 24, "virchow": 40}
DIMS = [16, 64, 192]


def constant_heads(outputs: dict[str, torch.Tensor]) -> NestedHeads:
    """Heads that predict outputs[teacher] whatever z is (zero weights, the output as last bias)."""
    heads = NestedHeads(WIDTHS, DIMS, hidden=8)
    with torch.no_grad():
        for (teacher, m) in heads(torch.zeros(1, 192)):
            head = heads.head(teacher, m)
            head.fc2.weight.zero_()
            head.fc2.bias.copy_(outputs[teacher])
    return heads


@pytest.fixture
def rows() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {teacher: torch.randn(width, generator=generator) for teacher, width in WIDTHS.items()}


def test_loss_is_zero_for_perfect_predictions_and_positive_otherwise(rows):
    z = torch.randn(6, 192)
    perfect = {teacher: row.expand(6, -1) for teacher, row in rows.items()}
    total, parts = nested_distill_loss(z, constant_heads(rows), perfect)
    assert total.item() == pytest.approx(0, abs=1e-6)
    assert set(parts) == {(teacher, m) for teacher in WIDTHS for m in DIMS}
    for part in parts.values():
        assert set(part) == {"cos", "smooth_l1", "loss"} and not any(v.requires_grad for v in part.values())
        assert part["cos"].item() == pytest.approx(1) and part["smooth_l1"].item() == pytest.approx(0)
    wrong = {teacher: -target for teacher, target in perfect.items()}
    total, parts = nested_distill_loss(z, constant_heads(rows), wrong)
    assert total > 1 and all(part["loss"] > 0 for part in parts.values())


def test_cosine_ignores_scale_and_smooth_l1_does_not(rows):
    z = torch.randn(6, 192)
    half = {teacher: row.expand(6, -1) / 2 for teacher, row in rows.items()}
    cosine_only, _ = nested_distill_loss(z, constant_heads(rows), half, alpha=1, beta=0)
    smooth_l1_only, _ = nested_distill_loss(z, constant_heads(rows), half, alpha=0, beta=1)
    assert cosine_only.item() == pytest.approx(0, abs=1e-6) and smooth_l1_only > 0.1


def test_total_is_the_teacher_and_dim_weighted_sum_of_the_parts():
    heads = NestedHeads(WIDTHS, DIMS, hidden=8)
    z = torch.randn(6, 192)
    targets = {teacher: torch.randn(6, width) for teacher, width in WIDTHS.items()}
    teacher_weights, dim_weights = {"uni": 2.0, "virchow": 0.5}, {16: 3.0}
    total, parts = nested_distill_loss(z, heads, targets, teacher_weights, dim_weights)
    expected = sum(teacher_weights[t] * dim_weights.get(m, 1.0) * part["loss"] for (t, m), part in parts.items())
    assert total.item() == pytest.approx(expected.item())
    unweighted, _ = nested_distill_loss(z, heads, targets)
    assert unweighted.item() == pytest.approx(sum(part["loss"] for part in parts.values()).item())


def test_loss_refuses_unknown_teachers_and_dims():
    heads = NestedHeads(WIDTHS, DIMS, hidden=8)
    z = torch.randn(2, 192)
    targets = {teacher: torch.randn(2, width) for teacher, width in WIDTHS.items()}
    with pytest.raises(ValueError, match="targets are for teachers"):
        nested_distill_loss(z, heads, {"uni": targets["uni"]})
    with pytest.raises(ValueError, match=r"dims \[32\]"):
        nested_distill_loss(z, heads, targets, dim_weights={32: 1.0})
    with pytest.raises(ValueError, match=r"teachers \['gigapath'\]"):
        nested_distill_loss(z, heads, targets, teacher_weights={"gigapath": 1.0})


@pytest.mark.parametrize("tied", [False, True])
def test_each_nested_dim_trains_the_backbone_through_its_prefix_only(tied):
    student = Student("vit_tiny_patch16_224", dict(img_size=32, depth=2), nested_dims=DIMS)
    heads = NestedHeads(WIDTHS, DIMS, hidden=8, tied=tied)
    images = torch.randn(3, 3, 32, 32)
    targets = {teacher: torch.randn(3, width) for teacher, width in WIDTHS.items()}
    for m in DIMS:
        student.zero_grad()
        z = student(images)
        z.retain_grad()
        total, _ = nested_distill_loss(z, heads, targets, dim_weights={k: float(k == m) for k in DIMS})
        total.backward()
        assert z.grad[:, :m].abs().sum() > 0 and not z.grad[:, m:].any()
        assert student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_tiny_student_overfits_a_fixed_batch():
    torch.manual_seed(0)
    student = Student("vit_tiny_patch16_224", dict(img_size=32, depth=2))
    heads = NestedHeads(WIDTHS, student.nested_dims, hidden=64)
    images = torch.randn(8, 3, 32, 32)
    targets = {teacher: torch.randn(8, width) for teacher, width in WIDTHS.items()}
    optimizer = torch.optim.AdamW([*student.parameters(), *heads.parameters()], lr=1e-3)
    losses = []
    for _ in range(60):
        total, _ = nested_distill_loss(student(images), heads, targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < losses[0] / 20
