"""Backbone factory: a timm model by name, with its constructor kwargs recorded.

The kwargs are kept (``model.pretrained_cfg`` and ``backbone_args``) so that later stages
(APT, export through transformers' TimmWrapper) can rebuild the same architecture.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from train import LABELS


def create_backbone(name: str, pretrained: bool | str = False, num_classes: int = len(LABELS),
                    **kwargs) -> nn.Module:
    """``timm.create_model(name, ...)``; ``pretrained`` may be True (hub) or a local weights file."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"model.backbone.name={name!r} is not a timm model; similar: {close}")
    overlay = {}
    if isinstance(pretrained, str) and pretrained not in ("", "false", "False"):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone.pretrained={pretrained} is not a file")
        overlay, pretrained = {"pretrained_cfg_overlay": {"file": str(path)}}, True
    model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **overlay, **kwargs)
    model.backbone_args = {"name": name, **kwargs}
    return model
