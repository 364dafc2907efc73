"""The autocast rule: the asked precision on a GPU, bfloat16 only where it is native; on a CPU,
bfloat16 only where it is native. Without a GPU here, the GPU case checks the fallback."""

from __future__ import annotations

import torch

from pipeline.precision import autocast_dtype, cpu_has_native_bf16, cuda_has_native_bf16


def test_cpu_runs_bf16_only_where_native_and_never_fp16():
    native = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype("cpu", "bf16") is native and autocast_dtype("cpu", "fp16") is native
    assert autocast_dtype("cpu", "fp32") is None


def test_gpu_runs_the_asked_precision_and_bf16_only_where_native():
    assert cuda_has_native_bf16() == (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)
    assert autocast_dtype("cuda", "bf16") is (torch.bfloat16 if cuda_has_native_bf16() else None)
    assert autocast_dtype("cuda", "fp16") is torch.float16 and autocast_dtype("cuda", "fp32") is None
