"""Classification metrics (torchmetrics), one collection per validator level.

Every metric reads P(roadwork) with threshold 0.5, where 0.5 itself counts as "None", as the
NATIX validator scores (torchmetrics thresholds with ``preds > threshold``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryMatthewsCorrCoef,
                                         BinaryStatScores)
from torchmetrics.wrappers import BootStrapper

THRESHOLD = 0.5


def roadwork_prob(logits: torch.Tensor) -> torch.Tensor:
    """P(roadwork) = softmax(logits)[:, 1] of 2-class logits (dtype kept)."""
    return logits.softmax(-1)[:, 1]


def with_mean(per_level: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``per_level`` plus a ``"mean"`` row: each metric that every level has, averaged over the levels."""
    if not per_level:
        return {}
    keys = set.intersection(*(set(m) for m in per_level.values()))
    mean = {k: float(sum(m[k] for m in per_level.values()) / len(per_level)) for k in sorted(keys)}
    return {**per_level, "mean": mean}


def by_level(metrics: Mapping[str, float], split: str = "test") -> dict[str, dict[str, float]]:
    """Flat ``<split>/<level>/<metric>`` keys as ``{level: {metric: value}}``; ``<split>/<metric>`` (the mean over
    levels) is the ``mean`` row; losses are left out."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == split and parts[-1] != "loss":
            rows.setdefault(parts[1] if len(parts) == 3 else "mean", {})[parts[-1]] = float(value)
    return rows


def natix_reward(mcc: torch.Tensor, accuracy: torch.Tensor) -> torch.Tensor:
    """The subnet's reward ``(0.5 * max(MCC, 0) + 0.5 * accuracy) ** 3``."""
    return (0.5 * mcc.clamp(min=0) + 0.5 * accuracy) ** 3


class NatixReward(Metric):
    """:func:`natix_reward` over all samples seen (the validator's 100/10 windows are a live-scoring detail)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = THRESHOLD, **kwargs):
        super().__init__(**kwargs)
        self.mcc = BinaryMatthewsCorrCoef(threshold=threshold)
        self.stats = BinaryStatScores(threshold=threshold)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of P(roadwork) ``preds`` and 0/1 ``target``."""
        self.mcc.update(preds, target)
        self.stats.update(preds, target)

    def compute(self) -> torch.Tensor:
        """The reward over every sample seen since the last reset."""
        tp, fp, tn, fn, _ = self.stats.compute().float()
        return natix_reward(self.mcc.compute().float(), (tp + tn) / (tp + fp + tn + fn).clamp(min=1))

    def reset(self) -> None:
        """Forget every sample seen (the inner MCC and counts too)."""
        super().reset()
        self.mcc.reset()
        self.stats.reset()


def classification_metrics() -> MetricCollection:
    """MCC, accuracy, F1 (roadwork positive), AUROC and the NATIX reward."""
    return MetricCollection({"mcc": BinaryMatthewsCorrCoef(threshold=THRESHOLD),
                             "acc": BinaryAccuracy(threshold=THRESHOLD),
                             "f1": BinaryF1Score(threshold=THRESHOLD),
                             "auroc": BinaryAUROC(),
                             "reward": NatixReward(threshold=THRESHOLD)})


def per_level_metrics(levels: Sequence[int]) -> nn.ModuleList:
    """One metric collection per validator level, in dataloader order."""
    return nn.ModuleList([classification_metrics() for _ in levels])


def bootstrap_interval(preds: torch.Tensor, target: torch.Tensor, num_bootstraps: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of MCC over samples (torchmetrics' BootStrapper), reproducible by ``seed``.

    The resampling runs in a forked RNG, so the caller's random stream is left as it was.
    """
    tail = (1 - confidence) / 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boot = BootStrapper(BinaryMatthewsCorrCoef(threshold=THRESHOLD), num_bootstraps=num_bootstraps,
                            quantile=torch.tensor([tail, 1 - tail]), sampling_strategy="multinomial")
        boot.update(preds.float().cpu(), target.long().cpu())
        low, high = boot.compute()["quantile"].tolist()
    return low, high


def paired_bootstrap_mcc(probs_a: torch.Tensor, probs_b: torch.Tensor, target: torch.Tensor,
                         groups: torch.Tensor | None = None, num_bootstraps: int = 1000, seed: int = 0,
                         confidence: float = 0.95, strata: torch.Tensor | None = None) -> dict[str, float]:
    """MCC(b) - MCC(a) on the same samples, with a paired percentile bootstrap interval.

    Both models are scored on each resample; ``groups`` (e.g. the image behind several validator
    levels, or its scene) are resampled whole, so correlated rows move together. ``strata`` (e.g. the validator
    level of each row): the MCC is computed within each stratum and averaged (the mean over levels).
    """
    pred_a, pred_b = (torch.as_tensor(p).float().cpu() > THRESHOLD for p in (probs_a, probs_b))
    target = torch.as_tensor(target).long().cpu()
    groups = torch.arange(len(target)) if groups is None else torch.as_tensor(groups).long().cpu()
    ids, member = torch.unique(groups, return_inverse=True)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(ids), (num_bootstraps, len(ids)), generator=gen)
    weights = torch.stack([torch.bincount(d, minlength=len(ids)) for d in draws])[:, member].float()  # (R, N)

    strata = torch.zeros_like(target) if strata is None else torch.as_tensor(strata).long().cpu()
    rows = [(strata == s).float() for s in torch.unique(strata)]

    def mcc(pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # weighted confusion counts -> MCC per row
        per_stratum = []
        for row in rows:
            p, t = pred.float() * row, target.float() * row  # rows of other strata count for nothing
            tp, fp = weights @ (p * t), weights @ (p * (row - t))
            fn, tn = weights @ ((row - p) * t), weights @ ((row - p) * (row - t))
            den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
            per_stratum.append(torch.where(den > 0, (tp * tn - fp * fn) / den.clamp(min=1e-12), torch.zeros_like(den)))
        return torch.stack(per_stratum).mean(0)

    delta = mcc(pred_b, weights) - mcc(pred_a, weights)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(delta, torch.tensor([tail, 1 - tail], dtype=delta.dtype)).tolist()
    point = BinaryMatthewsCorrCoef(threshold=THRESHOLD)  # the project's MCC, degenerate confusions included

    def mcc_point(pred: torch.Tensor) -> float:
        return sum(float(point(pred[row > 0].float(), target[row > 0])) for row in rows) / len(rows)

    mcc_a, mcc_b = mcc_point(pred_a), mcc_point(pred_b)
    return {"mcc_a": mcc_a, "mcc_b": mcc_b, "delta": mcc_b - mcc_a, "low": low, "high": high}
