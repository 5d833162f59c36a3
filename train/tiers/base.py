"""The cascade's learned parts behind one interface, registered by name (as timm registers its models).

A tier lives in its own folder, ``train/tiers/<name>/`` (its LightningModule and its :class:`Tier` subclass with the
schema of its settings, made known with :func:`register_tier`), with its settings in ``conf/<name>/default.yaml``. ``task=<name>`` trains it
through :func:`run_tier`, the one training flow; the thresholds stage, export and the cascade's checks ask the
tier what it is (``kind``), what it reads (``needs``), how to load its calibrated model and how it exports itself.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch.nn as nn
from omegaconf import DictConfig

from train.errors import ConfigError
from train.runs import Run
from train.tiers.training import build_trainer, restore_best
from train.utils.console import print_level_table
from train.utils.faults import fault_metrics
from train.utils.files import atomic_write_json
from train.utils.loggers import publish_figures

log = logging.getLogger(__name__)
KINDS = ("classifier", "router", "prm", "fusion")  # how the cascade routes through a tier (the manifest's kinds)
TIERS: dict[str, Tier] = {}


@dataclass
class Fit:
    """What fitting a tier left: the trainer, the module with its best weights, the checkpoint files, what the
    fit measured (e.g. Stage-1's test metrics) and anything else its :meth:`Tier.finish` reads."""
    trainer: pl.Trainer
    module: pl.LightningModule
    best: str | None = None
    last: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a trained tier records: its files, metrics, ``report.json`` (None: none), figures (name -> matplotlib
    Figure or a PNG it wrote), a per-level console table (``print_level_table``'s arguments) and extra registry
    fields."""
    artifacts: dict[str, Path]
    metrics: dict[str, float]
    report: dict | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    table: tuple | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Tier:
    """One learned part of the cascade, declared as ``class X(Tier, name=..., kind=..., schema=...)``: ``name`` is its
    stage, config group and saved model. Subclasses implement :meth:`inputs`, :meth:`module`, :meth:`loaders` (or
    :meth:`fit`, for a fit of their own: Stage-1 also tests, APT evaluates before and after), :meth:`finish`,
    :meth:`load` and :meth:`export`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "classifier"
    schema: ClassVar[type | None] = None  # a pydantic model of its config group, checked before any work
    ranks: ClassVar[str] = "one"  # which processes of a multi-process launch train it (see register_task)
    reads_shards: ClassVar[bool] = False  # trains on the prepared shards when data.train_source=shards

    def __init_subclass__(cls, name: str | None = None, kind: str | None = None, schema: type | None = None,
                          **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for key, value in (("name", name), ("kind", kind), ("schema", schema)):
            if value is not None:
                setattr(cls, key, value)

    def needs(self, cfg: DictConfig) -> list[str]:
        """The stages whose outputs it reads."""
        return []

    def settings(self, cfg: DictConfig) -> DictConfig:
        """Its config group (``cfg.<name>``)."""
        return cfg[self.name]

    def selection(self, cfg: DictConfig) -> tuple[str, str] | None:
        """The metric and mode that pick its best epoch (``<name>.selection``); None: the checkpoint callback's."""
        chosen = self.settings(cfg).get("selection")
        return None if chosen is None else (chosen.metric, chosen.mode)

    def trainer_overrides(self, cfg: DictConfig) -> dict:
        """``cfg.trainer`` keys this tier replaces: by default its own epochs, every batch of its small inputs."""
        return {"max_epochs": self.settings(cfg).epochs, "limit_train_batches": None, "limit_val_batches": None}

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Any:
        """What it learns from (read from the run's earlier stages)."""
        raise NotImplementedError

    def module(self, cfg: DictConfig, run: Run, inputs: Any, task_dir: Path) -> pl.LightningModule:
        raise NotImplementedError

    def loaders(self, cfg: DictConfig, inputs: Any) -> tuple | pl.LightningDataModule:
        """What the default :meth:`fit` trains on: (train, val) DataLoaders, or a DataModule (the run's images: its
        batch hooks then run too, e.g. the shards' augmentation on the device)."""
        raise NotImplementedError

    def fit(self, cfg: DictConfig, run: Run, trainer: pl.Trainer, module: pl.LightningModule, inputs: Any) -> Fit:
        """Fit on :meth:`loaders`, keep the best epoch."""
        data = self.loaders(cfg, inputs)
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, *data)
        return Fit(trainer, module, best=restore_best(trainer, module) or None)

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Any, task_dir: Path) -> Outcome:
        """Save, calibrate and evaluate the fitted tier."""
        raise NotImplementedError

    def load(self, run: Run) -> tuple[nn.Module, dict]:
        """(the calibrated model the cascade runs, its saved config) from ``run``."""
        raise NotImplementedError

    def export(self, cfg: DictConfig, run: Run, folder: Path):
        """Write its files into the bundle ``folder``, checked; returns its manifest entry (a ``ModelEntry``)."""
        raise NotImplementedError


def register_tier(cls: type[Tier]) -> type[Tier]:
    """Class decorator: make ``cls`` the tier named ``cls.name`` (``task=<name>`` trains it)."""
    if cls.kind not in KINDS:
        raise ValueError(f"tier {cls.name!r} has kind {cls.kind!r}; allowed: {list(KINDS)}")
    TIERS[cls.name] = cls()
    return cls


def load_tiers(modules: Sequence[str] = ()) -> dict[str, Tier]:
    """Import every tier folder of ``train.tiers`` and ``modules`` (a tier from outside the package:
    ``tier_modules=[...]``); importing one registers its tier. Returns the registry."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.ispkg:
            importlib.import_module(f"train.tiers.{module.name}")
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"tier_modules has {name!r}, which does not import ({e}); is its folder on the "
                              "Python path?") from None
    return TIERS


def get_tier(name: str) -> Tier:
    """The registered tier named ``name`` (tier folders import on first need); a ``ConfigError`` for an unknown one."""
    if name not in TIERS:
        load_tiers()
    if name not in TIERS:
        raise ConfigError(f"no tier named {name!r}; the tiers: {sorted(TIERS)}")
    return TIERS[name]


def reseed(cfg: DictConfig) -> None:
    """Seed every generator from ``cfg.seed`` again: what follows draws the same numbers whether the steps before it
    ran or read their results from a cache."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)


def run_tier(cfg: DictConfig, run: Run, tier: Tier) -> dict:
    """The one training flow: inputs, module, fit (best epoch kept), then the tier saves, calibrates and evaluates
    itself (:meth:`Tier.finish`); the report, table and figures are written and the stage recorded. The random
    numbers are the stage's, seeded when it starts; a tier whose inputs may come from a cache or not reseeds itself
    (:func:`reseed`)."""
    task_dir = run.task_dir(tier.name)
    inputs = tier.inputs(cfg, run, task_dir)
    module = tier.module(cfg, run, inputs, task_dir)
    trainer = build_trainer(cfg, task_dir, monitor=tier.selection(cfg), **tier.trainer_overrides(cfg))
    fit = tier.fit(cfg, run, trainer, module, inputs)
    if not trainer.is_global_zero:
        return fit.metrics  # the other ranks of a multi-process run: rank 0 writes the results
    outcome = tier.finish(cfg, run, fit, inputs, task_dir)
    artifacts = dict(outcome.artifacts)
    if outcome.report is not None:
        artifacts["report"] = atomic_write_json(task_dir / "report.json", outcome.report)
    if outcome.table is not None:
        print_level_table(*outcome.table)
    artifacts.update(publish_figures(trainer.loggers, task_dir, outcome.figures, trainer.global_step))
    metrics = {**outcome.metrics, **fault_metrics(trainer)}
    run.record(tier.name, artifacts=artifacts, metrics=metrics, tier=tier.name, **outcome.info)
    return metrics
