"""``task=stage1``: the binary roadwork classifier."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from train.metrics import per_level_metrics
from train.models import create_backbone
from train.runs import Run
from train.tasks import register_task
from train.tasks.lightning import build_datamodule, build_trainer, resolve_ckpt_path
from train.utils.console import print_metrics

log = logging.getLogger(__name__)


class Stage1Module(pl.LightningModule):
    """Backbone + cross-entropy; validation and test metrics per validator level.

    ``img_size``, ``mean`` and ``std`` are the input spec, saved with the checkpoint.
    """

    def __init__(self, backbone: dict, optimizer: Callable, scheduler: Callable | None = None,
                 img_size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, val_levels: Sequence[int] = (0,),
                 test_levels: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_weights"])
        self.net = create_backbone(**backbone)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.levels = {"val": list(val_levels), "test": list(test_levels)}
        self.eval_metrics = nn.ModuleDict({"val": per_level_metrics(val_levels),
                                           "test": per_level_metrics(test_levels)})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.criterion(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, split: str, batch: dict, dataloader_idx: int) -> None:
        logits = self(batch["image"])
        level = self.levels[split][dataloader_idx]
        self.log(f"{split}/L{level}/loss", self.criterion(logits, batch["label"]), add_dataloader_idx=False,
                 batch_size=len(batch["label"]))
        self.eval_metrics[split][dataloader_idx].update(logits.softmax(-1)[:, 1], batch["label"])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_levels(self, split: str) -> None:
        """Log ``<split>/L<level>/<metric>`` for each level and ``<split>/<metric>`` as their mean."""
        per_level = {}
        for level, metrics in zip(self.levels[split], self.eval_metrics[split]):
            per_level[level] = {k: v.float() for k, v in metrics.compute().items()}
            metrics.reset()
        out = {f"{split}/L{lv}/{k}": v for lv, m in per_level.items() for k, v in m.items()}
        for k in next(iter(per_level.values())):
            out[f"{split}/{k}"] = torch.stack([m[k] for m in per_level.values()]).mean()
        self.log_dict(out, prog_bar=False)

    def on_validation_epoch_end(self) -> None:
        self._log_levels("val")

    def on_test_epoch_end(self) -> None:
        self._log_levels("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@register_task("stage1")
def run_stage1(cfg: DictConfig, run: Run) -> dict:
    task_dir = run.task_dir("stage1")
    datamodule = build_datamodule(cfg, run)
    model = instantiate(cfg.model, class_weights=datamodule.class_weights)
    trainer = build_trainer(cfg, task_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), task_dir))
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    print_metrics({k: v for k, v in metrics.items() if not k.endswith("/loss")}, "stage1 test metrics per validator level")
    artifacts = {"best": best} if best else {}
    if checkpoint and checkpoint.last_model_path:
        artifacts["last"] = checkpoint.last_model_path
    run.record("stage1", artifacts=artifacts, metrics=metrics)
    return metrics
