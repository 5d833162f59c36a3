"""``task=difficulty``: the router that predicts, per sample, whether the draft and Stage-1 would answer wrongly.

The labels are honest outcomes: the calibrated draft and Stage-1 are run on the ``meta`` split (which
neither trained on) at the validator levels, and each answer is compared with the true label (``hard``:
wrong or not; ``soft``: the fraction of the image's levels answered wrongly). The router
(:class:`~train.models.difficulty.DifficultyRouter`) learns them from a downscaled image and the
draft's logits; its outputs are temperature-calibrated on the calib split. Reported on test: AUROC and the
area under the risk-coverage curve per tier, next to the tier's own confidence as a baseline; what a routing
threshold chosen by Learn-then-Test at ``difficulty.alpha`` would keep (a report figure: the thresholds stage
chooses the deployed one); ``routing_curve.png`` draws error against the fraction routed up.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc

from train.calibration import calibration_report, fit_calibrator
from train.calibration.risk_control import aurc, routing_curve, select_threshold
from train.data.splits import split_by_image
from train.metrics import roadwork_prob
from train.models.difficulty import DifficultyRouter, save_router
from train.optim import with_schedule
from train.predictions import OutcomeDataset, collect_outputs, outputs_cache
from train.runs import Run
from train.tasks.registry import calibrated, register_task
from train.tiers.calibration import load_calibrated
from train.tiers.cascade import one_per_scene
from train.tiers.training import build_datamodule, build_trainer, restore_best
from train.utils.console import print_level_table
from train.utils.faults import fault_metrics
from train.utils.files import atomic_write_json
from train.utils.loggers import log_figures

log = logging.getLogger(__name__)


class DifficultyModule(pl.LightningModule):
    """Trains the router with a per-tier binary cross-entropy on the (hard or soft) wrong-answer targets."""

    def __init__(self, router: dict, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = DifficultyRouter(**router)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.val_auroc = nn.ModuleList([BinaryAUROC() for _ in self.net.targets])

    def forward(self, images: torch.Tensor, draft_logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images, draft_logits)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch["image"], batch["draft_logits"]), batch["target"])
        self.log("train/loss", loss, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores = self(batch["image"], batch["draft_logits"]).sigmoid()
        for k, metric in enumerate(self.val_auroc):
            metric.update(scores[:, k], batch["wrong"][:, k].long())

    def on_validation_epoch_end(self) -> None:
        values = {t: m.compute() for t, m in zip(self.net.targets, self.val_auroc)}
        for t, value in values.items():
            self.log(f"val/auroc_{t}", value)
        self.log("val/auroc", torch.stack(list(values.values())).mean(), prog_bar=True)
        for m in self.val_auroc:
            m.reset()

    def configure_optimizers(self):
        return with_schedule(self, self.optimizer(self.parameters()), self.scheduler)


def wrong_answers(outcomes: dict, targets: list[str]) -> torch.Tensor:
    """``(N, len(targets))`` 1.0 where the tier's answer (P(roadwork) > 0.5) is not the label."""
    label = outcomes["label"].long()
    return torch.stack([((roadwork_prob(outcomes[t]) > 0.5).long() != label).float() for t in targets], 1)


def per_image_mean(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean over the rows of the same image (its validator levels)."""
    _, inverse = index.unique(return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, values.shape[1]).index_add_(0, inverse, values)
    counts = torch.bincount(inverse).unsqueeze(1).float()
    return (sums / counts)[inverse]


def _dataset(outcomes: dict, targets: torch.Tensor, wrong: torch.Tensor, rows: torch.Tensor) -> OutcomeDataset:
    return OutcomeDataset({"image": outcomes["image"][rows], "draft_logits": outcomes["draft"][rows],
                           "target": targets[rows], "wrong": wrong[rows]})


@torch.no_grad()
def router_scores(router: DifficultyRouter, outcomes: dict, batch: int = 1024) -> torch.Tensor:
    """Router logits over collected outcomes, ``(N, len(targets))``."""
    router.eval()
    return torch.cat([router(outcomes["image"][i:i + batch], outcomes["draft"][i:i + batch])
                      for i in range(0, len(outcomes["label"]), batch)])


def calibrate_router(router: DifficultyRouter, logits: torch.Tensor, wrong: torch.Tensor, n_bins: int) -> dict:
    """Fit one temperature per output on calib, fold them into the router; returns the calibration report."""
    temperatures, before, after = {}, {}, {}
    for k, target in enumerate(router.targets):
        z = torch.stack([torch.zeros_like(logits[:, k]), logits[:, k]], 1).double()
        scaler = fit_calibrator("temperature", z, wrong[:, k].long())
        temperatures[target] = scaler.temperature
        for tag, probs in (("before", logits[:, k].sigmoid()), ("after", scaler.probs(z).float())):
            report = calibration_report(probs, wrong[:, k].long(), n_bins)
            (before if tag == "before" else after).update({f"{target}/{m}": v for m, v in report.items()})
    router.fold_temperatures([temperatures[t] for t in router.targets])
    return {"method": "temperature", "params": temperatures, "folded": True, "before": before, "after": after}


def own_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """A tier's own doubt, 1 - |2 P(roadwork) - 1|: the baseline a router has to beat."""
    return 1 - (2 * roadwork_prob(logits) - 1).abs()


def routing_figures(scores: torch.Tensor, wrong: torch.Tensor, baseline: torch.Tensor) -> dict:
    """AUROC and AURC of the router's P(wrong), and AURC of a baseline uncertainty (the tier's own)."""
    return {"auroc": float(binary_auroc(scores, wrong.long())),
            "aurc": aurc(scores.numpy(), wrong.numpy()), "aurc_own_confidence": aurc(baseline.numpy(), wrong.numpy()),
            "auroc_own_confidence": float(binary_auroc(baseline, wrong.long())),
            "error_rate": float(wrong.mean())}


def plot_routing(path, curves: dict[str, tuple[torch.Tensor, torch.Tensor]], title: str) -> None:
    """Error among the samples a tier still answers against the fraction routed up (highest score first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (score, wrong) in curves.items():
        curve = routing_curve(score.numpy(), wrong.numpy())
        ax.plot(curve.fraction_routed, curve.kept_risk, label=name)
    ax.set_xlabel("fraction routed up (highest score first)")
    ax.set_ylabel("error rate among the rest")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register_task("difficulty", ranks="one", needs=lambda cfg: ["draft", *calibrated(cfg, "stage1")])
def run_difficulty(cfg: DictConfig, run: Run) -> dict:
    dcfg, task_dir = cfg.difficulty, run.task_dir("difficulty")
    tiers, spec = {}, None
    for name in ("draft", "stage1"):
        tiers[name], config, _ = load_calibrated(run, name)
        spec = spec or config["input"]
    datamodule = build_datamodule(cfg, run, spec)
    module: DifficultyModule = instantiate(dcfg.module)
    router, targets = module.net, module.net.targets
    def small(images: torch.Tensor) -> torch.Tensor:  # what the router sees, stored instead of the full image
        return F.adaptive_avg_pool2d(images, router.in_size)

    outcomes = {split: collect_outputs({**tiers, "image": small}, datamodule, split, dcfg.levels, outputs_cache(run))
                for split in ("meta", "calib", "test")}  # calib, test: the draft stage's outputs
    wrong = {split: wrong_answers(o, targets) for split, o in outcomes.items()}

    meta = outcomes["meta"]
    soft = per_image_mean(wrong["meta"], meta["index"])
    fit_targets = soft if dcfg.target == "soft" else wrong["meta"]
    train_rows, val_rows = split_by_image(meta["index"], dcfg.val_fraction, cfg.seed)
    loaders = [DataLoader(_dataset(meta, fit_targets, wrong["meta"], rows), batch_size=dcfg.batch_size,
                          shuffle=shuffle) for rows, shuffle in ((train_rows, True), (val_rows, False))]
    trainer = build_trainer(cfg, task_dir, monitor=("val/auroc", "max"), max_epochs=dcfg.epochs,
                            limit_train_batches=None, limit_val_batches=None)
    trainer.fit(module, *loaders)
    restore_best(trainer, module)
    router = module.net.cpu().eval()

    calibration = calibrate_router(router, router_scores(router, outcomes["calib"]), wrong["calib"], cfg.calibrate.n_bins)
    calibration.update(split="calib", levels=list(dcfg.levels), n=len(wrong["calib"]))
    scores = {split: router_scores(router, outcomes[split]).sigmoid() for split in ("calib", "test")}
    draft_k = targets.index("draft")
    rows = one_per_scene(cfg, run, "calib", outcomes["calib"]["index"].numpy())
    choice = select_threshold(1 - scores["calib"][rows, draft_k].numpy(), wrong["calib"][rows, draft_k].numpy(),
                              dcfg.alpha, dcfg.delta, min_accepted=dcfg.min_accepted)
    route_up = None if choice.threshold is None else 1 - choice.threshold
    kept = (scores["test"][:, draft_k] < route_up) if route_up is not None else torch.zeros(len(scores["test"]), dtype=torch.bool)
    test = {}
    for k, target in enumerate(targets):
        test[target] = routing_figures(scores["test"][:, k], wrong["test"][:, k], own_uncertainty(outcomes["test"][target]))
    test["routing"] = {"threshold": route_up, "kept_fraction": float(kept.float().mean()),
                       "draft_error_kept": float(wrong["test"][kept, draft_k].mean()) if kept.any() else None}
    plot_routing(task_dir / "routing_curve.png",
                 {f"{t}: router": (scores["test"][:, k], wrong["test"][:, k]) for k, t in enumerate(targets)}
                 | {f"{t}: own confidence": (own_uncertainty(outcomes["test"][t]), wrong["test"][:, k])
                    for k, t in enumerate(targets)},
                 f"difficulty router on test (levels {list(dcfg.levels)})")
    log_figures(trainer.loggers, {"routing_curve": task_dir / "routing_curve.png"}, trainer.global_step)

    guarantee = {**choice.guarantee(), "rule": "route the sample up (skip the draft) when P(draft wrong) >= threshold"}
    accepted = {"threshold": route_up, "guarantee": guarantee, "calib": {"acceptance_rate": choice.acceptance_rate,
                                                                         "n_accepted": choice.n_accepted}}
    weights, config = save_router(router, task_dir / "difficulty", spec, calibration=calibration)
    report = {"target": dcfg.target, "levels": list(dcfg.levels), "n": {s: len(w) for s, w in wrong.items()},
              "test": test, "calibration": calibration, "acceptance": accepted,
              "meta_error_rates": {t: float(wrong["meta"][:, k].mean()) for k, t in enumerate(targets)}}
    atomic_write_json(task_dir / "report.json", report)
    metrics = {f"test/{t}/{m}": v for t in targets for m, v in test[t].items()}
    metrics.update({"test/routing/kept_fraction": test["routing"]["kept_fraction"], **fault_metrics(trainer)})
    print_level_table({f"test/{t}/{m}": v for t in targets for m, v in test[t].items()},
                      "difficulty router on test: per tier", "test", ("auroc", "auroc_own_confidence", "aurc",
                                                                          "aurc_own_confidence", "error_rate"))
    run.record("difficulty", artifacts={"model": weights, "model_config": config, "report": task_dir / "report.json",
                                        "routing_curve": task_dir / "routing_curve.png"}, metrics=metrics)
    return metrics
