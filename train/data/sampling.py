"""The training sampler: each epoch's order (and each sample's augmentation seed) is a function of
``(seed, epoch)`` alone, so a run resumed from a checkpoint (at an epoch's end, or inside one: ``skip``) sees
exactly the batches an unbroken run would have seen.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields ``(index, augmentation_seed)``; Lightning calls :meth:`set_epoch` before each epoch.

    ``weights`` (one per sample) draws with replacement in proportion to them (class balancing);
    without weights each epoch is a permutation. ``epoch`` is where it starts: a resumed fit iterates the loader
    (and its workers prefetch) before Lightning calls :meth:`set_epoch`, so the loader's maker passes the epoch.
    ``skip``: the first pass leaves out that many samples of the epoch's order (those a checkpoint saved inside the
    epoch had trained on); ``len`` stays the whole epoch, as Lightning counts the batches done itself.
    ``draws``: each sample has that many augmentation seeds, cycled over the epochs (epoch ``e`` gives sample ``i``
    the seed of epoch ``e % draws``), so an input comes back and what a frozen model computed on it can be reused
    (the draft's teacher); None: a new seed every epoch.
    """

    def __init__(self, n: int, seed: int = 0, weights: np.ndarray | None = None, epoch: int = 0, skip: int = 0,
                 draws: int | None = None):
        if draws is not None and int(draws) < 1:
            raise ValueError(f"augmentation draws must be >= 1 (or None), got {draws}")
        self.n, self.seed, self.epoch, self.skip = n, int(seed), int(epoch), int(skip)
        self.draws = None if draws is None else int(draws)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` next; a new epoch drops ``skip`` (it applies to the epoch a fit resumed in)."""
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.n, generator=g) if self.weights is None else \
            torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        if self.draws is None:
            aug_seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        else:  # per sample, not per position: the draw follows the sample whatever the epoch's order
            draw = int(np.random.SeedSequence([self.seed, self.epoch % self.draws, self.draws]).generate_state(1)[0])
            per_sample = torch.randint(0, 2**31 - 1, (self.n,), generator=torch.Generator().manual_seed(draw))
            aug_seeds = per_sample[order]
        skip, self.skip = self.skip, 0
        return iter(zip(order[skip:].tolist(), aug_seeds[skip:].tolist()))
