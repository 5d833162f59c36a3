"""``task=evaluate``: the export bundle alone (ONNX Runtime) on validator queries, per level.

Only the bundle is loaded (manifest validated, files verified, calibration applied as the manifest
says); no training model code runs. Writes ``report.json``, ``predictions.parquet`` and the figures
``confusion.png``, ``levels.png`` (metrics per level) and ``reliability.png`` (the bundle's calibrated
probabilities) into ``<run>/evaluate/`` and prints MCC, accuracy, NATIX reward and ECE per level.
``evaluate.precision`` picks a quantised variant (``task=quantize``); it is then reported next to fp32 on the same
queries (MCC and ECE per level, agreement, size on disk, ONNX Runtime CPU latency per image).
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from train.calibration import level_figures
from train.export import Bundle
from train.export.manifest import FULL_PRECISION, MANIFEST
from train.predictions import write_predictions
from train.runs import Run
from train.tasks.registry import ensure_data, register_task
from train.tiers.replay import bundle_path, compare_precisions, replay_cascade
from train.tiers.training import build_datamodule
from train.utils.console import print_level_table
from train.utils.files import atomic_write_json, sha256_file
from train.utils.loggers import build_loggers, publish_figures

log = logging.getLogger(__name__)


@register_task("evaluate", needs=lambda cfg: [] if cfg.get("bundle") else ["export"])
def run_evaluate(cfg: DictConfig, run: Run) -> dict:
    """``task=evaluate``: score the bundle's ``evaluate.model`` per level at ``evaluate.precision`` (next to fp32),
    write the report, predictions and figures, and replay the cascade when asked; returns the metrics."""
    ecfg, task_dir = cfg.evaluate, run.task_dir("evaluate")
    bundle = Bundle(bundle_path(cfg, run))
    precision = ecfg.get("precision") or FULL_PRECISION
    classifiers = {p: bundle.classifier(ecfg.model, ecfg.threads, p)
                   for p in dict.fromkeys([FULL_PRECISION, precision])}
    classifier = classifiers[precision]
    ensure_data(cfg, run)
    datamodule = build_datamodule(cfg, run, classifier.entry.input.model_dump())
    both, comparison = compare_precisions(classifiers, datamodule, ecfg.split, ecfg.levels, ecfg.n_bins)
    predictions = {lv: {"prob": p[precision], "label": p["label"], "index": p["index"]} for lv, p in both.items()}
    per_level = comparison[precision]["metrics"]
    report = {"bundle": str(bundle.path), "manifest_sha256": sha256_file(bundle.path / MANIFEST),
              "model": ecfg.model, "precision": precision, "split": ecfg.split,
              "n": {f"L{lv}": len(p["label"]) for lv, p in predictions.items()},
              "metrics": per_level, "precisions": comparison,
              "latency_note": "ONNX Runtime CPU execution provider, evaluate.threads intra-op threads (null: its "
                              "default), batches of data.eval_batch_size, the precisions in turn on each batch"}
    atomic_write_json(task_dir / "report.json", report)
    write_predictions(task_dir / "predictions.parquet", predictions)
    loggers = build_loggers(cfg, task_dir, figures_only=True)
    figures = publish_figures(loggers, task_dir, level_figures(
        {f"L{lv}": (p["prob"], p["label"]) for lv, p in predictions.items()}, per_level,
        f"{ecfg.model} ({precision}) from the bundle, {ecfg.split} split", ecfg.n_bins))
    metrics = {f"{ecfg.split}/{lv}/{k}": v for lv, m in per_level.items() if lv != "mean" for k, v in m.items()}
    print_level_table(metrics, f"evaluate: {ecfg.model} ({precision}) from the bundle (ONNX Runtime), {ecfg.split} "
                      "split", split=ecfg.split, columns=("mcc", "acc", "reward", "auroc", "ece", "brier"))
    if precision != FULL_PRECISION:
        _print_precisions(comparison, ecfg.model)
        metrics.update({f"{p}/{k}": f[k] for p, f in comparison.items() for k in ("size_bytes", "latency_ms_per_image")})
        metrics.update({f"{precision}/agreement/{lv}": v
                        for lv, v in comparison[precision]["agreement_with_fp32"].items()})
    artifacts = {"report": task_dir / "report.json", "predictions": task_dir / "predictions.parquet", **figures}
    if ecfg.cascade and any(t.rule for t in bundle.manifest.tiers):  # tiers from the thresholds stage
        cascade_metrics, cascade_artifacts = replay_cascade(cfg, run, bundle, task_dir, loggers, precision)
        metrics.update(cascade_metrics)
        artifacts.update(cascade_artifacts)
    run.record("evaluate", artifacts=artifacts, metrics=metrics)
    return metrics


def _print_precisions(figures: dict, model: str) -> None:
    for precision, f in figures.items():
        mcc = " / ".join(f"{m['mcc']:.3f}" for lv, m in f["metrics"].items() if lv != "mean")
        log.info("%s %-13s MCC per level %s, ECE %.3f, agreement with fp32 %.4f, %.2f MB, %.3f ms per image", model,
                 precision, mcc, f["metrics"]["mean"]["ece"], f["agreement_with_fp32"]["mean"], f["size_bytes"] / 1e6,
                 f["latency_ms_per_image"])
