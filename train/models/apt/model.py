"""APT retrofit of a timm ViT: multi-scale patch embedding over a packed, variable-length sequence.

:class:`APTViT` wraps a trained timm ``VisionTransformer`` without changing its weights. A patch of
``p * 2**k`` pixels becomes one token: the pretrained patch embedding of the patch downsampled to
``p x p`` + a zero-initialised linear layer over its ``p x p`` sub-patch embeddings aggregated by
``k`` learned 2x2 stride-2 convolutions + the position embedding averaged over the base cells it
covers. With only base patches selected (or before any training) it computes exactly the wrapped
model's function. The class token and register tokens are kept; images are packed end to end
and attend only to themselves (:mod:`train.models.apt.packing`).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.apt.packing import Packing, TokenPlan, packed_attention, resolve_backend
from train.models.apt.selection import PatchSelector, flat_selection
from train.models.vit_wrapper import ViTWrapper, vit_problems

def base_patch_size(vit: nn.Module) -> int:
    """The patch size of a timm ViT that APT can wrap (a clear error for any other model)."""
    _check_supported(vit)
    return vit.patch_embed.patch_size[0]


def _check_supported(vit: nn.Module) -> None:
    from timm.models.vision_transformer import Attention, Block

    problems = vit_problems(vit, "APT", " (transformers backbones and CNNs have no patch tokens to merge)")
    if not isinstance(vit.patch_embed.proj, nn.Conv2d):
        problems.append("patch_embed.proj is not a Conv2d")
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            problems.append(f"block {i} is {type(blk).__name__}/{type(blk.attn).__name__} (supported: Block/Attention)")
            break
    if problems:
        raise ValueError(f"APT cannot wrap this {type(vit).__name__}: {'; '.join(problems)}")


class MultiScalePatchEmbed(nn.Module):
    """The token table of every candidate patch at every scale: ``(B, N_0 + N_1 + ..., dim)``."""

    def __init__(self, vit: nn.Module, n_scales: int = 3):
        super().__init__()
        dim = vit.embed_dim
        self.n_scales = n_scales
        # one 2x2 stride-2 convolution per doubling, and a zero-initialised linear layer per larger scale
        self.aggregate = nn.ModuleList([nn.Conv2d(dim, dim, 2, stride=2) for _ in range(n_scales - 1)])
        self.zero_linear = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_scales - 1)])
        for layer in self.zero_linear:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _embed(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The pretrained patch embedding (conv, flatten, norm) on any image size: ``(B, N, dim)``, grid."""
        grid = vit.patch_embed.proj(images)
        tokens = vit.patch_embed.norm(grid.flatten(2).transpose(1, 2))
        return tokens, grid.shape[-2:]

    def forward(self, vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        base, (gh, gw) = self._embed(vit, images)
        if (gh, gw) != tuple(vit.patch_embed.grid_size):
            raise ValueError(f"APT: images of {tuple(images.shape[-2:])} px give a {gh}x{gw} patch grid; the ViT "
                             f"was built for {tuple(vit.patch_embed.img_size)} px")
        n_base = gh * gw
        pos_grid = vit.pos_embed[:, -n_base:].transpose(1, 2).reshape(1, -1, gh, gw)
        rows = [base + vit.pos_embed[:, -n_base:]]
        sub = base.unflatten(1, (gh, gw))  # full-resolution sub-patch embeddings, channels last
        for k in range(1, self.n_scales):
            factor = 1 << k
            coarse, grid = self._embed(vit, F.avg_pool2d(images, factor))  # the patch downsampled to p x p
            sub = _conv2x2(sub, self.aggregate[k - 1])
            aggregated = self.zero_linear[k - 1](sub.flatten(1, 2))
            pos = F.avg_pool2d(pos_grid, factor).flatten(2).transpose(1, 2)  # mean over the covered base cells
            if sub.shape[1:3] != grid or pos.shape[1] != coarse.shape[1]:
                raise ValueError(f"scale {k}: grids disagree ({tuple(sub.shape[1:3])} vs {tuple(grid)})")
            rows.append(coarse + aggregated + pos)
        return torch.cat(rows, dim=1)


def _conv2x2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (2x2, stride 2) on channels-last ``(B, H, W, C)`` as one matrix product (odd edges dropped)."""
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    blocks = x[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h2, w2, 4 * c)
    return F.linear(blocks, conv.weight.reshape(conv.out_channels, -1), conv.bias)


class APTViT(ViTWrapper):
    """A timm ViT with content-adaptive patch sizes: ``images -> logits`` over packed variable-length sequences.

    ``thresholds[k - 1]`` is the entropy (bits) below which a ``patch * 2**k`` patch is used;
    ``attention`` picks the packed-attention kernel (``auto``: jagged SDPA on CUDA, padded SDPA on CPU).
    """

    def __init__(self, vit: nn.Module, thresholds: Sequence[float] = (5.5, 4.5), mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3, attention: str = "auto"):
        super().__init__()
        self.patch = base_patch_size(vit)
        self.vit = vit
        self.thresholds = [float(t) for t in thresholds]
        self.mean, self.std = list(mean), list(std)
        resolve_backend(attention, torch.device("cpu"))  # a known name
        self.attention = attention
        self.embed = MultiScalePatchEmbed(vit, len(self.thresholds) + 1)
        self.base_only_active = False
        self.backbone_args = getattr(vit, "backbone_args", {})

    @property
    def apt_args(self) -> dict:
        """What rebuilds this wrapper around ``create_backbone(**backbone_args)`` (saved with the weights)."""
        return {"thresholds": self.thresholds, "mean": self.mean, "std": self.std}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer-decay groups: the new layers learn at the head's rate (they match no group)."""
        return {"stem": r"^vit\.(?:cls_token|pos_embed|reg_token|patch_embed)",
                "blocks": r"^vit\.blocks\.(\d+)" if coarse else [(r"^vit\.blocks\.(\d+)", None),
                                                                  (r"^vit\.norm", (99999,))]}

    @contextmanager
    def base_only(self):
        """Within the block, only base patches are chosen (plans made outside are ignored): the wrapped model."""
        saved = self.thresholds
        self.thresholds, self.base_only_active = [float("-inf")] * len(saved), True
        try:
            yield self
        finally:
            self.thresholds, self.base_only_active = saved, False

    @property
    def base_tokens(self) -> int:
        """Patch tokens of the unmodified model."""
        return self.vit.patch_embed.num_patches

    def selector(self) -> PatchSelector:
        """The current selection rule, runnable anywhere (data-loader workers included)."""
        return PatchSelector(self.patch, self.thresholds, self.mean, self.std)

    def select(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The patch masks per scale of a batch of normalised images (no gradient)."""
        return self.selector().masks(images)

    def plan(self, images: torch.Tensor | None = None, masks: Sequence[torch.Tensor] | None = None,
             keep: torch.Tensor | None = None) -> TokenPlan:
        """The packing of a batch, from its images, masks per scale or ``(B, N_table)`` selection."""
        if keep is None:
            keep = flat_selection(masks if masks is not None else self.select(images))
        return TokenPlan.from_keep(keep, self.num_prefix_tokens)

    def forward(self, images: torch.Tensor, masks: Sequence[torch.Tensor] | None = None,
                plan: TokenPlan | None = None) -> torch.Tensor:
        """Logits of a batch; ``plan`` (from the data loader, say) saves the selection and its device syncs."""
        if plan is None or self.base_only_active:
            plan = self.plan(images, masks)  # on the device: reading the packed sizes syncs once
        plan = plan.to(images.device, non_blocking=True)
        table = self.embed(self.vit, images)                 # (B, N_table, dim)
        tokens = plan.gather(self._prefix(len(images)), table)
        return self.forward_packed(tokens, plan.packing)

    def forward_tokens(self, images: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """One image ``(1, 3, H, W)`` and its chosen rows of the token table: the exported ONNX graph."""
        table = self.embed(self.vit, images)
        tokens = torch.cat([self._prefix(1)[0], table[0].index_select(0, token_index)])
        x = self._features(tokens, Packing.from_lengths(torch.ones(1, dtype=torch.long)))  # one sequence: no mask
        pooled = x[self.num_prefix_tokens:].mean(0, keepdim=True) if self.vit.global_pool == "avg" else x[:1]
        return self._head(pooled)

    def _prefix(self, batch: int) -> torch.Tensor:
        """Class and register tokens with their position embeddings: ``(batch, prefix, dim)``."""
        vit = self.vit
        parts = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if not parts:
            return vit.pos_embed.new_zeros(batch, 0, vit.embed_dim)
        prefix = torch.cat(parts, dim=1)
        if not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, :prefix.shape[1]]
        return prefix

    def forward_packed(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Blocks, final norm, pooling per image and head over a packed ``(T, dim)`` sequence."""
        packing.prepare(self.attention)  # host-side sizes now, so the blocks run (and compile) without syncs
        x = self._features(tokens, packing)
        if self.vit.global_pool == "avg":  # mean over each image's patch tokens (a masked sum: no device sync)
            patch = (packing.position >= self.num_prefix_tokens).unsqueeze(1).to(x.dtype)
            pooled = torch.zeros(len(packing.lengths), x.shape[1], dtype=x.dtype, device=x.device)
            pooled = pooled.index_add(0, packing.document, x * patch)
            pooled = pooled / (packing.lengths - self.num_prefix_tokens).clamp(min=1).unsqueeze(1).to(x.dtype)
        else:
            pooled = x[packing.offsets[:-1]]
        return self._head(pooled)

    def compile_parts(self, **kwargs) -> None:
        """``torch.compile`` in place (parameter names unchanged): the multi-scale embedding (fixed shapes) and
        the blocks over packed sequences (dynamic token count)."""
        self.embed.compile(**kwargs)
        self._features = torch.compile(self._features, dynamic=True, **kwargs)

    def _features(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        vit = self.vit
        backend = self.attention  # resolved per call from q's device and dtype (bf16 under autocast)
        x = vit.norm_pre(vit.pos_drop(tokens))
        for blk in vit.blocks:
            if vit.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(_block, blk, x, packing, backend, use_reentrant=False)
            else:
                x = _block(blk, x, packing, backend)
        return vit.norm(x)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.vit.head(self.vit.head_drop(self.vit.fc_norm(pooled)))


def _drop_path(x: torch.Tensor, module: nn.Module, packing: Packing, training: bool) -> torch.Tensor:
    """timm's DropPath, per image rather than per packed token."""
    p = getattr(module, "drop_prob", 0.0)
    if not training or not p:
        return x
    keep = x.new_empty(len(packing.lengths)).bernoulli_(1 - p) / (1 - p)
    return x * keep[packing.document].unsqueeze(1)


def _block(blk: nn.Module, x: torch.Tensor, packing: Packing, backend: str) -> torch.Tensor:
    """A timm ``Block`` on a packed sequence, with its own weights."""
    y = _attention(blk.attn, blk.norm1(x), packing, backend)
    x = x + _drop_path(blk.ls1(y), blk.drop_path1, packing, blk.training)
    return x + _drop_path(blk.ls2(blk.mlp(blk.norm2(x))), blk.drop_path2, packing, blk.training)


def _attention(attn: nn.Module, x: torch.Tensor, packing: Packing, backend: str) -> torch.Tensor:
    """A timm ``Attention`` (qkv, q/k norm, optional gate, proj) with per-image packed attention."""
    n = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).view(n, 3, attn.num_heads, -1)
    backend = resolve_backend(backend, x.device, qkv.dtype)
    # q, k, v (T, heads, head_dim): strided views for FlashAttention's varlen kernel, contiguous copies for the rest
    q, k, v = qkv.unbind(1) if backend == "varlen" else qkv.transpose(0, 1).contiguous().unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = packed_attention(q, k, v, packing, backend, dropout).reshape(n, -1)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
