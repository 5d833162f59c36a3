"""Stage-1: the binary roadwork classifier (timm or transformers backbone; full, linear-probe or PEFT fine-tuning)."""
from train.tiers.stage1.module import Stage1Module
from train.tiers.stage1.tier import Stage1Tier

__all__ = ["Stage1Module", "Stage1Tier"]
