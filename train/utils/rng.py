"""Random-generator state that checkpoints carry, so resumed training draws what an unbroken run draws."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """The global Python, NumPy, torch (and CUDA) generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
             "has_gauss": int(has_gauss), "gauss": float(gauss)}  # tensors and plain values: weights_only loads them
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`: set the global generators to ``state`` (CUDA's too, when saved and present)."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointedRNG:
    """A LightningModule mixin: its checkpoints carry the global generator states, restored when a fit resumes (so
    dropout, drop path and mixup draws continue exactly)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = capture_rng()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng" in checkpoint and self._trainer is not None and self._trainer.state.fn == "fit":
            restore_rng(checkpoint["rng"])
