"""``task=stage1``: the binary roadwork classifier (timm or transformers backbone, full / probe / PEFT)."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import WeightAveraging
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.aggregation import CatMetric

from train.metrics import bootstrap_interval, per_level_metrics, roadwork_prob
from train.models import apply_finetune, count_parameters, create_backbone, merge_finetune
from train.models.saving import save_classifier
from train.optim import build_optimizer
from train.predictions import unique_rows, write_predictions
from train.runs import Run
from train.tasks import register_task
from train.tasks.lightning import build_datamodule, build_trainer, checkpoint_paths, resolve_ckpt_path
from train.utils.console import print_level_table
from train.utils.rng import capture_rng, restore_rng

log = logging.getLogger(__name__)


class Stage1Module(pl.LightningModule):
    """Backbone + cross-entropy; validation and test metrics per validator level.

    ``img_size``, ``mean`` and ``std`` are the input spec, saved with the checkpoint.
    ``finetune`` picks full / linear_probe / lora / dora / rslora (:func:`apply_finetune`).
    ``mixup`` is timm's :class:`~timm.data.Mixup` kwargs (mixup_alpha, cutmix_alpha, prob, ...).
    """

    def __init__(self, backbone: dict, optimizer: Callable, scheduler: Callable | None = None,
                 finetune: dict | None = None, img_size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, mixup: dict | None = None,
                 layer_decay: float | None = None, channels_last: bool = False, compile: bool = False,
                 grad_checkpointing: bool = False, val_levels: Sequence[int] = (0,),
                 test_levels: Sequence[int] = (0, 1, 2, 3), bootstrap: int = 1000):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_weights"])
        net = create_backbone(**backbone)
        if grad_checkpointing:
            net.set_grad_checkpointing(True)
        finetune = finetune or {"mode": "full"}
        self.finetune_mode = finetune.get("mode", "full")
        self.net = apply_finetune(net, **finetune)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: parameter names (and checkpoints) stay as they are
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.layer_decay, self.channels_last = layer_decay, channels_last
        self.criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=2) if mixup else None
        self.soft_criterion = SoftTargetCrossEntropy()
        self.levels = {"val": list(val_levels), "test": list(test_levels)}
        self.eval_metrics = nn.ModuleDict({"val": per_level_metrics(val_levels),
                                           "test": per_level_metrics(test_levels)})
        # per test level: logits, labels and split positions of every sample (gathered across devices)
        self.test_outputs = nn.ModuleList([nn.ModuleList([CatMetric(), CatMetric(), CatMetric()]) for _ in test_levels])
        self.test_predictions: dict[int, dict[str, torch.Tensor]] = {}
        self.bootstrap = bootstrap
        trainable, total = count_parameters(self.net)
        log.info("stage1 %s (%s): %s of %s parameters trainable (%.2f%%)", backbone["name"],
                 self.finetune_mode, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(labels) % 2 == 0:  # timm's Mixup pairs samples: even batches only
            images, soft = self.mixup(images, labels)
            loss = self.soft_criterion(self(images), soft)
        else:
            loss = self.criterion(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _eval_step(self, split: str, batch: dict, dataloader_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        level = self.levels[split][dataloader_idx]
        self.log(f"{split}/L{level}/loss", self.criterion(logits, batch["label"]), add_dataloader_idx=False,
                 batch_size=len(batch["label"]))
        self.eval_metrics[split][dataloader_idx].update(roadwork_prob(logits.float()), batch["label"])
        return logits

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self._eval_step("test", batch, dataloader_idx)
        for store, value in zip(self.test_outputs[dataloader_idx], (logits.float(), batch["label"], batch["index"])):
            store.update(value)

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
        self.test_predictions = {}
        for level, stores in zip(self.levels["test"], self.test_outputs):
            logits, labels, index = (s.compute() for s in stores)
            rows = unique_rows(index.long())
            self.test_predictions[level] = {"logits": logits[rows], "label": labels[rows].long(),
                                            "index": index[rows].long()}
            for s in stores:
                s.reset()
            if self.bootstrap:  # 95% interval of MCC per level, by resampling the test samples
                low, high = bootstrap_interval(roadwork_prob(logits), labels, self.bootstrap)
                self.log_dict({f"test/L{level}/mcc_low": low, f"test/L{level}/mcc_high": high})

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.net, self.layer_decay)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = capture_rng()  # dropout, drop path and mixup draws continue exactly on resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng" in checkpoint and self._trainer is not None and self._trainer.state.fn == "fit":
            restore_rng(checkpoint["rng"])

    def plain_model(self) -> nn.Module:
        """The backbone with any LoRA/DoRA merged in: what later tasks and export load."""
        return merge_finetune(self.net)

    @property
    def input_spec(self) -> dict:
        return {"img_size": self.hparams.img_size, "mean": list(self.hparams.mean), "std": list(self.hparams.std),
                "interpolation": "area", "channel_order": "RGB", "layout": "NCHW"}


@register_task("stage1")
def run_stage1(cfg: DictConfig, run: Run) -> dict:
    task_dir = run.task_dir("stage1")
    datamodule = build_datamodule(cfg, run)
    model = instantiate(cfg.model, class_weights=datamodule.class_weights)
    trainer = build_trainer(cfg, task_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), task_dir))
    best, last = checkpoint_paths(trainer)  # read now: test() reloads the callbacks' state from `best`
    # A checkpoint's state_dict holds the EMA weights when EMA is on; without the callback, test loads exactly those
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    with warnings.catch_warnings():  # ... and Lightning's reminder to keep the callback does not apply
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided")
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    print_level_table(metrics, "stage1 test metrics per validator level (MCC with bootstrap 95% interval)")
    weights, config = save_classifier(model.plain_model(), task_dir / "stage1", model.input_spec,
                                      finetune=model.finetune_mode,
                                      source_checkpoint=best)
    predictions = write_predictions(task_dir / "test_predictions.parquet", model.test_predictions)
    artifacts = {"model": weights, "model_config": config, "test_predictions": predictions}
    if best:
        artifacts["best"] = best
    if last:
        artifacts["last"] = last
    run.record("stage1", artifacts=artifacts, metrics=metrics)
    return metrics
