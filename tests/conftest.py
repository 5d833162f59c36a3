"""Shared fixtures: the real Hydra config, cut down, and one small pipeline run for many tests."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from train.configs import config_dir

CONF_DIR = config_dir()
QUIET = ["print_config=false", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def compose_config(*overrides: str) -> DictConfig:
    """Compose ``conf/config.yaml`` exactly as ``python -m train`` would, with overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def command_lines(markdown: str) -> list[str]:
    """The command lines of a page's bash blocks (continuations joined, comments dropped, ``a && b`` split)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                out += [command.strip() for command in line.split(" && ")]
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is many times faster than two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session (same settings -> generated once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_config(tmp_path, data_dir):
    """``compose_config`` for a fresh checkpoints folder, the shared data cache and debug=tiny."""
    def make(*overrides: str) -> DictConfig:
        return compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny",
                              *QUIET, *overrides)
    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """The Stage-1 pipeline (data -> stage1 -> calibrate -> export -> evaluate) once on tiny synthetic data; returns
    its Run."""
    from train.__main__ import run_task
    from train.runs import Run

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config(f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                         "pipeline=stage1")
    run_task(cfg)
    (run_path,) = list((root / "checkpoints").iterdir())
    return Run.open(run_path)


@pytest.fixture(scope="session")
def data_run(tmp_path_factory, data_dir):
    """A run with only its data stage done (debug=tiny), for tests that add stages on a copy (:func:`copy_run`)."""
    from train.__main__ import run_task
    from train.runs import Run

    root = tmp_path_factory.mktemp("data_run")
    run_task(compose_config(f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET, "task=data"))
    (path,) = list((root / "checkpoints").iterdir())
    return Run.open(path)


TIERS = ["difficulty", "draft", "stage1"]


@pytest.fixture(scope="session")
def cheap_tiers(tiny_run, data_dir, tmp_path_factory):
    """stage1 (trained longer than the tiny run's, so the teacher has a real decision function) -> calibrate ->
    draft (teacher outputs cached) -> difficulty -> export on a copy of the tiny run; returns (run, cfg).

    Shared by the tests of the cheap tiers and of what learns from Stage-1's outputs (PRM, fusion): a test that
    adds stages works on its own copy (:func:`copy_run`)."""
    from train.__main__ import run_task

    root = tmp_path_factory.mktemp("cheap_tiers")
    run = copy_run(tiny_run, root)
    base = [f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET, f"run_dir={run.path}",
            "pipeline=stage1", "trainer.limit_train_batches=null", "draft.epochs=6",
            "draft.teacher_outputs=cache",
            "draft.resamples=100", "difficulty.epochs=4"]
    run_task(compose_config(*base, "task=stage1", "trainer.max_epochs=4"))
    for task in ("calibrate", "draft", "difficulty"):
        run_task(compose_config(*base, f"task={task}"))
    cfg = compose_config(*base, "task=export", f"export.models=[{','.join(TIERS)}]")
    run_task(cfg)
    return run, cfg


def copy_run(run, root: Path):
    """A copy of ``run`` under ``root`` (its registry's paths follow the folder), for tests that add stages."""
    from train.runs import Run

    return Run.open(shutil.copytree(run.path, root / run.path.name))


@pytest.fixture(scope="session")
def prm_tiers(cheap_tiers, data_dir, tmp_path_factory):
    """The PRM stage (small traces, a few epochs) and an export with it, on a copy of the cheap-tiers run; returns
    (run, cfg). Shared by the PRM's tests and the cascade's (which add stages on their own copy)."""
    from train.__main__ import run_task

    root = tmp_path_factory.mktemp("prm")
    run = copy_run(cheap_tiers[0], root)
    base = [f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET, f"run_dir={run.path}",
            "pipeline=stage1", "prm.epochs=6", "prm.search.stop.min_accepted=10", "prm.search.budgets=[1,3,6]",
            "prm.search.budget=6"]
    cfg = compose_config(*base, "task=prm")
    run_task(cfg)
    run_task(compose_config(*base, "task=export", f"export.models=[{','.join(TIERS + ['prm'])}]"))
    return run, cfg
