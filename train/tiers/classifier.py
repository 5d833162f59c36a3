"""What every 2-class image classifier tier shares (Stage-1, APT, the draft): its LightningModule steps and its tier.

:class:`ClassifierModule` trains ``self.net`` (``images -> logits``) with cross-entropy (optionally
timm Mixup/CutMix), logs val/test metrics per validator level, records every test sample's logits
(for calibration and paired comparisons) and builds the optimiser the timm way. A subclass builds
``self.net`` and calls :meth:`setup_classifier`. :class:`ClassifierTier` loads a classifier tier's calibrated model
and exports it (ONNX, and the HF folder the NATIX miner loads for ``export.hf_model``).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import WeightAveraging
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchmetrics.aggregation import CatMetric

from train.export import Calibration, ExportError, export_classifier
from train.metrics import bootstrap_interval, by_level, per_level_metrics, roadwork_prob, with_mean
from train.optim import FusedOptimizerSteps, build_optimizer, with_schedule
from train.predictions import unique_rows
from train.runs import Run
from train.tiers.base import Tier
from train.tiers.calibration import load_calibrated
from train.tiers.training import build_datamodule, checkpoint_paths, testable_checkpoint
from train.utils.faults import fault_metrics
from train.utils.rng import CheckpointedRNG

log = logging.getLogger(__name__)


class ClassifierModule(CheckpointedRNG, FusedOptimizerSteps, pl.LightningModule):
    """Cross-entropy training and per-level evaluation of ``self.net``; see the module docstring."""

    net: nn.Module

    def setup_classifier(self, optimizer: Callable | None, scheduler: Callable | None = None,
                         label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                         mixup: dict | None = None, layer_decay: float | None = None,
                         val_levels: Sequence[int] = (0,), test_levels: Sequence[int] = (0, 1, 2, 3),
                         bootstrap: int = 1000) -> None:
        """Set up what the steps use: the loss (class weights, label smoothing, Mixup), optimiser factories, the
        val/test levels and their metrics, ``bootstrap`` resamples of the test MCC interval (0: none). A subclass calls
        it once ``self.net`` is built."""
        self.optimizer_factory, self.scheduler_factory, self.layer_decay = optimizer, scheduler, layer_decay
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(labels) % 2 == 0:  # timm's Mixup pairs samples: even batches only
            images, soft = self.mixup(images, labels)
            loss = self.soft_criterion(self(images), soft)
        else:
            loss = self.criterion(self.logits(batch), labels)
        # no prog_bar: Lightning turns prog_bar metrics into numbers at every batch end (a host-device sync per step);
        # the progress bar (train/utils/progress.py) reads train/loss at logging steps only
        self.log("train/loss", loss, batch_size=len(labels))
        return loss

    def logits(self, batch: dict) -> torch.Tensor:
        """The logits of a batch as the loader made it (subclasses read the extra fields they asked for)."""
        return self(batch["image"])

    def _eval_step(self, split: str, batch: dict, dataloader_idx: int) -> torch.Tensor:
        logits = self.logits(batch)
        level = self.levels[split][dataloader_idx]
        self.log(f"{split}/L{level}/loss", self.criterion(logits, batch["label"]), add_dataloader_idx=False,
                 batch_size=len(batch["label"]), sync_dist=True)  # several devices: the mean over all of them
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
        self.log_dict(out, prog_bar=False, sync_dist=True)  # already the same on every device (torchmetrics syncs)

    def on_validation_epoch_end(self) -> None:
        self._log_levels("val")

    def on_test_epoch_end(self) -> None:
        self._log_levels("test")
        self.test_predictions = {}
        for level, stores in zip(self.levels["test"], self.test_outputs):
            logits, labels, index = (s.compute() for s in stores)
            rows = unique_rows(index.long())
            self.test_predictions[level] = {"logits": logits[rows].cpu(), "label": labels[rows].long().cpu(),
                                            "index": index[rows].long().cpu()}  # outputs leave a stage on the CPU
            for s in stores:
                s.reset()
            if self.bootstrap:  # 95% interval of MCC per level, by resampling the test samples
                low, high = bootstrap_interval(roadwork_prob(logits), labels, self.bootstrap)
                self.log_dict({f"test/L{level}/mcc_low": low, f"test/L{level}/mcc_high": high})

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.net, self.layer_decay, fuse=self.fuses())
        return with_schedule(self, optimizer, self.scheduler_factory)


def test_figures(predictions: dict[int, dict[str, torch.Tensor]], metrics: dict[str, float], title: str) -> dict:
    """The confusion matrices, per-level metric bars and reliability diagram of a module's ``test_predictions``
    and ``test/...`` metrics (:func:`train.calibration.level_figures`)."""
    from train.calibration import level_figures

    per_level = {f"L{lv}": (roadwork_prob(p["logits"]), p["label"]) for lv, p in predictions.items()}
    return level_figures(per_level, by_level(metrics, "test"), title)


def fit_and_test(trainer: pl.Trainer, model: ClassifierModule, datamodule: pl.LightningDataModule,
                 ckpt_path: str | None = None) -> tuple[str | None, str | None, dict[str, float]]:
    """Fit, then test the best checkpoint; returns (best, last, ``test/...`` metrics, the fit's fault counts and
    ``<monitor>_best``: the best checkpoint's score, e.g. ``val/mcc_best``, what sweeps optimise)."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    best, last = checkpoint_paths(trainer)  # read now: test() reloads the callbacks' state from `best`
    scores = {f"{cb.monitor}_best": float(cb.best_model_score) for cb in trainer.checkpoint_callbacks
              if getattr(cb, "monitor", None) and cb.best_model_score is not None}
    # A checkpoint's state_dict holds the EMA weights when EMA is on; without the callback, test loads exactly those
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    with warnings.catch_warnings():  # ... and Lightning's reminder to keep the callback does not apply
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided")
        trainer.test(model, datamodule=datamodule, ckpt_path=testable_checkpoint(trainer, best), verbose=False)
    tested = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    return best, last, {**tested, **fault_metrics(trainer), **scores}


METRICS_SOURCE = ("the {name} stage's test predictions (at its training precision) with the calibration applied; "
                  "`task=evaluate` recomputes them from this bundle")


def parity_samples(datamodule, n: int, split: str = "calib") -> tuple[torch.Tensor, list[np.ndarray]]:
    """``n`` real validator queries (level 0) from ``split``: (model input tensors, the uint8 query images)."""
    dataset = datamodule.dataset(split, 0)
    queries = [dataset.query(i, 0) for i in range(min(n, len(dataset)))]
    return torch.stack([dataset.transform(q) for q in queries]), queries


class ClassifierTier(Tier, kind="classifier"):
    """A tier whose model maps images to 2 logits, calibrated by the calibrate stage or by its own stage."""

    def load(self, run: Run) -> tuple[nn.Module, dict]:
        model, config, _ = load_calibrated(run, self.name)
        return model, config

    def export(self, cfg, run: Run, folder):
        """ONNX checked in ONNX Runtime on real validator queries; for ``export.hf_model`` also the HF folder."""
        ecfg = cfg.export
        try:
            model, config, report = load_calibrated(run, self.name)
        except FileNotFoundError as e:
            raise ExportError(f"export.models has {self.name!r}: {e}") from None
        spec = config["input"]
        pixels, queries = parity_samples(build_datamodule(cfg, run, spec), ecfg.onnx.parity_images)
        metrics = with_mean({lv: m["after"] for lv, m in report.get("test", {}).items()})
        calibration = Calibration(**{k: v for k, v in report.items() if k != "test"})
        return export_classifier(self.name, model, spec, calibration, folder, pixels,
                                 queries if self.name == ecfg.hf_model else None, metrics,
                                 METRICS_SOURCE.format(name=self.name) if metrics else None, ecfg.onnx.opset,
                                 ecfg.onnx.parity_atol, self.tokens(run, model))

    def tokens(self, run: Run, model: nn.Module) -> dict[str, dict[str, float]] | None:
        """Measured tokens per image, for an adaptive-token model's manifest entry (None: a fixed token count)."""
        return None
