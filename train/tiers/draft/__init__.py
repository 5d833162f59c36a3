"""The speculative draft: a small student distilled from the calibrated Stage-1, answering the easy queries first."""
from train.tiers.draft.module import DraftModule
from train.tiers.draft.tier import DraftTier

__all__ = ["DraftModule", "DraftTier"]
