"""``task=fusion``: the cross-modal fusion head over the feature store, robust to missing modalities.

Trained on the store's ``meta`` split (part of its images held out for model selection) with ModDrop; calibrated
(temperature, the shared calibration code) on ``calib``, where the report says what an acceptance threshold by
Learn-then-Test would accept (max(p, 1 - p) >= threshold; error among accepted <= alpha w.p. >= 1 - delta; the head
is no cascade tier, so nothing deploys it). Reported on ``test``:
MCC with all modalities, with each one missing and with each one alone (per level and overall), the same for the
``fusion.compare`` heads and a dedicated head per modality, a paired bootstrap interval of fusion(all) minus the
best single modality, ECE before/after, and ``robustness.png`` (a heatmap of those MCCs).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.calibration import calibration_report, fit_calibrator, reliability_diagram
from train.calibration.risk_control import evaluate_threshold, select_threshold
from train.config_schema import Built, Positive, Probability, RiskControl, Selection
from train.data.feature_store import FeatureStore, load_split
from train.data.splits import split_by_image
from train.errors import ConfigError
from train.export import Calibration
from train.export.bundle import export_fusion
from train.metrics import paired_bootstrap_mcc, roadwork_prob
from train.models.fusion import FusionNet, conditions, load_fusion, save_fusion
from train.runs import Run
from train.tiers.base import Fit, Outcome, Tier, register_tier, reseed
from train.tiers.cascade import one_per_scene
from train.tiers.fusion.module import FusionModule, RowDataset, collate, rows_of
from train.tiers.training import build_trainer, restore_best
from train.utils.loggers import save_figure

log = logging.getLogger(__name__)
SPLITS = ("meta", "calib", "test")


def build_head(cfg: DictConfig, module_cfg: DictConfig, meta: dict, modalities: list[str]) -> FusionModule:
    """A fusion head for ``modalities``, its class weights and input normalisation from meta's training rows."""
    train_rows, _ = split_by_image(meta["index"], cfg.fusion.val_fraction, cfg.seed)
    dims = {m: meta["features"][k].shape[1] for k, m in enumerate(modalities)}
    counts = torch.bincount(meta["label"][train_rows], minlength=2).float()
    weights = (counts.sum() / (2 * counts.clamp(min=1))).tolist() if cfg.fusion.balance else None
    module: FusionModule = instantiate(module_cfg, dims=dims, class_weights=weights)
    module.net.fit_normalisation([f[train_rows] for f in meta["features"]], meta["present"][train_rows])
    return module


def head_loaders(cfg: DictConfig, meta: dict) -> tuple[DataLoader, DataLoader]:
    """Meta's rows split by image: (train, held out for model selection)."""
    train_rows, val_rows = split_by_image(meta["index"], cfg.fusion.val_fraction, cfg.seed)
    return tuple(DataLoader(RowDataset(rows_of(meta, rows)), batch_size=cfg.fusion.batch_size, shuffle=shuffle,
                            collate_fn=collate) for rows, shuffle in ((train_rows, True), (val_rows, False)))


@contextmanager
def cpu_threads(cfg: DictConfig) -> Iterator[None]:
    """``fusion.cpu_threads`` intra-op threads while a head trains on a CPU (a small head: more threads contend)."""
    threads = torch.get_num_threads()
    if cfg.fusion.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(int(cfg.fusion.cpu_threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_head(cfg: DictConfig, module_cfg: DictConfig, meta: dict, modalities: list[str], task_dir) -> FusionNet:
    """Fit one more head for the report (a compared architecture, one modality alone) into its own folder, as the
    tier's own head is fitted."""
    module = build_head(cfg, module_cfg, meta, modalities)
    shutil.rmtree(task_dir / "checkpoints", ignore_errors=True)  # a rerun's best checkpoint is its own
    reseed(cfg)
    tier = FusionTier()
    trainer = build_trainer(cfg, task_dir, monitor=tier.selection(cfg), **tier.trainer_overrides(cfg))
    with cpu_threads(cfg):
        trainer.fit(module, *head_loaders(cfg, meta))
    restore_best(trainer, module)
    return module.net.cpu().eval()


@torch.no_grad()
def fused_logits(net: FusionNet, data: dict, keep: torch.Tensor | None = None, batch: int = 4096) -> torch.Tensor:
    """Logits over a split with only the modalities in ``keep`` (a (M,) bool mask) treated as present."""
    net.eval()
    present = data["present"] & keep if keep is not None else data["present"]
    return torch.cat([net([f[i:i + batch] for f in data["features"]], present[i:i + batch])
                      for i in range(0, len(present), batch)])


def mcc_by_level(probs: torch.Tensor, data: dict) -> dict[str, float]:
    """MCC overall (``all``) and per validator level (``L0``...)."""
    out = {"all": float(binary_matthews_corrcoef(probs, data["label"]))}
    for level in data["level"].unique().tolist():
        rows = data["level"] == level
        out[f"L{level}"] = float(binary_matthews_corrcoef(probs[rows], data["label"][rows]))
    return out


def plot_heatmap(path, table: dict[str, dict[str, float]], title: str) -> None:
    """Rows (conditions / heads) x columns (overall, levels) of MCC, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = list(table), list(next(iter(table.values())))
    values = np.array([[table[r][c] for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.32 * len(rows) + 1.2))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, j in np.ndindex(values.shape):
        ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=6,
                color="white" if values[i, j] < values.mean() else "black")
    fig.colorbar(image, ax=ax, label="test MCC")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate_head(net: FusionNet, calib: dict, n_bins: int) -> dict:
    """Fit a temperature on calib (all modalities present), fold it in; returns the calibration report."""
    logits, labels = fused_logits(net, calib), calib["label"]
    scaler = fit_calibrator("temperature", logits.double(), labels)
    net.fold_temperature(scaler.temperature)
    return {"method": "temperature", "params": {"temperature": scaler.temperature}, "folded": True, "split": "calib",
            "levels": sorted(calib["level"].unique().tolist()), "n": len(labels),
            "before": calibration_report(roadwork_prob(logits), labels, n_bins),
            "after": calibration_report(roadwork_prob(fused_logits(net, calib)), labels, n_bins)}


def acceptance(probs: dict[str, torch.Tensor], data: dict[str, dict], fcfg: DictConfig, rows: np.ndarray) -> dict:
    """What a Learn-then-Test threshold on calib (``rows``: one query per scene) would accept, and its result on
    test: a report figure (the fusion head is no cascade tier)."""
    conf = {s: torch.maximum(p, 1 - p).numpy() for s, p in probs.items()}
    wrong = {s: ((p > 0.5).long() != data[s]["label"]).float().numpy() for s, p in probs.items()}
    choice = select_threshold(conf["calib"][rows], wrong["calib"][rows], fcfg.alpha, fcfg.delta,
                              min_accepted=fcfg.min_accepted)
    guarantee = {**choice.guarantee(), "rule": "accept the fusion's answer when max(p, 1 - p) >= threshold"}
    return {"threshold": choice.threshold, "guarantee": guarantee,
            "calib": {"acceptance_rate": choice.acceptance_rate, "n_accepted": choice.n_accepted},
            "test": evaluate_threshold(conf["test"], wrong["test"], choice.threshold)}


def single_modality_heads(cfg: DictConfig, data: dict, modalities: list[str], task_dir) -> dict[str, torch.Tensor]:
    """Test P(roadwork) of a dedicated head per modality (concat MLP on it alone, no ModDrop), calibrated on calib."""
    module_cfg = OmegaConf.merge(cfg.fusion.module, {"net": {"kind": "concat", "meta": False}, "moddrop": 0.0})
    out = {}
    for k, m in enumerate(modalities):
        one = {s: {**d, "features": [d["features"][k]], "present": d["present"][:, k:k + 1]} for s, d in data.items()}
        net = train_head(cfg, module_cfg, one["meta"], [m], task_dir / f"single_{m}")
        calibrate_head(net, one["calib"], cfg.calibrate.n_bins)
        out[f"single {m}"] = roadwork_prob(fused_logits(net, one["test"]))
    return out


class Settings(RiskControl):
    """``fusion``: the modalities fused, training and selection, the compared heads and the reported acceptance."""
    modalities: list[str] | None
    val_fraction: Probability
    epochs: Positive
    batch_size: Positive
    selection: Selection
    cpu_threads: Positive | None
    balance: bool
    bootstrap: Positive
    single_modality: bool
    compare: dict[str, dict[str, Any]] | None
    module: Built


@dataclass
class Inputs:
    """What the fusion head reads: the run's feature store, the modalities fused and their rows per split."""
    store: FeatureStore
    modalities: list[str]
    data: dict[str, dict]  # split -> the store's rows: features per modality, presence, label, index, level


@register_tier
class FusionTier(Tier, name="fusion", kind="fusion", schema=Settings):
    """The fusion head over the feature store, robust to missing modalities (a model of the bundle; the cascade does
    not route to it)."""

    def needs(self, cfg: DictConfig) -> list[str]:
        return ["features"]

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Inputs:
        store = FeatureStore(run.artifact("features", "manifest").parent)
        modalities = list(cfg.fusion.modalities or store.modalities)
        unknown = sorted(set(modalities) - set(store.modalities))
        if unknown:
            raise ConfigError(f"fusion.modalities has {unknown}, not in the feature store; allowed: "
                              f"{store.modalities}")
        return Inputs(store, modalities, {split: load_split(store, split, modalities) for split in SPLITS})

    def module(self, cfg: DictConfig, run: Run, inputs: Inputs, task_dir: Path) -> FusionModule:
        return build_head(cfg, cfg.fusion.module, inputs.data["meta"], inputs.modalities)

    def loaders(self, cfg: DictConfig, inputs: Inputs) -> tuple[DataLoader, DataLoader]:
        return head_loaders(cfg, inputs.data["meta"])

    def fit(self, cfg: DictConfig, run: Run, trainer, module: FusionModule, inputs: Inputs) -> Fit:
        reseed(cfg)  # every head of the report (this one, the compared ones) fits from the same numbers
        with cpu_threads(cfg):
            return super().fit(cfg, run, trainer, module, inputs)

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Inputs, task_dir: Path) -> Outcome:
        fcfg, store, modalities, data = cfg.fusion, inputs.store, inputs.modalities, inputs.data
        net = fit.module.net.cpu().eval()
        calibration = calibrate_head(net, data["calib"], cfg.calibrate.n_bins)
        probs = {s: roadwork_prob(fused_logits(net, data[s])) for s in ("calib", "test")}
        accepted = acceptance(probs, data, fcfg, one_per_scene(cfg, run, "calib", data["calib"]["index"].numpy()))
        test, labels = data["test"], data["test"]["label"]
        uncalibrated = roadwork_prob(fused_logits(net, test) * net.temperature)
        calibration["test"] = {"before": calibration_report(uncalibrated, labels, cfg.calibrate.n_bins),
                               "after": calibration_report(probs["test"], labels, cfg.calibrate.n_bins)}

        heads = {f"fusion, {name}": roadwork_prob(fused_logits(net, test, keep))
                 for name, keep in conditions(modalities).items()}
        for name, overrides in (fcfg.compare or {}).items():
            module_cfg = OmegaConf.merge(fcfg.module, {"net": overrides})
            other = train_head(cfg, module_cfg, data["meta"], modalities, task_dir / f"compare_{name}")
            calibrate_head(other, data["calib"], cfg.calibrate.n_bins)
            heads[f"{name}, all"] = roadwork_prob(fused_logits(other, test))
        singles = single_modality_heads(cfg, data, modalities, task_dir) if fcfg.single_modality else {}
        heads.update(singles)
        for tier in ("stage1", "draft"):  # the tier's own calibrated answer: the last 2 values of its modality
            if tier in modalities:
                heads[f"{tier} tier alone"] = roadwork_prob(test["features"][modalities.index(tier)][:, -2:])
        mcc = {name: mcc_by_level(p, test) for name, p in heads.items()}

        single_names = [n for n in mcc if n.startswith(("fusion, only", "single")) or n.endswith("tier alone")]
        best = max(single_names, key=lambda n: mcc[n]["all"])  # the strongest single modality on test: a conservative
        versus_best = {"best_single": best, **paired_bootstrap_mcc(heads[best], heads["fusion, all"], labels,
                                                                   test["index"], fcfg.bootstrap, cfg.seed)}
        drop_costs = {m: mcc["fusion, all"]["all"] - mcc[f"fusion, without {m}"]["all"] for m in modalities}
        plot_heatmap(task_dir / "robustness.png", mcc, f"test MCC by modalities present ({len(labels)} queries)")
        save_figure(reliability_diagram(labels, {"before": uncalibrated, "after": probs["test"]},
                                        cfg.calibrate.n_bins, "fusion on test, temperature scaling"),
                    task_dir / "fusion_reliability.png")
        weights, config = save_fusion(net, task_dir / "fusion", calibration=calibration, store=str(store.root),
                                      modalities=modalities, input=store.manifest["input"],
                                      producers={m: store.manifest["modalities"][m]["producer"] for m in modalities})
        report = {"modalities": modalities, "n": {s: len(d["label"]) for s, d in data.items()}, "test_mcc": mcc,
                  "versus_best_single": versus_best, "drop_one_cost": drop_costs,
                  "max_drop_one_cost": max(drop_costs.values()), "calibration": calibration, "acceptance": accepted}
        log.info("fusion(all) - %s: %+.3f [%.3f, %.3f]; largest drop-one cost %.3f; ECE calib %.3f -> %.3f",
                 best, versus_best["delta"], versus_best["low"], versus_best["high"], report["max_drop_one_cost"],
                 calibration["before"]["ece"], calibration["after"]["ece"])
        metrics = {f"test/{n}/mcc": m["all"] for n, m in mcc.items()}
        metrics.update({"test/versus_best_single/delta": versus_best["delta"], "test/versus_best_single/low":
                        versus_best["low"], "test/versus_best_single/high": versus_best["high"],
                        "test/max_drop_one_cost": report["max_drop_one_cost"],
                        "calib/ece_after": calibration["after"]["ece"]})
        table = ({f"test/{n}/{k}": v for n, m in mcc.items() for k, v in m.items()}, "fusion: test MCC", "test",
                 tuple(next(iter(mcc.values()))))
        return Outcome({"model": weights, "model_config": config}, metrics, report=report,
                       figures={"heatmap": task_dir / "robustness.png",
                                "reliability": task_dir / "fusion_reliability.png"}, table=table)

    def load(self, run: Run) -> tuple[FusionNet, dict]:
        return load_fusion(run.artifact(self.name, "model"))

    def export(self, cfg: DictConfig, run: Run, folder: Path):
        """The fusion head's ONNX, its parity checked on real feature-store rows (calib) under varied presence
        masks."""
        net, config = self.load(run)
        data = load_split(FeatureStore(config["store"]), "calib", net.modalities)
        n = min(cfg.export.onnx.parity_images, len(data["label"]))
        masks = torch.stack(list(conditions(net.modalities).values()))  # all, each one missing, each one alone
        present = data["present"][:n] & masks[torch.arange(n) % len(masks)]
        calibration = Calibration(**{k: v for k, v in config["calibration"].items() if k != "test"})
        report = json.loads(run.artifact(self.name, "report").read_text())
        metrics = {level: {"mcc": v} for level, v in report["test_mcc"]["fusion, all"].items()}
        return export_fusion(self.name, net, config["input"], calibration, folder, [f[:n] for f in data["features"]],
                             present, config.get("producers"), metrics, cfg.export.onnx.opset,
                             cfg.export.onnx.parity_atol)
