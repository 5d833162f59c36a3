"""``task=stage1``: the binary roadwork classifier (timm or transformers backbone, full / probe / PEFT)."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.strategies import DeepSpeedStrategy

from train.errors import RunError
from train.models.saving import save_classifier
from train.predictions import write_predictions
from train.runs import Run
from train.tasks.registry import ensure_shards, register_task
from train.tiers.classifier import fit_and_test, test_figures
from train.tiers.stage1 import Stage1Module
from train.tiers.training import build_datamodule, build_trainer, consolidated_checkpoint, resolve_ckpt_path
from train.utils.console import print_level_table
from train.utils.loggers import publish_figures

log = logging.getLogger(__name__)


@register_task("stage1", ranks="all", needs=lambda cfg: ["data"])
def run_stage1(cfg: DictConfig, run: Run) -> dict:
    task_dir = run.task_dir("stage1")
    ensure_shards(cfg, run)
    datamodule = build_datamodule(cfg, run)
    model = instantiate(cfg.model, class_weights=datamodule.class_weights)
    trainer = build_trainer(cfg, task_dir)
    best, last, metrics = fit_and_test(trainer, model, datamodule, resolve_ckpt_path(cfg.get("ckpt_path"), task_dir))
    if not trainer.is_global_zero:
        return metrics  # the other ranks of a multi-process run: rank 0 writes the results
    print_level_table(metrics, "stage1 test metrics per validator level (MCC with bootstrap 95% interval)")
    source = model
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        # the live model is sharded (ZeRO-3) or in bf16: the fp32 weights are in the best checkpoint's shards
        if not best:
            raise RunError("stage1 under DeepSpeed saves its model from the best checkpoint: keep "
                           "callbacks.model_checkpoint")
        best = str(consolidated_checkpoint(best))
        source = Stage1Module.from_checkpoint(best)
    weights, config = save_classifier(source.plain_model(), task_dir / "stage1", model.input_spec,
                                      finetune=model.finetune_mode,
                                      source_checkpoint=best)
    predictions = write_predictions(task_dir / "test_predictions.parquet", model.test_predictions)
    figures = publish_figures(trainer.loggers, task_dir, test_figures(
        model.test_predictions, metrics, "stage1 on test (before calibration)"), trainer.global_step)
    artifacts = {"model": weights, "model_config": config, "test_predictions": predictions, **figures}
    # checkpoint files (a DeepSpeed last.ckpt is a folder: it resumes with ckpt_path=last, the registry skips it)
    artifacts.update({k: v for k, v in (("best", best), ("last", last)) if v and Path(v).is_file()})
    run.record("stage1", artifacts=artifacts, metrics=metrics, test_precision=str(trainer.precision))
    return metrics
