"""A Hydra sweeper on Optuna >= 4: ``python -m train -m hparams_search=stage1_optuna`` (conf/hydra/sweeper/optuna.yaml).

It replaces hydra-optuna-sweeper, whose newest release requires optuna < 3 and keeps studies in memory, with the same
config surface: ``hydra.sweeper.{study_name, storage, direction, n_trials, n_jobs, max_failure_rate, sampler,
params}``, ``params`` in Hydra's override grammar (``interval(a, b)``, ``tag(log, interval(a, b))``, ``range(a, b,
step)``, ``choice(...)``; a plain value is fixed).

- The study lives in ``storage``: by default SQLite under the checkpoints folder, opened with ``load_if_exists``, so
  a second invocation with the same ``study_name`` resumes the study and several processes (or SLURM jobs) can share
  it (SQLite waits up to 60 s for another process's write; on a network filesystem whose locks are unreliable, or
  for many nodes, use a database server's URL, e.g. ``postgresql://...``). ``storage: null`` keeps it in memory.
- Each batch asks Optuna for ``n_jobs`` trials and hands them to the launcher at once (the basic launcher runs them one
  after another; ``hydra/launcher=slurm`` in parallel). Trial N's job folder is ``<sweep dir>/N`` (the job's run
  folder is made inside it); the trial records that run folder (or the job folder, if the job made none) as user
  attribute ``run``.
- A job that raises (or returns no number) is a failed trial and the study goes on, until more than
  ``max_failure_rate`` of this invocation's trials failed.
- The sampler's seed is offset by the number of trials the study holds when this process joins it, so a resumed study
  does not replay its first proposals. Processes started at the same moment on one study should get their own
  ``hydra.sweeper.sampler.seed`` (or ``null``).
- ``<sweep dir>/optimization_results.yaml`` gets the best trial over the whole study (``best_params``,
  ``best_value``, ``best_trial``, ``best_run``); with several directions, the Pareto front (``solutions``).

This module imports only Hydra and :mod:`train.extras` at import time (Hydra imports every plugin module on each
start); Optuna is imported when a sweep starts, with a one-line stop naming ``pip install 'roadwork-cascade[sweep]'``
when it is missing.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from train import extras

log = logging.getLogger("train.sweep")
SQLITE = "sqlite:///"


class SweepError(CompactHydraException):
    """A study that cannot start or go on; Hydra prints the message alone (no traceback)."""


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override; None for a plain (fixed) value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():  # Hydra's range excludes stop; Optuna's high is the last value
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(f"{override.input_line}: the Optuna sweeper takes choice(), range(), interval() and "
                     "tag(log, interval()) sweeps")


def search_space(specs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(name -> distribution, fixed overrides) of ``key=value`` overrides; a later override of a key wins."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(specs):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        dist = distribution(override)
        if dist is None:
            fixed[key] = override.input_line
        else:
            space[key] = dist
    return space, list(fixed.values())


class OptunaSweeper(Sweeper):
    """Asks Optuna for trials, launches each as one Hydra job and tells Optuna the value the job returned."""

    def __init__(self, sampler: DictConfig | None, direction: str | list[str], storage: str | None,
                 study_name: str, n_trials: int, n_jobs: int = 1, max_failure_rate: float = 0.0,
                 params: DictConfig | None = None) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise SweepError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: must lie in [0, 1]")
        self.sampler = sampler
        self.directions = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = max(1, n_jobs)
        self.max_failure_rate = max_failure_rate
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        module = extras.missing("sweep")
        if module:  # one line, no traceback (as train.__main__'s check of the command line)
            raise SystemExit(f"error: {extras.message('hydra/sweeper=optuna', 'sweep', module)}")
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def _storage(self) -> Any:
        """None (in memory), or the storage URL; SQLite waits for other processes' writes instead of failing."""
        if not self.storage:
            return None
        import optuna

        url = str(self.storage)
        if not url.startswith(SQLITE):
            return url
        Path(url[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    def _sampler(self, offset: int) -> Any:
        """The configured sampler (TPE if none), its seed offset by ``offset``."""
        import optuna

        if not self.sampler:
            return optuna.samplers.TPESampler()
        seed = self.sampler.get("seed")
        return instantiate(self.sampler, **({"seed": seed + offset} if seed is not None else {}))

    def sweep(self, arguments: list[str]) -> None:
        """Run ``n_trials`` trials over ``params`` and the command line's ``arguments``, ``n_jobs`` launched at a time,
        telling the study each job's value (or its failure); then write ``optimization_results.yaml``. More than
        ``max_failure_rate`` of the trials failing stops the sweep with :class:`SweepError`."""
        import optuna

        from train.utils.console import setup_logging

        setup_logging()  # the project's console; again after each batch (Hydra resets logging around jobs)
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines below say what matters
        study = optuna.create_study(study_name=self.study_name, storage=self._storage(), sampler=self._sampler(0),
                                    directions=self.directions, load_if_exists=True)
        joined = len(study.get_trials(deepcopy=False))
        if joined:
            study.sampler = self._sampler(joined)
        log.info("study %s (%s): %d trials so far; %d more, %d at a time", self.study_name,
                 "in memory" if not self.storage else "stored", joined, self.n_trials, self.n_jobs)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")

        done, failures, job_idx = 0, [], 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            for trial in trials:
                trial.set_user_attr("run", str((self.sweep_dir / str(trial.number)).resolve()))
            overrides = [[f"{k}={v}" for k, v in t.params.items()] + fixed + [f"hydra.sweep.subdir={t.number}"]
                         for t in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
            job_idx += len(returns)
            setup_logging()
            for trial, ret in zip(trials, returns):
                runs = sorted(p.parent for p in Path(trial.user_attrs["run"]).glob("*/registry.json"))
                if runs:  # the run folder the job made inside its job folder
                    trial.set_user_attr("run", str(runs[-1]))
                try:
                    self._tell(study, trial, ret.return_value)  # return_value raises the job's error
                except Exception as e:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed: %s: %s", trial.number, type(e).__name__, e)
                    failures.append(e)
            done += len(trials)
            if len(failures) > self.max_failure_rate * done:
                first = failures[0]
                raise SweepError(f"study {self.study_name}: {len(failures)} of {done} trials failed (more than "
                                 f"hydra.sweeper.max_failure_rate={self.max_failure_rate}); the first: "
                                 f"{type(first).__name__}: {first}") from first
        self._write_results(study)

    def _tell(self, study: Any, trial: Any, value: Any) -> None:
        """Record the job's value(s); no number (None, NaN, a wrong count) raises."""
        values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        if len(values) != len(self.directions) or any(v is None or math.isnan(float(v)) for v in values):
            raise SweepError(f"the job returned {value!r}, not {len(self.directions)} number(s): check "
                             "optimized_metric")
        study.tell(trial, [float(v) for v in values])

    def _write_results(self, study: Any) -> None:
        """``optimization_results.yaml``: the best trial of the whole study (or the Pareto front)."""
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise SweepError(f"study {self.study_name}: no trial has completed")
        results: dict[str, Any] = {"name": "optuna", "study_name": self.study_name,
                                   "n_trials": len(study.get_trials(deepcopy=False)), "n_complete": len(complete)}
        if len(self.directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number,
                           best_run=best.user_attrs.get("run"))
            log.info("study %s: best trial %d, value %s, params %s", self.study_name, best.number, best.value,
                     best.params)
        else:
            results["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values,
                                     "run": t.user_attrs.get("run")} for t in study.best_trials]
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
