"""``task=evaluate``: the export bundle alone (ONNX Runtime) on validator queries, per level.

Only the bundle is loaded (manifest validated, files verified, calibration applied as the manifest
says); no training model code runs. Writes ``report.json``, ``predictions.parquet`` and the figures
``confusion.png``, ``levels.png`` (metrics per level) and ``reliability.png`` (the bundle's calibrated
probabilities) into ``<run>/evaluate/`` and prints MCC, accuracy, NATIX reward and ECE per level.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from train.calibration import level_figures
from train.export import Bundle
from train.export.manifest import MANIFEST
from train.metrics import score_probs, with_mean
from train.predictions import predict_split, write_predictions
from train.runs import Run, atomic_write_json, sha256_file
from train.tasks import register_task
from train.tasks.lightning import build_datamodule, ensure_data
from train.utils.console import print_level_table
from train.utils.loggers import build_loggers, publish_figures

log = logging.getLogger(__name__)


def bundle_path(cfg: DictConfig, run: Run) -> Path:
    """``bundle=PATH``, else the run's own export."""
    return Path(cfg.bundle) if cfg.get("bundle") else run.artifact("export", "manifest").parent


@register_task("evaluate")
def run_evaluate(cfg: DictConfig, run: Run) -> dict:
    ecfg, task_dir = cfg.evaluate, run.task_dir("evaluate")
    bundle = Bundle(bundle_path(cfg, run))
    classifier = bundle.classifier(ecfg.model, ecfg.threads)
    ensure_data(cfg, run)
    datamodule = build_datamodule(cfg, run, classifier.entry.input.model_dump())
    predictions = predict_split(lambda images: classifier.probs(images.numpy()), datamodule, ecfg.split,
                                ecfg.levels, output="prob")
    per_level = with_mean({f"L{lv}": score_probs(p["prob"], p["label"], ecfg.n_bins)
                           for lv, p in predictions.items()})
    report = {"bundle": str(bundle.path), "manifest_sha256": sha256_file(bundle.path / MANIFEST),
              "model": ecfg.model, "split": ecfg.split, "n": {f"L{lv}": len(p["label"]) for lv, p in predictions.items()},
              "metrics": per_level}
    atomic_write_json(task_dir / "report.json", report)
    write_predictions(task_dir / "predictions.parquet", predictions)
    loggers = build_loggers(cfg, task_dir, figures_only=True)
    figures = publish_figures(loggers, task_dir, level_figures(
        {f"L{lv}": (p["prob"], p["label"]) for lv, p in predictions.items()}, per_level,
        f"{ecfg.model} from the bundle, {ecfg.split} split", ecfg.n_bins))
    metrics = {f"{ecfg.split}/{lv}/{k}": v for lv, m in per_level.items() if lv != "mean" for k, v in m.items()}
    print_level_table(metrics, f"evaluate: {ecfg.model} from the bundle (ONNX Runtime), {ecfg.split} split",
                      split=ecfg.split, columns=("mcc", "acc", "reward", "auroc", "ece", "brier"))
    artifacts = {"report": task_dir / "report.json", "predictions": task_dir / "predictions.parquet", **figures}
    if ecfg.cascade and any(t.rule for t in bundle.manifest.tiers):  # tiers from the thresholds stage
        from train.tasks.replay import replay_cascade

        cascade_metrics, cascade_artifacts = replay_cascade(cfg, run, bundle, task_dir, loggers)
        metrics.update(cascade_metrics)
        artifacts.update(cascade_artifacts)
    run.record("evaluate", artifacts=artifacts, metrics=metrics)
    return metrics
