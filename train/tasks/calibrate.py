"""The ``calibrate`` stage: fit each tier's calibrator on the calib split, fold it in, report before/after.

For every tier in ``calibrate.tiers`` it loads the tier's plain classifier from the registry, queries
the calib split at the validator levels, fits ``calibrate.method`` on those logits, folds a
temperature / Platt calibrator into the classifier head (isotonic stays a table for the consumer),
and writes ``<tier>.safetensors`` + ``.json``, a reliability diagram and ``calibration.json``.
When the tier recorded its test predictions, the before/after figures are also given on test.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from train.models.saving import load_classifier
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.calibration import calibrate_model
from train.utils.console import print_level_table
from train.utils.files import atomic_write_json
from train.utils.loggers import build_loggers, publish_figures

log = logging.getLogger(__name__)


def calibrate_tier(cfg: DictConfig, run: Run, tier: str) -> dict:
    """Fit, fold and save one tier's calibration; returns its report (also the manifest's ``calibration``)."""
    model, config = load_classifier(run.artifact(tier, "model"))
    return calibrate_model(cfg, run, model, config, tier, run.task_dir("calibrate"))


@register_task("calibrate", needs=lambda cfg: list(cfg.calibrate.tiers))
def run_calibrate(cfg: DictConfig, run: Run) -> dict:
    """``task=calibrate``: calibrate every tier of ``calibrate.tiers`` (:func:`calibrate_tier`), write
    ``calibration.json`` and the reliability diagrams, and record the stage; returns its metrics."""
    task_dir = run.task_dir("calibrate")
    reports, artifacts, metrics = {}, {}, {}
    for tier in cfg.calibrate.tiers:
        reports[tier] = report = calibrate_tier(cfg, run, tier)
        artifacts.update({f"{tier}_model": task_dir / f"{tier}.safetensors",
                          f"{tier}_model_config": task_dir / f"{tier}.json",
                          f"{tier}_reliability": task_dir / f"{tier}_reliability.png"})
        for when in ("before", "after"):
            metrics.update({f"{tier}/calib/{when}/{k}": v for k, v in report[when].items()})
            metrics.update({f"{tier}/test/{lv}/{when}/{k}": v for lv, m in report["test"].items()
                            for k, v in m[when].items() if k in ("ece", "mcc", "acc", "nll")})
        _print_report(tier, report)
    publish_figures(build_loggers(cfg, task_dir, figures_only=True), task_dir,
                    {k: v for k, v in artifacts.items() if k.endswith("_reliability")})
    atomic_write_json(task_dir / "calibration.json", reports)
    artifacts["report"] = task_dir / "calibration.json"
    run.record("calibrate", artifacts=artifacts, metrics=metrics)
    return metrics


def _print_report(tier: str, report: dict) -> None:
    log.info("%s: %s scaling %s on %d %s samples", tier, report["method"], report["params"], report["n"],
             report["split"])
    shown = ("ece", "ece_adaptive", "brier", "nll", "mcc", "acc")
    rows = {f"calib/{when}/{k}": v for when in ("before", "after") for k, v in report[when].items()}
    print_level_table(rows, f"{tier} calibration ({report['method']}), {report['split']} split", "calib", shown)
    if report["test"]:
        rows = {f"test/{lv} {when}/{k}": v for lv, m in report["test"].items() for when in ("before", "after")
                for k, v in m[when].items()}
        print_level_table(rows, f"{tier} on test, before / after calibration", "test", shown)
