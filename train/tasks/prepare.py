"""``task=prepare``: every image of ``prepare.splits`` decoded once into a uint8 shard (``train/data/shards.py``), for
``data.train_source=shards``. Decoding runs in the loader workers (``data.num_workers``); a rerun with the same
settings on the same index skips."""
from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from train.data.datamodule import ImageDataset
from train.data.shards import MANIFEST, write_split
from train.data.transforms import ShardImage
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.training import build_datamodule
from train.utils.console import console, track
from train.utils.files import atomic_write_json

log = logging.getLogger(__name__)


def shard_size(cfg: DictConfig) -> int:
    """``prepare.size``, or 8/7 of the model input (256 for 224): RandomResizedCrop keeps its detail."""
    return int(cfg.prepare.size or round(cfg.data.img_size * 8 / 7))


def settings(cfg: DictConfig, run: Run) -> dict:
    """What the shards depend on: a rerun with equal settings has nothing to do."""
    run.artifact("data", "index", verify=False)  # a clear error when the data stage is missing
    index_sha = run.read()["tasks"]["data"]["artifacts"]["index"]["sha256"]
    return {"splits": list(cfg.prepare.splits), "size": shard_size(cfg), "index_sha256": index_sha}


@register_task("prepare", needs=lambda cfg: ["data"])
def run_prepare(cfg: DictConfig, run: Run) -> dict:
    """``task=prepare``: decode ``prepare.splits`` into uint8 shards, unless the run already prepared them with equal
    settings; returns the image count, size and throughput."""
    wanted = settings(cfg, run)
    if run.is_complete("prepare") and run.read()["tasks"]["prepare"].get("settings") == wanted:
        log.info("shards of %s at %d px already prepared in %s: skipping", wanted["splits"], wanted["size"],
                 run.path.name)
        return run.metrics("prepare")
    size, folder = wanted["size"], run.task_dir("prepare")
    for stale in folder.glob(".*.tmp"):  # left by an interrupted run
        stale.unlink()
    datamodule = build_datamodule(cfg, run)
    start, splits = time.perf_counter(), {}
    for split in wanted["splits"]:
        table = datamodule.split(split)
        dataset = ImageDataset(table, ShardImage(size), decode_side=size)
        loader = datamodule.loader(dataset, batch_size=cfg.prepare.batch_size)
        batches = track(loader, f"prepare: {split} split", table.num_rows, "images", count=lambda b: len(b["index"]))
        splits[split] = write_split(folder, split, batches, table, size)
    seconds = time.perf_counter() - start
    manifest = {"size": size, "fit": "shorter side resized to size, centre-cropped square", "layout": "NHWC uint8 RGB",
                "index_sha256": wanted["index_sha256"], "splits": splits}
    atomic_write_json(folder / MANIFEST, manifest)
    n = sum(entry["shape"][0] for entry in splits.values())
    metrics = {"images": n, "size": size, "gigabytes": round(n * size * size * 3 / 1e9, 3),
               "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 1)}
    console.print(f"[bold]prepare[/]: {n} images of {wanted['splits']} decoded once into {size} px uint8 shards "
                  f"({metrics['gigabytes']} GB) in {seconds:.1f} s ({metrics['images_per_s']:.0f} img/s)")
    artifacts = {"shards": folder / MANIFEST, **{f"{s}_samples": folder / e["samples"] for s, e in splits.items()}}
    run.record("prepare", artifacts=artifacts, metrics=metrics, settings=wanted)
    return metrics
