"""Synthetic generator throughput: images/s on one core (render, render + JPEG) and on all cores."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import cv2

from train.data.synthetic import SceneKnobs, render_scene
from train.data.synthetic_source import SyntheticSource


def one_core_rate(n: int, size: int, encode: bool, repeats: int = 3) -> float:
    """Median images/s over ``repeats`` runs of ``n`` single-view scenes, one thread."""
    cv2.setNumThreads(1)
    knobs = SceneKnobs(size=size)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for seed in range(n):
            image = render_scene(r * n + seed, seed % 5 != 0, 1, knobs)[0].image
            if encode:
                cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def all_cores_rate(n_scenes: int, size: int) -> tuple[float, int]:
    """Images/s of the real parquet writer (SyntheticSource.prepare) on every core."""
    with tempfile.TemporaryDirectory() as tmp:
        source = SyntheticSource(tmp, n_scenes=n_scenes, views_per_scene=2, image_size=size, scenes_per_shard=100)
        start = time.perf_counter()
        source.prepare()
        return 2 * n_scenes / (time.perf_counter() - start), source.workers


def run(argv: list[str] | None = None) -> dict:
    """The ``synthetic`` benchmark at ``--size``: images/s per core (render, render + JPEG) and of the parquet
    writer on every core."""
    parser = argparse.ArgumentParser(prog="python -m train.bench synthetic")
    parser.add_argument("--n", type=int, default=300, help="scenes per timed repeat")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    n, size = args.n, args.size
    render = one_core_rate(n, size, encode=False)
    encoded = one_core_rate(n, size, encode=True)
    parallel, workers = all_cores_rate(max(n, 400), size)
    figures = {"size": size, "render_per_core": render, "render_jpeg_per_core": encoded,
               "parquet_all_cores": parallel, "cores": workers, "cpu_count": os.cpu_count()}
    print(f"synthetic generator at {size}px: {render:.0f} img/s per core (render), {encoded:.0f} img/s per core "
          f"(render + JPEG), {parallel:.0f} img/s written to parquet on {workers} processes")
    return figures
