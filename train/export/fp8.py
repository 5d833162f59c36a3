"""FP8 (e4m3) variant of a tier's PyTorch twin: every ``nn.Linear`` with float8 weights, evaluated in PyTorch.

Weights are stored as ``torch.float8_e4m3fn`` with one scale per output row; activations are cast to e4m3 per call
with one scale per row (token). On a GPU with float8 tensor cores (compute capability 8.9+: L4, H100) the product
runs in ``torch._scaled_mm`` (bf16 out); elsewhere, and for layers whose sizes it does not take (not multiples of
16, e.g. the 2-way head), it is simulated: the same e4m3 values dequantised and multiplied in fp32. The patch
embedding (a convolution) stays in the model's precision. Not part of the bundle: the bundle's ONNX Runtime has no
float8 kernels on the CPU (``python -m train.bench fp8`` measures it; docs/guides/cascade.md).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 of a 2-D tensor: ``(x / scale).to(fp8)`` and its float32 ``scale`` (rows x 1)."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def native_fp8(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device`` (CUDA, compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Module):
    """``nn.Linear`` with e4m3 weights (per output row scales) and e4m3 activations (per row scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = to_fp8(linear.weight)
        self.register_buffer("weight", weight)                 # (out, in) e4m3
        self.register_buffer("weight_scale", scale)            # (out, 1) float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.native_calls = 0                                  # calls that ran in torch._scaled_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq, x_scale = to_fp8(rows)
        out_features, in_features = self.weight.shape
        if native_fp8(x.device) and in_features % 16 == 0 and out_features % 16 == 0:
            pad = -len(rows) % 16                              # _scaled_mm takes row counts in multiples of 16
            xq, x_scale = nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8), \
                nn.functional.pad(x_scale, (0, 0, 0, pad), value=1.0)
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                   out_dtype=torch.bfloat16)[:len(rows)].float()
            self.native_calls += 1
        else:  # the same e4m3 values, dequantised, multiplied in fp32
            out = (xq.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def to_float8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by :class:`Float8Linear`."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Float8Linear(child))
    return model
