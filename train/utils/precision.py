"""Precision as a config choice: ``bf16``, ``fp32``, or ``auto`` (bf16 where the hardware computes it natively: CUDA
with bf16, CPUs with AVX512-BF16 / AMX). A run records the precision that ran (:func:`resolve_precision`)."""
from __future__ import annotations

import contextlib
from functools import cache

import torch

PRECISIONS = ("auto", "bf16", "fp32")


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


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision that runs on ``device`` for the configured one: ``auto`` becomes ``bf16`` where native, else
    ``fp32``; ``bf16`` and ``fp32`` stay as given (``bf16`` is emulated where not native: same numbers, slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(torch.device(device).type) else "fp32"
    return precision


def precision_autocast(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` resolves to ``bf16`` there; a no-op for ``fp32``."""
    device_type = torch.device(device).type
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
