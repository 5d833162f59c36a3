"""FLOP counting in one place: PyTorch's counter (``torch.utils.flop_counter``) on a model's PyTorch twin.

Used by the draft's report, the export manifest (``ModelEntry.flops``) and the Stage-1 benchmark's MFU (a training
step: forward + backward). The counter counts matmuls and convolutions (2 FLOPs per multiply-add) and nothing
elementwise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from train.models.draft import forced_budget


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# PyTorch counts SDPA's CUDA kernels but not the CPU one: without this, a ViT's attention would count as 0 on CPU
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn: Callable, *inputs, backward: bool = False) -> float:
    """Total FLOPs of ``fn(*inputs)`` (a module or a module's method), without gradients; ``backward=True`` adds
    the backward pass of the (summed) output: what a training step computes, the optimizer's update aside."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    if backward:
        with counter:
            out = fn(*inputs)
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        return float(counter.get_total_flops())
    with _frozen(fn), counter, torch.no_grad():
        fn(*inputs)
    return float(counter.get_total_flops())


@contextmanager
def _frozen(fn: Callable):
    """``fn``'s module with parameters not requiring grad: under no_grad a view of a parameter (a fusion head's
    latents) still requires grad, and the counter's module tracker fails on it as a submodule's input."""
    module = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    params = [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def model_flops(model: nn.Module, img_size: int, images: torch.Tensor | None = None) -> float:
    """Forward FLOPs per image of ``model`` in eval mode, on ``images`` or one random image."""
    images = torch.randn(1, 3, img_size, img_size) if images is None else images
    return count_flops(model.eval(), images) / len(images)


def each_image(fn: Callable, images: torch.Tensor, *per_image: Sequence) -> list[float]:
    """FLOPs of ``fn(images[i:i+1], *(x[i] for x in per_image))`` for every image: a batch-1 graph's calls."""
    return [count_flops(fn, images[i:i + 1], *(x[i] for x in per_image)) for i in range(len(images))]


def budget_flops(elastic: nn.Module, fn: Callable, *inputs) -> list[float]:
    """FLOPs of ``fn(*inputs)`` with each of the elastic ViT's token budgets forced in turn."""
    out = []
    for i in range(len(elastic.budgets)):
        with forced_budget(elastic, i):
            out.append(count_flops(fn, *inputs))
    return out
