"""How checkpoint files are written and read: atomically, and never by running code from the file.

A ``.ckpt`` is a pickle; ``torch.load(weights_only=True)`` unpickles only tensors and plain values, so a crafted file
cannot run code on load. :func:`load_checkpoint` is the one way the framework reads a checkpoint file (resume,
``task=export ckpt=...``, the stages that reload their best epoch); :class:`AtomicCheckpointIO` makes Lightning
write checkpoints to a temporary name and rename them, and read them through :func:`load_checkpoint`.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from train.utils.files import atomic_file


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that would run code when unpickled: it is refused, not loaded."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a file that needs more (arbitrary pickled objects) is refused with
    a message naming it, before any of its code runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(f"refused to load {path}: it holds more than tensors and plain values, and "
                                    f"unpickling it could run code ({first}). Only checkpoints this framework "
                                    "wrote (weights_only) are loaded") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, saving through a temporary sibling then a rename (a kill mid-save leaves the old
    checkpoint whole) and loading with ``weights_only=True`` only. Remote (``scheme://``) paths keep Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Save through a temporary sibling and a rename; a remote path is saved as Lightning saves it."""
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(Path(path)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load with :func:`load_checkpoint`, or Lightning's loader for a remote path: weights only, whatever
        ``weights_only`` says."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file {path} not found")
        return load_checkpoint(path, map_location)
