"""Fine-tuning modes: full, linear probe, and LoRA / DoRA / rsLoRA adapters through ``peft``.

``apply_finetune`` returns a module that still maps ``images -> logits``; ``merge_finetune`` folds the
adapters back into the weights so the result loads into ``create_backbone(**backbone_args)``.
"""
from __future__ import annotations

import torch.nn as nn

from train.errors import ConfigError
from train.models.backbones import HFImageClassifier

FINETUNE_MODES = ("full", "linear_probe", "lora", "dora", "rslora")
TIMM_TARGETS = ("qkv", "proj", "fc1", "fc2")
# transformers < 5 names ViT layers query/key/value/dense; transformers 5 q_proj/k_proj/v_proj/o_proj/fc1/fc2.
HF_TARGETS = ("query", "key", "value", "dense", "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


def apply_finetune(model: nn.Module, mode: str = "full", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                   target_modules: list[str] | str | None = None, head: str | None = None) -> nn.Module:
    """Set up ``model`` for ``mode``; the classifier head (module name ``head``) always trains.

    ``target_modules`` are last name parts of the ``nn.Linear`` layers to adapt (a str is a peft regex).
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune mode={mode!r}; expected one of {FINETUNE_MODES}")
    if mode == "full":
        return model
    head = head or head_name(model)
    if mode == "linear_probe":
        model.requires_grad_(False)
        model.get_submodule(head).requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        default = HF_TARGETS if isinstance(model, HFImageClassifier) else TIMM_TARGETS
        target_modules = _linear_layers(model, default, head)
    elif not isinstance(target_modules, str):
        target_modules = check_target_modules(model, list(target_modules), head)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        use_dora=mode == "dora", use_rslora=mode == "rslora", modules_to_save=[head])
    return get_peft_model(model, config)


def merge_finetune(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA adapters into the base weights (``merge_and_unload``); other models pass through."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    args = model.get_base_model().backbone_args
    merged = model.merge_and_unload()
    merged.backbone_args = args
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def head_name(model: nn.Module) -> str:
    """Module name of the classifier head: timm's ``get_classifier()``, or ``model.classifier`` for HF."""
    if isinstance(model, HFImageClassifier):
        head = model.model.classifier
    elif hasattr(model, "get_classifier"):
        head = model.get_classifier()
    else:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}; pass head=")
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not name:
        raise ValueError(f"the classifier head of {type(model).__name__} is not a named submodule; pass head=")
    return name


def _linear_names(model: nn.Module, head: str) -> dict[str, list[str]]:
    """Last name part -> full names of the ``nn.Linear`` layers outside the head."""
    out: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n != head and not n.startswith(f"{head}."):
            out.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    return out


def _linear_layers(model: nn.Module, names: list[str] | tuple[str, ...], head: str,
                   available: dict[str, list[str]] | None = None) -> list[str]:
    """Full names of the ``nn.Linear`` layers whose last name part is in ``names``, outside the head."""
    available = _linear_names(model, head) if available is None else available
    found = [n for part, full in available.items() if part in names for n in full]
    if not found:
        raise ValueError(f"no nn.Linear layer named any of {list(names)} in {type(model).__name__}")
    return found


def check_target_modules(model: nn.Module, names: list[str], head: str | None = None) -> list[str]:
    """:func:`_linear_layers` for names a user gave: each must name a linear layer of ``model``, or the error lists
    the ones that do."""
    head = head or head_name(model)
    available = _linear_names(model, head)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"model.finetune.target_modules: {unknown} name no linear layer of "
                         f"{type(model).__name__}; allowed (last name parts of its nn.Linear layers, head excluded): "
                         f"{sorted(available)}")
    return _linear_layers(model, names, head, available)
