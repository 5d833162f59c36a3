"""Views of one validator query for step-by-step inspection: the global image, tiles, zooms, other cameras.

A hard query gets more compute by looking at it piece by piece. :class:`ViewSet` names the views (one slot
each, the same slots for every query): ``global`` first, then ``tiles`` x ``tiles`` grids, centre ``zooms``
(the side as a fraction of the query), ``random_zooms`` seeded per sample, and up to ``cameras`` other
camera views of the same ``scene_id`` (absent slots are masked). Every crop is taken from the 224 px query
the validator sends and resized to the model's input, so a tile sees the scene at a higher resolution.
:class:`ViewDataset` serves all views of a query as one tensor; :func:`view_outputs` runs a classifier over
them once (logits and pooled embeddings per view), the cache that traces, the PRM and search read.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from train.data.transforms import ModelInput
from train.models.backbones import pooled_features
from train.models.saving import weights_sha256
from train.runs import cached_files, cached_tensors, fingerprint, read_cached
from train.utils.console import track

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the query's side


@dataclass(frozen=True)
class ViewSet:
    """Which views a query is inspected through; ``names`` are the slots, ``global`` is always slot 0."""
    tiles: Sequence[int] = (2, 3)
    zooms: Sequence[float] = (0.75, 0.5)
    random_zooms: int = 2
    random_scale: tuple[float, float] = (0.35, 0.7)
    cameras: int = 1
    seed: int = 0

    def __post_init__(self):
        if any(int(t) != t or t < 2 for t in self.tiles):
            raise ValueError(f"views.tiles must be integers >= 2 (grid sides), got {list(self.tiles)}")
        if any(not 0 < z < 1 for z in self.zooms):
            raise ValueError(f"views.zooms must be in (0, 1) (side of the centre crop), got {list(self.zooms)}")
        low, high = self.random_scale
        if not 0 < low <= high < 1:
            raise ValueError(f"views.random_scale must satisfy 0 < low <= high < 1, got {list(self.random_scale)}")
        if self.random_zooms < 0 or self.cameras < 0:
            raise ValueError("views.random_zooms and views.cameras must be >= 0")

    @property
    def fixed(self) -> list[tuple[str, Box]]:
        """The views with the same box for every query: global, tiles, centre zooms."""
        out = [("global", (0.0, 0.0, 1.0, 1.0))]
        for n in self.tiles:
            out += [(f"tile{n}_{r}{c}", (c / n, r / n, (c + 1) / n, (r + 1) / n)) for r in range(n) for c in range(n)]
        out += [(f"zoom{z:g}", ((1 - z) / 2, (1 - z) / 2, (1 + z) / 2, (1 + z) / 2)) for z in self.zooms]
        return out

    @property
    def names(self) -> list[str]:
        """The slot names: the fixed views, then the random zooms, then the other cameras."""
        return ([name for name, _ in self.fixed] + [f"random_zoom{k}" for k in range(self.random_zooms)]
                + [f"camera{k + 1}" for k in range(self.cameras)])

    @property
    def n_crops(self) -> int:
        """Slots cut from the query itself (every query has them all); cameras come after."""
        return len(self.fixed) + self.random_zooms

    def boxes(self, i: int) -> list[Box]:
        """The crop boxes of sample ``i``: the fixed ones, then its seeded random zooms."""
        rng = np.random.default_rng([self.seed, i])
        out = [box for _, box in self.fixed]
        for _ in range(self.random_zooms):
            side = rng.uniform(*self.random_scale)
            x0, y0 = rng.uniform(0, 1 - side, size=2)
            out.append((float(x0), float(y0), float(x0 + side), float(y0 + side)))
        return out

    @classmethod
    def from_description(cls, described: dict) -> "ViewSet":
        """The view set that :meth:`describe` gave ``described`` (e.g. a manifest's PRM ``views``)."""
        names = described["slots"]
        tiles = dict.fromkeys(int(n[4:].split("_")[0]) for n in names if n.startswith("tile"))
        view_set = cls(tiles=tuple(tiles), zooms=tuple(float(n[4:]) for n in names if n.startswith("zoom")),
                       random_zooms=described["random_zooms"], random_scale=tuple(described["random_scale"]),
                       cameras=described["cameras"], seed=described["seed"])
        if json.dumps(view_set.describe(), sort_keys=True) != json.dumps(described, sort_keys=True):
            raise ValueError(f"not a view-set description this code makes: {described}")
        return view_set

    def describe(self) -> dict:
        """For the manifest: how an inference stack rebuilds the slots."""
        return {"slots": self.names, "fixed_boxes": {name: list(box) for name, box in self.fixed},
                "random_zooms": self.random_zooms, "random_scale": list(self.random_scale), "cameras": self.cameras,
                "seed": self.seed, "box_format": "x0, y0, x1, y1 as fractions of the 224 px query, cropped then "
                                                 "resized to the model input"}


GLOBAL_ONLY = ViewSet(tiles=(), zooms=(), random_zooms=0, cameras=0)  # slot 0 only: the validator query itself


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The part of ``image`` inside ``box`` (fractions of its sides), at least one pixel each way."""
    h, w = image.shape[:2]
    x0, y0 = int(round(box[0] * w)), int(round(box[1] * h))
    x1, y1 = max(x0 + 1, int(round(box[2] * w))), max(y0 + 1, int(round(box[3] * h)))
    return image[y0:y1, x0:x1]


def query_plan(n: int, levels: Sequence[int], every_level: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sample positions, levels) of the queries: each sample at every level, or at one level each (in turn,
    so the levels get equal shares, as the validator's uniform draw does on average)."""
    levels = np.asarray(list(levels), dtype=np.int64)
    if every_level:
        return np.repeat(np.arange(n), len(levels)), np.tile(levels, n)
    return np.arange(n), levels[np.arange(n) % len(levels)]


class ViewDataset(Dataset):
    """Queries of one split: ``{"views": (V, 3, S, S), "mask": (V,), "label", "index", "level"}``.

    ``images`` is the split's :class:`~train.data.datamodule.ImageDataset` (for decoding); ``table`` its index
    rows, whose ``scene_id`` / ``view`` columns give each sample's other cameras (same split by construction).
    """

    def __init__(self, images, table: pa.Table, view_set: ViewSet, levels: Sequence[int], img_size: int,
                 mean, std, every_level: bool = False):
        self.images, self.view_set = images, view_set
        self.samples, self.levels = query_plan(len(images), levels, every_level)
        self.model_input = ModelInput(img_size, mean, std)
        self.img_size = img_size
        self.others = _other_cameras(table, view_set.cameras)
        # whole queries (the global slot, other cameras) as the split serves them: from the run's resized queries
        self.whole = images.model_input if images.transform == self.model_input else self._whole

    def _whole(self, i: int, level: int) -> torch.Tensor:
        return self.model_input(self.images.query(i, level))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict:
        i, level = int(self.samples[k]), int(self.levels[k])
        crops = self.view_set.boxes(i)[1:]  # after the global view (slot 0, the whole query)
        query = self.images.query(i, level) if crops else None
        views = [self.whole(i, level)] + [self.model_input(crop(query, box)) for box in crops]
        mask = [True] * len(views)
        for j in self.others[i]:
            if j < 0:
                views.append(torch.zeros_like(views[0]))
                mask.append(False)
            else:
                views.append(self.whole(int(j), level))
                mask.append(True)
        return {"views": torch.stack(views), "mask": torch.tensor(mask), "label": int(self.images.labels[i]),
                "index": i, "level": level}


def _other_cameras(table: pa.Table, cameras: int) -> np.ndarray:
    """``(N, cameras)`` positions of each sample's other views of the same scene (by camera index), -1 if none."""
    out = np.full((table.num_rows, cameras), -1, dtype=np.int64)
    if cameras == 0 or "scene_id" not in table.column_names:
        return out
    scenes = table.column("scene_id").to_pylist()
    order = table.column("view").to_numpy() if "view" in table.column_names else np.zeros(len(scenes))
    members: dict[str, list[int]] = {}
    for pos in np.argsort(order, kind="stable"):
        members.setdefault(scenes[pos], []).append(int(pos))
    for i, scene in enumerate(scenes):
        others = [j for j in members[scene] if j != i][:cameras]
        out[i, :len(others)] = others
    return out


def view_dataset(datamodule, split: str, view_set: ViewSet, levels: Sequence[int],
                 every_level: bool = False) -> ViewDataset:
    """The views of ``split``'s queries as the datamodule's images, transforms and evaluation seed make them."""
    return ViewDataset(datamodule.queries(split, levels), datamodule.split(split), view_set, levels,
                       datamodule.img_size, datamodule.mean, datamodule.std, every_level)


@torch.no_grad()
def view_outputs(model: torch.nn.Module, datamodule, split: str, view_set: ViewSet, levels: Sequence[int],
                 every_level: bool = False, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Run ``model`` once over every view of every query of ``split``.

    Returns ``logits`` (Q, V, 2), ``embeddings`` (Q, V, D) in float16, ``mask`` (Q, V), ``label``, ``index``,
    ``level`` (Q,). Masked views hold zeros. Runs on the GPU when there is one.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    dataset = view_dataset(datamodule, split, view_set, levels, every_level)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=datamodule.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())  # (a cache: no global draw)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "embeddings", "mask", "label", "index", "level")}
    for batch in track(loader, f"views: {split}", len(dataset), "queries", count=lambda b: len(b["label"])):
        views, mask = batch["views"].to(device, non_blocking=True), batch["mask"]
        b, v = mask.shape
        logits, embeddings = pooled_features(model, views.flatten(0, 1))
        keep = mask.reshape(b, v, 1).to(device)
        parts["logits"].append((logits.float().reshape(b, v, -1) * keep).cpu())
        parts["embeddings"].append((embeddings.float().reshape(b, v, -1) * keep).half().cpu())
        for key in ("mask", "label", "index", "level"):
            parts[key].append(batch[key])
    model.cpu()
    return {k: torch.cat(v) for k, v in parts.items()}


def _view_settings(model: torch.nn.Module, datamodule, split: str, view_set: ViewSet | None, levels: Sequence[int],
                   every_level: bool) -> dict:
    return {"model": weights_sha256(model), "views": None if view_set is None else view_set.describe(),
            "levels": [int(lv) for lv in levels], "every_level": bool(every_level), "split": split,
            "img_size": datamodule.img_size, "eval_seed": datamodule.eval_seed}


def cached_view_outputs(run, model: torch.nn.Module, datamodule, split: str, view_set: ViewSet, levels: Sequence[int],
                        every_level: bool = False, batch_size: int = 32) -> tuple[dict[str, torch.Tensor], Path]:
    """:func:`view_outputs`, computed once per run and shared by the tasks that read views (the PRM, the feature
    store): ``<run>/views/<split>-<fingerprint>.safetensors``, keyed by the model's weights and the view settings.
    Returns (the outputs, the file)."""
    settings = _view_settings(model, datamodule, split, view_set, levels, every_level)
    path = run.path / "views" / f"{split}-{fingerprint(settings, 12)}.safetensors"
    outputs = cached_tensors(path, settings, lambda: view_outputs(model, datamodule, split, view_set, levels,
                                                                  every_level, batch_size))
    return outputs, path


def global_view_outputs(run, model: torch.nn.Module, datamodule, split: str, levels: Sequence[int],
                        every_level: bool = False) -> dict[str, torch.Tensor] | None:
    """The global slot (the whole query) of any of the run's view caches made by ``model`` on these queries:
    ``logits`` (Q, 2), ``embeddings`` (Q, D) in float16, ``index``, ``level``; None when there is none (nothing is
    computed)."""
    wanted = _view_settings(model, datamodule, split, None, levels, every_level)
    for path, settings in cached_files(Path(run.path) / "views", f"{split}-*.safetensors"):
        if {**settings, "views": None} == wanted and (outputs := read_cached(path, settings)) is not None:
            return {"logits": outputs["logits"][:, 0], "embeddings": outputs["embeddings"][:, 0],
                    "index": outputs["index"], "level": outputs["level"]}
    return None
