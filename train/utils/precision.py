"""bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else full precision."""
from __future__ import annotations

import contextlib
from functools import cache

import torch


@cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda") multiplies bf16 matrices in hardware. On a CPU without it, bf16 is
    emulated and slower than float32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def bf16_autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` and native there; a no-op otherwise."""
    device_type = torch.device(device).type
    if enabled and native_bf16(device_type):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
