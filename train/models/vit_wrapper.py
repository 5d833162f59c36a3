"""What a wrapper around a timm ViT (APT, the elastic draft) hands through to the wrapped model ``self.vit``."""
from __future__ import annotations

import torch.nn as nn

SUPPORTED_POOLS = ("token", "avg")


def vit_problems(vit: nn.Module, wrapper: str, hint: str = "") -> list[str]:
    """Why ``wrapper`` cannot wrap ``vit`` in general (an error if it is no timm ViT at all); callers add their own."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{wrapper} wraps timm VisionTransformer models; got {type(vit).__name__}{hint}")
    problems = []
    if getattr(vit, "attn_pool", None) is not None or vit.global_pool not in SUPPORTED_POOLS:
        problems.append(f"global_pool={vit.global_pool!r} (supported: {SUPPORTED_POOLS})")
    if getattr(vit, "dynamic_img_size", False):
        problems.append("dynamic_img_size=True")
    if vit.pos_embed is None:
        problems.append("no absolute position embedding")
    return problems


class ViTWrapper(nn.Module):
    """Delegates timm's model API (features, prefix tokens, head, weight-decay exclusions, checkpointing) to ``vit``."""

    vit: nn.Module

    @property
    def num_features(self) -> int:
        """The wrapped ViT's ``num_features``."""
        return self.vit.num_features

    @property
    def embed_dim(self) -> int:
        """The wrapped ViT's ``embed_dim``."""
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """The wrapped ViT's class and register tokens."""
        return self.vit.num_prefix_tokens

    def get_classifier(self) -> nn.Module:
        """The wrapped ViT's classification head."""
        return self.vit.get_classifier()

    def no_weight_decay(self) -> set[str]:
        """The wrapped ViT's parameters exempt from weight decay, named from this wrapper (``vit.`` prefix)."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn the wrapped ViT's gradient checkpointing on or off."""
        self.vit.set_grad_checkpointing(enable)
