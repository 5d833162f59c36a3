"""Backbone factory: a timm or transformers image classifier by name, with its arguments recorded.

Every model gets ``backbone_args`` (``library``, ``name`` and the extra kwargs) so that later stages
(fine-tune merging, APT, export) can rebuild the same architecture with ``create_backbone(**backbone_args)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn as nn

from train import LABELS
from train.errors import ConfigError

LIBRARIES = ("timm", "transformers")
POS_EMBED_INITS = ("sincos",)
# backbone kwargs that leave the weights' shapes alone (or that timm adapts: the position grid follows img_size)
NOT_ARCHITECTURE = ("pretrained", "pos_embed_init", "num_classes", "img_size", "drop_rate", "drop_path_rate",
                    "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate")
RESAMPLED = ("pos_embed", "patch_embed.proj.weight")  # tensors timm resamples to the model's grid and patch


def create_backbone(name: str, pretrained: bool | str = False, num_classes: int = len(LABELS),
                    library: str = "timm", pos_embed_init: str | None = None, hf_config: dict | None = None,
                    **kwargs) -> nn.Module:
    """Build ``name`` from ``library``; ``pretrained`` may be True (hub / local folder) or a timm weights file.

    ``pos_embed_init="sincos"`` (timm ViTs only) starts the patch position embeddings from a fixed 2-D
    sin-cos table; they stay trainable. ``hf_config`` (a transformers config as a dict) builds the
    architecture without reading ``name`` (how :mod:`train.models.saving` makes its files self-contained).
    """
    if library == "timm":
        model = _create_timm(name, pretrained, num_classes, **kwargs)
    elif library == "transformers":
        model = _create_transformers(name, pretrained, num_classes, hf_config, **kwargs)
    else:
        raise ValueError(f"model.backbone.library={library!r}; expected one of {LIBRARIES}")
    args = {"library": library, "name": name, **kwargs}
    if num_classes != len(LABELS):
        args["num_classes"] = num_classes
    if pos_embed_init is not None and not _loads_weights(pretrained):  # a start for random weights only
        init_pos_embed(model, pos_embed_init)
        args["pos_embed_init"] = pos_embed_init
    model.backbone_args = args
    return model


def _create_timm(name: str, pretrained: bool | str, num_classes: int, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"model.backbone.name={name!r} is not a timm model; similar: {close}")
    path = weights_file(pretrained)
    if path is None:
        return timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)
    check_card(path, {"library": "timm", "name": name, **kwargs})
    overlay = _weights_file_overlay(name, path)
    if "state_dict" in overlay:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            check_fits(timm.create_model(name, num_classes=num_classes, **kwargs), overlay["state_dict"], path)
    return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                             **kwargs)


def weights_file(pretrained: bool | str) -> Path | None:
    """The local file ``model.backbone.pretrained`` names, or None (random weights, or ``true``: timm's hub weights):
    a backbone shipped with the package by name (:mod:`train.weights`), a run folder with a ``pretrain`` stage (its
    ``backbone.safetensors``), or a weights file."""
    if not isinstance(pretrained, str) or not _loads_weights(pretrained) or pretrained in ("true", "True"):
        return None
    from train.weights import SHIPPED

    if pretrained in SHIPPED:
        return SHIPPED[pretrained]
    path = Path(pretrained).expanduser()
    if path.is_dir():
        from train.runs import Run

        return Run.open(path).artifact("pretrain", "backbone")
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.pretrained={pretrained} is not a weights file, a run folder or one "
                                f"of the shipped backbones {sorted(SHIPPED)}")
    return path


def architecture(args: dict) -> dict:
    """The backbone kwargs that fix the weights' shapes (``NOT_ARCHITECTURE`` left out)."""
    return {k: v for k, v in args.items() if k not in NOT_ARCHITECTURE}


def check_card(path: Path, args: dict) -> None:
    """Refuse a pretrained backbone whose card (``path.json``, written by :func:`train.models.saving.save_backbone`)
    records another architecture than ``args``, naming the first key that differs. Files without a card pass."""
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return
    card = json.loads(card_path.read_text())
    if "architecture" not in card:
        return
    theirs, ours = card["architecture"], architecture(args)
    for key in sorted(theirs.keys() | ours.keys()):
        if theirs.get(key) != ours.get(key):
            raise ConfigError(f"model.backbone.{key}={ours.get(key)} but the weights {path} were pretrained with "
                              f"{key}={theirs.get(key)}: configure that architecture ({architecture(theirs)}), "
                              "or start from random weights with model.backbone.pretrained=false")


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a timm-layout state dict that does not fit ``model``: a missing or extra tensor (another depth) or one
    of another shape (another width), named; the classifier head and what timm resamples (``RESAMPLED``) aside. A
    file in another layout (no key in common) is left to the model's own converter."""
    head = model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None
    heads = {head} if isinstance(head, str) else set(head or ())

    def body(names) -> set[str]:
        return {n for n in names if n.rsplit(".", 1)[0] not in heads}

    own = model.state_dict()
    ours, theirs = body(own), body(state)
    if not ours & theirs:
        return
    for key in sorted(ours ^ theirs):
        where = "misses" if key in ours else "has an extra"
        raise ConfigError(f"the weights {path} do not fit model.backbone: the file {where} tensor {key!r} (another "
                          "depth or layout?); configure the architecture they were made for, or "
                          "model.backbone.pretrained=false")
    for key in sorted(ours):
        if own[key].shape != state[key].shape and key not in RESAMPLED:
            raise ConfigError(f"the weights {path} do not fit model.backbone: {key!r} is {tuple(state[key].shape)} in "
                              f"the file, {tuple(own[key].shape)} in the model (another width?); configure the "
                              "architecture they were made for, or model.backbone.pretrained=false")


def _weights_file_overlay(name: str, path: Path) -> dict:
    """timm's pretrained-config overlay that loads ``path``: a JAX ``.npz`` through the model's own reader; any other
    file (safetensors, a torch state dict or checkpoint) read here and handed over as a state dict, since timm before
    1.0.31 gives every file of a ViT to its ``.npz`` reader. timm then adapts the weights as for its own (position
    embeddings resampled, input convolution adapted); the head loads when the file's has as many classes as the
    model, and is left at its random start otherwise (an ImageNet head)."""
    if path.suffix == ".npz":
        return {"file": str(path), "custom_load": True}
    state = timm.models.load_state_dict(str(path))
    overlay = {"state_dict": state}
    heads = getattr(timm.models.get_pretrained_cfg(name), "classifier", None)
    head = heads if isinstance(heads, str) or heads is None else heads[0]
    if head is not None and f"{head}.weight" in state:
        overlay["num_classes"] = state[f"{head}.weight"].shape[0]
    return overlay


def _loads_weights(pretrained: bool | str) -> bool:
    """Whether ``model.backbone.pretrained`` asks for weights (True, a path) rather than a random start."""
    return bool(pretrained) and pretrained not in ("false", "False")


class HFImageClassifier(nn.Module):
    """A transformers image classifier seen as ``images -> logits``; the HF model is ``.model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Toggle activation checkpointing, like timm's ``set_grad_checkpointing``."""
        # transformers 5 renamed gradient_* to activation_*; the old names warn.
        prefix = "activation" if hasattr(self.model, "activation_checkpointing_enable") else "gradient"
        getattr(self.model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


def _create_transformers(name: str, pretrained: bool | str, num_classes: int, hf_config: dict | None = None,
                         **kwargs) -> HFImageClassifier:
    from transformers import AutoConfig, AutoModelForImageClassification

    labels = dict(LABELS) if num_classes == len(LABELS) else {i: f"LABEL_{i}" for i in range(num_classes)}
    label_args = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    if hf_config is not None:  # the architecture is given: no folder or hub access
        fields = {k: v for k, v in hf_config.items() if k not in ("id2label", "label2id")}
        config = AutoConfig.for_model(**fields, **label_args)
    else:
        if not Path(name).exists() and name.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"model.backbone.name={name} is not a folder with a transformers model")
        config = AutoConfig.from_pretrained(name, **label_args)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise ValueError(f"model.backbone.{key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    if _loads_weights(pretrained):
        model = AutoModelForImageClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)
    else:
        model = AutoModelForImageClassification.from_config(config)
    return HFImageClassifier(model)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``(grid_h * grid_w, dim)`` MAE-style table: first half of the channels encodes x, second half y."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                          torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(x), encode(y)], dim=1).float()


@torch.no_grad()
def init_pos_embed(model: nn.Module, kind: str, scale: float = 0.5) -> None:
    """Overwrite a timm ViT's patch rows of ``pos_embed`` (not the prefix tokens) with ``scale`` * table."""
    if kind not in POS_EMBED_INITS:
        raise ValueError(f"model.backbone.pos_embed_init={kind!r}; expected one of {POS_EMBED_INITS} or null")
    pos_embed = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(pos_embed, nn.Parameter) or grid is None:
        raise ValueError(f"pos_embed_init={kind!r} needs a timm ViT (pos_embed + patch_embed.grid_size); "
                         f"got {type(model).__name__}")
    n_patches = grid[0] * grid[1]
    if pos_embed.shape[1] < n_patches:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, fewer than the {n_patches} patches")
    table = sincos_2d(pos_embed.shape[-1], grid[0], grid[1])
    pos_embed[0, -n_patches:] = scale * table.to(pos_embed)


def feature_dim(model: nn.Module) -> int:
    """Width of a timm model's pooled (pre-logits) features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def pooled_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm classifier's (logits, pooled pre-logits features) in one pass."""
    if not hasattr(model, "forward_head"):
        raise ValueError(f"pooled features need a timm model (forward_features / forward_head); got "
                         f"{type(model).__name__}")
    pre = model.forward_head(model.forward_features(images), pre_logits=True)
    return model.get_classifier()(pre), pre
