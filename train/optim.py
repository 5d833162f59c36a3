"""Optimiser parameter groups (weight decay, layer-wise LR decay) and step-based LR schedules."""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | float = 0.05,
                  min_lr_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio`` x the base LR.

    ``warmup_steps`` below 1 is a fraction of ``total_steps``.
    """
    total = max(int(total_steps), 1)
    warmup = int(warmup_steps * total) if warmup_steps < 1 else int(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], model: nn.Module,
                    layer_decay: float | None = None, fuse: bool = True) -> torch.optim.Optimizer:
    """``factory(groups)`` over the trainable parameters, grouped the timm way.

    Biases, norms and ``model.no_weight_decay()`` names get no weight decay. ``layer_decay``
    (e.g. 0.75) scales each block's LR by ``layer_decay ** depth_from_the_head`` (timm's
    ``param_groups_layer_decay``; needs a timm model with ``group_matcher``). Torch optimizers with a ``fused``
    option get ``fused=True`` on CUDA unless the config sets it or ``fuse`` is false (:func:`fused_default`).
    """
    weight_decay = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    elif hasattr(model, "group_matcher"):
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    else:
        raise ValueError("model.layer_decay needs a timm backbone fine-tuned in full or linear_probe mode "
                         f"(no group_matcher on {type(model).__name__})")
    # positional: torch's `params`, DeepSpeed's CPU Adam's `model_params`
    optimizer = factory(groups, **(fused_default(factory, model) if fuse else {}))
    for group in optimizer.param_groups:  # torch optimizers ignore lr_scale: fold it into the LR once
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


def fused_default(factory: Callable[..., torch.optim.Optimizer], model: nn.Module) -> dict:
    """``{"fused": True}`` when ``factory`` (a partial of a torch optimizer) has a ``fused`` option the config leaves
    unset (null) and every trainable parameter is on CUDA: one kernel for the whole update instead of a loop."""
    keywords = getattr(factory, "keywords", {})
    cls = getattr(factory, "func", factory)
    try:
        has_option = "fused" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    if not has_option or keywords.get("fused") is not None or keywords.get("foreach"):
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    return {"fused": True} if params and all(p.is_cuda and p.is_floating_point() for p in params) else {}


def with_schedule(module, optimizer: torch.optim.Optimizer, scheduler: Callable | None):
    """What a LightningModule's ``configure_optimizers`` returns: the optimizer alone, or with
    ``scheduler(optimizer, total_steps=<the trainer's estimated steps>)`` stepped every optimisation step."""
    if scheduler is None:
        return optimizer
    total = module.trainer.estimated_stepping_batches
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler(optimizer, total_steps=total), "interval": "step"}}


class FusedOptimizerSteps:
    """LightningModule mixin: fused optimizers (:func:`fused_default`) wherever no gradient scaler runs, and gradient
    clipping that works with them. Lightning refuses clipping with a fused optimizer under any mixed precision for
    fear of a gradient scaler, but bf16 has none; under 16-mixed (the one scaled precision) nothing is fused."""

    def fuses(self) -> bool:
        """Whether :func:`build_optimizer` may fuse: not under 16-mixed, whose scaler unscales before clipping."""
        return self._trainer is None or self.trainer.precision != "16-mixed"

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, also for a fused optimizer (DeepSpeed's optimizer wrappers have no ``defaults``:
        DeepSpeed clips by its own config)."""
        if not gradient_clip_val or not getattr(optimizer, "defaults", {}).get("fused") or not self.fuses():
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
