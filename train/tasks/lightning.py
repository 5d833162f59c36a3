"""What every training task shares: its DataModule, Trainer, callbacks and loggers."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from train.runs import Run


def build_datamodule(cfg: DictConfig, run: Run) -> pl.LightningDataModule:
    """The configured DataModule over the index written by the run's ``data`` stage."""
    return instantiate(cfg.data, index_path=str(run.artifact("data", "index")))


def build_trainer(cfg: DictConfig, task_dir: Path) -> pl.Trainer:
    """Trainer with checkpoints in ``<task_dir>/checkpoints`` and logs in ``task_dir``."""
    loggers = [instantiate(lg, save_dir=str(task_dir)) for lg in (cfg.get("logger") or {}).values() if lg]
    callbacks = []
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is None or (not loggers and cb._target_.endswith("LearningRateMonitor")):
            continue  # the LR monitor needs a logger
        extra = {"dirpath": str(task_dir / "checkpoints")} if cb._target_.endswith("Checkpoint") else {}
        callbacks.append(instantiate(cb, **extra))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(task_dir))


def checkpoint_paths(trainer: pl.Trainer) -> tuple[str | None, str | None]:
    """(best, last) checkpoint files of the fit: the monitored ModelCheckpoint's best, the unmonitored one's latest."""
    best = last = None
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None):
            best = best or cb.best_model_path or None
        elif getattr(cb, "best_model_path", None):
            last = last or cb.best_model_path
    return best, last


def resolve_ckpt_path(ckpt_path: str | None, task_dir: Path) -> str | None:
    """``ckpt_path=last`` means the task's own ``last.ckpt``; any other value must be a file."""
    if not ckpt_path:
        return None
    path = task_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def batch_size(batch: dict) -> int:
    """Samples in one of our batches (for Lightning's ThroughputMonitor)."""
    return len(batch["label"])
