"""``task=quantize``: INT8 variants of the bundle's classifiers, each recalibrated and given its own thresholds.

For every model of ``quantize.models`` and variant of ``quantize.variants`` (static INT8 from calib queries,
dynamic INT8 as the baseline; :mod:`train.export.quantize`): the variant's ONNX file is written next to the fp32
one (``<model>.<variant>.onnx``); its calibration is fitted again on its own calib outputs with the method, split
and levels the fp32 entry records (:func:`train.tiers.calibration.fit_on`); its test metrics per level and its
agreement with fp32 are measured; where the bundle has a cascade with thresholds, the whole cascade is replayed on
calib at that precision and every threshold re-derived with the fp32 tier's guarantee (method, alpha, delta) by
the thresholds stage's code. The manifest gains ``models[m].variants`` and ``tiers[].precisions`` and is written
atomically (the fp32 entries are unchanged); ``quantize/report.json`` puts fp32 and each variant side by side.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from train.calibration.cascade import TierRule, select_cascade
from train.export import Bundle, BundleClassifier
from train.export.manifest import (FULL_PRECISION, MANIFEST, SCHEMA, Calibration, Manifest, ModelEntry, ModelVariant,
                                   TierPrecision, file_entry, write_manifest)
from train.export.onnx import INPUT
from train.export.quantize import MODES
from train.export.replay import BundleCascade
from train.predictions import predict_split
from train.runs import Run
from train.tasks.registry import ensure_data, register_task
from train.tiers.calibration import fit_on
from train.tiers.cascade import one_per_scene, tier_record, tier_rules
from train.tiers.replay import bundle_path, cascade_views, compare_precisions, replay_split
from train.tiers.training import build_datamodule
from train.utils.files import atomic_write_json

log = logging.getLogger(__name__)
CONSUMER = ("apply this calibration to the variant graph's logits (the fp32 calibration is already folded into them): "
            "temperature p = softmax(logits / T)[:, 1]; platt p = sigmoid(a * (logit_1 - logit_0) + b); isotonic "
            "p = numpy.interp(softmax(logits)[:, 1], x, y) (train.export.Bundle applies it)")
METRICS_SOURCE = "the variant from the bundle (ONNX Runtime CPU), recalibrated, on the {split} split's queries"


def calibration_pixels(datamodule, split: str, levels, samples: int) -> np.ndarray:
    """``samples`` model inputs from ``split``'s validator queries, spread evenly over the split and ``levels``."""
    out = []
    for level in levels:
        dataset = datamodule.dataset(split, level)
        rows = np.linspace(0, len(dataset) - 1, min(len(dataset), -(-samples // len(levels)))).astype(int)
        out += [batch["image"].numpy() for batch in datamodule.loader(Subset(dataset, rows.tolist()))]
    return np.concatenate(out)


def recalibrate(classifier, datamodule, fp32: Calibration, n_bins: int) -> Calibration:
    """The fp32 entry's calibration method fitted again on the variant's own logits (same split and levels)."""
    if fp32.method == "none":
        return Calibration(method="none", folded=False)
    calib = predict_split(lambda images: classifier.session.logits_and_probs(images.numpy())[0], datamodule,
                          fp32.split, fp32.levels)
    _, report, _ = fit_on(fp32.method, calib, fp32.split, n_bins)
    return Calibration(**{**report, "folded": False}, consumer_applies=CONSUMER)


def make_variant(qcfg: DictConfig, variant: str, entry: ModelEntry, src: Path, dst: Path,
                 pixels: np.ndarray) -> ModelVariant:
    """Quantise ``src`` into ``dst`` as ``quantize.variants[variant]`` says (calibration and metrics filled later)."""
    vcfg = OmegaConf.to_container(qcfg.variants[variant], resolve=True)
    mode = vcfg.pop("mode")
    if mode not in MODES:
        raise ValueError(f"quantize.variants.{variant}.mode={mode!r}; allowed: {sorted(MODES)}")
    if mode == "static":
        vcfg.update(pixels=pixels, calibration_data={**OmegaConf.to_container(qcfg.data), "n": len(pixels)},
                    batch_size=1 if entry.onnx.inputs[INPUT].shape[0] == 1 else vcfg.get("batch_size", 32))
    quantization = MODES[mode](src, dst, **vcfg)
    size = dst.stat().st_size
    return ModelVariant(precision="int8", files={"onnx": file_entry(dst.parent, dst)},
                        size_bytes=size, size_ratio=src.stat().st_size / size, quantization=quantization,
                        calibration=Calibration(method="none", folded=False))


def quantise_model(cfg: DictConfig, run: Run, bundle: Bundle, name: str, folder: Path) -> dict:
    """Every variant of model ``name`` written into ``folder``, recalibrated and measured on test; the entry gains
    them (files listed as in the bundle). Returns the side-by-side figures (fp32 and each variant)."""
    qcfg, entry = cfg.quantize, bundle.manifest.models[name]
    if entry.kind != "classifier" or entry.apt is not None or entry.fusion is not None:
        raise ValueError(f"quantize.models has {name!r}: only image classifiers are quantised (not routers, the PRM, "
                         "APT models, whose tokens are chosen outside the graph, or fusion heads)")
    datamodule = build_datamodule(cfg, run, entry.input.model_dump())
    src = bundle.path / entry.files[entry.onnx.file].path
    pixels = calibration_pixels(datamodule, qcfg.data.split, qcfg.data.levels, qcfg.data.samples)
    classifiers = {FULL_PRECISION: bundle.classifier(name, qcfg.threads)}
    for variant in (v for v, c in qcfg.variants.items() if c is not None):
        made = make_variant(qcfg, variant, entry, src, folder / f"{name}.{variant}.onnx", pixels)
        entry.variants[variant] = made
        made.calibration = recalibrate(BundleClassifier(folder, entry, qcfg.threads, variant), datamodule,
                                       entry.calibration, qcfg.n_bins)
        classifiers[variant] = BundleClassifier(folder, entry, qcfg.threads, variant)  # recalibrated P(roadwork)
        log.info("%s %s: %.2f MB (%.2fx smaller than fp32), kept in float: %s", name, variant, made.size_bytes / 1e6,
                 made.size_ratio, made.quantization.kept_float or "none")
    _, figures = compare_precisions(classifiers, datamodule, qcfg.test.split, qcfg.test.levels, qcfg.n_bins)
    for variant, made in entry.variants.items():
        if variant in figures:
            made.metrics, made.agreement = figures[variant]["metrics"], figures[variant]["agreement_with_fp32"]
            made.metrics_source = METRICS_SOURCE.format(split=qcfg.test.split)
    return figures


def recorded_rules(cfg: DictConfig, manifest: Manifest) -> dict[str, TierRule]:
    """Each tier's rule as its fp32 guarantee records it (method, alpha, delta); the configured one without one."""
    order = [(t.name, t.kind) for t in manifest.tiers]
    rules = tier_rules(cfg, order)
    for tier in manifest.tiers:
        g = tier.guarantee
        if g is not None:
            crc = g.method == "conformal_risk_control"
            rules[tier.name] = TierRule(alpha=g.alpha, delta=g.delta if g.delta is not None else cfg.cascade.delta,
                                        method="crc" if crc else "ltt",
                                        p_value=cfg.cascade.p_value if crc else g.method.split("/", 1)[1],
                                        min_accepted=int(cfg.cascade.min_accepted))
    return rules


def precision_thresholds(cfg: DictConfig, run: Run, bundle: Bundle, precision: str) -> list:
    """The cascade at ``precision`` replayed on calib (ONNX Runtime) and every threshold chosen again on its outputs:
    the thresholds stage's :func:`select_cascade` with the fp32 tiers' rules, one query per scene."""
    cascade = BundleCascade(bundle, cfg.quantize.threads, precision)
    reference = cfg.cascade.reference
    spec = bundle.manifest.models[reference].input.model_dump()
    outputs, meta = replay_split(cascade, build_datamodule(cfg, run, spec), "calib", cascade_views(cascade),
                                 cfg.cascade.levels, cfg.cascade.batch_size, cfg.data.num_workers)
    rows = one_per_scene(cfg, run, "calib", meta["index"])
    return select_cascade(cascade.order, outputs, meta["label"], recorded_rules(cfg, bundle.manifest), reference, rows)


def add_precisions(cfg: DictConfig, run: Run, bundle: Bundle, precisions) -> dict:
    """``tiers[].precisions`` for each precision where the bundle's cascade has thresholds; returns the thresholds."""
    manifest = bundle.manifest
    if not any(t.guarantee is not None for t in manifest.tiers):
        log.info("the bundle's cascade has no thresholds (no thresholds stage): none to derive for the variants")
        return {}
    out = {}
    for precision in precisions:
        chosen = {c.name: tier_record(c) for c in precision_thresholds(cfg, run, bundle, precision)}
        for tier in manifest.tiers:
            variants = manifest.models[tier.model].variants
            tier.precisions[precision] = TierPrecision(variant=precision if precision in variants else None,
                                                       threshold=chosen[tier.name]["threshold"],
                                                       guarantee=chosen[tier.name]["guarantee"])
        out[precision] = {n: c["threshold"] for n, c in chosen.items()}
        log.info("thresholds at %s: %s (fp32: %s)", precision, out[precision],
                 {t.name: t.threshold for t in manifest.tiers})
    return out


def rerecord(run: Run, task: str) -> None:
    """Record ``task`` again with the same artifacts, metrics and details, hashing its files as they are now."""
    entry = run.read()["tasks"][task]
    info = {k: v for k, v in entry.items() if k not in ("status", "finished", "artifacts", "metrics")}
    run.record(task, artifacts={k: run.path / a["path"] for k, a in entry["artifacts"].items()},
               metrics=entry["metrics"], **info)


@register_task("quantize", needs=lambda cfg: [] if cfg.get("bundle") else ["export"])
def run_quantize(cfg: DictConfig, run: Run) -> dict:
    """``task=quantize``: INT8 variants of ``quantize.models`` added to the bundle, recalibrated and measured, and the
    cascade's thresholds re-derived at each precision; returns sizes, latency, MCC and agreement with fp32."""
    qcfg, task_dir = cfg.quantize, run.task_dir("quantize")
    bundle = Bundle(bundle_path(cfg, run))
    ensure_data(cfg, run)
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=bundle.path.parent) as tmp:
        figures = {name: quantise_model(cfg, run, bundle, name, Path(tmp)) for name in qcfg.models}
        for name in qcfg.models:  # the files join the bundle; the manifest that lists them is written last
            for variant in bundle.manifest.models[name].variants.values():
                os.replace(Path(tmp) / variant.files["onnx"].path, bundle.path / variant.files["onnx"].path)
    precisions = list(dict.fromkeys(v for name in qcfg.models for v in bundle.manifest.models[name].variants))
    thresholds = add_precisions(cfg, run, bundle, precisions)
    atomic_write_json(bundle.path / SCHEMA, Manifest.model_json_schema())
    bundle.manifest.files["schema"] = file_entry(bundle.path, bundle.path / SCHEMA)
    write_manifest(bundle.path, bundle.manifest)
    Bundle(bundle.path)  # what we wrote reads back and verifies
    if run.is_complete("export") and bundle.path == run.artifact("export", "manifest", verify=False).parent:
        rerecord(run, "export")  # the run's bundle now lists the variants: its recorded hashes follow
    report = {"bundle": str(bundle.path), "models": figures, "thresholds": thresholds,
              "fp32_thresholds": {t.name: t.threshold for t in bundle.manifest.tiers}}
    atomic_write_json(task_dir / "report.json", report)
    metrics = {f"{name}/{p}/{k}": f[k] for name, per in figures.items() for p, f in per.items()
               for k in ("size_bytes", "latency_ms_per_image")}
    metrics.update({f"{name}/{p}/{lv}/mcc": m["mcc"] for name, per in figures.items() for p, f in per.items()
                    for lv, m in f["metrics"].items()})
    metrics.update({f"{name}/{p}/agreement/{lv}": a for name, per in figures.items() for p, f in per.items()
                    for lv, a in f["agreement_with_fp32"].items() if p != FULL_PRECISION})
    run.record("quantize", artifacts={"report": task_dir / "report.json", "manifest": bundle.path / MANIFEST,
                                      **{f"{n}_{v}": bundle.path / e.files["onnx"].path for n in qcfg.models
                                         for v, e in bundle.manifest.models[n].variants.items()}}, metrics=metrics)
    return metrics
