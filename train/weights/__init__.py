"""Backbones this project pretrained itself and ships with the package: ``model.backbone.pretrained=<name>``.

They lie in ``checkpoints/pretrained/`` (:func:`train.configs.pretrained_dir`; a wheel ships them as
``train/pretrained/``). Each is ``<name>.safetensors`` (a timm state dict, head removed) with its card ``<name>.json`` (architecture, input,
method, recipe, images seen, held-out figures, code version, sha256), as ``task=pretrain`` writes them. The pretraining
guide (docs/guides/pretraining.md) gives the command that remade each one.
"""
from pathlib import Path

from train.configs import pretrained_dir

SHIPPED: dict[str, Path] = {p.stem: p for p in sorted(pretrained_dir().glob("*.safetensors"))}
