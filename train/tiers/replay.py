"""The bundle on validator queries, for ``task=evaluate`` and ``task=quantize``: its classifiers at each precision
side by side (:func:`compare_precisions`), and the cascade replay: every query of calib and test through the bundle's tiers in ONNX Runtime
(:class:`train.export.replay.BundleCascade`), as the manifest says; reported against Stage-1 alone.

Queries are one validator level per image, in turn (``cascade.levels``), with every view the PRM may inspect (what
``ViewDataset`` serves: the data side only). Reports per-tier exit fractions, MCC / accuracy / NATIX reward per
level, mean FLOPs (every model run for a sample, from the manifest's counts) and mean latency per image, the paired
bootstrap of MCC(cascade) - MCC(Stage-1), and the cost-vs-MCC curve over ``cascade.sweep`` (thresholds re-chosen
on calib at each alpha by the same risk-control code). At a quantised ``precision`` (``evaluate.precision``) the
cascade runs its variants with their own thresholds, and the fp32 cascade is replayed on the same test queries
next to it (``compare``: MCC per level, exits, FLOPs, latency).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger
from safetensors.numpy import save_file
from torch.utils.data import DataLoader

from train.calibration.cascade import select_cascade
from train.calibration.metrics import score_probs
from train.calibration.plots import cascade_curve
from train.data.views import GLOBAL_ONLY, ViewSet, view_dataset
from train.export import Bundle
from train.export.bundle import BundleClassifier
from train.export.cascade import TierOutput
from train.export.manifest import FULL_PRECISION
from train.export.replay import BundleCascade
from train.metrics import THRESHOLD, paired_bootstrap_mcc, with_mean
from train.predictions import predict_split
from train.runs import Run
from train.tiers.cascade import one_per_scene, tier_rules
from train.tiers.training import build_datamodule
from train.utils.console import cost_ratio, print_level_table, track
from train.utils.files import atomic_write_json
from train.utils.loggers import publish_figures

log = logging.getLogger(__name__)
FIELDS = ("prob", "score", "answer", "views", "prm_flops")


def bundle_path(cfg: DictConfig, run: Run) -> Path:
    """``bundle=PATH``, else the run's own export."""
    return Path(cfg.bundle) if cfg.get("bundle") else run.artifact("export", "manifest").parent


def compare_precisions(classifiers: dict[str, BundleClassifier], datamodule, split: str, levels, n_bins: int):
    """Every classifier (one model at several precisions, fp32 among them) on the same queries, batch by batch in
    turn: ``({level: {precision: P, "label", "index"}}, {precision: metrics per level, agreement with fp32 per level,
    max |P - P_fp32|, size on disk, latency per image})``."""
    seconds = dict.fromkeys(classifiers, 0.0)

    def each(images):
        out = {}
        for precision, classifier in classifiers.items():
            start = time.perf_counter()
            out[precision] = classifier.probs(images.numpy())
            seconds[precision] += time.perf_counter() - start
        return out

    model = classifiers[FULL_PRECISION].path.stem  # the ONNX file's name: the model's
    predictions = predict_split(each, datamodule, split, levels,
                                description=f"evaluate: {model} ({', '.join(classifiers)}) on {split}")
    n = sum(len(p["label"]) for p in predictions.values())
    figures = {}
    for precision, classifier in classifiers.items():
        fp32 = {lv: p[FULL_PRECISION] for lv, p in predictions.items()}
        agree = {f"L{lv}": float(((p[precision] > THRESHOLD) == (fp32[lv] > THRESHOLD)).float().mean())
                 for lv, p in predictions.items()}
        figures[precision] = {
            "metrics": with_mean({f"L{lv}": score_probs(p[precision], p["label"], n_bins)
                                  for lv, p in predictions.items()}),
            "agreement_with_fp32": {**agree, "mean": sum(agree.values()) / len(agree)},
            "max_abs_diff_p_fp32": max(float((p[precision] - fp32[lv]).abs().max()) for lv, p in predictions.items()),
            "size_bytes": classifier.path.stat().st_size, "latency_ms_per_image": 1e3 * seconds[precision] / n}
    return predictions, figures



def _concat(parts: list[dict[str, TierOutput]]) -> dict[str, TierOutput]:
    out = {}
    for name, first in parts[0].items():
        fields = {f: np.concatenate([p[name].__dict__[f] for p in parts]) for f in FIELDS
                  if first.__dict__[f] is not None}
        out[name] = TierOutput(first.kind, **fields)
    return out


def replay_split(cascade: BundleCascade, datamodule, split: str, view_set: ViewSet, levels, batch_size: int,
                 workers: int) -> tuple[dict[str, TierOutput], dict[str, np.ndarray]]:
    """Every tier's ONNX Runtime outputs on ``split``'s queries, and their label / index / level."""
    dataset = view_dataset(datamodule, split, view_set, levels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    parts, meta = [], []
    for batch in track(loader, f"replay: cascade on {split}", len(dataset), "queries", count=lambda b: len(b["label"])):
        parts.append(cascade.outputs(batch["views"].numpy(), batch["mask"].numpy()))
        meta.append(torch.stack([batch["label"], batch["index"], batch["level"]], 1).numpy())
    label, index, level = np.concatenate(meta).T
    return _concat(parts), {"label": label, "index": index, "level": level}


def per_level(answer: np.ndarray, meta: dict) -> dict[str, dict[str, float]]:
    """MCC, accuracy and NATIX reward of ``answer`` per level (``L<level>``) and over all queries (``all``)."""
    out = {}
    for lv in np.unique(meta["level"]):
        rows = meta["level"] == lv
        m = score_probs(torch.from_numpy(answer[rows]).float(), torch.from_numpy(meta["label"][rows]))
        out[f"L{lv}"] = {k: m[k] for k in ("mcc", "acc", "reward")}
    m = score_probs(torch.from_numpy(answer).float(), torch.from_numpy(meta["label"]))
    out["all"] = {k: m[k] for k in ("mcc", "acc", "reward")}
    return out


def mean_latency(cascade: BundleCascade, routed, n_queries: int) -> float:
    """Seconds per image: each model's measured time per image (batched, ONNX Runtime CPU) over the samples it ran
    for, the PRM's views at the views model's rate, and the PRM's own time per query that reached it."""
    per_image = cascade.latency_per_image()
    total = sum(float(rows.mean()) * per_image.get(name, 0.0) for name, rows in routed.evaluated.items())
    prm = [n for n, k in cascade.order if k == "prm"]
    if prm:
        views_model = cascade.costs.views_model
        total += float(np.maximum(routed.views - 1, 0).mean()) * per_image.get(views_model, 0.0)
        prm_seconds = sum(t for t, _ in cascade.latency.get(prm[0], []))
        total += float((routed.views > 0).mean()) * prm_seconds / n_queries
    return total


def cascade_views(cascade: BundleCascade) -> ViewSet:
    """The views each query needs: every slot the PRM may inspect, else the validator query alone."""
    return ViewSet.from_description(cascade.search.views) if hasattr(cascade, "search") else GLOBAL_ONLY


def replay_cascade(cfg: DictConfig, run: Run, bundle: Bundle, task_dir: Path, loggers: Sequence[Logger] = (),
                   precision: str = FULL_PRECISION) -> tuple[dict, dict]:
    """Replay the bundle's cascade on calib and ``evaluate.split`` against ``evaluate.model`` alone (and the fp32
    cascade at another ``precision``); writes ``cascade.json``, the test routing and the cost curve, and returns
    (metrics, artifacts)."""
    ecfg, ccfg = cfg.evaluate, cfg.cascade
    cascade = BundleCascade(bundle, ecfg.threads, precision)
    reference = ecfg.model
    spec = bundle.manifest.models[reference].input.model_dump()
    datamodule = build_datamodule(cfg, run, spec)
    outputs, meta = {}, {}
    for split in ("calib", ecfg.split):
        outputs[split], meta[split] = replay_split(cascade, datamodule, split, cascade_views(cascade), ccfg.levels,
                                                   ccfg.batch_size, cfg.data.num_workers)
    test, test_meta = outputs[ecfg.split], meta[ecfg.split]
    routed = cascade.route(test)
    if reference not in test:
        raise ValueError(f"evaluate.model={reference!r} is not a tier of the cascade {[n for n, _ in cascade.order]}")
    alone = test[reference].decision
    diff = mcc_difference(alone, routed.answer, test_meta)
    label = test_meta["label"]
    ref_flops = cascade.costs.per_call[reference]
    latency = {"cascade": mean_latency(cascade, routed, len(label)),
               "reference": cascade.latency_per_image()[reference]}
    sweep = alpha_sweep(cfg, run, cascade, outputs["calib"], meta["calib"], test, test_meta, ref_flops, alone)
    report = {
        "bundle": str(bundle.path), "precision": precision, "split": ecfg.split, "n": int(len(label)),
        "reference": reference,
        "tiers": [{"name": n, "kind": k, "threshold": cascade.thresholds[n]} for n, k in cascade.order],
        "exit_fraction": {n: float((routed.exit == i).mean()) for i, (n, _) in enumerate(cascade.order)},
        "metrics": {"cascade": per_level(routed.answer, test_meta), "reference": per_level(alone, test_meta)},
        "mcc_difference": {k: diff[k] for k in ("delta", "low", "high")},
        "flops": {"cascade_mean": float(routed.flops.mean()), "reference": ref_flops,
                  "ratio": ref_flops / float(routed.flops.mean()),
                  "evaluated_fraction": {n: float(r.mean()) for n, r in routed.evaluated.items()},
                  "mean_views": float(routed.views.mean())},
        "latency_s_per_image": latency, "latency_per_model": cascade.latency_per_image(),
        "latency_note": "ONNX Runtime CPU, batches of cascade.batch_size; a model's time counts for the samples it "
                        "ran for", "sweep": sweep}
    if precision != FULL_PRECISION:
        report["compare"] = {FULL_PRECISION: _full_precision(cfg, bundle, datamodule, reference)}
    atomic_write_json(task_dir / "cascade.json", report)
    save_file({"answer": routed.answer, "exit": routed.exit, "flops": routed.flops, "views": routed.views,
               **{k: np.ascontiguousarray(v) for k, v in test_meta.items()}}, str(task_dir / "cascade_test.safetensors"))
    figures = publish_figures(loggers, task_dir, {"cascade_curve": cascade_curve(
        sweep, report, f"the cascade from the bundle, {ecfg.split} split")})
    _print(report)
    metrics = {f"cascade/{ecfg.split}/{lv}/{k}": v for lv, m in report["metrics"]["cascade"].items() for k, v in m.items()}
    metrics.update({"cascade/flops_ratio": report["flops"]["ratio"], "cascade/mcc_delta": diff["delta"],
                    "cascade/mcc_delta_low": diff["low"], "cascade/mcc_delta_high": diff["high"]})
    return metrics, {"cascade": task_dir / "cascade.json", **figures,
                     "cascade_test": task_dir / "cascade_test.safetensors"}


def _full_precision(cfg, bundle: Bundle, datamodule, reference: str) -> dict:
    """The fp32 cascade on the same test queries: MCC per level (cascade and the reference alone), exits, FLOPs and
    latency, for the side-by-side report of a quantised replay."""
    cascade = BundleCascade(bundle, cfg.evaluate.threads)
    test, meta = replay_split(cascade, datamodule, cfg.evaluate.split, cascade_views(cascade), cfg.cascade.levels,
                              cfg.cascade.batch_size, cfg.data.num_workers)
    routed = cascade.route(test)
    return {"tiers": [{"name": n, "kind": k, "threshold": cascade.thresholds[n]} for n, k in cascade.order],
            "exit_fraction": {n: float((routed.exit == i).mean()) for i, (n, _) in enumerate(cascade.order)},
            "metrics": {"cascade": per_level(routed.answer, meta),
                        "reference": per_level(test[reference].decision, meta)},
            "flops_cascade_mean": float(routed.flops.mean()),
            "latency_s_per_image": {"cascade": mean_latency(cascade, routed, len(meta["label"])),
                                    "reference": cascade.latency_per_image()[reference]}}


def mcc_difference(alone: np.ndarray, answer: np.ndarray, meta: dict) -> dict[str, float]:
    """MCC(cascade) - MCC(reference alone) on the same queries, with its paired bootstrap 95% interval (images
    resampled whole)."""
    return paired_bootstrap_mcc(torch.from_numpy(alone).float(), torch.from_numpy(answer).float(),
                                torch.from_numpy(meta["label"]), groups=torch.from_numpy(meta["index"]))


def alpha_sweep(cfg, run, cascade: BundleCascade, calib, calib_meta, test, test_meta, ref_flops: float,
                alone: np.ndarray) -> list[dict]:
    """At each alpha of ``cascade.sweep`` (the tiers without their own ``tier_alpha``): thresholds on calib (one query
    per scene), then the test cascade's mean FLOPs relative to the reference, its MCC and the paired bootstrap of its
    MCC difference to the reference alone (``alone``: the reference's answers)."""
    rows = one_per_scene(cfg, run, "calib", calib_meta["index"])
    out = []
    for alpha in cfg.cascade.sweep:
        chosen = select_cascade(cascade.order, calib, calib_meta["label"], tier_rules(cfg, cascade.order, alpha),
                                cfg.cascade.reference, rows)
        routed = cascade.route(test, {c.name: c.threshold for c in chosen})
        diff = mcc_difference(alone, routed.answer, test_meta)
        out.append({"alpha": float(alpha), "mcc": diff["mcc_b"], "flops_fraction": float(routed.flops.mean()) / ref_flops,
                    "mcc_delta": diff["delta"], "mcc_delta_low": diff["low"], "mcc_delta_high": diff["high"]})
    return out


def _print(report: dict) -> None:
    f, d = report["flops"], report["mcc_difference"]
    log.info("cascade from the bundle: exits %s; mean FLOPs %.3g vs %s alone %.3g (%s), %.2f views; "
             "MCC difference %+.3f [%+.3f, %+.3f]; latency %.2f ms vs %.2f ms per image",
             {k: round(v, 3) for k, v in report["exit_fraction"].items()}, f["cascade_mean"], report["reference"],
             f["reference"], cost_ratio(f["ratio"]), f["mean_views"], d["delta"], d["low"], d["high"],
             1e3 * report["latency_s_per_image"]["cascade"], 1e3 * report["latency_s_per_image"]["reference"])
    rows = {f"cascade/{who} {lv}/{k}": v for who, per in report["metrics"].items() for lv, m in per.items()
            for k, v in m.items()}
    print_level_table(rows, f"cascade vs {report['reference']} alone ({report['precision']}, {report['split']}, one "
                      "level per image)",
                      split="cascade", columns=("mcc", "acc", "reward"))
