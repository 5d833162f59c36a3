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

import logging
import shutil
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.calibration import calibration_report, fit_calibrator, reliability_diagram
from train.calibration.risk_control import evaluate_threshold, select_threshold
from train.data.feature_store import FeatureStore, load_split
from train.data.splits import split_by_image
from train.metrics import paired_bootstrap_mcc, roadwork_prob
from train.models.fusion import FusionNet, conditions, modality_dropout, save_fusion
from train.optim import with_schedule
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.cascade import one_per_scene
from train.tiers.training import build_trainer, restore_best
from train.utils.console import print_level_table
from train.utils.files import atomic_write_json
from train.utils.loggers import save_figure

log = logging.getLogger(__name__)
SPLITS = ("meta", "calib", "test")


class FusionModule(pl.LightningModule):
    """Cross-entropy on the fused logits (+ ``aux_weight`` x the per-modality heads' own losses), ModDrop on.

    ``class_weights`` (inverse class frequencies of the training rows) balance the loss, as Stage-1's balanced
    sampling does: on 4:1 data the head cannot score by leaning to the majority class."""

    def __init__(self, dims: dict[str, int], net: dict, optimizer: Callable, scheduler: Callable | None = None,
                 moddrop: float = 0.3, aux_weight: float = 0.3, class_weights: list[float] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = FusionNet(dims, **net)
        self.register_buffer("class_weights", torch.tensor(class_weights or [1.0, 1.0]), persistent=False)
        self.optimizer, self.scheduler, self.moddrop, self.aux_weight = optimizer, scheduler, moddrop, aux_weight
        self.val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, features: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.net(features, present)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        present = modality_dropout(batch["present"], self.moddrop)
        out = self.net.forward_all(batch["features"], present)
        loss = F.cross_entropy(out["logits"], batch["label"], weight=self.class_weights)
        if "unimodal" in out and self.aux_weight:
            per = F.cross_entropy(out["unimodal"].flatten(0, 1), batch["label"].repeat_interleave(present.shape[1]),
                                  weight=self.class_weights, reduction="none")
            loss = loss + self.aux_weight * (per * present.flatten().float()).sum() / present.sum().clamp(min=1)
        self.log("train/loss", loss, batch_size=len(present))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_outputs.append((self(batch["features"], batch["present"]).float(), batch["label"]))

    def on_validation_epoch_end(self) -> None:
        logits, label = (torch.cat(x) for x in zip(*self.val_outputs))
        self.val_outputs.clear()
        self.log("val/loss", F.cross_entropy(logits, label, weight=self.class_weights), prog_bar=True)
        self.log("val/mcc", binary_matthews_corrcoef(roadwork_prob(logits), label).float())

    def configure_optimizers(self):
        return with_schedule(self, self.optimizer(self.parameters()), self.scheduler)


def rows_of(data: dict, rows: torch.Tensor) -> dict:
    return {"features": [f[rows] for f in data["features"]], **{k: data[k][rows] for k in ("present", "label")}}


def _collate(items: list[dict]) -> dict:
    return {"features": [torch.stack(x) for x in zip(*(i["features"] for i in items))],
            "present": torch.stack([i["present"] for i in items]), "label": torch.stack([i["label"] for i in items])}


class RowDataset(Dataset):
    """Rows of a split's tensors (features per modality, presence, label)."""

    def __init__(self, data: dict):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, i: int) -> dict:
        return {"features": [f[i] for f in self.data["features"]], "present": self.data["present"][i],
                "label": self.data["label"][i]}


def train_head(cfg: DictConfig, module_cfg: DictConfig, meta: dict, modalities: list[str], task_dir) -> FusionNet:
    """Fit one fusion head on the meta split (model selection by val/loss on the held-out images)."""
    fcfg = cfg.fusion
    dims = {m: meta["features"][k].shape[1] for k, m in enumerate(modalities)}
    train_rows, val_rows = split_by_image(meta["index"], fcfg.val_fraction, cfg.seed)
    counts = torch.bincount(meta["label"][train_rows], minlength=2).float()
    weights = (counts.sum() / (2 * counts.clamp(min=1))).tolist() if fcfg.balance else None
    module: FusionModule = instantiate(module_cfg, dims=dims, class_weights=weights)
    module.net.fit_normalisation([f[train_rows] for f in meta["features"]], meta["present"][train_rows])
    loaders = [DataLoader(RowDataset(rows_of(meta, rows)), batch_size=fcfg.batch_size, shuffle=shuffle,
                          collate_fn=_collate) for rows, shuffle in ((train_rows, True), (val_rows, False))]
    shutil.rmtree(task_dir / "checkpoints", ignore_errors=True)  # a rerun's best checkpoint is its own
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, task_dir, monitor=("val/loss", "min"), max_epochs=fcfg.epochs,
                            limit_train_batches=None, limit_val_batches=None)
    threads = torch.get_num_threads()
    if fcfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(int(fcfg.cpu_threads))  # a small MLP / attention head: more threads only contend
    try:
        trainer.fit(module, *loaders)
    finally:
        torch.set_num_threads(threads)
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


@register_task("fusion", ranks="one", needs=lambda cfg: ["features"])
def run_fusion(cfg: DictConfig, run: Run) -> dict:
    fcfg, task_dir = cfg.fusion, run.task_dir("fusion")
    store = FeatureStore(run.artifact("features", "manifest").parent)
    modalities = list(fcfg.modalities or store.modalities)
    unknown = sorted(set(modalities) - set(store.modalities))
    if unknown:
        raise ValueError(f"fusion.modalities has {unknown}, not in the feature store; allowed: {store.modalities}")
    data = {split: load_split(store, split, modalities) for split in SPLITS}
    net = train_head(cfg, fcfg.module, data["meta"], modalities, task_dir / "main")
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
    best = max(single_names, key=lambda n: mcc[n]["all"])  # the strongest single modality on test: a conservative bar
    versus_best = {"best_single": best, **paired_bootstrap_mcc(heads[best], heads["fusion, all"], labels, test["index"],
                                                               fcfg.bootstrap, cfg.seed)}
    drop_costs = {m: mcc["fusion, all"]["all"] - mcc[f"fusion, without {m}"]["all"] for m in modalities}
    plot_heatmap(task_dir / "robustness.png", mcc, f"test MCC by modalities present ({len(labels)} queries)")
    save_figure(reliability_diagram(labels, {"before": uncalibrated, "after": probs["test"]}, cfg.calibrate.n_bins,
                                    "fusion on test, temperature scaling"), task_dir / "fusion_reliability.png")
    weights, config = save_fusion(net, task_dir / "fusion", calibration=calibration, store=str(store.root),
                                  modalities=modalities, input=store.manifest["input"],
                                  producers={m: store.manifest["modalities"][m]["producer"] for m in modalities})
    report = {"modalities": modalities, "n": {s: len(d["label"]) for s, d in data.items()}, "test_mcc": mcc,
              "versus_best_single": versus_best, "drop_one_cost": drop_costs,
              "max_drop_one_cost": max(drop_costs.values()), "calibration": calibration, "acceptance": accepted}
    atomic_write_json(task_dir / "report.json", report)
    print_level_table({f"test/{n}/{k}": v for n, m in mcc.items() for k, v in m.items()}, "fusion: test MCC",
                      "test", tuple(next(iter(mcc.values()))))
    log.info("fusion(all) - %s: %+.3f [%.3f, %.3f]; largest drop-one cost %.3f; ECE calib %.3f -> %.3f",
             best, versus_best["delta"], versus_best["low"], versus_best["high"], report["max_drop_one_cost"],
             calibration["before"]["ece"], calibration["after"]["ece"])
    metrics = {f"test/{n}/mcc": m["all"] for n, m in mcc.items()}
    metrics.update({"test/versus_best_single/delta": versus_best["delta"], "test/versus_best_single/low":
                    versus_best["low"], "test/versus_best_single/high": versus_best["high"],
                    "test/max_drop_one_cost": report["max_drop_one_cost"],
                    "calib/ece_after": calibration["after"]["ece"]})
    run.record("fusion", artifacts={"model": weights, "model_config": config, "report": task_dir / "report.json",
                                    "heatmap": task_dir / "robustness.png",
                                    "reliability": task_dir / "fusion_reliability.png"}, metrics=metrics)
    return metrics
