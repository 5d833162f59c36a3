"""Elastic visual-token compression (SpecVLM idea): a timm ViT draft that runs each image at its own token budget.

:class:`ElasticViT` wraps a timm ``VisionTransformer`` without changing its weights. After the patch and position
embeddings an image keeps a fraction (its *budget*) of the ``N`` patch tokens; the class and register tokens are
always kept, and at budget 1.0 the wrapped model's function is computed exactly.

- ``compress="prune"`` keeps the ``ceil(budget * N)`` most important patch tokens, in their original order.
  Importance = distance of a patch embedding from the image's mean patch embedding (a fixed prior: road and sky
  patches are alike, cones, signs and barriers stand out, so the model is sensible before any training) + a
  zero-initialised ``Linear(dim, 1)``, learned through a straight-through scale on the kept tokens (x1 forward).
- ``compress="pool"`` averages the patch grid (2x2 for 1/4, 2x1 for 1/2), position embeddings included, as one
  matrix product with a fixed pooling matrix (the same code runs eagerly and in ONNX).

A ``selector`` picks each image's budget: ``gate`` (a small network on the patch-embedding statistics;
straight-through Gumbel-softmax in training, argmax in eval), ``entropy`` (mean per-patch grayscale entropy against
fitted thresholds, as APT measures complexity) or ``fixed``. In eval, images are grouped by budget and each group
runs once at its token count; :meth:`ElasticViT.export_module` is the batch-1 graph for ONNX.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.apt.selection import grayscale_255, patch_entropy
from train.models.vit_wrapper import ViTWrapper, vit_problems

COMPRESSORS = ("prune", "pool")
SELECTORS = ("gate", "entropy", "fixed")


class ElasticOutput(NamedTuple):
    """What :class:`ElasticViT` returns: logits, pooled features, each image's budget index, the gate's logits
    (``selector="gate"`` only) and the mean fraction of patch tokens used."""
    logits: torch.Tensor               # (B, classes)
    features: torch.Tensor             # (B, num_features): pooled pre-head features (for the feature loss)
    budget_index: torch.Tensor         # (B,) long: index into ``budgets``
    gate_logits: torch.Tensor | None   # (B, len(budgets)) with selector="gate", else None
    expected_budget: torch.Tensor      # scalar: mean fraction of patch tokens used (the gate's expectation in training)


def _check_supported(vit: nn.Module) -> None:
    problems = vit_problems(vit, "ElasticViT")
    if problems:
        raise ValueError(f"ElasticViT cannot wrap this {type(vit).__name__}: {'; '.join(problems)}")


def prune_count(budget: float, n_patches: int) -> int:
    """Patch tokens kept by ``prune`` at ``budget``: ``ceil(budget * N)`` (at least 1)."""
    return max(1, math.ceil(budget * n_patches - 1e-9))


def pool_kernel(budget: float) -> tuple[int, int]:
    """``(rows, cols)`` pooled into one token: ``1/budget`` rounded, split as squarely as possible (rows >= cols)."""
    factor = max(1, round(1 / budget))
    cols = max(d for d in range(1, math.isqrt(factor) + 1) if factor % d == 0)
    return factor // cols, cols


def pool_matrix(grid: Sequence[int], kernel: Sequence[int]) -> torch.Tensor:
    """``(N_out, N)``: row ``o`` averages the base cells of output cell ``o`` (edge cells average what they cover)."""
    (gh, gw), (kh, kw) = grid, kernel
    out_w = -(-gw // kw)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    cell = (rows // kh * out_w + cols // kw).flatten()
    matrix = F.one_hot(cell, -(-gh // kh) * out_w).T.float()
    return matrix / matrix.sum(1, keepdim=True)


def entropy_thresholds(complexity: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """Thresholds so that a fraction ``shares[i]`` of ``complexity`` falls in budget ``i`` (quantiles, ascending)."""
    shares = torch.tensor([float(s) for s in shares], dtype=torch.float64)
    if len(shares) < 2 or (shares <= 0).any():
        raise ValueError(f"entropy shares must be >= 2 positive numbers (one per budget); got {shares.tolist()}")
    quantiles = (shares.cumsum(0) / shares.sum())[:-1]
    return torch.quantile(complexity.double(), quantiles).float()


class TokenImportance(nn.Module):
    """Score per patch token: ``||x_i - mean_j x_j||`` (fixed prior) + ``Linear(dim, 1)`` (zero-initialised).

    The input is detached: the scorer learns only through the straight-through scale in :meth:`ElasticViT._prune`.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.detach()
        return (x - x.mean(1, keepdim=True)).norm(dim=-1) + self.linear(x).squeeze(-1)


class BudgetGate(nn.Module):
    """Logits over budgets from per-channel mean and std of an image's patch embeddings (input detached).

    The last layer starts at zero: a uniform gate, so every budget is tried (and trained) at first.
    """

    def __init__(self, dim: int, n_budgets: int, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.fc1, self.act, self.fc2 = nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, n_budgets)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.detach()
        stats = torch.cat([x.mean(1), x.std(1)], dim=-1)
        return self.fc2(self.act(self.fc1(self.norm(stats))))


class ElasticViT(ViTWrapper):
    """A timm ViT at a per-image token budget: ``images -> ElasticOutput``; :meth:`classify` gives plain logits.

    ``budgets``: strictly increasing fractions of patch tokens in (0, 1]. ``thresholds`` (entropy selector,
    ``len(budgets) - 1`` ascending bits; or :meth:`fit_thresholds`): an image whose mean patch entropy is at least
    ``thresholds[i]`` gets a budget above ``i``. ``fixed_budget`` (fixed selector): one of ``budgets`` (default the
    largest). ``tau``: Gumbel-softmax temperature. ``train_all_budgets``: in gate training, run every budget on
    every image and mix by the one-hot (the full straight-through gradient, sum(budgets) x the tokens), else only
    each image's chosen budget (cheaper; the gate's gradient then comes from the chosen budget alone).
    Setting ``selector = "fixed"`` and ``fixed_index`` at run time forces one budget (e.g. to evaluate each).
    """

    def __init__(self, vit: nn.Module, budgets: Sequence[float] = (0.25, 0.5, 1.0), compress: str = "prune",
                 selector: str = "gate", thresholds: Sequence[float] | None = None, fixed_budget: float | None = None,
                 mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3, tau: float = 1.0,
                 gate_hidden: int = 64, train_all_budgets: bool = True):
        super().__init__()
        _check_supported(vit)
        self.budgets = [float(b) for b in budgets]
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets) or self.budgets != sorted(set(self.budgets)):
            raise ValueError(f"elastic budgets must be strictly increasing fractions in (0, 1]; got {list(budgets)}")
        if compress not in COMPRESSORS:
            raise ValueError(f"elastic compress={compress!r}; expected one of {COMPRESSORS}")
        if selector not in SELECTORS:
            raise ValueError(f"elastic selector={selector!r}; expected one of {SELECTORS}")
        self.vit, self.compress, self.selector = vit, compress, selector
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.tau, self.gate_hidden, self.train_all_budgets = float(tau), gate_hidden, train_all_budgets
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self._init_budgets()
        dim = vit.embed_dim
        self.importance = TokenImportance(dim) if compress == "prune" else None
        self.gate = BudgetGate(dim, len(self.budgets), gate_hidden) if selector == "gate" else None
        self._init_selector(thresholds, fixed_budget)
        self.backbone_args = getattr(vit, "backbone_args", {})

    def _init_budgets(self) -> None:
        """Token counts (and, for pool, the stacked pooling matrices with each budget's first row) per budget."""
        if self.compress == "prune":
            counts, offsets = [prune_count(b, self.num_patches) for b in self.budgets], [0] * len(self.budgets)
        else:
            kernels = [pool_kernel(b) for b in self.budgets]
            if len(set(kernels)) < len(kernels):
                raise ValueError(f"elastic pool: budgets {self.budgets} give the pooling kernels {kernels}; "
                                 "pooling can only reach 1/integer fractions, so use distinct ones")
            matrices = [pool_matrix(self.grid, k) for k in kernels]
            counts = [len(m) for m in matrices]
            offsets = [sum(counts[:i]) for i in range(len(counts))]
            self.register_buffer("pool_matrices", torch.cat(matrices), persistent=False)
        self._counts, self._offsets = counts, offsets  # python ints for the eager path (no device sync)
        self.register_buffer("counts", torch.tensor(counts), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        self.register_buffer("fractions", torch.tensor(counts) / self.num_patches, persistent=False)

    def _init_selector(self, thresholds: Sequence[float] | None, fixed_budget: float | None) -> None:
        if self.selector == "entropy":
            n = len(self.budgets) - 1
            values = [float("nan")] * n if thresholds is None else [float(t) for t in thresholds]
            if len(values) != n or values != sorted(values):
                raise ValueError(f"elastic entropy thresholds: {n} ascending values for {len(self.budgets)} budgets; "
                                 f"got {list(thresholds)}")
            self.register_buffer("thresholds", torch.tensor(values))  # fitted: saved with the weights
        fixed = self.budgets[-1] if fixed_budget is None else float(fixed_budget)
        if fixed not in self.budgets:
            raise ValueError(f"elastic fixed_budget={fixed_budget} is not one of the budgets {self.budgets}")
        self.fixed_index = self.budgets.index(fixed)

    @property
    def elastic_args(self) -> dict:
        """What rebuilds this wrapper around ``create_backbone(**backbone_args)`` (thresholds are in the weights)."""
        return {"budgets": self.budgets, "compress": self.compress, "selector": self.selector,
                "fixed_budget": self.budgets[self.fixed_index], "mean": self.mean, "std": self.std, "tau": self.tau,
                "gate_hidden": self.gate_hidden, "train_all_budgets": self.train_all_budgets}

    def token_counts(self, budget_index: torch.Tensor) -> torch.Tensor:
        """Patch tokens used per image (prefix tokens not counted)."""
        return self.counts[budget_index]

    # --- budget selection ------------------------------------------------------------------------

    @torch.no_grad()
    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        """Mean per-patch grayscale entropy (bits, 512 bins, the ViT's patch size) of normalised images: ``(B,)``."""
        gray = grayscale_255(images, self.mean, self.std)
        return patch_entropy(gray, self.vit.patch_embed.patch_size[0]).mean((1, 2))

    @torch.no_grad()
    def fit_thresholds(self, images: torch.Tensor, shares: Sequence[float] | None = None) -> torch.Tensor:
        """Entropy selector: thresholds giving budget ``i`` the share ``shares[i]`` of ``images`` (default equal)."""
        if self.selector != "entropy":
            raise ValueError(f"fit_thresholds is for selector='entropy'; this model's selector is {self.selector!r}")
        shares = [1.0] * len(self.budgets) if shares is None else shares
        if len(shares) != len(self.budgets):
            raise ValueError(f"{len(shares)} shares for {len(self.budgets)} budgets")
        self.thresholds.copy_(entropy_thresholds(self.complexity(images), shares))
        return self.thresholds.clone()

    def select(self, images: torch.Tensor, gate_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The eval-mode budget index per image ``(B,)``: gate argmax, entropy against thresholds, or fixed."""
        if self.selector == "gate":
            if gate_logits is None:
                gate_logits = self.gate(self.vit.patch_embed(images))
            return gate_logits.argmax(-1)
        if self.selector == "entropy":
            if not _tracing() and self.thresholds.isnan().any():
                raise RuntimeError("ElasticViT(selector='entropy') has no thresholds: pass thresholds= or call "
                                   "fit_thresholds(images) first")
            return (self.complexity(images)[:, None] >= self.thresholds).sum(1)
        return torch.full((len(images),), self.fixed_index, dtype=torch.long, device=images.device)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> ElasticOutput:
        patches = self.vit.patch_embed(images)                        # (B, N, dim), before position embeddings
        gate_logits = self.gate(patches) if self.selector == "gate" else None  # (selector may be switched to fixed)
        scores = self.importance(patches) if self.importance is not None else None
        tokens = self.vit._pos_embed(patches)                         # prefix tokens, then the patch grid
        if gate_logits is not None and self.training:
            choice = F.gumbel_softmax(gate_logits.float(), tau=self.tau, hard=True)  # one-hot forward, soft backward
            index = choice.argmax(-1)
            features = self._mixed(tokens, scores, choice, index)
            expected = (gate_logits.float().softmax(-1) @ self.fractions.float()).mean()  # E_gate[fraction]
        else:
            index = self.select(images, gate_logits)
            features = self._grouped(tokens, scores, index)
            expected = self.fractions[index].mean()
        return ElasticOutput(self.vit.head(features), features, index, gate_logits, expected)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Plain ``images -> logits``."""
        return self(images).logits

    def _mixed(self, tokens: torch.Tensor, scores: torch.Tensor | None, choice: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        """Features mixed over budgets by the straight-through one-hot ``choice``, so the gate gets a gradient."""
        if self.train_all_budgets:
            runs = [self._run(tokens, scores, b) for b in range(len(self.budgets))]
            return sum(choice[:, b, None].to(f.dtype) * f for b, f in enumerate(runs))
        features = self._grouped(tokens, scores, index)
        return choice.gather(1, index[:, None]).to(features.dtype) * features  # weight 1, gradient to the gate

    def _grouped(self, tokens: torch.Tensor, scores: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """Each budget's images run together at that budget's token count; features back in batch order."""
        rows, parts = [], []
        for b in index.unique().tolist():
            chosen = (index == b).nonzero().squeeze(1)
            rows.append(chosen)
            parts.append(self._run(tokens[chosen], None if scores is None else scores[chosen], b))
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts)[torch.cat(rows).argsort()]

    def _run(self, tokens: torch.Tensor, scores: torch.Tensor | None, b: int) -> torch.Tensor:
        """Pooled features of embedded ``tokens`` compressed to budget ``b``."""
        return self._encode(self._compress(tokens, scores, self._counts[b], self._offsets[b]))

    def _compress(self, tokens: torch.Tensor, scores: torch.Tensor | None, k, offset) -> torch.Tensor:
        """Prefix tokens + ``k`` patch tokens; ``k`` and ``offset`` are ints or graph values (ONNX export)."""
        full = isinstance(k, int) and k == self.num_patches
        if full and (self.compress == "pool" or not self.training):  # (training prune: the score still learns)
            return tokens
        p = self.num_prefix_tokens
        patches = tokens[:, p:]
        if self.compress == "prune":
            patches = self._prune(patches, scores, k)
        else:
            patches = torch.matmul(self.pool_matrices[offset:offset + k].to(patches.dtype), patches)
        return torch.cat([tokens[:, :p], patches], dim=1)

    def _prune(self, patches: torch.Tensor, scores: torch.Tensor, k) -> torch.Tensor:
        """The ``k`` highest-scoring patch tokens in their original order (ties: the earlier patch)."""
        if _tracing():  # the ONNX exporters have no stable sort; ONNX TopK also puts the earlier of equals first
            ranked = scores.topk(k, dim=1).indices
        else:
            ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        keep = ranked.sort(dim=1).values
        kept = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        if self.training:  # straight-through scale: exactly 1 forward, d(loss)/d(score) backward
            s = scores.gather(1, keep)
            kept = kept * (1 + (s - s.detach()))[..., None].to(kept.dtype)
        return kept

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped ViT after its position embeddings: blocks, norm, pooling, ``fc_norm`` (pre-logits)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(x))
        if vit.grad_checkpointing and self.training and torch.is_grad_enabled():
            from timm.models import checkpoint_seq
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.forward_head(vit.norm(x), pre_logits=True)

    def export_module(self) -> ElasticClassifier:
        """The eval path of one image as an ``images -> logits`` module (puts this model in eval mode)."""
        return ElasticClassifier(self).eval()


class ElasticClassifier(nn.Module):
    """``images (1, 3, H, W) -> logits (1, classes)``, the budget chosen inside the graph: what ONNX export traces.

    Works with both ``torch.onnx.export`` exporters: the TorchScript one (``dynamo=False``, opset 17 here) keeps
    the token count a graph value; the dynamo one (opset 18) makes it an unbacked symbolic size.
    """

    def __init__(self, model: ElasticViT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        if images.shape[0] != 1:
            raise ValueError(f"the elastic export graph runs one image at a time; got a batch of {images.shape[0]}")
        patches = m.vit.patch_embed(images)
        gate_logits = m.gate(patches) if m.selector == "gate" else None
        b = m.select(images, gate_logits)[0]
        k = _graph_int(m.counts[b], 1, m.num_patches)
        offset = _graph_int(m.offsets[b], 0, sum(m._counts) - 1) if m.compress == "pool" else 0
        if m.compress == "pool" and not _tracing():
            torch._check(offset + k <= sum(m._counts))
        scores = m.importance(patches) if m.importance is not None else None
        return m.vit.head(m._encode(m._compress(m.vit._pos_embed(patches), scores, k, offset)))


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _graph_int(value: torch.Tensor, low: int, high: int):
    """A data-dependent size: the 0-d tensor itself under TorchScript tracing, else an int (symbolic when exporting)."""
    if torch.jit.is_tracing():
        return value
    value = value.item()
    torch._check(value >= low)
    torch._check(value <= high)
    return value


def elastic_vit(vit: nn.Module | dict, **kwargs) -> ElasticViT:
    """An :class:`ElasticViT` around ``vit``, or around ``create_backbone(**vit)`` when given backbone arguments."""
    if isinstance(vit, dict):
        from train.models.backbones import create_backbone
        vit = create_backbone(**vit)
    return ElasticViT(vit, **kwargs)
