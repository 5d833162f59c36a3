"""Checks of the composed config before any work: keys no class takes, impossible combinations, values out of range.

``check_config(cfg)`` runs in ``run_task`` before the run folder is made; each failure is a :class:`ConfigError`
that names the key and what is allowed. (Hydra itself refuses an override of a key the config lacks, unless it is
added with ``+``; these checks also catch added keys and keys in experiment files.)
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Iterator

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel

from train import extras
from train.errors import ConfigError

PEFT_MODES = ("lora", "dora", "rslora")
# risk levels, probabilities and fractions: each must lie in [0, 1]
UNIT_INTERVAL = ("*.alpha", "*.delta", "cascade.tier_alpha.*", "cascade.sweep.*", "*_fraction", "data.splits.*",
                 "apt.quantiles.*", "fusion.module.moddrop", "data.validator_augment")
NOT_PROBABILITIES = ("model.finetune.alpha",)  # LoRA's alpha is a scale


def check_config(cfg: DictConfig) -> None:
    """Every check below; raises :class:`ConfigError` at the first failure."""
    plain = _plain(cfg)  # resolved once for the checks that walk every key
    check_extras(plain)
    check_targets(plain)
    check_unit_interval(plain)
    check_precisions(plain)
    check_schemas(plain)
    check_validator_augment(cfg)
    check_cascade(cfg)
    training = training_tasks(cfg)
    if training:
        check_devices(cfg)
    if "stage1" in training:
        check_finetune_targets(cfg)
        check_pretrained_card(cfg)


def check_pretrained_card(cfg: DictConfig) -> None:
    """A pretrained timm backbone with a card (``task=pretrain``'s, or a shipped one) must be the configured
    architecture: checked here, before the data stage runs, and again when the weights load."""
    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    if backbone.get("library", "timm") != "timm":
        return
    from train.models.backbones import check_card, weights_file

    path = weights_file(backbone.get("pretrained", False))
    if path is not None:
        check_card(path, backbone)


def job_stages(cfg: DictConfig) -> list[str]:
    """The tasks this job runs: a pipeline's stages, or the task itself."""
    name = cfg.task.name
    return list(cfg.pipeline.stages) if name == "pipeline" and cfg.get("pipeline") else [name]


def training_tasks(cfg: DictConfig) -> list[str]:
    """The tasks of this job that train a model: its tiers, and pretraining."""
    from train.tiers.base import load_tiers

    return [s for s in job_stages(cfg) if s in load_tiers() or s == "pretrain"]


def check_cascade(cfg: DictConfig) -> None:
    """For a job that chooses the cascade's thresholds: its reference and baseline are among its tiers and no tier is
    the fusion head (the cascade cannot route to it: it needs every view of a sample and the feature store). That
    each tier is trained is the thresholds stage's ``needs`` (``train.tasks.registry.check_needs``)."""
    if "thresholds" not in job_stages(cfg) or not cfg.get("cascade"):
        return
    tiers = list(cfg.cascade.tiers)
    for key in ("reference", "baseline"):
        value = cfg.cascade.get(key)
        if value is not None and value not in tiers:
            raise ConfigError(f"cascade.{key}={value!r} is not in cascade.tiers {tiers}")
    from train.tiers.base import load_tiers

    known = load_tiers()
    for name in tiers:
        if name not in known:
            raise ConfigError(f"cascade.tiers has {name!r}, which is no tier; the tiers: {sorted(known)}")
        if known[name].kind == "fusion":
            raise ConfigError(f"cascade.tiers has the fusion head {name!r}: the cascade does not route to it (it "
                              "needs every view of a sample and the feature store); remove it from cascade.tiers")


def _nodes(node, key: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every node of a plain (resolved) config, depth first."""
    yield key, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _nodes(v, f"{key}.{k}" if key else str(k))


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def check_targets(plain: dict) -> None:
    """Every key of a ``_target_`` node of the resolved config must be a parameter of its target (unless the target
    takes ``**kwargs``)."""
    for key, node in _nodes(plain):
        if not isinstance(node, dict) or "_target_" not in node:
            continue
        try:
            params = inspect.signature(get_object(node["_target_"])).parameters
        except Exception:  # an optional library missing, a builtin: instantiate reports it
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        allowed = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
        for name in node.keys():
            if not str(name).startswith("_") and name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=3)
                hint = f"did you mean {close}? " if close else ""
                raise ConfigError(f"{key}.{name}: {node['_target_']} takes no parameter {name!r}; {hint}allowed: "
                                  f"{allowed}")


def check_extras(plain: dict) -> None:
    """A ``_target_`` (or a Lightning strategy name) that needs an optional extra which is not installed (DeepSpeed,
    wandb) stops here with the ``pip install`` line to run."""
    for key, node in _nodes(plain):
        target = node.get("_target_") if isinstance(node, dict) else node if key == "trainer.strategy" else None
        if not isinstance(target, str):
            continue
        for extra in ("deepspeed", "wandb"):
            module = extras.missing(extra) if extra in target.lower() else None
            if module:
                raise ConfigError(extras.message(f"{key}={target}", extra, module))


def check_unit_interval(plain: dict) -> None:
    """Risk levels (alpha, delta), probabilities and fractions of the resolved config must lie in [0, 1]."""
    for key, value in _nodes(plain):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in NOT_PROBABILITIES:
            continue
        if any(fnmatch.fnmatchcase(key, p) for p in UNIT_INTERVAL) and not 0 <= value <= 1:
            raise ConfigError(f"{key}={value}: must lie in [0, 1] (a risk level, probability or fraction)")


def check_schemas(plain: dict) -> None:
    """Each group without a ``_target_`` against its schema (:mod:`train.config_schema`; a tier's group: the tier's
    ``schema``): unknown keys, types and allowed values, named by their dotted key."""
    from pydantic import ValidationError

    from train.config_schema import GROUPS
    from train.tiers.base import load_tiers

    tiers = {name: tier.schema for name, tier in load_tiers().items() if tier.schema is not None}
    for group, schema in {**GROUPS, **tiers}.items():
        if group not in plain:
            continue
        try:
            schema.model_validate(plain[group])
        except ValidationError as e:
            error = e.errors()[0]
            key = ".".join([group, *map(str, error["loc"])])
            if error["type"] == "extra_forbidden":
                node = schema
                for part in error["loc"][:-1]:  # the schema of the key's parent, for its allowed names
                    annotation = node.model_fields[part].annotation if isinstance(part, str) else None
                    node = next((a for a in getattr(annotation, "__args__", (annotation,))
                                 if isinstance(a, type) and issubclass(a, BaseModel)), None) or node
                allowed = list(node.model_fields)
                close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=3)
                hint = f"did you mean {close}? " if close else ""
                raise ConfigError(f"{key}: no such key; {hint}allowed: {allowed}") from None
            if error["type"] == "value_error":  # a rule across keys (the schema's model validator)
                raise ConfigError(f"{key}: {error['msg'].removeprefix('Value error, ')}") from None
            where = f"{key}={error['input']!r}" if error["type"] != "missing" else key
            raise ConfigError(f"{where}: {error['msg']}") from None


def check_precisions(plain: dict) -> None:
    """A tier's own precision (``*_precision``, e.g. the draft's teacher) is one of ``auto``, ``bf16``, ``fp32``."""
    from train.utils.precision import PRECISIONS

    for key, value in _nodes(plain):
        if key.endswith("_precision") and value not in PRECISIONS:
            raise ConfigError(f"{key}={value!r}; allowed: {', '.join(PRECISIONS)}")


def check_validator_augment(cfg: DictConfig) -> None:
    """The validator's queries are cropped from the full source image, which decode-once shards do not keep."""
    data = cfg.get("data") or {}
    if data.get("validator_augment", 0) and data.get("train_source", "jpeg") == "shards":
        raise ConfigError(f"data.validator_augment={data.validator_augment} with data.train_source=shards: the "
                          "validator's queries are cropped from the full source image, which the shards (a downscaled "
                          "centre square) do not keep; use data.train_source=jpeg")


def check_devices(cfg: DictConfig) -> None:
    """DeepSpeed and the GPU accelerator need a CUDA device; DeepSpeed cannot take channels_last weights."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy")
    strategy = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    deepspeed = "deepspeed" in strategy.lower()
    if deepspeed and not torch.cuda.is_available():
        raise ConfigError(f"trainer.strategy={strategy}: DeepSpeed needs CUDA GPUs and none is visible; on this "
                          "machine use trainer=cpu (trainer.strategy: auto or ddp)")
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={trainer.accelerator}: no CUDA GPU is visible; use trainer=cpu "
                          "(trainer.accelerator: cpu or auto)")
    if deepspeed and cfg.get("model") and cfg.model.get("channels_last"):
        raise ConfigError("model.channels_last=true with a DeepSpeed strategy: DeepSpeed flattens the parameters "
                          "and cannot take channels_last convolution weights (measured on 2 H100s); set "
                          "model.channels_last=false")


def check_finetune_targets(cfg: DictConfig) -> None:
    """``model.finetune.target_modules`` (LoRA / DoRA / rsLoRA) must name linear layers of the backbone, which is
    built on the meta device for this (no memory, no weights read)."""
    finetune = cfg.model.get("finetune") or {}
    targets = finetune.get("target_modules")
    if finetune.get("mode") not in PEFT_MODES or targets is None or isinstance(targets, str):
        return
    from train.models import create_backbone
    from train.models.finetune import check_target_modules

    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    try:
        with torch.device("meta"):
            model = create_backbone(**{**backbone, "pretrained": False})
    except Exception:  # e.g. a transformers folder not at hand yet: the model build checks it again
        return
    check_target_modules(model, list(targets))
