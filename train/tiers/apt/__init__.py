"""APT: Stage-1 retrofitted with content-adaptive patch sizes in one epoch (Choudhury et al. 2025)."""
from train.tiers.apt.module import APTModule
from train.tiers.apt.tier import APTTier

__all__ = ["APTModule", "APTTier"]
