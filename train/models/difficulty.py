"""The difficulty router: from a downscaled image (and the draft's logits) the probability that each cheap
tier answers a sample wrongly.

Its score decides routing: a sample whose P(draft wrong) is high skips the draft and goes straight to
the deeper tiers. The network is tiny on purpose: it runs on every image, before any classifier but the
draft.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.saving import load_net, save_net

TARGETS = ("draft", "stage1")  # the tiers whose mistakes the router predicts, in output order
DRAFT_INPUTS = ("logits", "none")


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DifficultyRouter(nn.Module):
    """``(images, draft_logits) -> (B, len(targets))`` logits of P(tier wrong).

    ``images`` are the classifiers' normalised inputs at any size; they are average-pooled to ``in_size``.
    ``draft_input="logits"`` adds the draft's margin and its magnitude (its confidence) as features.
    """

    def __init__(self, in_size: int = 32, width: int = 16, hidden: int = 32, draft_input: str = "logits",
                 targets: Sequence[str] = TARGETS):
        super().__init__()
        if draft_input not in DRAFT_INPUTS:
            raise ValueError(f"difficulty draft_input={draft_input!r}; allowed: {list(DRAFT_INPUTS)}")
        self.in_size, self.draft_input, self.targets = in_size, draft_input, list(targets)
        self.router_args = {"in_size": in_size, "width": width, "hidden": hidden, "draft_input": draft_input,
                            "targets": self.targets}
        self.features = nn.Sequential(_conv(3, width, 1), _conv(width, 2 * width, 2), _conv(2 * width, 4 * width, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        extra = 2 if draft_input == "logits" else 0
        self.head = nn.Sequential(nn.Linear(4 * width + extra, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, len(self.targets)))

    @property
    def output(self) -> nn.Linear:
        """The last layer (a fitted temperature per output is folded into it)."""
        return self.head[-1]

    def downscale(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` average-pooled to ``in_size`` (unchanged when already that size)."""
        return images if images.shape[-1] == self.in_size else F.adaptive_avg_pool2d(images, self.in_size)

    def forward(self, images: torch.Tensor, draft_logits: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(self.downscale(images))
        if self.draft_input == "logits":
            if draft_logits is None:
                raise ValueError("this router reads the draft's logits (draft_input=logits); pass draft_logits")
            margin = (draft_logits[:, 1] - draft_logits[:, 0]).unsqueeze(1).float()
            x = torch.cat([x, margin, margin.abs()], dim=1)
        return self.head(x)

    @torch.no_grad()
    def fold_temperatures(self, temperatures: Sequence[float]) -> None:
        """Divide each output's logit by its temperature, in the weights."""
        t = torch.tensor(list(temperatures), dtype=self.output.weight.dtype).unsqueeze(1)
        self.output.weight.div_(t)
        self.output.bias.div_(t.squeeze(1))


def save_router(router: DifficultyRouter, path: Path, input_spec: dict, **extra) -> tuple[Path, Path]:
    """``path.safetensors`` + ``path.json`` (architecture, input spec and ``extra``, e.g. its calibration)."""
    return save_net(router, path, "roadwork-router", {"router": router.router_args, "input": input_spec, **extra})


def load_router(path: str | Path) -> tuple[DifficultyRouter, dict]:
    """Inverse of :func:`save_router`: (router in eval mode, its config)."""
    return load_net(path, lambda config: DifficultyRouter(**config["router"]))
