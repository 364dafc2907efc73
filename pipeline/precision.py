"""Which dtype a forward pass autocasts to, given the device and the precision asked for.

On a GPU the asked precision is used, bfloat16 only where the GPU computes it natively (compute
capability 8.0 on: A100, H100, RTX 30xx on); older GPUs (V100, T4) emulate it slowly, so they run
float32 instead (float16 would need loss scaling to train). On a CPU, autocast to bfloat16 pays only
where the CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports): there it runs ViTs
about 4x faster than float32, but elsewhere (e.g. AVX2-only CPUs) bfloat16 is emulated and runs 3-10x
*slower*, so such CPUs run float32. float16 is never used on a CPU (few fast kernels): bfloat16 stands in.
"""

from __future__ import annotations

import functools

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@functools.cache
def cpu_has_native_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cuda_has_native_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)  # False without CUDA


def autocast_dtype(device_type: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (bf16, fp16, fp32) on ``device_type``; None means float32."""
    dtype = DTYPES[precision]
    if device_type == "cpu" and dtype is not None:
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if device_type == "cuda" and dtype is torch.bfloat16 and not cuda_has_native_bf16():
        return None
    return dtype


def autocast(device_type: str, precision: str) -> torch.autocast:
    dtype = autocast_dtype(device_type, precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
