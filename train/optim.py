"""Learning-rate schedules built by step count (the trainer supplies ``total_steps``)."""
from __future__ import annotations

import math

import torch


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
