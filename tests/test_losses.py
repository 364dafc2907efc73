"""The nested distillation loss: its value, its weights, its gradients, and that a student learns with it."""

from __future__ import annotations

import pytest
import torch

from distill.koleo import koleo, nested_koleo
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


def test_total_is_the_teacher_and_dim_weighted_mean_of_the_parts():
    heads = NestedHeads(WIDTHS, DIMS, hidden=8)
    z = torch.randn(6, 192)
    targets = {teacher: torch.randn(6, width) for teacher, width in WIDTHS.items()}
    teacher_weights, dim_weights = {"uni": 2.0, "virchow": 0.5}, {16: 3.0}
    total, parts = nested_distill_loss(z, heads, targets, teacher_weights, dim_weights)
    weights = {(t, m): teacher_weights[t] * dim_weights.get(m, 1.0) for t, m in parts}
    expected = sum(weights[key] * part["loss"] for key, part in parts.items()) / sum(weights.values())
    assert total.item() == pytest.approx(expected.item())
    unweighted, _ = nested_distill_loss(z, heads, targets)
    assert unweighted.item() == pytest.approx(torch.stack([part["loss"] for part in parts.values()]).mean().item())
    with pytest.raises(ValueError, match="leave nothing to train"):
        nested_distill_loss(z, heads, targets, {"uni": 0.0, "virchow": 0.0})


def test_the_loss_by_hand_on_two_teachers_with_weights():
    """Linear heads set by hand, one nested dim of 2, two rows: every term is computed here from its definition."""
    heads = NestedHeads({"a": 2, "b": 2}, [2], kind="linear")
    with torch.no_grad():
        for teacher in ("a", "b"):
            heads.head(teacher, 2).weight.copy_(torch.eye(2))
            heads.head(teacher, 2).bias.zero_()
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # predictions are z itself
    targets = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[0.0, 1.0], [0.0, 2.5]])}
    # a: perfect, loss 0. b: row 0 is orthogonal (cos 0), row 1 parallel (cos 1): mean cos 0.5;
    # smooth-L1 elementwise |d| = 1, 1, 0, 0.5 -> 0.5, 0.5, 0, 0.125: mean 0.28125.
    loss_b = 0.9 * (1 - 0.5) + 0.1 * 0.28125
    total, parts = nested_distill_loss(z, heads, targets, teacher_weights={"a": 3.0, "b": 1.0})
    assert parts["b", 2]["loss"].item() == pytest.approx(loss_b) and parts["a", 2]["loss"].item() == pytest.approx(0)
    assert total.item() == pytest.approx((3.0 * 0 + 1.0 * loss_b) / 4.0)


def test_koleo_by_hand():
    """Four unit vectors at 0, 90, 100 and 180 degrees (their scale does not count): the nearest neighbours'
    chord lengths are 2 sin(45), 2 sin(5), 2 sin(5) and 2 sin(40) degrees."""
    angles = torch.tensor([0.0, 90.0, 100.0, 180.0]).deg2rad()
    vectors = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    chords = 2 * torch.tensor([45.0, 5.0, 5.0, 40.0]).deg2rad().sin()
    assert koleo(vectors).item() == pytest.approx(-chords.log().mean().item(), rel=1e-5)
    z = torch.cat([vectors, torch.zeros(4, 2)], dim=1)  # the prefix of 2 and the whole of 4 hold the same vectors
    assert nested_koleo(z, [2, 4]).item() == pytest.approx(koleo(vectors).item(), rel=1e-6)
    spread, clustered = koleo(torch.eye(4)), koleo(torch.eye(4) + 5)
    assert spread < clustered  # closer neighbours, larger KoLeo: minimising it spreads the batch
    with pytest.raises(ValueError, match="at least 2"):
        koleo(torch.ones(1, 3))


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
