"""The difficulty router: predicts, per query, whether the draft and Stage-1 would answer it wrongly."""
from train.tiers.difficulty.module import DifficultyModule
from train.tiers.difficulty.tier import DifficultyTier

__all__ = ["DifficultyModule", "DifficultyTier"]
