"""APT's LightningModule: the saved Stage-1 ViT wrapped in :class:`~train.models.apt.APTViT` (content-adaptive patch
sizes, packed variable-length attention), counting the patch tokens of every evaluated image."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torchmetrics.aggregation import CatMetric

from train.models.apt import APTViT, PatchSelector, TokenPlan
from train.models.saving import load_classifier
from train.tiers.classifier import ClassifierModule

TRAIN_MODES = ("all", "new")


class APTModule(ClassifierModule):
    """Stage-1 (a saved classifier at ``stage1``) wrapped by APT; counts the patch tokens of every evaluated image.

    ``train="new"`` trains only the multi-scale embedding's new layers; ``"all"`` everything.
    """

    def __init__(self, stage1: str, thresholds: Sequence[float], optimizer: Callable | None = None,
                 scheduler: Callable | None = None, attention: str = "auto", train: str = "all",
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None, mixup: dict | None = None,
                 layer_decay: float | None = None, grad_checkpointing: bool = False, compile: bool = False,
                 val_levels: Sequence[int] = (0,), test_levels: Sequence[int] = (0, 1, 2, 3), bootstrap: int = 1000):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_weights"])
        if train not in TRAIN_MODES:
            raise ValueError(f"apt.module.train={train!r}; allowed: {list(TRAIN_MODES)}")
        vit, config = load_classifier(stage1)
        self.input_spec = config["input"]
        self.net = APTViT(vit.train(), thresholds, self.input_spec["mean"], self.input_spec["std"], attention)
        if grad_checkpointing:
            self.net.set_grad_checkpointing(True)
        if compile:
            self.net.compile_parts()
        if train == "new":
            self.net.requires_grad_(False)
            self.net.embed.requires_grad_(True)
        self.setup_classifier(optimizer, scheduler, label_smoothing, class_weights, mixup, layer_decay,
                              val_levels, test_levels, bootstrap)
        self.tokens = nn.ModuleDict({split: nn.ModuleList([CatMetric() for _ in self.levels[split]])
                                     for split in ("val", "test")})
        self.token_counts: dict[str, dict[int, torch.Tensor]] = {"val": {}, "test": {}}
        self._counts: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, plan: TokenPlan | None = None) -> torch.Tensor:
        if plan is None or self.net.base_only_active:
            plan = self.net.plan(images)
        self._counts = plan.patch_tokens
        return self.net(images, plan=plan)

    def logits(self, batch: dict) -> torch.Tensor:
        """The logits of ``batch``, with the packing plan the loader workers made (``apt_plan``) when it has one."""
        return self(batch["image"], batch.get("apt_plan"))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The loader workers' selection (:meth:`APTViT.selector`) -> the batch's packing plan, on the host."""
        keep = batch.pop(PatchSelector.field, None)
        if keep is not None:
            batch["apt_plan"] = self.net.plan(keep=keep)
        return batch

    def _eval_step(self, split: str, batch: dict, dataloader_idx: int) -> torch.Tensor:
        logits = super()._eval_step(split, batch, dataloader_idx)
        self.tokens[split][dataloader_idx].update(self._counts.float())
        return logits

    def _log_levels(self, split: str) -> None:
        super()._log_levels(split)
        per_level = {}
        for level, store in zip(self.levels[split], self.tokens[split]):
            per_level[level] = store.compute().cpu()
            store.reset()
            self.log(f"{split}/L{level}/tokens", per_level[level].mean())
        self.log(f"{split}/tokens", torch.cat(list(per_level.values())).mean())
        self.token_counts[split] = per_level
