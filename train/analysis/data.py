"""What ``notebooks/synthetic_data.ipynb`` shows of a run's data: counts per split and class, and a grid of sample
images per class and difficulty (the synthetic generator's 0-1 score: small, cut-off or few roadwork objects,
night, fog, look-alikes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from train import LABELS
from train.analysis.runs import Table
from train.data.images import ImageReader, decode_rgb
from train.data.splits import SPLITS

DIFFICULTY_BINS = {"easy": (0.0, 1 / 3), "medium": (1 / 3, 2 / 3), "hard": (2 / 3, 1.0001)}


def read_index(run: str | Path) -> dict[str, np.ndarray]:
    """The run's sample index (``data/index.parquet``) as columns."""
    table = pq.read_table(Path(run) / "data" / "index.parquet").to_pydict()
    return {k: np.asarray(v) for k, v in table.items()}


def split_table(index: dict[str, np.ndarray]) -> Table:
    """Per split: samples, scenes, the share of roadwork and the mean difficulty of each class."""
    rows = []
    for split in [s for s in SPLITS if s in set(index["split"])]:
        mask = index["split"] == split
        row = {"split": split, "samples": int(mask.sum()), "scenes": len(set(index["scene_id"][mask])),
               "roadwork_share": float(index["label"][mask].mean())}
        for label, name in LABELS.items():
            values = index["difficulty"][mask & (index["label"] == label)]
            row[f"difficulty_{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else None
        rows.append(row)
    return Table(rows)


def pick_samples(index: dict[str, np.ndarray], per_cell: int = 4, split: str = "train", seed: int = 0
                 ) -> dict[tuple[int, str], np.ndarray]:
    """(label, difficulty bin) -> up to ``per_cell`` random rows of the index from ``split``."""
    rng = np.random.default_rng(seed)
    difficulty = np.nan_to_num(index["difficulty"], nan=-1.0)  # unknown difficulty (real data) falls in no bin
    cells = {}
    for label in LABELS:
        for name, (low, high) in DIFFICULTY_BINS.items():
            rows = np.flatnonzero((index["split"] == split) & (index["label"] == label) & (difficulty >= low)
                                  & (difficulty < high))
            cells[(label, name)] = rng.choice(rows, min(per_cell, len(rows)), replace=False)
    return cells


def sample_grid(index: dict[str, np.ndarray], per_cell: int = 4, split: str = "train", seed: int = 0):
    """One row per (class, difficulty bin), ``per_cell`` images each, titled with the difficulty."""
    from matplotlib.figure import Figure

    cells = pick_samples(index, per_cell, split, seed)
    reader = ImageReader()
    fig = Figure(figsize=(2.2 * per_cell, 2.3 * len(cells)), layout="constrained")
    axes = fig.subplots(len(cells), per_cell, squeeze=False)
    for (label, name), rows, line in zip(cells, cells.values(), axes):
        line[0].set_ylabel(f"{LABELS[label]}\n{name}", fontsize=10)
        for ax, i in zip(line, list(rows) + [None] * per_cell):
            ax.set(xticks=[], yticks=[])
            if i is not None:
                image = decode_rgb(reader.read(index["file"][i], int(index["row"][i]), index["column"][i]))
                ax.imshow(image)
                ax.set_title(f"difficulty {index['difficulty'][i]:.2f}", fontsize=8)
    fig.suptitle(f"{split} split: samples per class and difficulty")
    return fig
