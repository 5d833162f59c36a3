"""``task=stage1``: Stage-1 fit on the run's train split (model selection on val), tested on every validator level,
saved as the plain classifier later stages load."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.strategies import DeepSpeedStrategy

from train.errors import RunError
from train.models.saving import save_classifier
from train.predictions import write_predictions
from train.runs import Run
from train.tiers.base import Fit, Outcome, register_tier
from train.tiers.classifier import ClassifierTier, fit_and_test, test_figures
from train.tiers.stage1.module import Stage1Module
from train.tiers.training import build_datamodule, consolidated_checkpoint, resolve_ckpt_path


@register_tier
class Stage1Tier(ClassifierTier, name="stage1"):
    """Configured by ``model`` (the module and backbone) and ``trainer`` (its Trainer as it is)."""

    ranks = "all"
    reads_shards = True

    def needs(self, cfg: DictConfig) -> list[str]:
        return ["data"]

    def settings(self, cfg: DictConfig) -> DictConfig:
        return cfg.model

    def trainer_overrides(self, cfg: DictConfig) -> dict:
        return {}

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path):
        return build_datamodule(cfg, run)

    def module(self, cfg: DictConfig, run: Run, datamodule, task_dir: Path) -> Stage1Module:
        return instantiate(cfg.model, class_weights=datamodule.class_weights)

    def fit(self, cfg: DictConfig, run: Run, trainer, module: Stage1Module, datamodule) -> Fit:
        resume = resolve_ckpt_path(cfg.get("ckpt_path"), run.task_dir(self.name))
        return Fit(trainer, module, *fit_and_test(trainer, module, datamodule, resume))

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, datamodule, task_dir: Path) -> Outcome:
        model, best = fit.module, fit.best
        source = model
        if isinstance(fit.trainer.strategy, DeepSpeedStrategy):
            # the live model is sharded (ZeRO-3) or in bf16: the fp32 weights are in the best checkpoint's shards
            if not best:
                raise RunError("stage1 under DeepSpeed saves its model from the best checkpoint: keep "
                               "callbacks.model_checkpoint")
            best = str(consolidated_checkpoint(best))
            source = Stage1Module.from_checkpoint(best)
        weights, config = save_classifier(source.plain_model(), task_dir / "stage1", model.input_spec,
                                          finetune=model.finetune_mode, source_checkpoint=best)
        predictions = write_predictions(task_dir / "test_predictions.parquet", model.test_predictions)
        artifacts = {"model": weights, "model_config": config, "test_predictions": predictions}
        # checkpoint files (a DeepSpeed last.ckpt is a folder: it resumes with ckpt_path=last, the registry skips it)
        artifacts.update({k: v for k, v in (("best", best), ("last", fit.last)) if v and Path(v).is_file()})
        return Outcome(artifacts, fit.metrics,
                       figures=test_figures(model.test_predictions, fit.metrics, "stage1 on test (before calibration)"),
                       table=(fit.metrics, "stage1 test metrics per validator level (MCC with bootstrap 95% interval)"),
                       info={"test_precision": str(fit.trainer.precision)})
