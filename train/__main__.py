"""``python -m train``: compose the config, open or create the run, run the task, report."""
from __future__ import annotations

import logging
import sys

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from train.config_checks import check_config, job_stages
from train.configs import config_dir
from train.data import BadImageError, DataError
from train.errors import ConfigError, RunError
from train.export import BundleError, ExportError
from train.extras import check_args
from train.runs import Run
from train.tasks.registry import check_needs, get_task, runs_here
from train.tiers.base import load_tiers
from train.utils.checkpoints import UnsafeCheckpointError
from train.utils.console import close_log_file, log_to_file, print_config, save_config, save_overrides, setup_logging
from train.utils.distributed import is_rank_zero
from train.utils.faults import NonFiniteLossError, Preempted

log = logging.getLogger("train")
USER_ERRORS = (DataError, BadImageError, RunError, BundleError, ExportError, FileNotFoundError, ConfigError,
               UnsafeCheckpointError, NonFiniteLossError)


def run_task(cfg: DictConfig) -> float | None:
    """Run ``cfg.task.name`` in the run named by ``run_dir`` (or a new one); returns the optimised metric.

    A multirun's job makes its new run inside its job folder (:func:`job_folder`). With several processes (DDP,
    DeepSpeed) they share rank 0's run; rank 0 alone logs to ``train.log``, saves the config and runs what does not
    train (:func:`~train.tasks.runs_here`); the others print warnings only.
    """
    rank_zero = is_rank_zero()
    setup_logging("INFO" if rank_zero else "WARNING")
    task = cfg.task.name
    load_tiers(cfg.get("tier_modules") or ())  # tiers from outside the package join the registry first
    fn = get_task(task)
    check_config(cfg)  # before the run folder is made: a bad key or combination costs nothing
    check_needs(cfg, job_stages(cfg), Run.open(cfg.run_dir) if cfg.get("run_dir") else None)  # and missing inputs
    run = Run.for_process(cfg.get("run_dir"), job_folder() or cfg.paths.checkpoints_dir,
                          cfg.get("run_name") or cfg.get("experiment_name") or task)
    if rank_zero:
        log_to_file(run.path / "train.log")
        save_config(cfg, run.path / task / "config.yaml")
        save_overrides(run.path / "overrides.yaml", task)  # this command's overrides, appended
        if cfg.get("print_config", True):
            print_config(cfg)
    log.info("run %s: task '%s'", run.path, task)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    metrics = fn(cfg, run) if runs_here(task) else {}
    log.info("run %s: task '%s' finished", run.path, task)
    optimized = cfg.get("optimized_metric") if rank_zero else None  # sweeps read rank 0's
    return _lookup(metrics, optimized) if optimized else None


def _lookup(metrics: dict, key: str) -> float:
    """Find ``key`` in (possibly per-stage nested) task metrics; sweeps minimise/maximise it."""
    if key in metrics:
        return float(metrics[key])
    for value in metrics.values():
        if isinstance(value, dict) and key in value:
            return float(value[key])
    raise KeyError(f"optimized_metric={key!r} not among the task's metrics")


def in_multirun() -> bool:
    """Whether this job is one of a ``-m`` sweep's."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_folder() -> str | None:
    """A multirun job's folder ``<sweep dir>/<subdir>`` (subdir: the job number; under the Optuna sweeper the trial
    number), in which the job makes its new run folder: a sweep folder holds its jobs' runs as
    ``<sweep dir>/<number>/<run>``. None outside a multirun (runs go to ``paths.checkpoints_dir``)."""
    return HydraConfig.get().runtime.output_dir if in_multirun() else None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def job(cfg: DictConfig) -> float | None:
    """One job. In a multirun a failed job raises to Hydra, which records it and runs the other jobs: the basic
    sweeper reports the first failure once all jobs ran, the Optuna sweeper marks the trial failed
    (``hydra.sweeper.max_failure_rate``)."""
    multirun = in_multirun()
    try:
        return run_task(cfg)
    except USER_ERRORS as e:  # bad input or a missing stage: the message says it all, no traceback
        log.error("%s: %s", type(e).__name__, e)
        if multirun:
            raise  # an exception, not SystemExit: that would end the whole sweep
        raise SystemExit(1) from None
    except Preempted as e:  # a signal in training: last.ckpt is saved
        log.warning("preempted by %s", e)
        raise SystemExit(e.code) from None
    except Exception:
        if multirun:
            log.exception("job %s failed; the sweep goes on", HydraConfig.get().job.num)  # into its train.log
        raise
    finally:
        if multirun:
            close_log_file()


def main() -> None:
    """``roadwork-train`` / ``python -m train``: stop before Hydra composes when the command line picks a config
    whose optional extra is missing (a missing launcher or sweeper plugin would fail composition itself)."""
    stop = check_args(sys.argv[1:])
    if stop:
        raise SystemExit(f"error: {stop}")
    job()


if __name__ == "__main__":
    main()
