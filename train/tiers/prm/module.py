"""The process reward model's LightningModule (per-step BCE against Monte Carlo step labels, validated by step
AUROC) and the traces it trains on."""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchmetrics.classification import BinaryAUROC

from train.models.prm import ProcessRewardModel
from train.models.traces import margins, running_belief
from train.optim import with_schedule


class TraceDataset(Dataset):
    """Traces of cached queries as PRM inputs: rows of ``traces`` (N, T) over query ``rows`` (N,), with targets."""

    def __init__(self, views: dict, rows: torch.Tensor, traces: torch.Tensor, target: torch.Tensor,
                 hard: torch.Tensor, rule: str):
        self.margin, self.embeddings = margins(views["logits"]), views["embeddings"]
        self.rows, self.traces, self.target, self.hard, self.rule = rows, traces, target, hard, rule

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch in one gather (the DataLoader calls this with ``collate_fn=batched``)."""
        i = torch.as_tensor(indices)
        q, slots = self.rows[i].unsqueeze(1), self.traces[i]
        m = self.margin[q, slots]
        return {"embeddings": self.embeddings[q, slots].float(), "margins": m, "beliefs": running_belief(m, self.rule),
                "slots": slots, "target": self.target[i], "hard": self.hard[i]}


def batched(batch: dict) -> dict:
    """The collate function of :class:`TraceDataset` loaders: its ``__getitems__`` already made the batch."""
    return batch


class PRMModule(pl.LightningModule):
    """Per-step binary cross-entropy of the PRM against Monte Carlo step labels; validation by step AUROC."""

    def __init__(self, prm: dict, optimizer: Callable, scheduler: Callable | None = None, embed_dim: int = 0,
                 n_slots: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = ProcessRewardModel(embed_dim, n_slots, **prm)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.val_auroc = BinaryAUROC()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["embeddings"], batch["margins"], batch["beliefs"], batch["slots"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch["target"])
        self.log("train/loss", loss, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_auroc.update(self(batch).sigmoid().flatten(), batch["hard"].flatten().long())

    def on_validation_epoch_end(self) -> None:
        self.log("val/step_auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()

    def configure_optimizers(self):
        return with_schedule(self, self.optimizer(self.parameters()), self.scheduler)
