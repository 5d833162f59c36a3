"""Per-sample predictions of a split, one row per (validator level, sample): a run artifact in parquet.

Columns: ``level``, ``index`` (position in the split), ``label`` and the scores: ``logit_0`` /
``logit_1`` for raw logits, ``prob`` for a calibrated P(roadwork). Later stages (calibration,
thresholds, the difficulty router) read them instead of running the model again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from train.models.saving import weights_sha256
from train.runs import cached_files, fingerprint, read_cached, write_cached
from train.utils.console import progress

Columns = dict[str, np.ndarray]


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def unique_rows(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each sample index, in index order.

    Distributed samplers pad the last batch with repeated samples; gathered predictions drop them here.
    """
    order = index.argsort(stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]


def write_predictions(path: Path, per_level: dict[int, dict]) -> Path:
    """``per_level[level]`` maps column names to 1-D arrays (``logits`` [N, 2] becomes logit_0, logit_1)."""
    tables = []
    for level, columns in per_level.items():
        cols: Columns = {}
        for name, value in columns.items():
            array = _numpy(value)
            if name == "logits":
                cols.update({f"logit_{k}": array[:, k].astype(np.float32) for k in range(array.shape[1])})
            else:
                cols[name] = array
        n = len(next(iter(cols.values())))
        tables.append(pa.table({"level": np.full(n, level, dtype=np.int8), **cols}))
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.concat_tables(tables), tmp)
    tmp.replace(path)
    return path


def read_predictions(path: Path) -> dict[int, Columns]:
    """Inverse of :func:`write_predictions`: ``{level: {column: array}}``, rows sorted by ``index``."""
    table = pq.read_table(path).to_pydict()
    levels = np.asarray(table.pop("level"))
    out = {}
    for level in sorted(set(levels.tolist())):
        rows = levels == level
        cols = {name: np.asarray(values)[rows] for name, values in table.items()}
        order = np.argsort(cols["index"], kind="stable")
        cols = {name: values[order] for name, values in cols.items()}
        if "logit_0" in cols:
            cols["logits"] = np.stack([cols.pop("logit_0"), cols.pop("logit_1")], axis=1)
        out[int(level)] = cols
    return out


@torch.no_grad()
def predict_split(fn, datamodule, split: str, levels, output: str = "logits", device: str | torch.device = "cpu",
                  description: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Run ``fn(images) -> scores`` over ``split`` as validator queries at each of ``levels``.

    Returns ``{level: {output: scores, "label": ..., "index": ...}}`` in split order (on the CPU), the
    input of :func:`write_predictions`. ``fn`` may be a PyTorch model on ``device`` (``output="logits"``)
    or any callable, e.g. an ONNX Runtime session that returns calibrated probabilities (``output="prob"``);
    one that returns a dict of tensors gives one entry per key instead of ``output``. ``description`` names the
    pass in its progress (default ``predict: <split>``).
    """
    out = {}
    queries = datamodule.split(split).num_rows * len(levels)
    with progress(description or f"predict: {split}", queries, "queries") as step:
        for level in levels:
            parts: dict[str, list] = {"label": [], "index": []}
            for batch in datamodule.loader(datamodule.dataset(split, level)):
                scores = fn(batch["image"].to(device))
                for key, value in (scores.items() if isinstance(scores, dict) else [(output, scores)]):
                    parts.setdefault(key, []).append(torch.as_tensor(value).float().cpu())
                parts["label"].append(batch["label"])
                parts["index"].append(batch["index"])
                step.advance(len(batch["label"]))
            out[int(level)] = {k: torch.cat(v) for k, v in parts.items()}
    return out


def outputs_cache(run) -> Path:
    """The run's folder of model outputs on validator queries (:func:`collect_outputs`)."""
    return run.path / "outputs"


def cached_outputs_path(cache_dir: Path, model: torch.nn.Module, datamodule, split: str, levels) -> Path:
    """Where ``cache_dir`` keeps ``model``'s outputs on ``split`` at ``levels``."""
    return Path(cache_dir) / f"{split}-{fingerprint(_cache_key(model, datamodule, split, levels), 12)}.safetensors"


def cache_outputs(cache_dir: Path, model: torch.nn.Module, datamodule, split: str,
                  per_level: dict[int, dict]) -> Path | None:
    """Hand ``model``'s logits on every query of ``split`` (``{level: {"logits", "label", "index"}}`` in split order,
    as :func:`predict_split` gives them) to :func:`collect_outputs` with the same ``cache_dir``: a stage that has
    them anyway spares later stages the pass. Nothing is written (None) unless every level covers the whole split."""
    n = datamodule.split(split).num_rows
    if not per_level or not all(np.array_equal(_numpy(p["index"]), np.arange(n)) for p in per_level.values()):
        return None
    key = _cache_key(model, datamodule, split, list(per_level))
    path = cached_outputs_path(cache_dir, model, datamodule, split, list(per_level))
    write_cached(path, key, {
        "out": torch.cat([torch.as_tensor(p["logits"]).float() for p in per_level.values()]),
        "label": torch.cat([torch.as_tensor(p["label"]).long() for p in per_level.values()]),
        "index": torch.cat([torch.as_tensor(p["index"]).long() for p in per_level.values()]),
        "level": torch.cat([torch.full((n,), int(lv)) for lv in per_level])})
    return path


def cached_queries(cache_dir: Path, model: torch.nn.Module, datamodule, split: str, index: np.ndarray,
                   level: np.ndarray) -> torch.Tensor | None:
    """``model``'s outputs on the queries ``(index[k] at level[k])`` of ``split``, read from any file of
    ``cache_dir`` that holds them (:func:`collect_outputs` / :func:`cache_outputs` over a set of levels), else None:
    a stage that asks one level per image reads what a stage that ran every level kept."""
    key = _cache_key(model, datamodule, split, [])  # any levels: each file says which it holds
    table = datamodule.split(split)
    for path, found in cached_files(cache_dir, f"{split}-*.safetensors"):
        if {**found, "levels": []} != key or not set(level.tolist()) <= set(found["levels"]):
            continue
        hit = read_cached(path, found)
        if hit is None:
            continue
        at = np.full((max(found["levels"]) + 1, table.num_rows), -1)
        at[hit["level"].numpy(), hit["index"].numpy()] = np.arange(len(hit["index"]))
        rows = at[level, index]
        if (rows < 0).any():
            continue
        if not np.array_equal(hit["label"].numpy()[rows], table.column("label").to_numpy()[index]):
            raise RuntimeError(f"the cached outputs in {path} have other labels than this data's {split} split: "
                               "delete the file to have it rewritten")
        return hit["out"][torch.from_numpy(rows)]
    return None


def _cache_key(model: torch.nn.Module, datamodule, split: str, levels) -> dict:
    """What a model's outputs on a split's validator queries depend on (the cache file's fingerprint)."""
    return {"model": weights_sha256(model), "split": split, "levels": [int(lv) for lv in levels],
            "img_size": datamodule.img_size, "mean": list(datamodule.mean), "std": list(datamodule.std),
            "eval_seed": datamodule.eval_seed}


def collect_outputs(outputs: dict, datamodule, split: str, levels, cache_dir: Path | None = None
                    ) -> dict[str, torch.Tensor]:
    """``{name: fn(images)}`` over ``split`` at each level, stacked over the levels with ``label``, ``index`` and
    ``level``; models among ``outputs`` run on the GPU when there is one (and go back to the CPU).

    With ``cache_dir`` (a run's ``outputs/``), each model's outputs are kept there, keyed by its weights and the
    queries, and any later call reads them instead of running the model again (the calibrate stage hands on the
    calibrated tiers' outputs, :func:`cache_outputs`; the draft stage's teacher and draft on calib and test are the
    router's inputs too); the data is read only for what is not cached."""
    keys = {n: _cache_key(fn, datamodule, split, levels) for n, fn in outputs.items()
            if cache_dir is not None and isinstance(fn, torch.nn.Module)}
    paths = {n: cached_outputs_path(cache_dir, outputs[n], datamodule, split, levels) for n in keys}
    cached = {n: hit for n in keys if (hit := read_cached(paths[n], keys[n])) is not None}
    todo = {n: fn for n, fn in outputs.items() if n not in cached}
    rows = ("label", "index", "level")
    out = _run_outputs(todo, datamodule, split, levels) if todo else {k: next(iter(cached.values()))[k] for k in rows}
    for name, hit in cached.items():
        if not all(torch.equal(hit[k], out[k]) for k in rows):
            raise RuntimeError(f"the cached outputs of {name!r} ({paths[name]}) cover other {split} queries than "
                               "this data: delete the file to have it rewritten")
        out[name] = hit["out"]
    for name in set(keys) - set(cached):
        write_cached(paths[name], keys[name], {"out": out[name], **{k: out[k] for k in rows}})
    return out


def _run_outputs(outputs: dict, datamodule, split: str, levels) -> dict[str, torch.Tensor]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [fn for fn in outputs.values() if isinstance(fn, torch.nn.Module)]
    for model in models:
        model.to(device).eval()
    per_level = predict_split(lambda images: {name: fn(images) for name, fn in outputs.items()}, datamodule, split,
                              levels, device=device, description=f"predict: {', '.join(outputs)} on {split}")
    for model in models:
        model.cpu()
    out = {key: torch.cat([p[key] for p in per_level.values()]) for key in next(iter(per_level.values()))}
    out["level"] = torch.cat([torch.full((len(p["label"]),), lv) for lv, p in per_level.items()])
    return out


class OutcomeDataset(Dataset):
    """Rows of equal-length tensors, served as dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}
