"""What the feature store holds: one fixed-size vector per query and modality, computed from what models saw.

Each modality is a small class with one interface: ``setup(run) -> producer`` (loads its model, says what made
the column), ``dim``, ``dataset(datamodule, split, levels, every_level)`` (the split's planned queries; the heavy
per-sample work runs in the loader workers) and ``encode(batch) -> (values, present)``. None reads what only the
synthetic generator knows (object boxes, counts, labels, difficulty): every input is the validator query image.

- ``classifier``: a calibrated tier's pooled embedding + its 2 calibrated logits (Stage-1, the draft);
- ``views``: Stage-1 over the multi-view slots of :mod:`train.data.views` (global, tiles, zooms, other camera):
  the per-view logit margins, which slots exist, and the mean embedding over the present views;
- ``image_stats``: HSV colour histograms and edge density (overall and on a grid) of the query image.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from train.data.feature_store import FeatureStore
from train.data.views import ViewSet, cached_view_outputs, global_view_outputs, query_plan
from train.models.backbones import pooled_features
from train.models.saving import weights_sha256
from train.predictions import OutcomeDataset

log = logging.getLogger(__name__)


class QueryDataset(Dataset):
    """A split's planned queries (sample, level): ``{"x": fn(validator query), "index", "level"}``; without ``fn``,
    ``x`` is the model input (read from the run's resized queries when they exist)."""

    def __init__(self, datamodule, split: str, levels: Sequence[int], every_level: bool, fn):
        self.images, self.fn = datamodule.queries(split, levels), fn
        self.samples, self.levels = query_plan(len(self.images), levels, every_level)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict:
        i, level = int(self.samples[k]), int(self.levels[k])
        x = self.images.model_input(i, level) if self.fn is None else self.fn(self.images.query(i, level))
        return {"x": x, "index": i, "level": level}


def embedding_and_logits(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding, logits) of a timm classifier or of an elastic draft (its compressed-token features)."""
    elastic = getattr(model, "elastic", None)
    if elastic is not None:
        out = elastic(images)
        return out.features, out.logits
    logits, features = pooled_features(model, images)
    return features, logits


class ClassifierModality:
    """A calibrated tier's pooled embedding (at float16 precision, as the view cache keeps it) and calibrated logits
    (``embedding=False``: the logits only). Read from the global slot of the run's view cache when the tier made one
    on the same queries (the PRM's views), computed otherwise: the same values either way."""

    def __init__(self, tier: str = "stage1", embedding: bool = True):
        self.tier, self.embedding, self.model, self.dim = tier, embedding, None, 0

    def setup(self, run) -> dict:
        from train.tiers.calibration import load_calibrated

        self.run = run
        self.model, config, _ = load_calibrated(run, self.tier)
        self.model.eval()
        self.input_spec = config["input"]
        with torch.no_grad():
            size = config["input"]["img_size"]
            features, logits = embedding_and_logits(self.model, torch.zeros(1, 3, size, size))
        self.dim = (features.shape[1] if self.embedding else 0) + logits.shape[1]
        return {"kind": "classifier", "tier": self.tier, "weights_sha256": weights_sha256(self.model),
                "values": ("pooled embedding (float16 precision), then " if self.embedding else "")
                + "calibrated logits [None, Roadwork]"}

    def dataset(self, datamodule, split: str, levels: Sequence[int], every_level: bool) -> Dataset:
        """The split's planned queries: from the view cache's global slot when it holds them, else the query images."""
        found = global_view_outputs(self.run, self.model, datamodule, split, levels, every_level)
        if found is not None:
            return OutcomeDataset(found)
        return QueryDataset(datamodule, split, levels, every_level, None)

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, present)``: the embedding (at float16 precision) and calibrated logits; every row present."""
        if "x" in batch:
            features, logits = embedding_and_logits(self.model, batch["x"])
        else:  # the view cache's global slot
            features, logits = batch["embeddings"], batch["logits"]
        values = torch.cat([features.half().float(), logits.float()], 1) if self.embedding else logits.float()
        return values, torch.ones(len(values), dtype=torch.bool)


class ViewsModality:
    """Stage-1 (or another calibrated tier) over the multi-view slots: margins per slot, slot mask, mean embedding
    (``embedding=False``: margins and mask only)."""

    def __init__(self, tier: str = "stage1", tiles: Sequence[int] = (2, 3), zooms: Sequence[float] = (0.75, 0.5),
                 random_zooms: int = 2, cameras: int = 1, seed: int = 0, embedding: bool = True):
        self.tier, self.model, self.dim, self.embedding = tier, None, 0, embedding
        self.view_set = ViewSet(tuple(tiles), tuple(zooms), random_zooms, cameras=cameras, seed=seed)

    def setup(self, run) -> dict:
        producer = ClassifierModality(self.tier, self.embedding)
        described = producer.setup(run)
        self.run, self.model, self.input_spec = run, producer.model, producer.input_spec
        self.dim = 2 * len(self.view_set.names) + producer.dim - 2
        return {**described, "kind": "views", "views": self.view_set.describe(), "values": "per-slot logit margin (0 "
                "where absent), per-slot presence" + (", mean embedding over present slots" if self.embedding else "")}

    def dataset(self, datamodule, split: str, levels: Sequence[int], every_level: bool) -> Dataset:
        """The split's view outputs from the run's shared cache (computed there once, also read by the PRM)."""
        outputs, _ = cached_view_outputs(self.run, self.model, datamodule, split, self.view_set, levels, every_level,
                                         datamodule.eval_batch_size)
        return OutcomeDataset({k: outputs[k] for k in ("logits", "embeddings", "mask", "index", "level")})

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, present)`` of a batch: margins per slot (0 where absent), slot presence and the mean embedding
        over the present slots; every row present."""
        logits, keep = batch["logits"].float(), batch["mask"].float()
        margins = (logits[..., 1] - logits[..., 0]) * keep
        parts = [margins, keep]
        if self.embedding:
            total = (batch["embeddings"].float() * keep[..., None]).sum(1)
            parts.append(total / keep.sum(1, keepdim=True).clamp(min=1))
        return torch.cat(parts, 1).float(), torch.ones(len(keep), dtype=torch.bool)


class ImageStats:
    """Query image (uint8 RGB) -> HSV histograms (joint hue x saturation, value) and edge density (whole image and a
    ``grid`` x ``grid`` layout), as a float32 tensor. Picklable: it runs in the loader workers."""

    def __init__(self, hue_bins: int = 12, sat_bins: int = 4, value_bins: int = 8, grid: int = 4):
        self.hue_bins, self.sat_bins, self.value_bins, self.grid = hue_bins, sat_bins, value_bins, grid

    @property
    def dim(self) -> int:
        """Vector length: hue x saturation and value histograms, overall edge density, an edge density per grid cell."""
        return self.hue_bins * self.sat_bins + self.value_bins + 1 + self.grid ** 2

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.int64)
        h = hsv[:, 0] * self.hue_bins // 180
        s = hsv[:, 1] * self.sat_bins // 256
        hs = np.bincount(h * self.sat_bins + s, minlength=self.hue_bins * self.sat_bins)
        v = np.bincount(hsv[:, 2] * self.value_bins // 256, minlength=self.value_bins)
        edges = cv2.Canny(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), 100, 200) > 0
        side = edges.shape[0] // self.grid * self.grid, edges.shape[1] // self.grid * self.grid
        cells = edges[:side[0], :side[1]].reshape(self.grid, side[0] // self.grid, self.grid, -1).mean((1, 3))
        n = len(hsv)
        return torch.from_numpy(np.concatenate([hs / n, v / n, [edges.mean()], cells.reshape(-1)]).astype(np.float32))


class ImageStatsModality:
    """Colour histograms and edge density of the validator query (no model)."""

    def __init__(self, hue_bins: int = 12, sat_bins: int = 4, value_bins: int = 8, grid: int = 4):
        self.stats = ImageStats(hue_bins, sat_bins, value_bins, grid)
        self.dim = self.stats.dim

    def setup(self, run) -> dict:
        return {"kind": "image_stats", **vars(self.stats), "values": "joint hue x saturation histogram, value "
                "histogram (fractions of pixels), Canny edge density of the whole query, then per grid cell"}

    def dataset(self, datamodule, split: str, levels: Sequence[int], every_level: bool) -> Dataset:
        """The split's planned queries, :class:`ImageStats` computed in the loader workers."""
        return QueryDataset(datamodule, split, levels, every_level, self.stats)

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, present)``: the image statistics; every row present."""
        return batch["x"].float(), torch.ones(len(batch["x"]), dtype=torch.bool)


def split_keys(datamodule, split: str, levels: Sequence[int], every_level: bool) -> dict[str, np.ndarray]:
    """The store's key columns of ``split``'s planned queries."""
    table = datamodule.split(split)
    samples, planned = query_plan(table.num_rows, levels, every_level)
    return {"sample_id": np.asarray(table.column("sample_id").to_pylist(), dtype=str)[samples],
            "level": planned.astype(np.int8), "index": samples.astype(np.int64),
            "label": table.column("label").to_numpy()[samples].astype(np.int8)}


def write_modality(store: FeatureStore, name: str, modality, datamodule, split: str, levels: Sequence[int],
                   every_level: bool, shard_size: int) -> int:
    """Compute the missing shards of ``name`` for ``split``; returns how many were written (0: already complete)."""
    keys = split_keys(datamodule, split, levels, every_level)
    shards = store.plan(split, len(keys["index"]), shard_size)
    todo = [k for k in range(len(shards)) if not store.has_shard(split, name, k)]
    if not todo:
        return 0
    dataset = modality.dataset(datamodule, split, levels, every_level)
    if len(dataset) != len(keys["index"]):
        raise RuntimeError(f"modality {name}: {len(dataset)} queries planned for split {split}, the store has "
                           f"{len(keys['index'])}")
    for k in todo:
        start, stop = shards[k]
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=datamodule.eval_batch_size,
                            num_workers=datamodule.num_workers, generator=torch.Generator())  # (no global draw)
        values, present, index, level = [], [], [], []
        for batch in loader:
            v, p = modality.encode(batch)
            values.append(v.cpu())
            present.append(p.cpu())
            index.append(batch["index"])
            level.append(batch["level"])
        index, level = torch.cat(index).numpy(), torch.cat(level).numpy()
        if not (np.array_equal(index, keys["index"][start:stop]) and np.array_equal(level, keys["level"][start:stop])):
            raise RuntimeError(f"modality {name}: its queries for {split} rows {start}-{stop} are not the planned ones")
        store.write_shard(split, name, k, {c: v[start:stop] for c, v in keys.items()}, torch.cat(values).numpy(),
                          torch.cat(present).numpy())
        log.info("features: %s / %s shard %d of %d written (%d queries)", split, name, k + 1, len(shards), stop - start)
    return len(todo)

