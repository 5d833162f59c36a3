"""The fusion head: per-modality features (+ a presence mask) -> calibrated roadwork logits.

Every modality gets its own encoder (standardisation fitted on training rows, then an MLP) into a token; an absent
modality's features are replaced by zeros before encoding and its token is masked out of the fusion, so its values
cannot move the output. Fusions by name (:data:`FUSIONS`), all ``(tokens, present) -> pooled``:

- ``bottleneck``: a few learned latent tokens cross-attend to the present modality tokens (plus an always-present
  null token), then attend to each other (bottleneck / latent fusion);
- ``concat``: the tokens (zeroed where absent) and the presence bits, concatenated, through an MLP;
- ``gmu``: a gated multimodal unit: ``sum_m z_m tanh(W_m token_m)``, gates softmaxed over present modalities;
- ``late``: each modality's own logits (a linear head per token, trained by its own loss), averaged over the
  present ones.

``meta=True`` adds the "meta fusion" option: a learned per-input weight between the early fusion's logits and the
late fusion's average. :func:`modality_dropout` (ModDrop) hides modalities at random during training.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.saving import load_net, save_net

CLIP = 5.0  # standardised features are clipped to +-CLIP


class ModalityEncoder(nn.Module):
    """Standardise (``mean`` / ``std`` buffers, set by :meth:`fit`; clipped to +-``CLIP``), then MLP -> a ``width``
    token. A feature (nearly) constant in training keeps std 1, and the clip keeps a value never seen in training
    (a colour bin that was always empty) from swamping the token."""

    def __init__(self, dim: int, width: int, hidden: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width),
                                 nn.LayerNorm(width))

    @torch.no_grad()
    def fit(self, values: torch.Tensor) -> None:
        self.mean.copy_(values.mean(0))
        std = values.std(0) if len(values) > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        x = ((values - self.mean) / self.std).clamp(-CLIP, CLIP)
        x = torch.where(present[:, None], x, torch.zeros_like(values))
        return self.mlp(x)


class Attention(nn.Module):
    """Multi-head attention of ``q`` over ``kv`` with a key mask ``(B, T)`` (masked keys get weight exactly 0)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = q.shape
        split = lambda x: x.reshape(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        k, v = self.kv(kv).chunk(2, -1)
        scores = split(self.q(q)) @ split(k).transpose(-1, -2) / math.sqrt(d // self.heads)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return self.out((scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d))


class LatentBlock(nn.Module):
    """Latents cross-attend to the modality tokens, then self-attend, then an MLP (pre-norm, residual)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(4)])
        self.cross, self.self_attn = Attention(width, heads), Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * width, width))

    def forward(self, z: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = z + self.cross(self.norms[0](z), self.norms[1](tokens), mask)
        h = self.norms[2](z)
        z = z + self.self_attn(h, h)
        return z + self.mlp(self.norms[3](z))


class BottleneckFusion(nn.Module):
    """``latents`` learned tokens read the present modality tokens through ``layers`` latent blocks; output: their
    mean."""

    def __init__(self, n_modalities: int, width: int, hidden: int, dropout: float, latents: int = 4, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.modality_embed = nn.Parameter(torch.randn(n_modalities, width) * 0.02)
        self.latents = nn.Parameter(torch.randn(latents, width) * 0.02)
        self.null = nn.Parameter(torch.zeros(1, width))  # always present: attention is defined with no modality
        self.blocks = nn.ModuleList([LatentBlock(width, heads, dropout) for _ in range(layers)])
        self.norm, self.out_dim = nn.LayerNorm(width), width

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]  # not len(): it would fix the batch size in an exported graph
        kv = torch.cat([self.null.expand(b, 1, -1), tokens + self.modality_embed], 1)
        mask = torch.cat([torch.ones_like(present[:, :1]), present], 1)
        z = self.latents.expand(b, -1, -1)
        for block in self.blocks:
            z = block(z, kv, mask)
        return self.norm(z).mean(1)


def masked_flat(tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Tokens zeroed where absent, flattened, with the presence bits appended: ``(B, M * width + M)``."""
    return torch.cat([(tokens * present[..., None]).flatten(1), present.float()], 1)


class ConcatFusion(nn.Module):
    """Concatenated tokens (zeroed where absent) + presence bits through an MLP."""

    def __init__(self, n_modalities: int, width: int, hidden: int, dropout: float, **_):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_modalities * (width + 1), hidden), nn.GELU(), nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_flat(tokens, present))


class GatedMultimodalUnit(nn.Module):
    """GMU (Arevalo et al. 2017) for M modalities: gates from all tokens, softmaxed over the present ones and a null."""

    def __init__(self, n_modalities: int, width: int, hidden: int, dropout: float, **_):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Linear(width, hidden) for _ in range(n_modalities)])
        self.gate = nn.Linear(n_modalities * (width + 1), n_modalities + 1)
        self.null = nn.Parameter(torch.zeros(hidden))
        self.out_dim = hidden

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        h = torch.stack([torch.tanh(t(tokens[:, m])) for m, t in enumerate(self.transforms)]
                        + [self.null.expand(tokens.shape[0], -1)], 1)
        keep = torch.cat([present, torch.ones_like(present[:, :1])], 1)
        z = self.gate(masked_flat(tokens, present)).masked_fill(~keep, float("-inf")).softmax(-1)
        return (z[..., None] * h).sum(1)


class UnimodalHeads(nn.Module):
    """One linear roadwork head per modality token: ``(B, M, 2)`` logits."""

    def __init__(self, n_modalities: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_modalities, width, 2) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(n_modalities, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bmd,mdk->bmk", tokens, self.weight) + self.bias


def late_average(unimodal: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The present modalities' logits averaged (zeros, P = 0.5, when none is present)."""
    weights = present.float()[..., None]
    return (unimodal * weights).sum(1) / weights.sum(1).clamp(min=1)


FUSIONS = {"bottleneck": BottleneckFusion, "concat": ConcatFusion, "gmu": GatedMultimodalUnit, "late": None}


class FusionNet(nn.Module):
    """``(features: one (B, D_m) tensor per modality, present: (B, M) bool) -> (B, 2)`` calibrated logits.

    ``forward_all`` also returns the per-modality logits (for the late fusion's own losses) and, with ``meta``, the
    early fusion's logits and the per-input weight between early and late fusion.
    """

    def __init__(self, dims: dict[str, int], kind: str = "bottleneck", width: int = 64, hidden: int = 128,
                 dropout: float = 0.1, meta: bool = False, **fusion_kwargs):
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"fusion kind={kind!r}; allowed: {list(FUSIONS)}")
        if meta and kind == "late":
            raise ValueError("fusion meta=true mixes an early fusion with the late one: "
                             "pick kind=bottleneck|concat|gmu")
        self.modalities, self.kind, self.meta = list(dims), kind, meta
        self.fusion_args = {"dims": dict(dims), "kind": kind, "width": width, "hidden": hidden, "dropout": dropout,
                            "meta": meta, **fusion_kwargs}
        m = len(dims)
        self.encoders = nn.ModuleList([ModalityEncoder(d, width, hidden, dropout) for d in dims.values()])
        self.unimodal = UnimodalHeads(m, width) if kind == "late" or meta else None
        self.fusion = FUSIONS[kind](m, width, hidden, dropout, **fusion_kwargs) if kind != "late" else None
        self.head = nn.Linear(self.fusion.out_dim, 2) if self.fusion is not None else None
        self.mix = (nn.Sequential(nn.Linear(m * (width + 1), hidden), nn.GELU(), nn.Linear(hidden, 1))
                    if meta else None)
        self.register_buffer("temperature", torch.ones(()))

    def fit_normalisation(self, features: list[torch.Tensor], present: torch.Tensor) -> None:
        """Standardisation of each modality from the rows where it is present."""
        for m, (encoder, values) in enumerate(zip(self.encoders, features)):
            encoder.fit(values[present[:, m]] if present[:, m].any() else values)

    def forward_all(self, features: list[torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of one pass: ``logits`` (divided by the temperature), ``early`` with a fusion, ``unimodal`` and
        ``late`` with per-modality heads, and ``weight`` (of early against late fusion) with ``meta``."""
        present = present.bool()
        tokens = torch.stack([enc(x.float(), present[:, m])
                              for m, (enc, x) in enumerate(zip(self.encoders, features))], 1)
        out = {}
        if self.unimodal is not None:
            out["unimodal"] = self.unimodal(tokens)
            out["late"] = late_average(out["unimodal"], present)
        if self.fusion is not None:
            out["early"] = self.head(self.fusion(tokens, present))
        if self.meta:
            out["weight"] = torch.sigmoid(self.mix(masked_flat(tokens, present)))
            logits = out["weight"] * out["early"] + (1 - out["weight"]) * out["late"]
        else:
            logits = out["early"] if self.fusion is not None else out["late"]
        out["logits"] = logits / self.temperature
        return out

    def forward(self, features: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.forward_all(features, present)["logits"]

    @torch.no_grad()
    def fold_temperature(self, temperature: float) -> None:
        """Divide the logits by ``temperature`` too (it multiplies the stored temperature)."""
        self.temperature.mul_(float(temperature))


def modality_dropout(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ModDrop: each present modality hidden with probability ``p``; a row keeps at least one of its modalities."""
    if p <= 0:
        return present
    noise = torch.rand(present.shape, generator=generator, device=present.device)
    kept = present & (noise >= p)
    emptied = present.any(1) & ~kept.any(1)
    rescue = F.one_hot((noise * present).argmax(1), present.shape[1]).bool()  # one present modality, at random
    return torch.where(emptied[:, None], rescue & present, kept)


def save_fusion(net: FusionNet, path: Path, **extra) -> tuple[Path, Path]:
    """``path.safetensors`` + ``path.json`` (architecture, modality order and ``extra``: calibration, store, ...)."""
    return save_net(net, path, "roadwork-fusion", {"fusion": net.fusion_args, **extra})


def load_fusion(path: str | Path) -> tuple[FusionNet, dict]:
    """Inverse of :func:`save_fusion`: (fusion net in eval mode, its config)."""
    return load_net(path, lambda config: FusionNet(**config["fusion"]))


def conditions(modalities: list[str]) -> dict[str, torch.Tensor]:
    """Which modalities are kept: all, each one missing, each one alone."""
    eye = torch.eye(len(modalities), dtype=torch.bool)
    return {"all": torch.ones(len(modalities), dtype=torch.bool),
            **{f"without {m}": ~eye[k] for k, m in enumerate(modalities)},
            **{f"only {m}": eye[k] for k, m in enumerate(modalities)}}
