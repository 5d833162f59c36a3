"""Decode-once shards: each image of a split decoded, resized and stored as uint8 once (``task=prepare``), then
served in batches straight from a memory-mapped array (``data.train_source=shards``).

A prepared run holds ``<run>/prepare/shards.json`` (the manifest, recorded in the registry) and per split
``<split>.npy`` (``N x S x S x 3`` uint8, RGB, row ``i`` = position ``i`` of the split in the run's index) and
``<split>.parquet`` (position, sample_id, label of each row).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from train.data.sources import DataError

MANIFEST = "shards.json"


def write_split(folder: Path, split: str, batches: Iterable[dict], table: pa.Table, size: int) -> dict:
    """Write ``batches`` (in order: ``image`` uint8 ``[B, S, S, 3]``, ``index`` positions) as ``<split>.npy`` and the
    split's ``table`` rows as ``<split>.parquet``, each through a temporary file; returns the manifest entry."""
    n = table.num_rows
    path, tmp = folder / f"{split}.npy", folder / f".{split}.npy.tmp"
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    digest, filled = hashlib.sha256(), 0
    for batch in batches:
        index, pixels = batch["index"].numpy(), np.ascontiguousarray(batch["image"].numpy())
        if not np.array_equal(index, np.arange(filled, filled + len(index))):
            raise RuntimeError(f"prepare: batches out of order at position {filled}")
        images[filled:filled + len(index)] = pixels
        digest.update(memoryview(pixels).cast("B"))
        filled += len(index)
    if filled != n:
        raise RuntimeError(f"prepare: wrote {filled} of {n} images of split '{split}'")
    images.flush()
    del images
    os.replace(tmp, path)
    samples = pa.table({"position": np.arange(n), "sample_id": table.column("sample_id"),
                        "label": table.column("label")})
    tmp_samples = folder / f".{split}.parquet.tmp"
    pq.write_table(samples, tmp_samples)
    os.replace(tmp_samples, folder / f"{split}.parquet")
    return {"images": path.name, "samples": f"{split}.parquet", "shape": [n, size, size, 3],
            "sha256": digest.hexdigest()}


def read_manifest(path: str | Path) -> dict:
    """The shards manifest (``shards.json``) at ``path``."""
    return json.loads(Path(path).read_text())


class ShardDataset(Dataset):
    """One split's shard. Keys are positions or ``(position, augmentation seed)`` from
    :class:`~train.data.sampling.EpochSampler`; a list of keys (a batch, through ``__getitems__``) gives one batch:
    ``{"image": uint8 [B, S, S, 3], "label", "index"}`` plus ``"augment"``, ``augment.draw(seeds)``, when the
    dataset has an ``augment`` (:class:`~train.data.gpu_augment.GpuAugment`)."""

    def __init__(self, manifest: str | Path, split: str, augment=None):
        manifest = Path(manifest)
        entry = read_manifest(manifest)["splits"].get(split)
        if entry is None:
            raise DataError(f"{manifest} has no shard of split '{split}': run task=prepare with "
                            f"prepare.splits including it")
        self.path, self.shape = manifest.parent / entry["images"], tuple(entry["shape"])
        samples = pq.read_table(manifest.parent / entry["samples"])
        self.labels = samples.column("label").to_numpy()
        self.sample_ids = samples.column("sample_id").to_pylist()
        self.augment = augment
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped array, opened once per process (loader workers open their own)."""
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
            if self._images.shape != self.shape:
                raise DataError(f"{self.path} holds {self._images.shape}, its manifest says {self.shape}: "
                                "rerun task=prepare")
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list) -> dict:
        positions = np.array([k[0] if isinstance(k, tuple) else k for k in keys], dtype=np.int64)
        batch = {"image": torch.from_numpy(self.images[positions]), "label": torch.from_numpy(self.labels[positions]),
                 "index": torch.from_numpy(positions)}
        if self.augment is not None:
            seeds = [k[1] if isinstance(k, tuple) else k for k in keys]
            batch["augment"] = torch.from_numpy(self.augment.draw(seeds))
        return batch

    def __getitem__(self, key) -> dict:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getstate__(self) -> dict:  # the memory map does not travel to loader workers
        return {**self.__dict__, "_images": None}


def as_batch(batch: dict) -> dict:
    """The loader's collate function: :meth:`ShardDataset.__getitems__` already made the batch."""
    return batch
