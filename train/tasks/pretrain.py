"""``task=pretrain``: a backbone pretrained without downloads, saved for ``model.backbone.pretrained=``.

``pretrain.method=fdsl`` (formula-driven supervised learning): the backbone learns to tell apart K fractal categories
(:mod:`train.data.fractals`), every image rendered on the training device from the global step, so nothing is read
from disk and a resumed run draws what an unbroken one draws. ``pretrain.method=mae``: a masked autoencoder
(:mod:`train.models.mae`) on the data group's images, labels ignored. Both write ``<run>/pretrain/backbone.safetensors``
(the timm state dict, classifier head removed) and ``backbone.json`` (its card:
:func:`train.models.saving.save_backbone`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from train.data.fractals import FractalCategories, FractalImages, search_categories
from train.models import create_backbone
from train.models.mae import MaskedAutoencoder
from train.models.saving import save_backbone
from train.optim import FusedOptimizerSteps, build_optimizer, with_schedule
from train.runs import Run
from train.tasks.registry import ensure_data, ensure_shards, register_task
from train.tiers.training import batch_size, build_datamodule, build_trainer, checkpoint_paths, resolve_ckpt_path
from train.utils.faults import fault_metrics
from train.utils.files import atomic_write_bytes
from train.utils.rng import CheckpointedRNG

log = logging.getLogger(__name__)
METHODS = ("fdsl", "mae")


def step_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``key`` (e.g. seed, stream, step, rank): independent streams, the same
    draws for the same key in any process."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2 ** 63 - 1))


class PretrainModule(CheckpointedRNG, FusedOptimizerSteps, pl.LightningModule):
    """What both methods share: the backbone ``self.net``, its optimiser and compile; :meth:`backbone` is the net to
    save (head removed)."""

    net: nn.Module
    monitor: tuple[str, str]

    def setup_optim(self, optimizer: Callable | None, scheduler: Callable | None, compile: bool) -> None:
        """Keep the optimiser and scheduler factories for :meth:`configure_optimizers`; ``compile`` compiles
        ``self.net`` in place."""
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if compile:
            self.net.compile()  # in place: parameter names (and the saved file) stay as they are

    def configure_optimizers(self):
        return with_schedule(self, build_optimizer(self.optimizer_factory, self.net, fuse=self.fuses()),
                             self.scheduler_factory)

    def on_train_start(self) -> None:
        self.trained, self.since = 0, time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.trained += batch_size(batch)

    def on_train_end(self) -> None:
        """``self.throughput``: images trained per second by all processes in this fit (compile and held-out scoring
        included)."""
        self.throughput = self.trained * self.trainer.world_size / max(time.perf_counter() - self.since, 1e-9)

    def backbone(self) -> nn.Module:
        """``self.net`` with its classifier head removed (in place): what is saved."""
        self.net.reset_classifier(0)
        return self.net


class FractalPretrainModule(PretrainModule):
    """FDSL: ``classes`` fractal categories (searched from ``seed``), each step a batch rendered from
    (seed, step, rank) on the module's device; held-out instances (their own seeds) give ``val/acc``."""

    monitor = ("val/acc", "max")

    def __init__(self, backbone: dict, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 classes: int = 1000, seed: int = 0, search: dict | None = None, render: dict | None = None,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), img_size: int = 64,
                 label_smoothing: float = 0.1, mixup: dict | None = None, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = create_backbone(**{**backbone, "pretrained": False}, num_classes=classes)
        categories = search_categories(classes, seed=seed, resolution=img_size, **(search or {}))
        self.register_buffer("maps", categories.maps)  # travel with the checkpoint and the device
        self.register_buffer("probs", categories.probs)
        self.register_buffer("fill", categories.fill)
        self.render_args = {"size": img_size, "mean": tuple(mean), "std": tuple(std), **(render or {})}
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=classes) if mixup else None
        self.soft_criterion = SoftTargetCrossEntropy()
        self.accuracy = MulticlassAccuracy(num_classes=classes, average="micro")
        self.setup_optim(optimizer, scheduler, compile)

    def images(self, n: int, *key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labelled images drawn from ``key`` on the module's device."""
        categories = FractalCategories(self.maps, self.probs, self.fill, self.hparams.seed)
        return FractalImages(categories, **self.render_args)(n, step_generator(self.device, self.hparams.seed, *key))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = self.images(len(batch["slot"]), 0, self.global_step, self.global_rank)
        if self.mixup is not None and len(labels) % 2 == 0:
            images, soft = self.mixup(images, labels)
            loss = self.soft_criterion(self.net(images), soft)
        else:
            loss = self.criterion(self.net(images), labels)
        self.log("train/loss", loss, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, labels = self.images(len(batch["slot"]), 1, batch_idx, self.global_rank)  # the same ones every time
        logits = self.net(images)
        self.log("val/loss", self.criterion(logits, labels), batch_size=len(labels), sync_dist=True)
        self.accuracy.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc", self.accuracy.compute(), sync_dist=True)
        self.accuracy.reset()


class MAEPretrainModule(PretrainModule):
    """A masked autoencoder around a timm ViT on the data group's images (labels ignored); ``val/loss`` is the
    reconstruction error of the val split's masked patches (fixed masks), ``val/baseline`` the same for predicting
    each masked patch as its own mean."""

    monitor = ("val/loss", "min")

    def __init__(self, backbone: dict, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 norm_pix_loss: bool = True, seed: int = 0, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = create_backbone(**{**backbone, "pretrained": False})
        self.mae = MaskedAutoencoder(self.net, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss)
        self.setup_optim(optimizer, scheduler, compile)

    def configure_optimizers(self):
        return with_schedule(self, build_optimizer(self.optimizer_factory, self.mae, fuse=self.fuses()),
                             self.scheduler_factory)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.mae(batch["image"], step_generator(self.device, self.hparams.seed, 0, self.global_step,
                                                      self.global_rank))
        self.log("train/loss", out["loss"], batch_size=len(batch["image"]))
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.mae(batch["image"], step_generator(self.device, self.hparams.seed, 1, dataloader_idx, batch_idx))
        n = len(batch["image"])
        self.log_dict({"val/loss": out["loss"], "val/baseline": out["baseline"]}, batch_size=n, sync_dist=True,
                      add_dataloader_idx=False)


class RenderSlots(pl.LightningDataModule):
    """The loaders of a method that makes its own images: each item, ``{"slot": (n,)}``, is a slot of n images to render
    (what they are is up to the module, from the step), ``steps`` per epoch for training and enough for ``held_out``
    images for validation."""

    def __init__(self, batch_size: int, steps: int, held_out: int):
        super().__init__()
        self.batch_size, self.steps, self.held_out = batch_size, steps, held_out

    def _slots(self, sizes: list[int]) -> DataLoader:
        return DataLoader([{"slot": torch.zeros(n, dtype=torch.uint8)} for n in sizes], batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._slots([self.batch_size] * self.steps)

    def val_dataloader(self) -> DataLoader:
        full, rest = divmod(self.held_out, self.batch_size)
        return self._slots([self.batch_size] * full + ([rest] if rest else []))


def build_method(cfg: DictConfig, run: Run) -> tuple[PretrainModule, pl.LightningDataModule]:
    """The module and data of ``cfg.pretrain.method``."""
    p = cfg.pretrain
    common = {"backbone": OmegaConf.to_container(cfg.model.backbone, resolve=True),
              "optimizer": instantiate(p.optimizer), "scheduler": instantiate(p.scheduler) if p.scheduler else None,
              "seed": p.seed, "compile": p.compile}
    if p.method == "fdsl":
        module = FractalPretrainModule(**common, **OmegaConf.to_container(p.fdsl, resolve=True),
                                       img_size=cfg.model.img_size, mean=list(cfg.model.mean), std=list(cfg.model.std))
        return module, RenderSlots(p.batch_size, p.steps_per_epoch, p.held_out)
    if p.method == "mae":
        ensure_data(cfg, run)
        ensure_shards(cfg, run)
        module = MAEPretrainModule(**common, **OmegaConf.to_container(p.mae, resolve=True))
        datamodule = build_datamodule(cfg, run)
        datamodule.balance, datamodule.batch_size = "none", p.batch_size  # labels play no part
        return module, datamodule
    raise ValueError(f"pretrain.method={p.method!r}; allowed: {list(METHODS)}")


@register_task("pretrain", ranks="all")
def run_pretrain(cfg: DictConfig, run: Run) -> dict:
    """``task=pretrain``: pretrain the backbone by ``pretrain.method``; rank 0 saves it with its card (and ships it with
    ``pretrain.ship_as``). Returns the held-out metrics and the throughput."""
    task_dir = run.task_dir("pretrain")
    module, datamodule = build_method(cfg, run)
    trainer = build_trainer(cfg, task_dir, monitor=module.monitor, max_epochs=cfg.pretrain.epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), task_dir))
    held_out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    images_seen = trainer.global_step * cfg.pretrain.batch_size * trainer.world_size
    seen = {"images_seen": images_seen, "images_per_second": module.throughput}
    metrics = {**held_out, **seen, **fault_metrics(trainer)}
    if not trainer.is_global_zero:
        return metrics
    _, last = checkpoint_paths(trainer)
    card = {"method": cfg.pretrain.method, **seen, "held_out": held_out,
            "recipe": OmegaConf.to_container(cfg.pretrain, resolve=True), "precision": str(trainer.precision),
            "input": {"img_size": cfg.model.img_size, "mean": list(cfg.model.mean), "std": list(cfg.model.std)}}
    weights, card_path = save_backbone(module.backbone().float(), task_dir / "backbone", card)
    log.info("pretrain (%s): %s images seen (%.0f img/s), held-out %s; backbone saved to %s", cfg.pretrain.method,
             f"{images_seen:,}", module.throughput, {k: round(v, 4) for k, v in held_out.items()}, weights)
    artifacts = {"backbone": weights, "card": card_path, **({"last": last} if last else {})}
    run.record("pretrain", artifacts=artifacts, metrics=metrics)
    if cfg.pretrain.ship_as:
        ship(weights, card_path, cfg.pretrain.ship_as)
    return metrics


def ship(weights: Path, card: Path, name: str) -> None:
    """Copy a pretrained backbone and its card into the shipped backbones (:func:`train.configs.pretrained_dir`)."""
    from train.configs import pretrained_dir

    folder = pretrained_dir()
    for src, suffix in ((weights, ".safetensors"), (card, ".json")):
        atomic_write_bytes(folder / f"{name}{suffix}", src.read_bytes())
    log.info("shipped as model.backbone.pretrained=%s (%s)", name, folder)
