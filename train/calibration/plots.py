"""Calibration figures as PNG files: reliability diagrams (e.g. before / after) and per-level confusion matrices.

Figures are built on ``matplotlib.figure.Figure`` and saved by its Agg canvas, never through pyplot, so they work
headless and leave the caller's backend (a notebook's, say) alone. matplotlib is imported only here, when drawing.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from train import LABELS
from train.calibration.metrics import calibration_report, reliability_bins
from train.metrics import THRESHOLD


def reliability_diagram(path: str | Path, labels: torch.Tensor, curves: dict[str, torch.Tensor], n_bins: int = 15,
                        title: str = "") -> Path:
    """One panel per curve (name -> P(roadwork)): top-label accuracy per confidence bin, with counts underneath."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(curves), 5), layout="constrained")
    axes = fig.subplots(2, len(curves), sharex=True, squeeze=False, height_ratios=[3, 1])
    for (name, probs), top, bottom in zip(curves.items(), axes[0], axes[1]):
        _reliability_panel(top, bottom, name, probs, labels, n_bins)
    axes[0, 0].legend(loc="upper left")
    return _save(fig, path, title)


def _reliability_panel(top, bottom, name: str, probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> None:
    count, accuracy, confidence = (t.numpy() for t in reliability_bins(probs, labels, n_bins))
    centers, width = (np.arange(n_bins) + 0.5) / n_bins, 1 / n_bins
    seen = count > 0
    top.bar(centers[seen], accuracy[seen], width, edgecolor="black", label="accuracy")
    top.bar(centers[seen], (confidence - accuracy)[seen], width, bottom=accuracy[seen], color="red", alpha=0.3,
            hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    ece = calibration_report(probs, labels, n_bins)["ece"]
    top.set(title=f"{name}: ECE {ece:.3f}", ylabel="top-label accuracy", ylim=(0, 1))
    bottom.bar(centers, count, width, color="grey", edgecolor="black")
    # top-label confidence is at least 0.5: start at the edge of the bin holding 0.5
    bottom.set(xlabel="confidence max(p, 1 - p)", ylabel="count", xlim=(math.floor(n_bins / 2) / n_bins, 1))


def confusion_matrices(path: str | Path, per_level: dict[int | str, tuple[torch.Tensor, torch.Tensor]],
                       title: str = "") -> Path:
    """One confusion-matrix panel per level (level -> (0/1 predictions, labels)), classes named as in LABELS."""
    from matplotlib.figure import Figure
    from torchmetrics.classification import BinaryConfusionMatrix

    names = [LABELS[i] for i in sorted(LABELS)]
    fig = Figure(figsize=(4 * len(per_level), 4.5), layout="constrained")
    for (level, (preds, labels)), ax in zip(per_level.items(), fig.subplots(1, len(per_level), squeeze=False)[0]):
        matrix = BinaryConfusionMatrix(threshold=THRESHOLD)
        matrix.update(preds.detach().cpu().long(), labels.detach().cpu().long())
        matrix.plot(ax=ax, labels=names)
        ax.set_title(f"level {level}")
    return _save(fig, path, title)


def cascade_curve(path: str | Path, sweep: list[dict], report: dict, title: str = "") -> Path:
    """Test MCC against mean FLOPs per image (relative to the reference tier alone) over an alpha sweep, with the
    deployed cascade and the reference marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    xs, ys = [p["flops_fraction"] for p in sweep], [p["mcc"] for p in sweep]
    ax.plot(xs, ys, marker="o", label="cascade, thresholds re-chosen at each alpha")
    for p in sweep:
        ax.annotate(f"a={p['alpha']:g}", (p["flops_fraction"], p["mcc"]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    ref = report["metrics"]["reference"]["all"]["mcc"]
    ax.scatter([1.0], [ref], marker="s", c="k", label=f"{report['reference']} alone")
    ax.scatter([1 / report["flops"]["ratio"]], [report["metrics"]["cascade"]["all"]["mcc"]], marker="*", s=140,
               c="tab:red", label="deployed cascade (manifest)")
    ax.set_xlabel(f"mean FLOPs per image / {report['reference']}'s")
    ax.set_ylabel("MCC (all levels)")
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
