"""The colour-only baseline: how far joint RGB histograms + logistic regression get.

If colour alone solved the synthetic task, a model could score well without learning what
roadwork looks like. ``python -m train.data.colour_baseline checkpoints/<run>`` reports the
baseline's test MCC on a run's splits; the spine requires it to stay below 0.6.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_accuracy, binary_matthews_corrcoef

from train.data.datamodule import ImageDataset, RoadworkDataModule
from train.runs import Run


class ColourHistogram:
    """Image -> normalised joint RGB histogram with ``bins`` levels per channel (a dataset transform)."""

    def __init__(self, bins: int = 8):
        self.bins = bins

    def __call__(self, image: np.ndarray, i: int = 0, seed: int | None = None) -> torch.Tensor:
        q = (image.reshape(-1, 3).astype(np.int64) * self.bins) // 256
        codes = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]
        hist = np.bincount(codes, minlength=self.bins ** 3).astype(np.float32)
        return torch.from_numpy(hist / hist.sum())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-2, steps: int = 200):
    """Class-balanced, L2-regularised logistic regression on standardised features (LBFGS).

    Balanced, so that on 4:1 data it cannot score by predicting the majority class; returns a predict fn.
    """
    mean, std = x.mean(0), x.std(0) + 1e-6
    freq = y.float().mean()
    balance = torch.where(y == 1, 0.5 / freq, 0.5 / (1 - freq))
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), weight=balance) \
            + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda x_new: torch.sigmoid(((x_new - mean) / std) @ w.detach() + b.detach())


def split_histograms(dm: RoadworkDataModule, split: str, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour histograms (``bins`` levels per channel) and labels of every sample of split ``split``."""
    ds = ImageDataset(dm.split(split), ColourHistogram(bins))
    xs, ys = [], []
    for batch in DataLoader(ds, batch_size=256, num_workers=dm.num_workers):
        xs.append(batch["image"])
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def colour_baseline(dm: RoadworkDataModule, train_split: str = "train", test_split: str = "test", bins: int = 8) -> dict:
    """Fit on ``train_split``, report MCC and accuracy on ``test_split``."""
    x_train, y_train = split_histograms(dm, train_split, bins)
    x_test, y_test = split_histograms(dm, test_split, bins)
    p = fit_logistic(x_train, y_train)(x_test)
    return {"mcc": float(binary_matthews_corrcoef(p, y_test)), "acc": float(binary_accuracy(p, y_test)),
            "n_train": len(y_train), "n_test": len(y_test)}


def main() -> None:
    """Command line: print the colour baseline's figures on a run's splits as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder whose data stage is complete")
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    index = Run.open(args.run_dir).artifact("data", "index")
    dm = RoadworkDataModule(source=None, splits={}, num_workers=args.workers, index_path=str(index))
    print(json.dumps(colour_baseline(dm, bins=args.bins), indent=2))


if __name__ == "__main__":
    main()
