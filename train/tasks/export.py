"""The ``export`` stage: write ``<run>/export/`` anew from the registry (or from ``ckpt=PATH``).

Each tier in ``export.models`` exports itself (:meth:`train.tiers.base.Tier.export`): its calibrated model as an ONNX
file checked in ONNX Runtime on real inputs, its FLOPs counted on the same inputs, ``export.hf_model`` also the HF
folder the NATIX miner loads. The bundle gets the cascade the thresholds stage chose, ``model_card.json``,
``manifest.json`` and the manifest's JSON schema ``manifest.schema.json``.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from train.export import Calibration, ExportError, ModelCard, export_classifier, write_bundle
from train.export.cascade import KINDS, RULES
from train.export.manifest import MANIFEST, MODEL_CARD, SCHEMA, load_manifest
from train.runs import Run
from train.tasks.registry import ensure_data, register_task
from train.tiers.base import get_tier
from train.tiers.calibration import calibrated
from train.tiers.classifier import parity_samples
from train.tiers.training import build_datamodule, consolidated_checkpoint
from train.utils.checkpoints import load_checkpoint
from train.utils.console import console, track
from train.utils.provenance import now_utc

log = logging.getLogger(__name__)
BUNDLE_DIR = "export"


def model_card(cfg: DictConfig, run: Run) -> ModelCard:
    """The bundle's ``model_card.json`` from ``export.model_card`` (the name defaults to the run's); an ``ExportError``
    when a NATIX submission has no ``submitted_by``."""
    card = dict(cfg.export.model_card)
    if cfg.export.natix_submission and not str(card.get("submitted_by") or "").strip():
        raise ExportError("export.natix_submission=true needs export.model_card.submitted_by (your NATIX identity)")
    card["model_name"] = card.get("model_name") or f"roadwork-{run.path.name}"
    return ModelCard(**card, submission_time=now_utc())


def _from_checkpoint(cfg: DictConfig, run: Run, folder: Path):
    """Export ``ckpt=`` (a Stage-1 Lightning checkpoint) uncalibrated: calibration needs a run's calib split."""
    model, spec = from_checkpoint(cfg.ckpt)
    log.warning("exporting %s uncalibrated (calibration needs a run's calib split)", cfg.ckpt)
    ecfg = cfg.export
    pixels, queries = parity_samples(build_datamodule(cfg, run, spec), ecfg.onnx.parity_images)
    return export_classifier(ecfg.hf_model, model, spec, Calibration(method="none", folded=False), folder, pixels,
                             queries, None, None, ecfg.onnx.opset, ecfg.onnx.parity_atol)


def from_checkpoint(path: str) -> tuple[nn.Module, dict]:
    """A Stage-1 Lightning checkpoint's plain model and input spec (no run registry needed); the checkpoint is a file
    or the folder Lightning saves under DeepSpeed."""
    from train.tiers.stage1 import Stage1Module

    ckpt = consolidated_checkpoint(path)  # a DeepSpeed checkpoint folder: one fp32 file inside it
    hparams = load_checkpoint(ckpt).get("hyper_parameters", {})
    if "backbone" not in hparams:
        raise ExportError(f"ckpt={path} is not a Stage-1 Lightning checkpoint (its hyper_parameters have no backbone)")
    module = Stage1Module.from_checkpoint(ckpt)
    return module.plain_model().eval(), module.input_spec


def _tiers(cfg: DictConfig, run: Run) -> list[dict] | None:
    """The cascade the thresholds stage chose (order, kinds, thresholds, guarantees), or None without that stage."""
    if not run.is_complete("thresholds"):
        return None
    chosen = json.loads(run.artifact("thresholds", "thresholds").read_text())
    missing = [n for n in chosen["order"] if n not in cfg.export.models]
    if missing:
        raise ExportError(f"the cascade's tiers {missing} are not exported: add them to export.models")
    last = chosen["order"][-1]
    return [{"name": n, "model": n, "kind": t["kind"], "threshold": t["threshold"],
             "rule": RULES["last" if n == last and t["kind"] != "prm" else t["kind"]], "guarantee": t["guarantee"]}
            for n, t in ((n, chosen["tiers"][n]) for n in chosen["order"])]


def _needs(cfg: DictConfig) -> list[str]:
    """The models to export (the classifiers calibrated); none when a Lightning checkpoint is exported (``ckpt=``)."""
    return [] if cfg.get("ckpt") else [stage for name in cfg.export.models for stage in calibrated(cfg, name)]


@register_task("export", needs=_needs)
def run_export(cfg: DictConfig, run: Run) -> dict:
    """``task=export``: write the bundle anew from ``export.models`` (or ``ckpt=``) with the cascade the thresholds
    stage chose, and record it; returns each model's parity, checks and FLOPs."""
    ecfg = cfg.export
    card = model_card(cfg, run)
    ensure_data(cfg, run)
    if cfg.get("ckpt"):
        graphs = [(ecfg.hf_model, partial(_from_checkpoint, cfg, run))]
    else:  # routers lead, then the classifiers, the PRM (test-time search over views), fusion (the deepest)
        tiers = sorted((get_tier(name) for name in ecfg.models), key=lambda t: (KINDS + ("fusion",)).index(t.kind))
        graphs = [(tier.name, partial(tier.export, cfg, run)) for tier in tiers]

    def build(folder: Path) -> dict:
        return {name: export(folder) for name, export in track(graphs, "export: ONNX graphs", unit="graphs")}

    tiers = None if cfg.get("ckpt") else _tiers(cfg, run)
    bundle = write_bundle(run.path / BUNDLE_DIR, build, card, OmegaConf.to_container(cfg, resolve=True),
                          run=run.path.name, tiers=tiers)
    manifest = load_manifest(bundle)
    metrics = {f"{n}/onnx_parity_max_abs_diff": m.onnx.parity_max_abs_diff for n, m in manifest.models.items()}
    metrics.update({f"{n}/{k}": v for n, m in manifest.models.items() for k, v in m.checks.items()})
    metrics.update({f"{n}/flops": m.flops.per_call for n, m in manifest.models.items() if m.flops is not None})
    run.record("export", artifacts={"manifest": bundle / MANIFEST, "model_card": bundle / MODEL_CARD,
                                    "schema": bundle / SCHEMA}, metrics=metrics, bundle=str(bundle))
    console.print(f"[bold]export[/]: bundle written to {bundle}")
    return metrics
