"""Classification metrics (torchmetrics), one collection per validator level."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryMatthewsCorrCoef


def classification_metrics() -> MetricCollection:
    """Metrics on P(roadwork); threshold 0.5 with 0.5 itself counting as "None" (as NATIX scores)."""
    return MetricCollection({"mcc": BinaryMatthewsCorrCoef(threshold=0.5), "acc": BinaryAccuracy(threshold=0.5)})


def per_level_metrics(levels: Sequence[int]) -> nn.ModuleList:
    """One metric collection per validator level, in dataloader order."""
    return nn.ModuleList([classification_metrics() for _ in levels])
