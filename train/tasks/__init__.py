"""Tasks by name: each is ``fn(cfg, run) -> metrics`` and is picked with ``task=NAME``."""
from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from train.runs import Run

TaskFn = Callable[[DictConfig, Run], dict]
TASKS: dict[str, TaskFn] = {}


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    def add(fn: TaskFn) -> TaskFn:
        TASKS[name] = fn
        return fn
    return add


def get_task(name: str) -> TaskFn:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name]


# Importing the task modules registers them.
from train.tasks import apt, calibrate, data, difficulty, draft, evaluate, export, pipeline, prm, stage1  # noqa: E402,F401
from train.tasks import features, fusion, prepare, thresholds  # noqa: E402,F401
