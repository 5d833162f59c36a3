"""Evaluation figures: reliability diagrams (e.g. before / after), per-level confusion matrices and metric bars, the
cascade's cost/accuracy curve. Each function returns a ``matplotlib.figure.Figure``;
:func:`train.utils.loggers.save_figure` writes it as PNG (tasks: :func:`train.utils.loggers.publish_figures`, which
also logs it), a notebook shows it.

Figures are built on ``Figure`` and saved by its Agg canvas, never through pyplot, so they work headless and leave
the caller's backend (a notebook's, say) alone. matplotlib is imported only here, when drawing.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from train import LABELS
from train.calibration.metrics import calibration_report, reliability_bins
from train.metrics import THRESHOLD


def reliability_diagram(labels: torch.Tensor, curves: dict[str, torch.Tensor], n_bins: int = 15, title: str = ""):
    """One panel per curve (name -> P(roadwork)): top-label accuracy per confidence bin, with counts underneath."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(curves), 5), layout="constrained")
    axes = fig.subplots(2, len(curves), sharex=True, squeeze=False, height_ratios=[3, 1])
    for (name, probs), top, bottom in zip(curves.items(), axes[0], axes[1]):
        _reliability_panel(top, bottom, name, probs, labels, n_bins)
    axes[0, 0].legend(loc="upper left")
    return _titled(fig, title)


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


def confusion_matrices(per_level: dict[int | str, tuple[torch.Tensor, torch.Tensor]], title: str = ""):
    """One confusion-matrix panel per level (level -> (0/1 predictions, labels)), classes named as in LABELS."""
    from matplotlib.figure import Figure
    from torchmetrics.classification import BinaryConfusionMatrix

    names = [LABELS[i] for i in sorted(LABELS)]
    fig = Figure(figsize=(4 * len(per_level), 4.5), layout="constrained")
    for (level, (preds, labels)), ax in zip(per_level.items(), fig.subplots(1, len(per_level), squeeze=False)[0]):
        matrix = BinaryConfusionMatrix(threshold=THRESHOLD, sync_on_compute=False)  # the data is already gathered
        matrix.update(preds.detach().cpu().long(), labels.detach().cpu().long())
        matrix.plot(ax=ax, labels=names)
        ax.set_title(f"level {level}")
    return _titled(fig, title)


def cascade_curve(sweep: list[dict], report: dict, title: str = ""):
    """Test MCC against mean FLOPs per image (relative to the reference tier alone) over an alpha sweep, with the
    deployed cascade and the reference marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    xs, ys = [p["flops_fraction"] for p in sweep], [p["mcc"] for p in sweep]
    ax.plot(xs, ys, marker="o", label="cascade, thresholds re-chosen at each alpha")
    if all("mcc_delta_low" in p for p in sweep):  # the paired interval of the difference to the reference alone
        err = [[p["mcc_delta"] - p["mcc_delta_low"] for p in sweep], [p["mcc_delta_high"] - p["mcc_delta"] for p in sweep]]
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="tab:blue", alpha=0.5, capsize=2,
                    label="paired 95% interval of MCC(cascade) - MCC(reference)")
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
    return _titled(fig, title)


LEVEL_METRICS = ("mcc", "acc", "f1", "auroc", "reward")


def level_metrics(per_level: dict[str, dict[str, float]], metrics: tuple[str, ...] = LEVEL_METRICS, title: str = ""):
    """Grouped bars: each metric (x) for each validator level (one colour each; ``mean`` rows left out), MCC with
    its bootstrap 95% interval where the row has ``mcc_low`` / ``mcc_high``."""
    from matplotlib.figure import Figure

    levels = [lv for lv in per_level if lv != "mean"]
    metrics = [m for m in metrics if any(m in per_level[lv] for lv in levels)]
    fig = Figure(figsize=(1.2 + 1.1 * len(metrics), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(levels), 1)
    for i, level in enumerate(levels):
        row = per_level[level]
        xs = np.arange(len(metrics)) + (i - (len(levels) - 1) / 2) * width
        heights = [row.get(m, np.nan) for m in metrics]
        errors = None
        if "mcc" in metrics and "mcc_low" in row:  # asymmetric interval on the MCC bar only
            errors = np.zeros((2, len(metrics)))
            j = metrics.index("mcc")
            errors[:, j] = row["mcc"] - row["mcc_low"], row["mcc_high"] - row["mcc"]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=str(level))
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="value", ylim=(min(0.0, *[per_level[lv].get("mcc", 0) for lv in levels]) - 0.05, 1.0))
    ax.legend(fontsize=8, ncols=min(len(levels), 4), loc="upper left")
    return _titled(fig, title)


def level_figures(per_level: dict[str, tuple[torch.Tensor, torch.Tensor]], metrics: dict[str, dict[str, float]],
                  title: str, n_bins: int = 15) -> dict:
    """The figures of a classifier scored per validator level (level -> (P(roadwork), labels); ``metrics``: level ->
    metric -> value): ``confusion`` (one panel per level), ``levels`` (metric bars) and ``reliability`` (all levels
    pooled)."""
    probs = torch.cat([p.float().cpu() for p, _ in per_level.values()])
    labels = torch.cat([y.long().cpu() for _, y in per_level.values()])
    return {"confusion": confusion_matrices({lv: ((p > THRESHOLD).long(), y) for lv, (p, y) in per_level.items()},
                                            title),
            "levels": level_metrics(metrics, title=title),
            "reliability": reliability_diagram(labels, {"all levels": probs}, n_bins, title)}


def _titled(fig, title: str):
    if title:
        fig.suptitle(title)
    return fig
