"""Figure 5: students against real teacher architectures at inference (random weights, bf16, CPU).

Tiles/s, parameters and bytes per embedding; for the student, bytes per nested width too. Weights
are random: speed and size do not depend on their values, and no real weights can be fetched here.
"""

from __future__ import annotations

import timm
import torch

from bench.common import Row, timed
from pipeline.precision import autocast
from distill.student import default_nested_dims
from pipeline.teachers import LoadedTeacher, create_architecture, get_teacher

FIGURE = "5 inference"
STUDENTS = {"Pathryoshka-S (ViT-S/14 reg4)": "vit_small_patch14_reg4_dinov2", "Pathryoshka-B (ViT-B/14 reg4)": "vit_base_patch14_reg4_dinov2"}


def random_module(build, device: str = "cpu") -> torch.nn.Module:
    """Build on the meta device, then allocate and fill quickly: a 1B-parameter init is slow and pointless here."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    return module


def random_teacher(name: str, device: str = "cpu") -> LoadedTeacher:
    """A registry teacher's real architecture with random weights, frozen, as the features stage runs it."""
    spec = get_teacher(name)
    return LoadedTeacher(random_module(lambda: create_architecture(spec), device).requires_grad_(False), spec, "random", torch.device(device))


def tiles_per_second(module: torch.nn.Module, batch: torch.Tensor, repeat: int) -> float:
    def forward() -> None:
        with torch.inference_mode(), autocast(batch.device.type, "bf16"):  # as the teachers run here
            module.forward_features(batch)
        if batch.is_cuda:
            torch.cuda.synchronize()

    forward()  # warm-up
    return len(batch) / timed(forward, repeat=repeat)


def measure(quick: bool) -> tuple[list[Row], dict[str, float]]:
    """The rows, and each real teacher architecture's tiles/s (figure 4 prices online distillation with them)."""
    batch = torch.randn(2 if quick else 8, 3, 224, 224)
    teachers = ["uni"] if quick else ["uni", "virchow2", "h-optimus-1"]
    repeat = 1 if quick else 2
    rows: list[Row] = []
    teacher_rate = {}
    for name in teachers:
        spec = get_teacher(name)
        module = random_module(lambda: create_architecture(spec))
        teacher_rate[name] = tiles_per_second(module, batch, repeat)
        params = sum(p.numel() for p in module.parameters())
        width = max(spec.widths.values())
        rows.append(Row(FIGURE, f"teacher {name}", teacher_rate[name], "tiles/s", note=f"{params / 1e6:.0f}M params, {width * 2} bytes per fp16 embedding ({width})"))
        del module
    slowest = min(teacher_rate, key=teacher_rate.get)
    for label, arch in STUDENTS.items():
        module = random_module(lambda: timm.create_model(arch, img_size=224, num_classes=0))
        rate = tiles_per_second(module, batch, repeat)
        params = sum(p.numel() for p in module.parameters())
        widths = default_nested_dims(module.num_features)
        rows.append(Row(
            FIGURE, f"student {label}", rate, "tiles/s", f"teacher {slowest}", rate / teacher_rate[slowest],
            note=f"{params / 1e6:.0f}M params; fp16 bytes per embedding at width " + ", ".join(f"{m}: {2 * m}" for m in widths),
        ))
    return rows, teacher_rate
