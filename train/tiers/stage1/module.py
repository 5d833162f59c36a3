"""The Stage-1 classifier's LightningModule: a timm or transformers backbone, full / probe / PEFT fine-tuning."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from train.models import apply_finetune, count_parameters, create_backbone, merge_finetune
from train.tiers.classifier import ClassifierModule
from train.tiers.training import consolidated_checkpoint

log = logging.getLogger(__name__)


class Stage1Module(ClassifierModule):
    """The Stage-1 backbone trained by :class:`ClassifierModule`.

    ``img_size``, ``mean`` and ``std`` are the input spec, saved with the checkpoint.
    ``finetune`` picks full / linear_probe / lora / dora / rslora (:func:`apply_finetune`).
    ``mixup`` is timm's :class:`~timm.data.Mixup` kwargs (mixup_alpha, cutmix_alpha, prob, ...).
    """

    def __init__(self, backbone: dict, optimizer: Callable, scheduler: Callable | None = None,
                 finetune: dict | None = None, img_size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, mixup: dict | None = None,
                 layer_decay: float | None = None, channels_last: bool = False, compile: bool = False,
                 grad_checkpointing: bool = False, val_levels: Sequence[int] = (0,),
                 test_levels: Sequence[int] = (0, 1, 2, 3), bootstrap: int = 1000):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_weights"])
        net = create_backbone(**backbone)
        if grad_checkpointing:
            net.set_grad_checkpointing(True)
        finetune = finetune or {"mode": "full"}
        self.finetune_mode = finetune.get("mode", "full")
        self.net = apply_finetune(net, **finetune)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: parameter names (and checkpoints) stay as they are
        self.channels_last = channels_last
        self.setup_classifier(optimizer, scheduler, label_smoothing, class_weights, mixup, layer_decay,
                              val_levels, test_levels, bootstrap)
        trainable, total = count_parameters(self.net)
        log.info("stage1 %s (%s): %s of %s parameters trainable (%.2f%%)", backbone["name"],
                 self.finetune_mode, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Stage1Module":
        """The module saved in a Stage-1 checkpoint (a file, or a DeepSpeed folder: converted to fp32 first), on the
        CPU and uncompiled, for its weights."""
        return cls.load_from_checkpoint(consolidated_checkpoint(path), map_location="cpu", optimizer=None,
                                        compile=False, weights_only=True)

    def plain_model(self) -> nn.Module:
        """The backbone with any LoRA/DoRA merged in: what later tasks and export load."""
        return merge_finetune(self.net)

    @property
    def input_spec(self) -> dict:
        """The input spec saved with the model: size, mean, std, resize, channel order and layout."""
        return {"img_size": self.hparams.img_size, "mean": list(self.hparams.mean), "std": list(self.hparams.std),
                "interpolation": "area", "channel_order": "RGB", "layout": "NCHW"}
