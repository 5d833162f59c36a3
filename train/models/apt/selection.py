"""APT patch-size selection: per-patch grayscale entropy at scales p, 2p, 4p, chosen as a quadtree.

A larger patch is chosen where its entropy is below that scale's threshold; a chosen patch masks the
smaller patches beneath it; patches that do not fit whole stay at the smaller scale. Batched torch
(CPU or GPU, also usable in data-loader workers); the selection is a list of boolean masks, one per
scale, on that scale's grid of whole patches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # on 0-255 RGB
BINS = 512                              # histogram bins over [0, 256)


def grayscale_255(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised model input -> ``(B, H, W)`` gray level on 0-255 (float32)."""
    x = pixel_values.float()
    gray = torch.zeros_like(x[:, 0])
    for c in range(3):  # python-float constants: no host-to-device copy (which would synchronise the GPU)
        gray += GRAY_WEIGHTS[c] * ((x[:, c] * std[c] + mean[c]) * 255).clamp(0, 255)
    return gray


def patch_histograms(gray: torch.Tensor, size: int, bins: int = BINS) -> torch.Tensor:
    """``(B, H//size, W//size, bins)`` int32 counts of every whole ``size`` x ``size`` patch (no device sync)."""
    b, h, w = gray.shape
    gh, gw = h // size, w // size
    levels = (gray[:, :gh * size, :gw * size] * (bins / 256.0)).long().clamp_(0, bins - 1)
    device = gray.device
    rows = torch.arange(gh * size, device=device) // size * gw
    cols = torch.arange(gw * size, device=device) // size
    images = torch.arange(b, device=device) * (gh * gw)
    keys = (images[:, None, None] + rows[None, :, None] + cols[None, None, :]) * bins + levels
    counts = torch.zeros(b * gh * gw * bins, dtype=torch.int32, device=device)
    counts.scatter_add_(0, keys.flatten(), torch.ones(1, dtype=torch.int32, device=device).expand(keys.numel()))
    return counts.view(b, gh, gw, bins)


def coarser_histograms(counts: torch.Tensor) -> torch.Tensor:
    """Histograms of the patches twice the size: each the sum of its 2 x 2 children (whole ones only)."""
    b, gh, gw, bins = counts.shape
    h2, w2 = gh // 2, gw // 2
    return counts[:, :2 * h2, :2 * w2].reshape(b, h2, 2, w2, 2, bins).sum((2, 4), dtype=torch.int32)


def histogram_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Base-2 entropy of histograms along the last axis."""
    p = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(-1)


def patch_entropy(gray: torch.Tensor, size: int, bins: int = BINS) -> torch.Tensor:
    """Base-2 entropy of the ``bins``-bin histogram of every whole ``size`` x ``size`` patch: ``(B, H//size, W//size)``."""
    return histogram_entropy(patch_histograms(gray, size, bins))


def select_patches(gray: torch.Tensor, patch: int, thresholds: Sequence[float]) -> list[torch.Tensor]:
    """Masks ``[base, 2p, 4p, ...]`` (bool, ``(B, H//s, W//s)`` each) of the chosen patches per scale.

    ``thresholds[k - 1]`` is the entropy (bits) below which a ``patch * 2**k`` patch is chosen; every
    pixel of a grid of whole base patches is covered by exactly one chosen patch.
    """
    b, h, w = gray.shape
    n_scales = len(thresholds) + 1
    grids = [(h // (patch << k), w // (patch << k)) for k in range(n_scales)]
    entropy: list[torch.Tensor] = [None] * n_scales
    counts = patch_histograms(gray, patch << 1, BINS) if n_scales > 1 else None
    for k in range(1, n_scales):  # each scale's histograms from the one below: one pass over the pixels
        if k > 1:
            counts = coarser_histograms(counts)
        entropy[k] = histogram_entropy(counts)
    covered = torch.zeros(b, *grids[0], dtype=torch.bool, device=gray.device)  # on the base grid
    masks: list[torch.Tensor] = [None] * n_scales
    for k in range(n_scales - 1, 0, -1):  # largest first: a chosen patch masks everything beneath it
        gh, gw = grids[k]
        chosen = entropy[k] < thresholds[k - 1]
        chosen &= ~_shrink(covered, 1 << k, (gh, gw))
        masks[k] = chosen
        covered |= _expand(chosen, 1 << k, grids[0])
    masks[0] = ~covered
    return masks


def _expand(mask: torch.Tensor, factor: int, grid: tuple[int, int]) -> torch.Tensor:
    """A coarse mask on the base grid (each cell repeated ``factor`` times; rows/columns beyond it stay False)."""
    up = mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return F.pad(up, (0, grid[1] - up.shape[2], 0, grid[0] - up.shape[1]))


def _shrink(covered: torch.Tensor, factor: int, grid: tuple[int, int]) -> torch.Tensor:
    """True where any base cell under a ``factor``-sized patch of ``grid`` is already covered."""
    gh, gw = grid
    block = covered[:, :gh * factor, :gw * factor].reshape(covered.shape[0], gh, factor, gw, factor)
    return block.any(4).any(2)


def token_counts(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Patch tokens per image of a selection, ``(B,)``."""
    return sum(m.flatten(1).sum(1) for m in masks)


def flat_selection(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, N_table)`` bool over the multi-scale token table (base grid, then 2p grid, ..., each row-major)."""
    return torch.cat([m.flatten(1) for m in masks], dim=1)


def token_indices(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per image, the rows of the multi-scale token table it uses (the exported graph's ``token_index``)."""
    return [row.nonzero().squeeze(1) for row in flat_selection(masks)]


class PatchSelector:
    """The selection of one model input, as a data-loader sample field: ``image (3, H, W) -> {"apt_keep": (N_table,)}``.

    Picklable, so it runs in loader workers and the GPU never waits on it; its rows follow the
    multi-scale token table's order (:func:`flat_selection`).
    """

    field = "apt_keep"

    def __init__(self, patch: int, thresholds: Sequence[float], mean: Sequence[float], std: Sequence[float]):
        self.patch, self.thresholds = patch, [float(t) for t in thresholds]
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def masks(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Masks per scale of a batch of normalised images (no gradient)."""
        with torch.no_grad():
            return select_patches(grayscale_255(images, self.mean, self.std), self.patch, self.thresholds)

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.field: flat_selection(self.masks(image[None]))[0]}
