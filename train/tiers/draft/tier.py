"""``task=draft``: the speculative draft, a small student distilled from the frozen, calibrated Stage-1.

Loss (EAGLE / SpecVLM): ``soft_weight`` x soft cross-entropy to the teacher's tempered distribution +
``feature_weight`` x SmoothL1 between the projected student features and the teacher's pooled features
(+ optional hard-label CE, + ``budget_cost`` x the gate's expected token fraction for an elastic ViT).
The teacher runs in each step (``teacher_outputs=online``; with ``augment_draws`` each image's augmentations
cycle through that many draws and the teacher runs once per draw) or its outputs are written once for the train
split's validator-level queries (``cache``). After training the draft is calibrated on the calib split
(the shared calibrate code); its report says what relaxed acceptance by Learn-then-Test at ``alpha`` would give
(accepted answers disagreeing with the teacher at most ``alpha`` of the time, with probability 1 - ``delta``). The
deployed threshold is the thresholds stage's.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from pydantic import Field
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.calibration.risk_control import evaluate_threshold, one_per_group, resampled_violations, select_threshold
from train.config_schema import Built, Levels, Positive, RiskControl
from train.data.splits import scene_groups
from train.export.flops import budget_flops, model_flops
from train.metrics import roadwork_prob
from train.models.draft import ElasticStudent, forced_budget
from train.models.saving import load_classifier, save_classifier
from train.predictions import collect_outputs, outputs_cache
from train.runs import Run
from train.tiers.base import Fit, Outcome, register_tier
from train.tiers.calibration import calibrate_model, calibrated, load_calibrated
from train.tiers.classifier import ClassifierTier
from train.tiers.draft.module import DraftModule, teacher_cache
from train.tiers.training import build_datamodule, restore_best
from train.utils.files import atomic_write_json
from train.utils.precision import resolve_precision

log = logging.getLogger(__name__)


def budget_outputs(elastic: nn.Module) -> dict:
    """What the budget report needs per query besides the draft's and teacher's logits: the selector's budget and
    the logits with every budget forced."""
    def forced(index: int):
        def fn(images: torch.Tensor) -> torch.Tensor:
            with forced_budget(elastic, index):
                return elastic.classify(images)
        return fn

    return {"budget": lambda images: elastic.select(images).float(),
            **{f"forced_{i}": forced(i) for i in range(len(elastic.budgets))}}


def budget_report(elastic: nn.Module, test: dict[str, torch.Tensor], levels: Sequence[int]) -> dict:
    """An elastic draft on the test outcomes: its selector's budgets (share, mean fraction, agreement and MCC per
    chosen budget) and every budget forced on all images."""
    target, label = (roadwork_prob(test["teacher"]) > 0.5).long(), test["label"].long()

    def scores(logits: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
        pred = (roadwork_prob(logits) > 0.5).long()
        if rows is None:
            return {"n": len(pred), **agreement(pred, target, label)}
        return {"n": int(rows.sum()), **agreement(pred[rows], target[rows], label[rows])}

    chosen = test["budget"].long()
    fractions = elastic.fractions.cpu()
    return {"budgets": elastic.budgets, "token_fractions": fractions.tolist(), "levels": list(levels),
            "mean_fraction": float(fractions[chosen].mean()),
            "chosen": {str(b): {"share": float((chosen == i).float().mean()),
                                **(scores(test["draft"], chosen == i) if (chosen == i).any() else {})}
                       for i, b in enumerate(elastic.budgets)},
            "all": scores(test["draft"]),
            "forced": {str(b): scores(test[f"forced_{i}"]) for i, b in enumerate(elastic.budgets)}}


def agreement(pred: torch.Tensor, target: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """A draft's answers against the teacher's (``agree_mcc``, ``agree_acc``) and the labels (``mcc_label``)."""
    return {"agree_mcc": float(binary_matthews_corrcoef(pred, target)),
            "agree_acc": float((pred == target).float().mean()),
            "mcc_label": float(binary_matthews_corrcoef(pred, label))}


def agreement_figures(outcomes: dict[str, torch.Tensor], split: str) -> dict[str, float]:
    """The calibrated draft against the teacher and the labels per validator level, and their means: the keys and
    values :class:`DraftModule` logs (``<split>/L<level>/agree_mcc`` ..., ``<split>/mcc`` = mean agreement MCC)."""
    pred, target = ((roadwork_prob(outcomes[k]) > 0.5).long() for k in ("draft", "teacher"))
    label = outcomes["label"].long()
    per_level = {}
    for level in outcomes["level"].unique().tolist():
        rows = outcomes["level"] == level
        per_level[level] = agreement(pred[rows], target[rows], label[rows])
    figures = {f"{split}/L{lv}/{k}": v for lv, values in per_level.items() for k, v in values.items()}
    figures.update({f"{split}/{k}": float(np.mean([v[k] for v in per_level.values()]))
                    for k in ("agree_mcc", "agree_acc", "mcc_label")})
    figures[f"{split}/mcc"] = figures[f"{split}/agree_mcc"]
    return figures


def acceptance(outcomes: dict[str, dict], scenes: dict[str, np.ndarray], dcfg: DictConfig, seed: int) -> tuple:
    """What Learn-then-Test at ``draft.alpha`` would accept on calib (one query per scene), its result on test and
    the resampled check of its guarantee: (choice, test figures, check). A report figure: the thresholds stage
    chooses the deployed threshold."""
    conf, disagree, groups = {}, {}, {}
    for split, o in outcomes.items():
        p = roadwork_prob(o["draft"])
        conf[split] = torch.maximum(p, 1 - p).numpy()
        disagree[split] = ((p > 0.5) != (roadwork_prob(o["teacher"]) > 0.5)).float().numpy()
        groups[split] = scenes[split] + (0 if split == "calib" else 1 + int(scenes["calib"].max()))
    rows = one_per_group(groups["calib"], seed)
    choice = select_threshold(conf["calib"][rows], disagree["calib"][rows], dcfg.alpha, dcfg.delta,
                              min_accepted=dcfg.min_accepted)
    on_test = evaluate_threshold(conf["test"], disagree["test"], choice.threshold)
    pooled = [np.concatenate([x["calib"], x["test"]]) for x in (conf, disagree, groups)]
    check = resampled_violations(*pooled, len(rows), dcfg.alpha, dcfg.delta, dcfg.resamples, seed, dcfg.min_accepted)
    return choice, on_test, check


def draft_flops(draft: nn.Module, teacher: nn.Module, img_size: int, budgets: dict | None) -> dict:
    """Forward FLOPs per image of teacher and draft; an elastic draft's per budget, weighted by the selector's
    choices on test."""
    flops = {"teacher": model_flops(teacher, img_size)}
    if budgets is None:
        flops["draft"] = model_flops(draft, img_size)
    else:
        per_budget = budget_flops(draft.elastic, draft.eval(), torch.randn(1, 3, img_size, img_size))
        shares = [budgets["chosen"][str(b)]["share"] for b in budgets["budgets"]]
        flops.update(per_budget=dict(zip(map(str, budgets["budgets"]), per_budget)),
                     draft=float(np.dot(per_budget, shares)))
    flops["ratio"] = flops["draft"] / flops["teacher"]
    return flops


class Settings(RiskControl):
    """``draft``: the teacher and how its outputs reach the student, the epochs, the module and the reported acceptance
    (levels, alpha, resamples)."""
    teacher: str
    teacher_outputs: Literal["online", "cache"]
    cache_levels: Levels
    augment_draws: Positive | None
    epochs: Positive
    levels: Levels
    resamples: Annotated[int, Field(ge=0)]
    module: Built


@dataclass
class Inputs:
    """What the draft reads: the teacher's input spec, the run's data, whether the teacher's outputs are remembered."""
    spec: dict
    datamodule: object
    remember: bool  # the teacher's outputs on repeated augmentation draws are kept


@register_tier
class DraftTier(ClassifierTier, name="draft", schema=Settings):
    """The speculative draft: a small student distilled from the calibrated ``draft.teacher``, then calibrated."""
    def needs(self, cfg: DictConfig) -> list[str]:
        return calibrated(cfg, cfg.draft.teacher)

    def trainer_overrides(self, cfg: DictConfig) -> dict:
        return {"max_epochs": cfg.draft.epochs}  # batch limits: the trainer's, as Stage-1's

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Inputs:
        dcfg = cfg.draft
        teacher_model, teacher_config, _ = load_calibrated(run, dcfg.teacher)
        save_classifier(teacher_model, task_dir / "teacher", teacher_config["input"])  # what the module loads
        spec = teacher_config["input"]
        datamodule = build_datamodule(cfg, run, spec)
        remember = dcfg.teacher_outputs == "online" and dcfg.augment_draws is not None
        datamodule.augment_draws = dcfg.augment_draws if remember else None
        return Inputs(spec, datamodule, remember)

    def module(self, cfg: DictConfig, run: Run, inputs: Inputs, task_dir: Path) -> DraftModule:
        module: DraftModule = instantiate(cfg.draft.module, teacher=str(task_dir / "teacher"),
                                          remember_train=inputs.remember)
        if isinstance(module.net, ElasticStudent) and module.net.model.selector == "entropy":
            train_set = inputs.datamodule.dataset("train", 0)  # equal shares of the budgets by image complexity
            images = torch.stack([train_set[i]["image"] for i in range(min(512, len(train_set)))])
            module.net.model.fit_thresholds(images)
        return module

    def fit(self, cfg: DictConfig, run: Run, trainer, module: DraftModule, inputs: Inputs) -> Fit:
        dcfg, datamodule = cfg.draft, inputs.datamodule
        if dcfg.teacher_outputs == "cache":
            data = teacher_cache(run.task_dir(self.name) / "teacher_cache.safetensors", module.teacher, datamodule,
                                 dcfg.cache_levels)
            train_loader = DataLoader(data, batch_size=datamodule.batch_size, shuffle=True,
                                      num_workers=datamodule.num_workers,
                                      persistent_workers=datamodule.num_workers > 0)
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=datamodule.val_dataloader())
        else:
            trainer.fit(module, datamodule=datamodule)
        return Fit(trainer, module, best=restore_best(trainer, module, strict=False) or None)

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Inputs, task_dir: Path) -> Outcome:
        dcfg, module, datamodule, spec = cfg.draft, fit.module, inputs.datamodule, inputs.spec
        teacher_precision = (resolve_precision(module.teacher_precision, fit.trainer.strategy.root_device)
                             if dcfg.teacher_outputs == "online" else "fp32")  # the cache is written in float32
        log.info("draft: the teacher ran in %s (draft.module.teacher_precision=%s)", teacher_precision,
                 module.teacher_precision)
        remembered = module.memos["train"]
        if remembered is not None:
            log.info("draft: the teacher ran on %d distinct training inputs (%d augmentation draws of %d images) in "
                     "%d epochs", len(remembered), dcfg.augment_draws, len(datamodule.split("train")), dcfg.epochs)

        draft = module.cpu().eval().student_classifier()
        weights, config_path = save_classifier(draft, task_dir / "student", spec)
        draft, config = load_classifier(weights)
        calibration = calibrate_model(cfg, run, draft, config, "draft", task_dir)
        atomic_write_json(task_dir / "calibration.json", calibration)
        draft, _ = load_classifier(task_dir / "draft")

        tiers = {"draft": draft, "teacher": module.teacher.cpu()}
        elastic = getattr(draft, "elastic", None)
        cache = outputs_cache(run)  # the calibrate stage handed on the teacher's; the router reads all of them
        outcomes = {"calib": collect_outputs(tiers, datamodule, "calib", dcfg.levels, cache),
                    "test": collect_outputs({**tiers, **(budget_outputs(elastic) if elastic else {})}, datamodule,
                                            "test", dcfg.levels, cache)}
        test = agreement_figures(outcomes["test"], "test")
        scenes = {split: scene_groups(datamodule.split(split))[o["index"].numpy()] for split, o in outcomes.items()}
        choice, on_test, check = acceptance(outcomes, scenes, dcfg, cfg.seed)
        budgets = budget_report(elastic, outcomes["test"], dcfg.levels) if elastic else None
        flops = draft_flops(draft, module.teacher, spec["img_size"], budgets)
        accepted = {"threshold": choice.threshold, "guarantee": {**choice.guarantee(), "against": f"the {dcfg.teacher} "
                    "teacher's answer", "rule": "accept the draft's answer when max(p, 1-p) >= threshold"},
                    "calib": {"acceptance_rate": choice.acceptance_rate, "accepted_risk": choice.accepted_risk},
                    "test": on_test}
        report = {"teacher": dcfg.teacher, "teacher_outputs": dcfg.teacher_outputs,
                  "teacher_precision": teacher_precision, "augment_draws": dcfg.augment_draws,
                  "teacher_train_inputs": None if remembered is None else len(remembered), "test": test,
                  "acceptance": accepted, "resampled_guarantee": check, "flops": flops, "budgets": budgets}
        disagreement = on_test["accepted_risk"]
        metrics = {**test, "acceptance/test/rate": on_test["acceptance_rate"],
                   "acceptance/test/disagreement": disagreement if disagreement is not None else float("nan"),
                   "flops/ratio": flops["ratio"]}
        log.info("draft acceptance at alpha=%.3g, delta=%.3g (a report figure: the thresholds stage deploys its own): "
                 "threshold %s; on test %.1f%% accepted, %.2f%% of them disagree with the teacher; FLOPs %.3g vs "
                 "teacher %.3g", dcfg.alpha, dcfg.delta, choice.threshold, 100 * on_test["acceptance_rate"],
                 100 * (disagreement or 0), flops["draft"], flops["teacher"])
        artifacts = {"model": weights, "model_config": config_path, "calibrated_model": task_dir / "draft.safetensors",
                     "calibrated_model_config": task_dir / "draft.json", "calibration": task_dir / "calibration.json"}
        return Outcome(artifacts, metrics, report=report, figures={"reliability": task_dir / "draft_reliability.png"},
                       table=(test, "draft (calibrated) on test: agreement with the teacher, MCC vs labels", "test",
                              ("agree_mcc", "agree_acc", "mcc_label")))
