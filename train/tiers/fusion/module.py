"""The fusion head's LightningModule (cross-entropy on the fused logits, ModDrop on) and the feature rows it trains
on."""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.metrics import roadwork_prob
from train.models.fusion import FusionNet, modality_dropout
from train.optim import with_schedule


class FusionModule(pl.LightningModule):
    """Cross-entropy on the fused logits (+ ``aux_weight`` x the per-modality heads' own losses), ModDrop on.

    ``class_weights`` (inverse class frequencies of the training rows) balance the loss, as Stage-1's balanced
    sampling does: on 4:1 data the head cannot score by leaning to the majority class."""

    def __init__(self, dims: dict[str, int], net: dict, optimizer: Callable, scheduler: Callable | None = None,
                 moddrop: float = 0.3, aux_weight: float = 0.3, class_weights: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = FusionNet(dims, **net)
        self.register_buffer("class_weights", torch.tensor(class_weights or [1.0, 1.0]), persistent=False)
        self.optimizer, self.scheduler, self.moddrop, self.aux_weight = optimizer, scheduler, moddrop, aux_weight
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, features: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.net(features, present)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        present = modality_dropout(batch["present"], self.moddrop)
        out = self.net.forward_all(batch["features"], present)
        loss = F.cross_entropy(out["logits"], batch["label"], weight=self.class_weights)
        if "unimodal" in out and self.aux_weight:
            per = F.cross_entropy(out["unimodal"].flatten(0, 1), batch["label"].repeat_interleave(present.shape[1]),
                                  weight=self.class_weights, reduction="none")
            loss = loss + self.aux_weight * (per * present.flatten().float()).sum() / present.sum().clamp(min=1)
        self.log("train/loss", loss, batch_size=len(present))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_outputs.append((self(batch["features"], batch["present"]).float(), batch["label"]))

    def on_validation_epoch_end(self) -> None:
        logits, label = (torch.cat(x) for x in zip(*self.val_outputs))
        self.val_outputs.clear()
        self.log("val/loss", F.cross_entropy(logits, label, weight=self.class_weights), prog_bar=True)
        self.log("val/mcc", binary_matthews_corrcoef(roadwork_prob(logits), label).float())

    def configure_optimizers(self):
        return with_schedule(self, self.optimizer(self.parameters()), self.scheduler)


def rows_of(data: dict, rows: torch.Tensor) -> dict:
    """The ``rows`` of a split's tensors (features per modality, presence, label)."""
    return {"features": [f[rows] for f in data["features"]], **{k: data[k][rows] for k in ("present", "label")}}


def collate(items: list[dict]) -> dict:
    """A batch of :class:`RowDataset` items: the features stacked per modality, presence and labels stacked."""
    return {"features": [torch.stack(x) for x in zip(*(i["features"] for i in items))],
            "present": torch.stack([i["present"] for i in items]), "label": torch.stack([i["label"] for i in items])}


class RowDataset(Dataset):
    """Rows of a split's tensors (features per modality, presence, label)."""

    def __init__(self, data: dict):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, i: int) -> dict:
        return {"features": [f[i] for f in self.data["features"]], "present": self.data["present"][i],
                "label": self.data["label"][i]}
