"""The experiment loggers (``logger=csv|tensorboard|wandb|none``, or a list): built for a task's folder, told the run's
name, tags and config, and shown the task's figures.

Every task writes into ``<run>/<task>/``; its loggers do too (``metrics.csv``, TensorBoard's event file, wandb's
``wandb/offline-run-*``). A logger's ``name`` / ``group`` / ``job_type`` left null in its config become the run's
and the task's names, so wandb groups the tasks of one run. Figures are PNG files first (the run folder keeps them
whatever the logger); :func:`publish_figures` saves and shows them where the logger can store images.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only


class KeepOpenTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger whose ``finalize`` flushes without closing the writer. tensorboardX names its
    event file by the second and opens it with "wb": a writer reopened after fit (for test, then for the figures)
    within the same second would overwrite what the last one wrote."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush the event file, keeping the writer open, and save."""
        if self._experiment is not None:
            self.experiment.flush()
        self.save()


IMAGE_LOGGERS = (TensorBoardLogger, WandbLogger)  # the loggers log_figures shows images in


def build_loggers(cfg: DictConfig, task_dir: Path, figures_only: bool = False) -> list[Logger]:
    """The configured loggers writing into ``task_dir`` (``<run>/<task>``), with the run's name, tags and resolved
    config logged as hyperparameters. ``figures_only``: only those that store images (for a task without a Trainer,
    which logs nothing else; the task folder already holds its config)."""
    run, task = task_dir.parent.name, task_dir.name
    identity = {"name": f"{run}/{task}", "group": run, "job_type": task}
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg is None:
            continue
        if lg._target_.endswith("WandbLogger"):
            _finish_wandb_run()  # one wandb run per task: a run still open is an earlier task's
        named = {k: v for k, v in identity.items() if k in lg and lg[k] is None}
        loggers.append(instantiate(lg, save_dir=str(task_dir), **named))
    if figures_only:
        loggers = [lg for lg in loggers if isinstance(lg, IMAGE_LOGGERS)]
    info = {"run": run, "task": task, "tags": list(cfg.get("tags") or []),
            "config": OmegaConf.to_container(cfg, resolve=True)}
    for logger in loggers:
        logger.log_hyperparams(info)
        logger.save()  # TensorBoard writes its hparams.yaml only when saved
    return loggers


def _finish_wandb_run() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG file at ``path`` (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def publish_figures(loggers: Sequence[Logger], task_dir: Path, figures: Mapping[str, object],
                    step: int = 0) -> dict[str, Path]:
    """The one way a task shows figures: each matplotlib Figure is saved as ``<task_dir>/<name>.png`` (a path is a
    PNG the task wrote itself), then all are logged (:func:`log_figures`); returns name -> PNG path."""
    paths = {name: Path(f) if isinstance(f, (str, Path)) else save_figure(f, task_dir / f"{name}.png")
             for name, f in figures.items()}
    log_figures(loggers, paths, step)
    return paths


def log_figures(loggers: Sequence[Logger], figures: Mapping[str, str | Path], step: int = 0) -> None:
    """Show PNG files (name -> path, written already) in every logger that stores images: TensorBoard as images
    ``figures/<name>``, wandb as ``wandb.Image``; a CSV logger keeps only the files."""
    if not figures:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, path in figures.items():
                logger.experiment.add_image(f"figures/{name}", _rgb(path), step, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            for name, path in figures.items():
                logger.log_image(f"figures/{name}", [str(path)], step=step)


def _rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
