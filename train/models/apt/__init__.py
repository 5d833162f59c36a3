"""APT: content-adaptive patch sizes for a trained timm ViT (selection, multi-scale embedding, packing)."""
from train.models.apt.model import APTViT, MultiScalePatchEmbed
from train.models.apt.packing import BACKENDS, Packing, TokenPlan, packed_attention
from train.models.apt.selection import (PatchSelector, flat_selection, grayscale_255, patch_entropy, select_patches,
                                        token_counts)

__all__ = ["APTViT", "BACKENDS", "MultiScalePatchEmbed", "Packing", "PatchSelector", "TokenPlan", "flat_selection",
           "grayscale_255", "packed_attention", "patch_entropy", "select_patches", "token_counts"]
