"""The feature store: fixed-size per-sample features of several modalities, sharded parquet, resumable.

Layout of a store folder::

    manifest.json                     modalities (dim, producer, fingerprint), splits (queries, shards), externals
    <split>/<modality>-<NNNNN>.parquet  rows: sample_id, level, index, label, <modality> (float32 list), has_<modality>

A split's queries follow a fixed plan (:func:`train.data.views.query_plan`), so every modality's shard ``k`` holds
the same rows; :func:`read_split` puts them side by side (one column per modality plus its presence flag) and checks
that the keys agree. Shards are written atomically and listed in the manifest as they finish, so an interrupted
``task=features`` resumes where it stopped. External modalities (a detector's counts, a VLM's embedding) are files
keyed by ``sample_id`` and joined by :func:`join_external`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from train.runs import fingerprint
from train.utils.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "roadwork-feature-store"
KEY_COLUMNS = ("sample_id", "level", "index", "label")
# columns an external file may not bring: they are the answer, or what the synthetic generator alone knows
FORBIDDEN_EXTERNAL = ("label", "split", "scene_id", "difficulty", "scene_description")


class FeatureStoreError(RuntimeError):
    """A feature store or an external modality file is missing, inconsistent or leaks the answer."""


def presence_column(modality: str) -> str:
    """The name of the column flagging which rows have ``modality``."""
    return f"has_{modality}"


class FeatureStore:
    """One store folder: writes shards and keeps the manifest; reads splits back as columns."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        self.manifest = json.loads(path.read_text()) if path.is_file() else {
            "format": FORMAT, "version": 1, "key": list(KEY_COLUMNS[:2]), "modalities": {}, "splits": {}}
        if self.manifest.get("format") != FORMAT:
            raise FeatureStoreError(f"{path} is not a feature-store manifest (format {self.manifest.get('format')!r})")

    def save(self) -> None:
        """Write the manifest (atomically)."""
        atomic_write_json(self.root / MANIFEST, self.manifest)

    @property
    def modalities(self) -> list[str]:
        """The declared modalities, in the order they were declared."""
        return list(self.manifest["modalities"])

    def dims(self) -> dict[str, int]:
        """Feature width of each declared modality."""
        return {m: int(v["dim"]) for m, v in self.manifest["modalities"].items()}

    def declare(self, modality: str, dim: int, producer: dict) -> None:
        """Register ``modality``; a changed producer (other model, settings) drops its old shards."""
        entry = {"dim": int(dim), "producer": producer, "fingerprint": fingerprint([dim, producer])}
        old = self.manifest["modalities"].get(modality)
        if old is not None and old["fingerprint"] != entry["fingerprint"]:
            for split in self.manifest["splits"].values():
                split["shards"].pop(modality, None)
        self.manifest["modalities"][modality] = entry
        self.save()

    def plan(self, split: str, n_queries: int, shard_size: int) -> list[tuple[int, int]]:
        """The (start, stop) rows of ``split``'s shards; a changed plan drops the split's shards."""
        entry = {"queries": int(n_queries), "shard_size": int(shard_size)}
        current = self.manifest["splits"].get(split)
        if current is None or {k: current[k] for k in entry} != entry:
            self.manifest["splits"][split] = {**entry, "shards": {}}
            self.save()
        return [(s, min(s + shard_size, n_queries)) for s in range(0, n_queries, shard_size)]

    def shard_path(self, split: str, modality: str, k: int) -> Path:
        """Where shard ``k`` of ``modality`` in ``split`` lives (written or not)."""
        return self.root / split / f"{modality}-{k:05d}.parquet"

    def has_shard(self, split: str, modality: str, k: int) -> bool:
        """Whether shard ``k`` is recorded in the manifest and its file still has the recorded checksum."""
        recorded = self.manifest["splits"][split]["shards"].get(modality, {}).get(str(k))
        path = self.shard_path(split, modality, k)
        return recorded is not None and path.is_file() and sha256_file(path) == recorded

    def write_shard(self, split: str, modality: str, k: int, keys: dict[str, np.ndarray], values: np.ndarray,
                    present: np.ndarray) -> Path:
        """Write rows of one shard (atomically) and record it; absent rows hold zeros."""
        dim = self.dims()[modality]
        values = np.asarray(values, np.float32).reshape(len(present), dim)
        values = np.where(np.asarray(present, bool)[:, None], values, 0).astype(np.float32)
        flat = pa.array(values.reshape(-1), pa.float32())
        table = pa.table({**{c: keys[c] for c in KEY_COLUMNS},
                          modality: pa.FixedSizeListArray.from_arrays(flat, dim),
                          presence_column(modality): pa.array(np.asarray(present, bool))})
        path = self.shard_path(split, modality, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        self.manifest["splits"][split]["shards"].setdefault(modality, {})[str(k)] = sha256_file(path)
        self.save()
        return path

    def complete(self, split: str, modality: str) -> bool:
        """Whether every shard of ``split``'s plan holds ``modality``, recorded and unchanged."""
        entry = self.manifest["splits"].get(split)
        if entry is None or modality not in self.manifest["modalities"]:
            return False
        return all(self.has_shard(split, modality, k) for k in range(self.n_shards(split)))

    def n_shards(self, split: str) -> int:
        """Shards in ``split``'s plan."""
        entry = self.manifest["splits"][split]
        return -(-entry["queries"] // entry["shard_size"])

    def read_split(self, split: str, modalities: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """``{sample_id, level, index, label, <m>: (N, dim) float32, has_<m>: (N,) bool}`` for ``split``."""
        modalities = list(modalities or self.modalities)
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown:
            raise FeatureStoreError(f"{self.root}: no modality {unknown} (it has {self.modalities})")
        if split not in self.manifest["splits"]:
            raise FeatureStoreError(f"{self.root} has no split {split!r} (it has {sorted(self.manifest['splits'])}); "
                                    f"run task=features with features.splits including it")
        out: dict[str, np.ndarray] = {}
        for m in modalities:
            if not self.complete(split, m):
                raise FeatureStoreError(f"{self.root}: modality {m!r} of split {split!r} is incomplete or changed "
                                        "on disk; rerun task=features to finish it")
            table = pa.concat_tables([pq.read_table(self.shard_path(split, m, k)) for k in range(self.n_shards(split))])
            keys = {c: table.column(c).to_numpy(zero_copy_only=False) for c in KEY_COLUMNS}
            if not out:
                out.update(keys)
            elif not all(np.array_equal(out[c], keys[c]) for c in KEY_COLUMNS[:2]):
                raise FeatureStoreError(f"{self.root}/{split}: modality {m!r} rows do not line up with "
                                        f"{modalities[0]!r} (sample_id / level differ)")
            column = table.column(m).combine_chunks()
            out[m] = column.values.to_numpy().reshape(len(table), self.dims()[m])
            out[presence_column(m)] = table.column(presence_column(m)).to_numpy(zero_copy_only=False)
        return out


# ------------------------------------------------------------------------------------------- external modalities

def read_external(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(sample_ids, features (N, D) float32)`` from a parquet file (a ``sample_id`` column and numeric or
    fixed-size-list columns) or an npz file (arrays ``sample_id`` and ``features``)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureStoreError(f"external modality file not found: {path}")
    if path.suffix == ".npz":
        data = np.load(path, allow_pickle=False)
        missing = [k for k in ("sample_id", "features") if k not in data.files]
        if missing:
            raise FeatureStoreError(f"{path}: an npz external modality needs arrays 'sample_id' and 'features' "
                                    f"(missing {missing}; it has {data.files})")
        ids, values = data["sample_id"].astype(str), np.asarray(data["features"], np.float32)
        values = values.reshape(len(ids), -1)
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        if "sample_id" not in table.column_names:
            raise FeatureStoreError(f"{path}: no 'sample_id' column (it has {table.column_names})")
        ids = np.asarray(table.column("sample_id").to_pylist(), dtype=str)
        parts = []
        for name in table.column_names:
            if name == "sample_id":
                continue
            if name in FORBIDDEN_EXTERNAL:
                raise FeatureStoreError(f"{path}: column {name!r} is not a feature (it is the answer or what only the "
                                        f"data generator knows); forbidden: {list(FORBIDDEN_EXTERNAL)}")
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                parts.append(col.values.to_numpy().reshape(len(ids), -1))
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                parts.append(col.to_numpy(zero_copy_only=False).reshape(-1, 1))
            else:
                raise FeatureStoreError(f"{path}: column {name!r} has type {col.type}; external features must be "
                                        "numeric or fixed-size lists of numbers")
        if not parts:
            raise FeatureStoreError(f"{path}: no feature columns besides 'sample_id'")
        values = np.concatenate(parts, axis=1).astype(np.float32)
    else:
        raise FeatureStoreError(f"external modality file {path}: expected .parquet or .npz")
    if not np.isfinite(values).all():
        bad = np.where(~np.isfinite(values).all(1))[0][:10]
        raise FeatureStoreError(f"{path}: features hold NaN or inf (rows {bad.tolist()})")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise FeatureStoreError(f"{path}: duplicate sample ids {unique[counts > 1][:10].tolist()}")
    return ids, values


def join_external(ids: np.ndarray, values: np.ndarray, known_ids: Iterable[str], wanted_ids: np.ndarray,
                  source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of ``values`` for ``wanted_ids`` by sample id: ``(features, present, n_missing)``.

    Ids of the file that are not samples of the run (``known_ids``) are an error naming them; wanted samples the
    file does not cover are absent (``present`` False) and counted.
    """
    known = set(map(str, known_ids))
    unknown = [i for i in ids.tolist() if i not in known]
    if unknown:
        raise FeatureStoreError(f"{source}: {len(unknown)} of {len(ids)} sample ids match no sample of the run's "
                                f"index, e.g. {unknown[:10]} (ids must be the index's sample_id values)")
    row = {sid: k for k, sid in enumerate(ids.tolist())}
    pos = np.array([row.get(str(s), -1) for s in wanted_ids], dtype=np.int64)
    present = pos >= 0
    out = np.zeros((len(wanted_ids), values.shape[1]), np.float32)
    out[present] = values[pos[present]]
    return out, present, int((~present).sum())


def load_split(store: FeatureStore, split: str, modalities: list[str]) -> dict:
    """A split of the store as tensors: ``features`` (one per modality), ``present`` (N, M), ``label``, ``index``,
    ``level``."""
    cols = store.read_split(split, modalities)
    return {"features": [torch.from_numpy(np.array(cols[m])) for m in modalities],
            "present": torch.from_numpy(np.stack([cols[presence_column(m)] for m in modalities], 1)),
            "label": torch.from_numpy(cols["label"].astype(np.int64)),
            "index": torch.from_numpy(np.array(cols["index"])),  # a copy: the store's arrays are read-only
            "level": torch.from_numpy(cols["level"].astype(np.int64))}
