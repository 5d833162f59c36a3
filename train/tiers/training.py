"""What every training task shares: its DataModule, Trainer, callbacks and loggers."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.strategies import DeepSpeedStrategy

from train.runs import Run
from train.utils.checkpoints import load_checkpoint
from train.utils.loggers import build_loggers

log = logging.getLogger(__name__)
CONSOLIDATED = "fp32.ckpt"  # a DeepSpeed checkpoint folder's weights as one fp32 Lightning checkpoint


def build_datamodule(cfg: DictConfig, run: Run, input_spec: dict | None = None) -> pl.LightningDataModule:
    """The configured DataModule over the index written by the run's ``data`` stage.

    ``input_spec`` (a saved model's ``img_size`` / ``mean`` / ``std``) replaces the configured model input; the
    run's shards (``task=prepare``), when it has them, serve ``data.train_source=shards``.
    """
    spec = {k: input_spec[k] for k in ("img_size", "mean", "std")} if input_spec else {}
    shards = {"shards_path": str(run.artifact("prepare", "shards"))} if run.is_complete("prepare") else {}
    return instantiate(cfg.data, index_path=str(run.artifact("data", "index")), **spec, **shards)


def build_trainer(cfg: DictConfig, task_dir: Path, monitor: tuple[str, str] | None = None, **overrides) -> pl.Trainer:
    """Trainer with checkpoints in ``<task_dir>/checkpoints`` and logs in ``task_dir``; ``overrides`` replace
    ``cfg.trainer`` keys (e.g. a task's own ``max_epochs``); ``monitor`` = (metric, mode) replaces the best
    checkpoint's (for tasks whose model selection metric is not ``val/mcc``)."""
    loggers = build_loggers(cfg, task_dir)
    callbacks = []
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is None or (not loggers and cb._target_.endswith("LearningRateMonitor")):
            continue  # the LR monitor needs a logger
        extra = {"dirpath": str(task_dir / "checkpoints")} if cb._target_.endswith("Checkpoint") else {}
        if monitor and extra and cb.get("monitor"):
            extra.update(monitor=monitor[0], mode=monitor[1])
        callbacks.append(instantiate(cb, **extra))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(task_dir),
                       **overrides)


def checkpoint_paths(trainer: pl.Trainer) -> tuple[str | None, str | None]:
    """(best, last) checkpoint files of the fit: the monitored ModelCheckpoint's best, the unmonitored one's latest."""
    best = last = None
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None):
            best = best or cb.best_model_path or None
        elif getattr(cb, "best_model_path", None):
            last = last or cb.best_model_path
    return best, last


def testable_checkpoint(trainer: pl.Trainer, best: str | None) -> str | None:
    """The checkpoint ``trainer.test`` can load: ``best`` itself, except a ZeRO-3 folder, which DeepSpeed 0.19 cannot
    load without optimizer states (it calls a method its parameter-offload engine lacks). That one is consolidated
    into one fp32 file (rank 0, the others wait), which Lightning then gathers into the sharded model
    (``load_full_weights``)."""
    strategy = trainer.strategy
    if not best or not isinstance(strategy, DeepSpeedStrategy) or not strategy.zero_stage_3:
        return best
    if trainer.is_global_zero:
        consolidated_checkpoint(best)
    strategy.barrier("consolidated")
    strategy.load_full_weights = True
    return str(Path(best) / CONSOLIDATED)


def restore_best(trainer: pl.Trainer, module: pl.LightningModule, strict: bool = True) -> str:
    """After fit: load the monitored checkpoint's weights (the best epoch) into ``module``; returns its path ('' when
    there is none)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        module.load_state_dict(load_checkpoint(best)["state_dict"], strict=strict)
    return best


def resolve_ckpt_path(ckpt_path: str | None, task_dir: Path) -> str | None:
    """``ckpt_path=last`` means the task's own ``last.ckpt``; any value must be a checkpoint file or, under
    DeepSpeed, the checkpoint folder Lightning saved (both resume exactly)."""
    if not ckpt_path:
        return None
    path = task_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not (path.is_file() or is_deepspeed_checkpoint(path)):
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return str(path)


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the folder Lightning saves a checkpoint as under DeepSpeed (its ``latest`` names the tag)."""
    return (Path(path) / "latest").is_file()


def consolidated_checkpoint(path: str | Path) -> Path:
    """``path`` as one Lightning checkpoint file: a file as it is; a DeepSpeed checkpoint folder (sharded, maybe in
    low precision) converted by Lightning's zero-to-fp32 utility into ``<folder>/fp32.ckpt``, which holds the fp32
    weights and what Lightning's own checkpoints hold. Made again only when the folder was saved anew since; kept
    inside the folder, so it goes when the folder goes."""
    path = Path(path)
    if path.is_file():
        return path
    if not is_deepspeed_checkpoint(path):
        raise FileNotFoundError(f"no such checkpoint: {path} (a file, or the folder Lightning saves under DeepSpeed)")
    out = path / CONSOLIDATED
    if not out.is_file() or out.stat().st_mtime < (path / "latest").stat().st_mtime:
        from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        log.info("converting the DeepSpeed checkpoint %s to one fp32 file", path)
        tmp = out.with_suffix(".tmp")
        convert_zero_checkpoint_to_fp32_state_dict(path, tmp)
        tmp.replace(out)
    return out


def batch_size(batch: dict) -> int:
    """Samples in one of our batches (for Lightning's ThroughputMonitor and the progress bar's img/s): the length
    of its ``label``, else of its first tensor; read from shapes, so no device sync."""
    if "label" in batch:
        return len(batch["label"])
    return next(len(v) for v in batch.values() if hasattr(v, "shape"))
