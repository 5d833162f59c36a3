"""The chosen patch grid drawn over images (one PNG): where APT spends its tokens."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SCALE_COLOURS = ("#ffffff", "#ffd23f", "#ff5e5b", "#3bceac")  # p, 2p, 4p, 8p


def patch_grid(path: Path, images: Sequence[np.ndarray], masks: Sequence[torch.Tensor], patch: int,
               titles: Sequence[str] | None = None, columns: int = 4) -> Path:
    """Draw each image (uint8 HxWx3 at model resolution) with its chosen patches outlined, by scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i])
        counts = []
        for k, mask in enumerate(masks):
            size = patch << k
            cells = mask[i].nonzero().tolist()
            counts.append(len(cells))
            for r, c in cells:
                ax.add_patch(Rectangle((c * size - 0.5, r * size - 0.5), size, size, fill=False, linewidth=0.6,
                                       edgecolor=SCALE_COLOURS[k % len(SCALE_COLOURS)]))
        base = (images[i].shape[0] // patch) * (images[i].shape[1] // patch)
        label = f"{titles[i]}: " if titles else ""
        ax.set_title(f"{label}{sum(counts)}/{base} tokens", fontsize=8)
    sizes = ", ".join(f"{patch << k}px" for k in range(len(masks)))
    fig.suptitle(f"APT patches ({sizes}: white, yellow, red)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
