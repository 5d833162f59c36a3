"""Tasks by name: each is ``fn(cfg, run) -> metrics`` and is picked with ``task=NAME``."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from omegaconf import DictConfig

from train.runs import Run, RunError
from train.utils.distributed import is_rank_zero, world_size

TaskFn = Callable[[DictConfig, Run], dict]
TASKS: dict[str, TaskFn] = {}
RANKS: dict[str, str] = {}  # task -> which processes of a multi-process launch run it (see register_task)


def register_task(name: str, ranks: str = "zero") -> Callable[[TaskFn], TaskFn]:
    """Register ``fn`` as ``task=name``. ``ranks`` says which processes of a multi-process launch (DDP, DeepSpeed)
    run it: ``zero`` (rank 0 alone: it trains nothing), ``all`` (every rank: its Trainer needs them all; rank 0
    alone writes the results) or ``one`` (it trains, but on one process only for now)."""
    def add(fn: TaskFn) -> TaskFn:
        TASKS[name], RANKS[name] = fn, ranks
        return fn
    return add


def single_process_only(names: Iterable[str]) -> None:
    """An error for the first of ``names`` that trains on one process only, when this launch has several."""
    for name in names:
        if RANKS[name] == "one" and world_size() > 1:
            raise RunError(f"task '{name}' trains on one process only for now: run it with one device (trainer=gpu, "
                           "or trainer.devices=1 trainer.num_nodes=1); a pipeline goes on from it with "
                           "run_dir=<its run>")


def runs_here(name: str) -> bool:
    """Whether this process runs task ``name`` (see :func:`register_task`)."""
    single_process_only([name])
    return RANKS[name] == "all" or is_rank_zero()


def get_task(name: str) -> TaskFn:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name]


# Importing the task modules registers them.
from train.tasks import apt, calibrate, data, difficulty, draft, evaluate, export, pipeline, prm, stage1  # noqa: E402,F401
from train.tasks import features, fusion, prepare, pretrain, quantize, thresholds  # noqa: E402,F401
