"""What ``notebooks/bundle.ipynb`` shows of an export bundle: its models and cascade tiers (manifest), the per-level
metrics recorded in it, and the reliability of its calibrated scores (from the run's ``task=evaluate``)."""
from __future__ import annotations

from pathlib import Path

import torch

from train.analysis.runs import Table
from train.export import Bundle
from train.export.manifest import MANIFEST
from train.predictions import read_predictions


def open_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path``: an export folder, or a run folder (its ``export/``); files checked against the
    manifest's sha256."""
    path = Path(path)
    return Bundle(path if (path / MANIFEST).is_file() else path / "export")


def models_table(bundle: Bundle) -> Table:
    """One row per model: kind, input size, calibration (method, ECE on the calibration split before -> after),
    mean test MCC, FLOPs per call, ONNX parity with PyTorch."""
    rows = []
    for name, m in bundle.manifest.models.items():
        cal = m.calibration
        rows.append({"model": name, "kind": m.kind, "input": m.input.img_size, "calibration": cal.method,
                     "ece_before": cal.before.get("ece"), "ece_after": cal.after.get("ece"),
                     "mean_mcc": m.metrics.get("mean", {}).get("mcc"),
                     "mflops": m.flops.per_call / 1e6 if m.flops else None,
                     "onnx_parity": m.onnx.parity_max_abs_diff, "files": len(m.files)})
    return Table(rows)


def tiers_table(bundle: Bundle) -> Table:
    """The cascade in order: each tier's kind, threshold and the guarantee it holds."""
    rows = []
    for i, tier in enumerate(bundle.manifest.tiers):
        g = tier.guarantee
        rows.append({"order": i, "tier": tier.name, "kind": tier.kind, "threshold": tier.threshold,
                     "alpha": g.alpha if g else None, "delta": g.delta if g else None,
                     "accepted": g.acceptance_rate if g else None, "guarantee": g.statement if g else ""})
    return Table(rows)


def level_metrics_figure(bundle: Bundle, model: str = "stage1"):
    """Bars of the model's metrics per validator level, as recorded in the manifest."""
    from train.calibration.plots import level_metrics

    entry = bundle.manifest.models[model]
    return level_metrics(entry.metrics, title=f"{model}: {entry.metrics_source or 'metrics per level'}")


def bundle_predictions(bundle: Bundle) -> dict[int, dict]:
    """The bundle's scores on the evaluated split, per level (``<run>/evaluate/predictions.parquet``, written by
    ``task=evaluate`` from the bundle alone)."""
    path = bundle.path.parent / "evaluate" / "predictions.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m train task=evaluate run_dir={bundle.path.parent}`")
    return read_predictions(path)


def reliability_figure(bundle: Bundle, n_bins: int = 15):
    """The reliability diagram of the bundle's calibrated P(roadwork) on the evaluated split, all levels pooled and
    per level (the same samples at each level)."""
    from train.calibration.plots import reliability_diagram

    per_level = bundle_predictions(bundle)
    labels = torch.from_numpy(next(iter(per_level.values()))["label"]).long()
    curves = {f"L{lv}": torch.from_numpy(p["prob"]).float() for lv, p in per_level.items()}
    if any(not torch.equal(torch.from_numpy(p["label"]).long(), labels) for p in per_level.values()):
        raise ValueError("the levels hold different samples: cannot draw them against one set of labels")
    return reliability_diagram(labels, curves, n_bins, f"calibrated P(roadwork) from {bundle.path}")
