"""Tasks by name: each is ``fn(cfg, run) -> metrics``, registered with :func:`register_task` in its own module of
``train.tasks`` and picked with ``task=NAME``; every tier of :mod:`train.tiers.base`'s registry is also a task, its
training flow (:func:`~train.tiers.base.run_tier`). The modules are imported when a task is first looked up. A task
that needs an earlier stage runs it through here (:func:`ensure_data`, :func:`ensure_shards`)."""
from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path

from omegaconf import DictConfig

from train.errors import RunError
from train.runs import Run
from train.tiers.base import Tier, load_tiers, run_tier
from train.utils.distributed import is_rank_zero, world_size

log = logging.getLogger(__name__)
TaskFn = Callable[[DictConfig, Run], dict]
NeedsFn = Callable[[DictConfig], list[str]]
TASKS: dict[str, TaskFn] = {}
RANKS: dict[str, str] = {}  # task -> which processes of a multi-process launch run it (see register_task)
NEEDS: dict[str, NeedsFn] = {}  # task -> the stages whose outputs it reads, for a config


def register_task(name: str, ranks: str = "zero", needs: NeedsFn | None = None) -> Callable[[TaskFn], TaskFn]:
    """Register ``fn`` as ``task=name``. ``ranks`` says which processes of a multi-process launch (DDP, DeepSpeed)
    run it: ``zero`` (rank 0 alone: it trains nothing), ``all`` (every rank: its Trainer needs them all; rank 0
    alone writes the results) or ``one`` (it trains, but on one process only for now). ``needs(cfg)``: the stages
    whose outputs it reads (:func:`check_needs`); a stage it runs itself when missing (data, prepare) is not one."""
    def add(fn: TaskFn) -> TaskFn:
        TASKS[name], RANKS[name], NEEDS[name] = fn, ranks, needs or (lambda cfg: [])
        return fn
    return add


def check_needs(cfg: DictConfig, stages: Iterable[str], run: Run | None) -> None:
    """Before the first of ``stages`` runs: each one's inputs come from an earlier one or a stage complete in ``run``
    (None: a new run, which holds nothing)."""
    load_tasks()
    made = {name for name in TASKS if run is not None and run.is_complete(name)}
    for stage in stages:
        missing = [need for need in dict.fromkeys(NEEDS.get(stage, lambda cfg: [])(cfg)) if need not in made]
        if missing:
            where = f"run {run.path.name} does not hold them" if run is not None else "this is a new run"
            raise RunError(f"stage '{stage}' reads the outputs of {missing}: no earlier stage makes them and {where}; "
                           f"add them before '{stage}' (pipeline.stages), or give run_dir= a run that has them")
        made.add(stage)


def load_tasks() -> None:
    """Import every module of ``train.tasks`` (importing one registers its tasks) and make every registered tier a
    task (a tier registered later, e.g. by a user's own module, joins on the next lookup)."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"train.tasks.{module.name}")
    for name, tier in load_tiers().items():
        if name not in TASKS:
            register_task(name, ranks=tier.ranks, needs=tier.needs)(_tier_task(tier))


def _tier_task(tier: Tier) -> TaskFn:
    def train_tier(cfg: DictConfig, run: Run) -> dict:
        if tier.reads_shards:
            ensure_shards(cfg, run)
        return run_tier(cfg, run, tier)
    return train_tier


def get_task(name: str) -> TaskFn:
    """The task named ``name`` (task modules and tiers load on first need); a ``ValueError`` for an unknown one."""
    if name not in TASKS:
        load_tasks()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name]


def task_ranks(name: str) -> str:
    """Which processes run task ``name`` (see :func:`register_task`)."""
    get_task(name)
    return RANKS[name]


def ensure_data(cfg: DictConfig, run: Run) -> None:
    """Run the ``data`` stage in ``run`` unless it is complete (tasks that only need images, e.g. evaluate)."""
    if not run.is_complete("data"):
        log.info("run %s has no data stage yet: indexing the configured data first", run.path.name)
        get_task("data")(cfg, run)


def ensure_shards(cfg: DictConfig, run: Run) -> None:
    """With ``data.train_source=shards``, run ``task=prepare`` in ``run`` (it skips when the shards are up to date)."""
    if cfg.data.get("train_source", "jpeg") == "shards":
        get_task("prepare")(cfg, run)


def single_process_only(names: Iterable[str]) -> None:
    """An error for the first of ``names`` that trains on one process only, when this launch has several."""
    for name in names:
        if task_ranks(name) == "one" and world_size() > 1:
            raise RunError(f"task '{name}' trains on one process only for now: run it with one device (trainer=gpu, "
                           "or trainer.devices=1 trainer.num_nodes=1); a pipeline goes on from it with "
                           "run_dir=<its run>")


def runs_here(name: str) -> bool:
    """Whether this process runs task ``name`` (see :func:`register_task`)."""
    single_process_only([name])
    return task_ranks(name) == "all" or is_rank_zero()
