"""The validator's queries, rendered once per run: each (split, level) stored as the JPEG bytes the validator sends.

Rendering a query (decode the source image, apply the level's augmentation, re-encode as the 224 px JPEG) costs a
CPU more than a small model's forward pass, and every stage after Stage-1 reads the same calib, test and meta
queries: calibration, the draft's acceptance, the router, the views, the thresholds, the replay. The first reader
of a split at a level renders all its queries with the loader workers and stores them next to the run's index
(``<run>/data/queries/<split>-L<level>-<fingerprint>.parquet``). Later readers decode the stored JPEG. The query
*is* that JPEG, so a stored query decodes to exactly what rendering it again would give. The model inputs are cached
too (:class:`ResizedQueries`: decoded and resized to the model's size once, uint8), so a pass over a split costs
the model alone. ``data.query_cache=false`` renders on every read instead. Making a cache draws no number from the
global random generators (a run trains the same models whether its caches were made or found).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from train.data.images import loader_worker_init
from train.data.transforms import ModelInput, ValidatorQuery, decode_query
from train.data.validator import QUERY_SIZE, VALIDATOR_VERSION
from train.runs import fingerprint
from train.utils.console import track

log = logging.getLogger(__name__)
FORMAT = 2  # bump when what a stored query holds changes


class QueryStore:
    """The rendered queries of one split at one level, read by position; each loader worker opens the file itself."""

    def __init__(self, path: Path):
        self.path, self._jpeg = Path(path), None

    def __len__(self) -> int:
        return pq.read_metadata(self.path).num_rows

    def __getitem__(self, i: int) -> bytes:
        if self._jpeg is None:
            self._jpeg = pq.read_table(self.path, columns=["jpeg"], memory_map=True).column("jpeg")
        return self._jpeg[i].as_py()

    def __getstate__(self):  # an open table does not travel to loader workers
        return {"path": self.path, "_jpeg": None}


class _Rendering(Dataset):
    def __init__(self, images, level: int, seed: int):
        self.images, self.query = images, ValidatorQuery(level, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> bytes:
        return self.query.render(self.images.image(i), i)


def query_store(images, directory: Path, split: str, level: int, seed: int, num_workers: int) -> QueryStore:
    """The store of ``split``'s queries at ``level`` (``images``: the split's ImageDataset), rendered if missing.

    The file name's fingerprint covers the split's samples, the level, the evaluation seed and what renders them
    (the validator version the levels follow, the versions of the libraries that draw the pixels), so a changed
    setting renders anew.
    """
    key = {"samples": fingerprint([images.files, images.rows.tolist(), images.columns]), "split": split,
           "level": int(level), "seed": int(seed), "size": QUERY_SIZE, "validator": VALIDATOR_VERSION,
           "torchvision": torchvision.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__, "format": FORMAT}
    path = Path(directory) / f"{split}-L{level}-{fingerprint(key, 12)}.parquet"
    if path.is_file() and pq.read_metadata(path).num_rows == len(images):
        return QueryStore(path)
    start = time.perf_counter()
    loader = DataLoader(_Rendering(images, level, seed), batch_size=64, num_workers=num_workers,
                        collate_fn=list, worker_init_fn=loader_worker_init, generator=torch.Generator())
    jpegs = [jpeg for batch in track(loader, f"queries: rendering {split} L{level}", len(images), "queries", count=len)
             for jpeg in batch]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes may render the same split at once
    pq.write_table(pa.table({"jpeg": pa.array(jpegs, pa.binary())}), tmp, row_group_size=1024)
    tmp.replace(path)
    log.info("validator queries of %s at level %d rendered once for this run: %d in %.1f s (%.1f MB)", split, level,
             len(jpegs), time.perf_counter() - start, path.stat().st_size / 1e6)
    return QueryStore(path)


class _Resizing(Dataset):
    def __init__(self, store: QueryStore, model_input: ModelInput):
        self.store, self.model_input = store, model_input

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.model_input.resized(decode_query(self.store[i], i))


class ResizedQueries:
    """A store's queries decoded and resized to the model's input size (uint8, N x size x size x 3), written once
    beside it (``<store>-<size>px.npy``) and memory-mapped: :meth:`ModelInput.normalized` of row ``i`` is exactly
    what decoding query ``i`` and :class:`ModelInput` give."""

    def __init__(self, store: QueryStore, model_input: ModelInput, num_workers: int):
        self.path = self.path_for(store, model_input)
        if not self.complete(self.path, store):
            loader = DataLoader(_Resizing(store, model_input), batch_size=256, num_workers=num_workers,
                                collate_fn=np.stack, worker_init_fn=loader_worker_init, generator=torch.Generator())
            tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, np.concatenate(list(loader)))
            tmp.replace(self.path)
        self._rows = None

    @staticmethod
    def path_for(store: QueryStore, model_input: ModelInput) -> Path:
        """Where the queries of ``store`` resized to ``model_input``'s size are kept."""
        return store.path.with_name(f"{store.path.stem}-{model_input.img_size}px.npy")

    @staticmethod
    def complete(path: Path, store: QueryStore) -> bool:
        """Whether ``path`` holds one resized query per query of ``store``."""
        return path.is_file() and len(np.load(path, mmap_mode="r")) == len(store)

    @classmethod
    def existing(cls, store: QueryStore, model_input: ModelInput) -> "ResizedQueries | None":
        """The store's resized queries if an earlier reader wrote them (None otherwise: nothing is computed)."""
        path = cls.path_for(store, model_input)
        if not cls.complete(path, store):
            return None
        found = cls.__new__(cls)
        found.path, found._rows = path, None
        return found

    def __getitem__(self, i: int) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows[i]

    def __getstate__(self):  # each loader worker maps the file itself
        return {"path": self.path, "_rows": None}
