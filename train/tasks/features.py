"""``task=features``: run the run's trained models over its splits and write the feature store.

Each modality of ``features.modalities`` (:mod:`train.tiers.modalities`) is computed for the planned queries of every
split in ``features.splits`` into ``<run>/features/`` (:class:`~train.data.feature_store.FeatureStore`), shard by
shard; shards already written by the same producer are kept, so an interrupted run resumes. External modalities
(``features.external``: name -> a user's parquet / npz keyed by ``sample_id``) are joined by id: ids that are no
sample of the run are an error, samples the file lacks are absent (counted). The manifest says which model (tier +
weights sha256) or file produced each column.
"""
from __future__ import annotations

import logging
import time

from hydra.utils import instantiate
from omegaconf import DictConfig

from train.data.feature_store import FeatureStore, join_external, read_external
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.calibration import calibrated
from train.tiers.modalities import split_keys, write_modality
from train.tiers.training import build_datamodule
from train.utils.files import atomic_write_json, sha256_file

log = logging.getLogger(__name__)
STORE_DIR = "features"


def store_external(store: FeatureStore, name: str, path: str, datamodule, fcfg: DictConfig) -> dict:
    """Join one external file into the store by sample id; returns {split: number of samples it lacks}."""
    ids, values = read_external(path)
    store.declare(name, values.shape[1], {"kind": "external", "file": str(path), "sha256": sha256_file(path)})
    datamodule.setup()
    known = datamodule.index.column("sample_id").to_pylist()  # every sample of the run, whatever its split
    missing = {}
    for split in fcfg.splits:
        keys = split_keys(datamodule, split, fcfg.levels, split in fcfg.every_level)
        features, present, missing[split] = join_external(ids, values, known, keys["sample_id"],
                                                          f"external {name} ({path})")
        for k, (start, stop) in enumerate(store.plan(split, len(present), fcfg.shard_size)):
            store.write_shard(split, name, k, {c: v[start:stop] for c, v in keys.items()}, features[start:stop],
                              present[start:stop])
        if missing[split]:
            log.warning("external %s: %d of %d %s queries have no row in %s (stored as absent)", name, missing[split],
                        len(present), split, path)
    return missing


def _needs(cfg: DictConfig) -> list[str]:
    """The calibrated tiers the modalities read."""
    tiers = [m["tier"] for m in (cfg.features.modalities or {}).values() if m is not None and m.get("tier")]
    return [stage for tier in tiers for stage in calibrated(cfg, tier)]


@register_task("features", needs=_needs)
def run_features(cfg: DictConfig, run: Run) -> dict:
    """``task=features``: write every modality and external file into the run's feature store, keeping the modality
    shards already written; returns each modality's dim and time and the samples external files lack."""
    fcfg = cfg.features
    store = FeatureStore(run.task_dir(STORE_DIR))
    report: dict = {"modalities": {}, "external_missing": {}}
    datamodule = None
    for name, spec in (fcfg.modalities or {}).items():
        if spec is None:
            continue
        start = time.perf_counter()
        modality = instantiate(spec)
        producer = modality.setup(run)
        store.declare(name, modality.dim, producer)
        spec = getattr(modality, "input_spec", None)
        if spec and not store.manifest.get("input"):
            store.manifest["input"] = spec  # the image input of the models behind the columns
        datamodule = build_datamodule(cfg, run, spec)
        written = {split: write_modality(store, name, modality, datamodule, split, fcfg.levels,
                                         split in fcfg.every_level, fcfg.shard_size) for split in fcfg.splits}
        seconds = time.perf_counter() - start
        report["modalities"][name] = {"dim": modality.dim, "shards_written": written, "seconds": round(seconds, 1)}
        log.info("features: %s (%d values per query) done in %.1f s; shards written %s", name, modality.dim, seconds,
                 written)
    for name, path in (fcfg.external or {}).items():
        datamodule = datamodule or build_datamodule(cfg, run)
        report["external_missing"][name] = store_external(store, name, str(path), datamodule, fcfg)
    if not store.manifest.get("input"):
        store.manifest["input"] = {"img_size": cfg.model.img_size, "mean": list(cfg.model.mean),
                                   "std": list(cfg.model.std), "interpolation": "area"}
    store.save()
    report["queries"] = {s: store.manifest["splits"][s]["queries"] for s in fcfg.splits}
    report["dims"] = store.dims()
    atomic_write_json(store.root / "report.json", report)
    metrics = {f"{m}/dim": r["dim"] for m, r in report["modalities"].items()}
    metrics.update({f"{m}/seconds": r["seconds"] for m, r in report["modalities"].items()})
    metrics.update({f"{m}/missing/{s}": n for m, per in report["external_missing"].items() for s, n in per.items()})
    run.record("features", artifacts={"manifest": store.root / "manifest.json", "report": store.root / "report.json"},
               metrics=metrics, store=str(store.root))
    return metrics
