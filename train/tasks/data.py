"""The ``data`` stage: materialise the source and write the run's sample index."""
from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from train.runs import Run
from train.tasks.registry import register_task
from train.utils.console import console

log = logging.getLogger(__name__)


@register_task("data")
def run_data(cfg: DictConfig, run: Run) -> dict:
    """``task=data``: build the run's sample index from ``cfg.data`` and record it; returns the index's counts."""
    datamodule = instantiate(cfg.data)
    path, stats = datamodule.build_index(run.task_dir("data"))
    counts = ", ".join(f"{k} {v['n']} ({v['roadwork']} roadwork)" for k, v in stats["splits"].items())
    console.print(f"[bold]data[/]: {stats['total']} samples; {counts}; skipped {stats['skipped_total']} "
                  f"{stats['skipped'] or ''}")
    run.record("data", artifacts={"index": path}, metrics=stats)
    return stats
