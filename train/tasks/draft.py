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
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryMatthewsCorrCoef
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.calibration.risk_control import evaluate_threshold, one_per_group, resampled_violations, select_threshold
from train.data.splits import scene_groups
from train.export.flops import budget_flops, model_flops
from train.metrics import roadwork_prob
from train.models.backbones import feature_dim, pooled_features
from train.models.distill import DistillationLoss, FeatureProjection, TeacherMemo
from train.models.draft import (ElasticStudent, StudentOutput, build_student, draft_classifier, fold_teacher_head,
                                forced_budget)
from train.models.draft import init_from_teacher as init_student
from train.models.saving import load_classifier, save_classifier
from train.optim import with_schedule
from train.predictions import collect_outputs, outputs_cache, predict_split
from train.runs import Run
from train.tasks.registry import calibrated, register_task
from train.tiers.calibration import calibrate_model, load_calibrated
from train.tiers.training import build_datamodule, build_trainer, restore_best
from train.utils.console import print_level_table
from train.utils.faults import fault_metrics
from train.utils.files import atomic_write_json
from train.utils.loggers import log_figures
from train.utils.precision import precision_autocast, resolve_precision

log = logging.getLogger(__name__)
HEADS = ("teacher", "own")  # teacher: logits = the frozen teacher's head on the projected features (EAGLE)


def agreement_metrics() -> MetricCollection:
    """The student's answers against the teacher's (``agree_*``)."""
    return MetricCollection({"agree_mcc": BinaryMatthewsCorrCoef(), "agree_acc": BinaryAccuracy()})


class DraftModule(pl.LightningModule):
    """A student (:func:`~train.models.draft.build_student`) learning the frozen teacher at ``teacher`` (a saved,
    calibrated classifier). Logs agreement with the teacher (``agree_mcc``, the selection metric ``val/mcc``) and
    accuracy against the labels per validator level, and the mean token budget of an elastic student.

    The teacher's outputs on validation and test queries are remembered (:class:`TeacherMemo`): those inputs come
    back every epoch. ``remember_train``: its outputs on training inputs too, for a sampler that repeats each
    sample's augmentation draws (``draft.augment_draws``): the teacher then runs on each draw once."""

    def __init__(self, teacher: str, student: dict, optimizer: Callable, scheduler: Callable | None = None,
                 elastic: dict | None = None, loss: dict | None = None, budget_cost: float = 0.0, head: str = "teacher",
                 init_from_teacher: bool = True, teacher_precision: str = "auto", remember_train: bool = False,
                 val_levels: Sequence[int] = (0,), test_levels: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.teacher, config = load_classifier(teacher)
        self.teacher.requires_grad_(False).eval()
        self.input_spec = config["input"]
        self.net = build_student(student, elastic, self.input_spec["mean"], self.input_spec["std"])
        if init_from_teacher:
            copied = init_student(self.net, self.teacher)
            log.info("draft student initialised from the teacher: %d tensors copied (%s)", len(copied),
                     ", ".join(sorted({n.split(".")[0] for n in copied})) or "none matched")
        self.projection = FeatureProjection(self.net.num_features, feature_dim(self.teacher))
        self.criterion = DistillationLoss(**(loss or {}))
        self.optimizer, self.scheduler, self.budget_cost = optimizer, scheduler, budget_cost
        resolve_precision(teacher_precision, "cpu")  # an unknown name fails here, not in the first step
        self.teacher_precision = teacher_precision
        if head not in HEADS:
            raise ValueError(f"draft.module.head={head!r}; allowed: {list(HEADS)}")
        self.head = head
        self.levels = {"val": list(val_levels), "test": list(test_levels)}
        self.agreement = nn.ModuleDict({s: nn.ModuleList([agreement_metrics() for _ in lv])
                                        for s, lv in self.levels.items()})
        self.label_mcc = nn.ModuleDict({s: nn.ModuleList([BinaryMatthewsCorrCoef() for _ in lv])
                                       for s, lv in self.levels.items()})
        self.budgets: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self.memos = {"train": TeacherMemo() if remember_train else None, "val": TeacherMemo(), "test": TeacherMemo()}
        self.strict_loading = False  # checkpoints leave the frozen teacher out (it is reloaded from its file)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no batch-norm updates
        return self

    @torch.no_grad()
    def teach(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's (logits, pooled features) at ``teacher_precision``: the teacher's forward is most of a
        step's cost, and its targets need no more precision than the student learns to."""
        with precision_autocast(images.device, self.teacher_precision):
            logits, features = pooled_features(self.teacher, images)
        return logits.float(), features.float()

    def targets(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (logits, pooled features) on ``batch``, from its memo for the inputs seen before."""
        memo = self.memos[split]
        return self.teach(batch["image"]) if memo is None else memo(batch["index"], batch["image"], self.teach)

    def student(self, images: torch.Tensor) -> tuple[StudentOutput, torch.Tensor, torch.Tensor]:
        """(the student's output, its logits, its features projected into the teacher's space)."""
        out = self.net(images)
        projected = self.projection(out.features)
        logits = self.teacher.get_classifier()(projected) if self.head == "teacher" else out.logits
        return out, logits, projected

    def student_classifier(self) -> nn.Module:
        """The trained student as a plain classifier, the teacher's head folded into its own when shared."""
        net = draft_classifier(self.net)
        if self.head == "teacher":
            fold_teacher_head(net.get_classifier(), self.projection.proj, self.teacher.get_classifier())
        return net

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if "teacher_logits" in batch:
            t_logits, t_features = batch["teacher_logits"], batch["teacher_features"]
        else:
            t_logits, t_features = self.targets(batch, "train")
        out, logits, projected = self.student(images)
        losses = self.criterion(logits, t_logits.float(), projected, t_features.float(), batch["label"])
        loss = losses["loss"]
        if out.expected_budget is not None and self.budget_cost:
            loss = loss + self.budget_cost * out.expected_budget
            self.log("train/budget", out.expected_budget.detach(), batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(images))
        self.log("train/loss", loss, batch_size=len(images))
        return loss

    def _eval_step(self, split: str, batch: dict, idx: int) -> None:
        t_logits, _ = self.targets(batch, split)
        out, logits, _ = self.student(batch["image"])
        student, teacher = roadwork_prob(logits.float()), roadwork_prob(t_logits.float())
        self.agreement[split][idx].update(student, (teacher > 0.5).long())
        self.label_mcc[split][idx].update(student, batch["label"])
        if out.budget_index is not None:
            self.budgets[split].append(self.net.budget_fractions()[out.budget_index.cpu()])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_levels(self, split: str) -> None:
        per_level = {}
        for level, agree, acc in zip(self.levels[split], self.agreement[split], self.label_mcc[split]):
            values = {k: float(v) for k, v in agree.compute().items()} | {"mcc_label": float(acc.compute())}
            agree.reset()
            acc.reset()
            per_level[level] = values
            self.log_dict({f"{split}/L{level}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
        for key in ("agree_mcc", "agree_acc", "mcc_label"):
            self.log(f"{split}/{key}", float(np.mean([v[key] for v in per_level.values()])), add_dataloader_idx=False)
        self.log(f"{split}/mcc", float(np.mean([v["agree_mcc"] for v in per_level.values()])), prog_bar=True,
                 add_dataloader_idx=False)  # model selection: agreement with the teacher
        if self.budgets[split]:
            self.log(f"{split}/budget", torch.cat(self.budgets[split]).float().mean(), add_dataloader_idx=False)
            self.budgets[split] = []

    def on_validation_epoch_end(self) -> None:
        self._log_levels("val")

    def on_test_epoch_end(self) -> None:
        self._log_levels("test")

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]
        return with_schedule(self, self.optimizer(params), self.scheduler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}


class CachedTeacher(Dataset):
    """The train split as validator-level queries, each sample with the teacher's cached logits and features."""

    def __init__(self, datasets: list[Dataset], cache: dict[str, torch.Tensor]):
        self.data = ConcatDataset(datasets)
        self.logits, self.features = cache["logits"], cache["features"]
        if len(self.logits) != len(self.data):
            raise ValueError(f"the teacher cache has {len(self.logits)} rows for {len(self.data)} samples: "
                             "delete it to have it rewritten")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "teacher_logits": self.logits[i], "teacher_features": self.features[i]}


def teacher_cache(path, teacher: nn.Module, datamodule, levels: Sequence[int]) -> CachedTeacher:
    """Write (once) and read the teacher's outputs on the train split's validator-level queries."""
    datasets = [datamodule.dataset("train", level) for level in levels]
    if not path.is_file():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher.to(device)
        outputs = predict_split(lambda images: dict(zip(("logits", "features"), pooled_features(teacher, images))),
                                datamodule, "train", levels, device=device, description="draft: teacher on train")
        teacher.cpu()
        tmp = path.with_suffix(".tmp")
        save_file({k: torch.cat([o[k] for o in outputs.values()]) for k in ("logits", "features")}, str(tmp))
        tmp.replace(path)
        log.info("teacher outputs cached for %d train queries (levels %s) in %s", sum(map(len, datasets)),
                 list(levels), path)
    return CachedTeacher(datasets, load_file(str(path)))


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


@register_task("draft", ranks="one", needs=lambda cfg: calibrated(cfg, cfg.draft.teacher))
def run_draft(cfg: DictConfig, run: Run) -> dict:
    dcfg, task_dir = cfg.draft, run.task_dir("draft")
    teacher_model, teacher_config, _ = load_calibrated(run, dcfg.teacher)
    save_classifier(teacher_model, task_dir / "teacher", teacher_config["input"])  # what the module loads
    spec = teacher_config["input"]
    datamodule = build_datamodule(cfg, run, spec)
    remember = dcfg.teacher_outputs == "online" and dcfg.augment_draws is not None
    datamodule.augment_draws = dcfg.augment_draws if remember else None  # the teacher's outputs on repeats are kept
    module: DraftModule = instantiate(dcfg.module, teacher=str(task_dir / "teacher"), remember_train=remember)
    if isinstance(module.net, ElasticStudent) and module.net.model.selector == "entropy":
        train_set = datamodule.dataset("train", 0)  # equal shares of the budgets by image complexity
        module.net.model.fit_thresholds(torch.stack([train_set[i]["image"] for i in range(min(512, len(train_set)))]))
    trainer = build_trainer(cfg, task_dir, max_epochs=dcfg.epochs)
    if dcfg.teacher_outputs == "cache":
        data = teacher_cache(task_dir / "teacher_cache.safetensors", module.teacher, datamodule, dcfg.cache_levels)
        train_loader = DataLoader(data, batch_size=datamodule.batch_size, shuffle=True,
                                  num_workers=datamodule.num_workers, persistent_workers=datamodule.num_workers > 0)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=datamodule.val_dataloader())
    else:
        trainer.fit(module, datamodule=datamodule)
    restore_best(trainer, module, strict=False)
    teacher_precision = (resolve_precision(module.teacher_precision, trainer.strategy.root_device)
                         if dcfg.teacher_outputs == "online" else "fp32")  # the cache is written in float32
    log.info("draft: the teacher ran in %s (draft.module.teacher_precision=%s)", teacher_precision,
             module.teacher_precision)
    remembered = module.memos["train"]
    if remembered is not None:
        log.info("draft: the teacher ran on %d distinct training inputs (%d augmentation draws of %d images) in %d "
                 "epochs", len(remembered), dcfg.augment_draws, len(datamodule.split("train")), dcfg.epochs)

    draft = module.cpu().eval().student_classifier()
    weights, config_path = save_classifier(draft, task_dir / "student", spec)
    draft, config = load_classifier(weights)
    calibration = calibrate_model(cfg, run, draft, config, "draft", task_dir)
    atomic_write_json(task_dir / "calibration.json", calibration)
    log_figures(trainer.loggers, {"draft_reliability": task_dir / "draft_reliability.png"}, trainer.global_step)
    draft, _ = load_classifier(task_dir / "draft")

    tiers = {"draft": draft, "teacher": module.teacher.cpu()}
    elastic = getattr(draft, "elastic", None)
    cache = outputs_cache(run)  # the calibrate stage handed on the teacher's; the router reads all of them
    outcomes = {"calib": collect_outputs(tiers, datamodule, "calib", dcfg.levels, cache),
                "test": collect_outputs({**tiers, **(budget_outputs(elastic) if elastic else {})}, datamodule, "test",
                                        dcfg.levels, cache)}
    test = agreement_figures(outcomes["test"], "test")
    scenes = {split: scene_groups(datamodule.split(split))[o["index"].numpy()] for split, o in outcomes.items()}
    choice, on_test, check = acceptance(outcomes, scenes, dcfg, cfg.seed)
    budgets = budget_report(elastic, outcomes["test"], dcfg.levels) if elastic else None
    flops = draft_flops(draft, module.teacher, spec["img_size"], budgets)
    accepted = {"threshold": choice.threshold, "guarantee": {**choice.guarantee(), "against": f"the {dcfg.teacher} "
                 "teacher's answer", "rule": "accept the draft's answer when max(p, 1-p) >= threshold"},
                 "calib": {"acceptance_rate": choice.acceptance_rate, "accepted_risk": choice.accepted_risk},
                 "test": on_test}
    report = {"teacher": dcfg.teacher, "teacher_outputs": dcfg.teacher_outputs, "teacher_precision": teacher_precision,
              "augment_draws": dcfg.augment_draws,
              "teacher_train_inputs": None if remembered is None else len(remembered), "test": test,
              "acceptance": accepted, "resampled_guarantee": check, "flops": flops, "budgets": budgets}
    atomic_write_json(task_dir / "report.json", report)
    metrics = {**test, "acceptance/test/rate": on_test["acceptance_rate"],
               "acceptance/test/disagreement": on_test["accepted_risk"] if on_test["accepted_risk"] is not None else float("nan"),
               "flops/ratio": flops["ratio"], **fault_metrics(trainer)}
    print_level_table(test, "draft (calibrated) on test: agreement with the teacher, MCC vs labels",
                      "test", ("agree_mcc", "agree_acc", "mcc_label"))
    log.info("draft acceptance at alpha=%.3g, delta=%.3g (a report figure: the thresholds stage deploys its own): "
             "threshold %s; on test %.1f%% accepted, %.2f%% of them disagree with the teacher; FLOPs %.3g vs teacher %.3g", dcfg.alpha, dcfg.delta, choice.threshold,
             100 * on_test["acceptance_rate"], 100 * (on_test["accepted_risk"] or 0), flops["draft"], flops["teacher"])
    artifacts = {"model": weights, "model_config": config_path, "calibrated_model": task_dir / "draft.safetensors",
                 "calibrated_model_config": task_dir / "draft.json", "calibration": task_dir / "calibration.json",
                 "report": task_dir / "report.json",
                 "reliability": task_dir / "draft_reliability.png"}
    run.record("draft", artifacts=artifacts, metrics=metrics)
    return metrics
