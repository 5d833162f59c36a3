"""Split assignment by scene (views of one scene never straddle two splits), and images held out within a split."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "meta", "val", "calib", "test")


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate ``data.splits``: known names, non-negative, summing to 1."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"data.splits has unknown split(s) {sorted(unknown)}; allowed: {list(SPLITS)}")
    fr = {k: float(v) for k, v in fractions.items()}
    if any(v < 0 for v in fr.values()):
        raise ValueError(f"data.splits fractions must be >= 0, got {fr}")
    if abs(sum(fr.values()) - 1.0) > 1e-6:
        raise ValueError(f"data.splits fractions must sum to 1, got {sum(fr.values()):.4f} ({fr})")
    return fr


def assign_splits(scene_ids: Sequence[str], fractions: Mapping[str, float], seed: int = 0) -> np.ndarray:
    """Give every sample a split name so that each split gets ~its fraction of *samples*.

    Scenes are shuffled with ``seed`` and laid end to end; a scene goes to the split whose
    share of the cumulative sample count contains the scene's midpoint. Deterministic.
    """
    fr = check_fractions(fractions)
    scene_ids = np.asarray(scene_ids, dtype=object)
    scenes, inverse, counts = np.unique(scene_ids.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(scenes))
    mid = (np.cumsum(counts[order]) - counts[order] / 2) / counts.sum()
    names = [k for k in SPLITS if fr.get(k, 0) > 0]
    edges = np.cumsum([fr[k] for k in names])
    bucket = np.minimum(np.searchsorted(edges, mid, side="right"), len(names) - 1)
    scene_split = np.empty(len(scenes), dtype=object)
    scene_split[order] = np.asarray(names, dtype=object)[bucket]
    return scene_split[inverse]


def split_by_image(index: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (train, val) masks over rows, whole images (all their levels) on one side."""
    import torch  # here, not at the top: the data stage's spawned renderers import this package, torch costs 1-3 s

    images = index.unique()
    generator = torch.Generator().manual_seed(seed)
    val_images = images[torch.randperm(len(images), generator=generator)[:max(1, int(len(images) * val_fraction))]]
    val = torch.isin(index, val_images)
    return ~val, val


def scene_groups(table) -> np.ndarray:
    """An integer per row of an index table: its scene (rows of one scene are not independent samples)."""
    return np.unique(table.column("scene_id").to_pylist(), return_inverse=True)[1]
