"""``task=pipeline``: run ``pipeline.stages`` in order inside one run, skipping completed ones.

With several processes (DDP, DeepSpeed) every rank walks the same stages: all of them run the stages that train on
every rank (``stage1``), rank 0 alone runs the others, and the ranks meet before each stage that needs them all, so
they read what rank 0 wrote. Once no such stage is left, the other ranks leave and rank 0 goes on alone.
Every stage starts from ``seed``, so it trains the same model as ``task=<stage> run_dir=...`` run alone.
"""
from __future__ import annotations

import logging
import time
from functools import partial

import pytorch_lightning as pl
from omegaconf import DictConfig

from train.runs import Run
from train.tasks.registry import get_task, register_task, runs_here, single_process_only, task_ranks
from train.utils.distributed import is_rank_zero, leave_process_group, wait_for_rank_zero

log = logging.getLogger(__name__)


@register_task("pipeline", ranks="all")
def run_pipeline(cfg: DictConfig, run: Run) -> dict:
    """``task=pipeline``: run ``pipeline.stages`` in order, skipping complete ones unless ``pipeline.force``; returns
    each stage's metrics by name."""
    stages = list(cfg.pipeline.stages)
    fns = {stage: get_task(stage) for stage in stages}  # unknown names fail before any work
    results: dict = {}
    todo = []
    for stage in stages:
        if run.is_complete(stage) and not cfg.pipeline.force:
            log.info("stage '%s' already complete in %s: skipping (pipeline.force=true reruns it)", stage, run.path.name)
            results[stage] = run.metrics(stage)
        else:
            todo.append(stage)
    for i, stage in enumerate(todo):
        if runs_here(stage):
            log.info("stage '%s' starting", stage)
            pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the random numbers a run of it alone draws
            start = time.perf_counter()
            results[stage] = fns[stage](cfg, run)
            log.info("stage '%s' done in %.1f s", stage, time.perf_counter() - start)
        rest = todo[i + 1:]
        if any(task_ranks(s) == "all" for s in rest):
            wait_for_rank_zero(partial(run.is_complete, stage))
            continue
        single_process_only(rest)  # every rank stops here, while the number of processes is known
        leave_process_group()  # the rest is rank 0's alone
        if not is_rank_zero():
            break
    return results
