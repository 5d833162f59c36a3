"""Networks of every tier, created by name, and their fine-tuning modes."""
from train.models.backbones import HFImageClassifier, create_backbone
from train.models.finetune import FINETUNE_MODES, apply_finetune, count_parameters, merge_finetune

__all__ = ["FINETUNE_MODES", "HFImageClassifier", "apply_finetune", "count_parameters", "create_backbone",
           "merge_finetune"]
