"""The cross-modal fusion head over the feature store, robust to missing modalities."""
from train.tiers.fusion.module import FusionModule
from train.tiers.fusion.tier import FusionTier

__all__ = ["FusionModule", "FusionTier"]
