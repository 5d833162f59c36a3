"""The process reward model and the PRM-guided test-time search over multi-view inspection traces."""
from train.tiers.prm.module import PRMModule, TraceDataset, batched
from train.tiers.prm.tier import PRMTier

__all__ = ["PRMModule", "PRMTier", "TraceDataset", "batched"]
