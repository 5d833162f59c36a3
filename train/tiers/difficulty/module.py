"""The router's LightningModule: a per-tier binary cross-entropy on the (hard or soft) wrong-answer targets."""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from train.models.difficulty import DifficultyRouter
from train.optim import with_schedule


class DifficultyModule(pl.LightningModule):
    """Trains the router with a per-tier binary cross-entropy on the (hard or soft) wrong-answer targets."""

    def __init__(self, router: dict, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = DifficultyRouter(**router)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.val_auroc = nn.ModuleList([BinaryAUROC() for _ in self.net.targets])

    def forward(self, images: torch.Tensor, draft_logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images, draft_logits)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch["image"], batch["draft_logits"]), batch["target"])
        self.log("train/loss", loss, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores = self(batch["image"], batch["draft_logits"]).sigmoid()
        for k, metric in enumerate(self.val_auroc):
            metric.update(scores[:, k], batch["wrong"][:, k].long())

    def on_validation_epoch_end(self) -> None:
        values = {t: m.compute() for t, m in zip(self.net.targets, self.val_auroc)}
        for t, value in values.items():
            self.log(f"val/auroc_{t}", value)
        self.log("val/auroc", torch.stack(list(values.values())).mean(), prog_bar=True)
        for m in self.val_auroc:
            m.reset()

    def configure_optimizers(self):
        return with_schedule(self, self.optimizer(self.parameters()), self.scheduler)
