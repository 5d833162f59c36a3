"""``task=pipeline``: run ``pipeline.stages`` in order inside one run, skipping completed ones."""
from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from train.runs import Run
from train.tasks import get_task, register_task

log = logging.getLogger(__name__)


@register_task("pipeline")
def run_pipeline(cfg: DictConfig, run: Run) -> dict:
    stages = list(cfg.pipeline.stages)
    if "pipeline" in stages:
        raise ValueError("pipeline.stages cannot contain 'pipeline'")
    fns = {stage: get_task(stage) for stage in stages}  # unknown names fail before any work
    results: dict = {}
    for stage, fn in fns.items():
        if run.is_complete(stage) and not cfg.pipeline.force:
            log.info("stage '%s' already complete in %s: skipping (pipeline.force=true reruns it)", stage, run.path.name)
            results[stage] = run.metrics(stage)
            continue
        log.info("stage '%s' starting", stage)
        start = time.perf_counter()
        results[stage] = fn(cfg, run)
        log.info("stage '%s' done in %.1f s", stage, time.perf_counter() - start)
    return results
