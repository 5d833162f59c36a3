"""The process reward model: a small causal sequence model that scores every step of an inspection trace.

Step ``t`` of a trace is described by the view's pooled embedding, its logit margin, the running belief
(:func:`train.models.traces.running_belief`) and its magnitude, the view's slot and the step index; with
``use_global`` the global view's embedding (the trace's first step) is added to every step. A causal body
(a GRU, or pre-norm transformer blocks with causal attention) reads the steps in order and the head gives
one logit per step: P(continuing from this prefix ends with the right answer).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.saving import load_net, save_net

ARCHS = ("transformer", "gru")


class CausalBlock(nn.Module):
    """Pre-norm transformer block whose attention only looks back."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"prm width {width} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class ProcessRewardModel(nn.Module):
    """``(embeddings (B,T,D), margins (B,T), beliefs (B,T), slots (B,T) int64) -> step logits (B,T)``."""

    def __init__(self, embed_dim: int, n_slots: int, width: int = 64, arch: str = "transformer", layers: int = 2,
                 heads: int = 4, use_global: bool = True, max_steps: int = 32, dropout: float = 0.1):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"prm arch={arch!r}; allowed: {list(ARCHS)}")
        self.config = {"embed_dim": embed_dim, "n_slots": n_slots, "width": width, "arch": arch, "layers": layers,
                       "heads": heads, "use_global": use_global, "max_steps": max_steps, "dropout": dropout}
        self.use_global, self.arch = use_global, arch
        self.norm = nn.LayerNorm(embed_dim)
        self.embed = nn.Sequential(nn.Linear(embed_dim * (2 if use_global else 1) + 4, width), nn.GELU(),
                                   nn.Dropout(dropout))
        self.slot = nn.Embedding(n_slots, width)
        self.step = nn.Embedding(max_steps, width)
        if arch == "gru":
            self.body = nn.GRU(width, width, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        else:
            self.body = nn.Sequential(*[CausalBlock(width, heads, dropout) for _ in range(layers)])
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, embeddings: torch.Tensor, margins: torch.Tensor, beliefs: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        e = self.norm(embeddings.float())
        parts = [e, e[:, :1].expand_as(e)] if self.use_global else [e]
        beliefs = beliefs.float()
        scalars = torch.stack([margins.float(), beliefs, beliefs.abs(), torch.tanh(beliefs)], -1)
        steps = torch.arange(e.shape[1], device=e.device).clamp(max=self.step.num_embeddings - 1)
        x = self.embed(torch.cat(parts + [scalars], -1)) + self.slot(slots) + self.step(steps)
        x = self.body(x)[0] if self.arch == "gru" else self.body(x)
        return self.head(x).squeeze(-1)


def save_prm(model: ProcessRewardModel, path, extra: dict) -> tuple:
    """``path.safetensors`` + ``path.json`` (the constructor arguments and ``extra``: views, belief rule, search)."""
    return save_net(model, path, "roadwork-prm", {"prm": model.config, **extra})


def load_prm(path) -> tuple[ProcessRewardModel, dict]:
    """Inverse of :func:`save_prm`: (PRM in eval mode, its config)."""
    return load_net(path, lambda config: ProcessRewardModel(**config["prm"]))
