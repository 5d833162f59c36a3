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

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from pydantic import model_validator
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from train.calibration import calibration_report, fit_calibrator
from train.calibration.risk_control import aurc, routing_curve, select_threshold
from train.config_schema import Built, Levels, Positive, Probability, RiskControl, Selection
from train.data.splits import split_by_image
from train.export import Calibration
from train.export.bundle import export_router
from train.metrics import roadwork_prob
from train.models.difficulty import DifficultyRouter, load_router, save_router
from train.predictions import OutcomeDataset, collect_outputs, outputs_cache
from train.runs import Run
from train.tiers.base import Fit, Outcome, Tier, register_tier
from train.tiers.calibration import calibrated, load_calibrated
from train.tiers.cascade import one_per_scene
from train.tiers.classifier import parity_samples
from train.tiers.difficulty.module import DifficultyModule
from train.tiers.training import build_datamodule

log = logging.getLogger(__name__)


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


class Settings(RiskControl):
    """``difficulty``: the router's queries, targets, training and selection, and its reported acceptance."""
    levels: Levels
    target: Literal["hard", "soft"]
    val_fraction: Probability
    epochs: Positive
    batch_size: Positive
    selection: Selection
    module: Built

    @model_validator(mode="after")
    def _targets_are_the_cheap_tiers(self) -> Settings:
        targets = list(self.module.get("router", {}).get("targets", ["draft", "stage1"]))
        if "draft" not in targets or not set(targets) <= {"draft", "stage1"}:
            raise ValueError(f"module.router.targets={targets}: the router predicts the draft's mistakes and may "
                             "add Stage-1's ([draft] or [draft, stage1])")
        return self


@dataclass
class Inputs:
    """What the router reads: the calibrated draft's and Stage-1's outputs with the pooled image on meta, calib and
    test, where each tier was wrong, and meta's training targets."""
    spec: dict
    outcomes: dict[str, dict]  # split -> the tiers' logits, the pooled image, label, index, level
    wrong: dict[str, torch.Tensor]  # split -> (N, targets) 1.0 where the tier answered wrongly
    fit_targets: torch.Tensor  # meta's targets: hard (wrong or not) or soft (the image's fraction of levels wrong)


@register_tier
class DifficultyTier(Tier, name="difficulty", kind="router", schema=Settings):
    """The router: P(draft wrong) and P(Stage-1 wrong) from a thumbnail and the draft's logits."""

    def needs(self, cfg: DictConfig) -> list[str]:
        return ["draft", *calibrated(cfg, "stage1")]

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Inputs:
        dcfg, tiers, spec = cfg.difficulty, {}, None
        for name in ("draft", "stage1"):
            tiers[name], config, _ = load_calibrated(run, name)
            spec = spec or config["input"]
        datamodule = build_datamodule(cfg, run, spec)
        in_size = dcfg.module.router.in_size

        def small(images: torch.Tensor) -> torch.Tensor:  # what the router sees, stored instead of the full image
            return F.adaptive_avg_pool2d(images, in_size)

        outcomes = {split: collect_outputs({**tiers, "image": small}, datamodule, split, dcfg.levels,
                                           outputs_cache(run))
                    for split in ("meta", "calib", "test")}  # calib, test: the draft stage's outputs
        targets = list(dcfg.module.router.targets)
        wrong = {split: wrong_answers(o, targets) for split, o in outcomes.items()}
        soft = per_image_mean(wrong["meta"], outcomes["meta"]["index"])
        return Inputs(spec, outcomes, wrong, soft if dcfg.target == "soft" else wrong["meta"])

    def module(self, cfg: DictConfig, run: Run, inputs: Inputs, task_dir: Path) -> DifficultyModule:
        return instantiate(cfg.difficulty.module)

    def loaders(self, cfg: DictConfig, inputs: Inputs) -> tuple[DataLoader, DataLoader]:
        meta, dcfg = inputs.outcomes["meta"], cfg.difficulty
        train_rows, val_rows = split_by_image(meta["index"], dcfg.val_fraction, cfg.seed)

        def dataset(rows: torch.Tensor) -> OutcomeDataset:
            return OutcomeDataset({"image": meta["image"][rows], "draft_logits": meta["draft"][rows],
                                   "target": inputs.fit_targets[rows], "wrong": inputs.wrong["meta"][rows]})

        return tuple(DataLoader(dataset(rows), batch_size=dcfg.batch_size, shuffle=shuffle)
                     for rows, shuffle in ((train_rows, True), (val_rows, False)))

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Inputs, task_dir: Path) -> Outcome:
        dcfg, outcomes, wrong = cfg.difficulty, inputs.outcomes, inputs.wrong
        router = fit.module.net.cpu().eval()
        targets = router.targets
        calibration = calibrate_router(router, router_scores(router, outcomes["calib"]), wrong["calib"],
                                       cfg.calibrate.n_bins)
        calibration.update(split="calib", levels=list(dcfg.levels), n=len(wrong["calib"]))
        scores = {split: router_scores(router, outcomes[split]).sigmoid() for split in ("calib", "test")}
        draft_k = targets.index("draft")
        rows = one_per_scene(cfg, run, "calib", outcomes["calib"]["index"].numpy())
        choice = select_threshold(1 - scores["calib"][rows, draft_k].numpy(), wrong["calib"][rows, draft_k].numpy(),
                                  dcfg.alpha, dcfg.delta, min_accepted=dcfg.min_accepted)
        route_up = None if choice.threshold is None else 1 - choice.threshold
        kept = (scores["test"][:, draft_k] < route_up if route_up is not None
                else torch.zeros(len(scores["test"]), dtype=torch.bool))
        test = {t: routing_figures(scores["test"][:, k], wrong["test"][:, k], own_uncertainty(outcomes["test"][t]))
                for k, t in enumerate(targets)}
        test["routing"] = {"threshold": route_up, "kept_fraction": float(kept.float().mean()),
                           "draft_error_kept": float(wrong["test"][kept, draft_k].mean()) if kept.any() else None}
        plot_routing(task_dir / "routing_curve.png",
                     {f"{t}: router": (scores["test"][:, k], wrong["test"][:, k]) for k, t in enumerate(targets)}
                     | {f"{t}: own confidence": (own_uncertainty(outcomes["test"][t]), wrong["test"][:, k])
                        for k, t in enumerate(targets)},
                     f"difficulty router on test (levels {list(dcfg.levels)})")
        guarantee = {**choice.guarantee(),
                     "rule": "route the sample up (skip the draft) when P(draft wrong) >= threshold"}
        accepted = {"threshold": route_up, "guarantee": guarantee,
                    "calib": {"acceptance_rate": choice.acceptance_rate, "n_accepted": choice.n_accepted}}
        weights, config = save_router(router, task_dir / "difficulty", inputs.spec, calibration=calibration)
        report = {"target": dcfg.target, "levels": list(dcfg.levels), "n": {s: len(w) for s, w in wrong.items()},
                  "test": test, "calibration": calibration, "acceptance": accepted,
                  "meta_error_rates": {t: float(wrong["meta"][:, k].mean()) for k, t in enumerate(targets)}}
        per_tier = {f"test/{t}/{m}": v for t in targets for m, v in test[t].items()}
        metrics = {**per_tier, "test/routing/kept_fraction": test["routing"]["kept_fraction"]}
        return Outcome({"model": weights, "model_config": config}, metrics, report=report,
                       figures={"routing_curve": task_dir / "routing_curve.png"},
                       table=(per_tier, "difficulty router on test: per tier", "test",
                              ("auroc", "auroc_own_confidence", "aurc", "aurc_own_confidence", "error_rate")))

    def load(self, run: Run) -> tuple[DifficultyRouter, dict]:
        return load_router(run.artifact(self.name, "model"))

    def export(self, cfg: DictConfig, run: Run, folder: Path):
        """The router's ONNX, its parity checked on real queries with the calibrated draft's logits."""
        router, config = self.load(run)
        spec = config["input"]
        pixels, _ = parity_samples(build_datamodule(cfg, run, spec), cfg.export.onnx.parity_images)
        draft, _, _ = load_calibrated(run, "draft")
        with torch.no_grad():
            draft_logits = draft.eval()(pixels).float()
        report = json.loads(run.artifact(self.name, "report").read_text())
        calibration = Calibration(**{k: config["calibration"][k] for k in
                                     ("method", "params", "folded", "split", "levels", "n", "before", "after")})
        metrics = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                   for t, m in report["test"].items() if t in router.targets}
        return export_router(self.name, router, spec, calibration, folder, pixels, draft_logits, metrics,
                             cfg.export.onnx.opset, cfg.export.onnx.parity_atol)
