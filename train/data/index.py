"""The sample index of a run: every usable sample, its label and its split.

``build_index`` checks every image once (bad ones are skipped and counted, and the build stops
past ``max_bad_fraction``), assigns scene-disjoint splits and returns the table plus its stats.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from train.data.images import BadImageError, ImageReader, decode_rgb
from train.data.sources import DataError
from train.data.splits import SPLITS, assign_splits

log = logging.getLogger(__name__)


def where(file: str, row: int) -> str:
    """How errors name a sample: the file, plus the row for parquet files."""
    return f"{file} row {row}" if row >= 0 else file


def _check_chunk(rows: list[tuple[str, int, str]]) -> list[tuple[str, str] | None]:
    reader = ImageReader()
    out = []
    for file, row, column in rows:
        try:
            decode_rgb(reader.read(file, row, column), max_side=256, where=where(file, row))
            out.append(None)
        except BadImageError as e:
            out.append((e.reason, str(e)))
    return out


def find_bad_images(samples: pa.Table, workers: int = 0) -> list[tuple[int, str, str]]:
    """Decode every image once; returns ``(position, reason, message)`` for each bad one."""
    rows = list(zip(samples.column("file").to_pylist(), samples.column("row").to_pylist(),
                    samples.column("column").to_pylist()))
    workers = workers or os.cpu_count() or 1
    chunks = [rows[i:i + 256] for i in range(0, len(rows), 256)]
    if workers > 1 and len(chunks) > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = [r for chunk in pool.map(_check_chunk, chunks) for r in chunk]
    else:
        results = [r for chunk in chunks for r in _check_chunk(chunk)]
    return [(i, *r) for i, r in enumerate(results) if r is not None]


def build_index(samples: pa.Table, splits: Mapping[str, float], split_seed: int = 0, verify_images: bool = True,
                max_bad_fraction: float = 0.02, workers: int = 0) -> tuple[pa.Table, dict]:
    """Drop bad images (counted), assign splits, check none is empty; returns (index, stats)."""
    if samples.num_rows == 0:
        raise DataError("the data source holds no samples")
    skipped: Counter = Counter()
    if verify_images:
        bad = find_bad_images(samples, workers)
        for _, reason, message in bad[:10]:
            log.warning("skipping bad image: %s", message)
        skipped.update(reason for _, reason, _ in bad)
        if len(bad) > max_bad_fraction * samples.num_rows:
            shown = "\n  ".join(m for _, _, m in bad[:10])
            raise DataError(f"{len(bad)} of {samples.num_rows} images are unusable "
                            f"({len(bad) / samples.num_rows:.1%} > data.max_bad_fraction={max_bad_fraction}):\n  {shown}")
        if bad:
            keep = np.ones(samples.num_rows, dtype=bool)
            keep[[i for i, _, _ in bad]] = False
            samples = samples.filter(pa.array(keep))
            log.warning("skipped %d bad image(s): %s", len(bad), dict(skipped))
    split = assign_splits(samples.column("scene_id").to_pylist(), splits, split_seed)
    index = samples.append_column("split", pa.array(split.astype(str), type=pa.string()))
    stats = index_stats(index, splits)
    stats["skipped"] = dict(skipped)
    stats["skipped_total"] = int(sum(skipped.values()))
    return index, stats


def index_stats(index: pa.Table, splits: Mapping[str, float]) -> dict:
    """Per-split sample and roadwork counts; an empty split that was asked for is an error."""
    split = np.asarray(index.column("split").to_pylist())
    label = index.column("label").to_numpy()
    stats: dict = {"total": int(index.num_rows), "splits": {}}
    for name in SPLITS:
        n = int((split == name).sum())
        if splits.get(name, 0) > 0 and n == 0:
            raise DataError(f"split '{name}' is empty ({index.num_rows} samples in "
                            f"{len(set(index.column('scene_id').to_pylist()))} scenes); "
                            "add data or change data.splits")
        if n:
            stats["splits"][name] = {"n": n, "roadwork": int(label[split == name].sum())}
    return stats
