"""The embedded default data: the synthetic generator written once to parquet and reused.

Shards are written in the NATIX parquet schema (an ``image`` struct of JPEG bytes, ``label``,
``scene_description``) plus ``scene_id``, ``view``, ``difficulty``, into a folder named by a
fingerprint of the generator settings, so changed settings never reuse stale images.
Generation is parallel, resumable shard by shard, and deterministic by seed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from train.data.sources import ParquetSource
from train.utils.console import progress
from train.utils.files import atomic_write_json

log = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int64()),
    ("scene_description", pa.string()),
    ("scene_id", pa.string()),
    ("view", pa.int64()),
    ("difficulty", pa.float32()),
])
DONE = "_COMPLETE.json"


def scene_label(seed: int, scene: int, roadwork_fraction: float) -> int:
    """The label of scene ``scene``: roadwork with probability ``roadwork_fraction``."""
    return int(np.random.default_rng([seed, scene, 1]).random() < roadwork_fraction)


class SyntheticSource(ParquetSource):
    """Generates ``n_scenes`` scenes x ``views_per_scene`` views into ``root/<fingerprint>/``."""

    name = "synthetic"

    def __init__(self, root: str, n_scenes: int = 7000, views_per_scene: int = 2, image_size: int = 256,
                 roadwork_fraction: float = 0.8, seed: int = 0, jpeg_quality: int = 90,
                 scenes_per_shard: int = 500, workers: int = 0, knobs: dict | None = None):
        if not 1 <= views_per_scene <= 6:
            raise ValueError(f"data.source.views_per_scene must be in 1..6, got {views_per_scene}")
        if not 0 < roadwork_fraction < 1:
            raise ValueError(f"data.source.roadwork_fraction must be in (0, 1), got {roadwork_fraction}")
        self.settings = dict(n_scenes=int(n_scenes), views_per_scene=int(views_per_scene),
                             image_size=int(image_size), roadwork_fraction=float(roadwork_fraction),
                             seed=int(seed), jpeg_quality=int(jpeg_quality), knobs=dict(knobs or {}))
        self.scenes_per_shard, self.workers = int(scenes_per_shard), int(workers) or os.cpu_count() or 1
        super().__init__(str(Path(root) / self.fingerprint()), image_column="image")

    def fingerprint(self) -> str:
        """The data folder's name: the scene and view counts and a hash of every generator setting."""
        blob = json.dumps(self.settings, sort_keys=True).encode()
        return f"n{self.settings['n_scenes']}x{self.settings['views_per_scene']}-" + hashlib.sha1(blob).hexdigest()[:10]

    def shard_paths(self) -> list[tuple[Path, range]]:
        """Each shard's file and the range of scene numbers it holds."""
        n, k = self.settings["n_scenes"], self.scenes_per_shard
        return [(self.root / f"part-{i // k:05d}.parquet", range(i, min(i + k, n))) for i in range(0, n, k)]

    def prepare(self) -> None:
        """Generate the missing shards (a no-op when the folder is complete)."""
        if (self.root / DONE).exists():
            log.info("synthetic data: reusing %s", self.root)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        todo = [(str(p), r.start, r.stop, self.settings) for p, r in self.shard_paths() if not p.exists()]
        start = time.perf_counter()
        log.info("synthetic data: rendering %d scenes x %d views into %s on %d processes",
                 self.settings["n_scenes"], self.settings["views_per_scene"], self.root, self.workers)
        scenes = sum(stop - begin for _, begin, stop, _ in todo)
        with progress("synthetic data: rendering", scenes, "scenes") as step:
            if self.workers > 1 and len(todo) > 1:
                with mp.get_context("spawn").Pool(min(self.workers, len(todo))) as pool:
                    jobs = [(pool.apply_async(write_shard, t), t[2] - t[1]) for t in todo]
                    counts = []
                    for job, n in jobs:  # in order: a shard's scenes count once it is written
                        counts.append(job.get())
                        step.advance(n)
            else:
                counts = [write_shard(*t, on_scene=step.advance) for t in todo]
        seconds = time.perf_counter() - start
        atomic_write_json(self.root / DONE, {**self.settings, "images": sum(counts), "seconds": round(seconds, 2)})
        if counts:
            log.info("synthetic data: %d images in %.1f s (%.0f img/s)", sum(counts), seconds, sum(counts) / seconds)


def write_shard(path: str, start: int, stop: int, settings: dict, on_scene: Callable[[], None] | None = None) -> int:
    """Render scenes ``start..stop-1`` and write them as one parquet shard (atomically); ``on_scene()`` after each."""
    import cv2

    from train.data.synthetic import SceneKnobs, render_scene

    cv2.setNumThreads(1)
    knobs = SceneKnobs(size=settings["image_size"], **settings["knobs"])
    rows: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    for scene in range(start, stop):
        label = scene_label(settings["seed"], scene, settings["roadwork_fraction"])
        views = render_scene(int(np.random.default_rng([settings["seed"], scene]).integers(2**62)), label,
                             settings["views_per_scene"], knobs)
        for v in views:
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(v.image, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, settings["jpeg_quality"]])
            rows["image"].append({"bytes": jpeg.tobytes(), "path": f"scene{scene:07d}_view{v.view}.jpg"})
            rows["label"].append(label)
            rows["scene_description"].append(v.description)
            rows["scene_id"].append(f"scene{scene:07d}")
            rows["view"].append(v.view)
            rows["difficulty"].append(v.difficulty)
        if on_scene is not None:
            on_scene()
    tmp = Path(path).with_suffix(".tmp")
    pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), tmp)
    os.replace(tmp, path)
    return len(rows["label"])



