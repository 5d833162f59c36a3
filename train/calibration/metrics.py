"""Calibration metrics of P(roadwork): top-label ECE (equal-width and equal-mass bins), binary ECE, Brier, NLL.

"Top-label" scores the confidence in the predicted class, max(p, 1 - p), against whether that class is right. The
predicted class is Roadwork iff p > 0.5; p == 0.5 counts as None, as the NATIX validator scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import binary_calibration_error

from train.metrics import THRESHOLD, classification_metrics

EPS = 1e-7  # NLL clamps p to [EPS, 1 - EPS]


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence max(p, 1 - p) of the predicted class and whether it is right (1) or wrong (0)."""
    predicted = (probs > THRESHOLD).long()
    return torch.maximum(probs, 1 - probs), (predicted == labels).long()


def adaptive_ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """ECE over equal-mass bins: sorted by confidence, split into ``n_bins`` groups of (almost) equal size."""
    groups = [g for g in confidence.argsort(stable=True).tensor_split(n_bins) if len(g)]
    gaps = torch.stack([len(g) * (correct[g].double().mean() - confidence[g].mean()).abs() for g in groups])
    return gaps.sum() / len(confidence)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor,
                     n_bins: int = 15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: count, top-label accuracy and mean confidence (0 where empty)."""
    confidence, correct = top_label(probs.detach().cpu().double(), labels.detach().cpu().long())
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(max=n_bins - 1)  # as torchmetrics; 1.0 last
    count = torch.bincount(index, minlength=n_bins).double()
    accuracy = torch.bincount(index, weights=correct.double(), minlength=n_bins) / count.clamp(min=1)
    mean_confidence = torch.bincount(index, weights=confidence, minlength=n_bins) / count.clamp(min=1)
    return count, accuracy, mean_confidence


def calibration_report(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """ECE (top-label), ECE of P(roadwork) itself, equal-mass top-label ECE, Brier score and NLL, as floats."""
    probs, labels = probs.detach().double().flatten().contiguous(), labels.detach().long().flatten()
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("calibration_report needs probabilities P(roadwork) in [0, 1], not logits")
    confidence, correct = top_label(probs, labels)
    # binary_calibration_error compares each bin's mean "pred" with its mean "target", so on (confidence, correct)
    # it is top-label ECE with our tie rule spelled out. multiclass_calibration_error on [1 - p, p] would pick the
    # class by argmax, whose index at a tie (p == 0.5) torch does not specify, and it casts to float32.
    return {"ece": float(binary_calibration_error(confidence, correct, n_bins=n_bins)),
            "ece_binary": float(binary_calibration_error(probs, labels, n_bins=n_bins)),
            "ece_adaptive": float(adaptive_ece(confidence, correct, n_bins)),
            "brier": float(mean_squared_error(probs, labels.double())),
            "nll": float(F.binary_cross_entropy(probs.clamp(EPS, 1 - EPS), labels.double()))}


def score_probs(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Classification metrics and calibration errors (ECE, adaptive ECE, Brier, NLL) of P(roadwork)."""
    probs, target = torch.as_tensor(probs).float().cpu(), torch.as_tensor(target).long().cpu()
    scores = {k: float(v) for k, v in classification_metrics()(probs, target).items()}
    return {**scores, **calibration_report(probs, target, n_bins)}
