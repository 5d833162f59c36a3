"""The ``export`` stage: write ``<run>/export/`` anew from the registry (or from ``ckpt=PATH``).

Each model in ``export.models`` comes from the calibrate stage (calibration folded into its head);
it gets an ONNX file checked in ONNX Runtime on real validator queries and its FLOPs counted on the same
inputs, ``export.hf_model`` also the HF folder the NATIX miner loads, and the bundle gets ``model_card.json``,
``manifest.json`` and the manifest's JSON schema ``manifest.schema.json``.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from train.export import Calibration, ExportError, ModelCard, export_classifier, write_bundle
from train.export.bundle import export_fusion, export_prm, export_router
from train.export.manifest import MANIFEST, MODEL_CARD, SCHEMA, load_manifest
from train.metrics import with_mean
from train.models.difficulty import load_router
from train.models.fusion import load_fusion
from train.models.prm import load_prm
from train.runs import Run, net_kind
from train.tasks.registry import calibrated, ensure_data, register_task
from train.tiers.calibration import load_calibrated
from train.tiers.training import build_datamodule, consolidated_checkpoint
from train.utils.checkpoints import load_checkpoint
from train.utils.console import console, track
from train.utils.provenance import now_utc

log = logging.getLogger(__name__)
BUNDLE_DIR = "export"


def model_card(cfg: DictConfig, run: Run) -> ModelCard:
    card = dict(cfg.export.model_card)
    if cfg.export.natix_submission and not str(card.get("submitted_by") or "").strip():
        raise ExportError("export.natix_submission=true needs export.model_card.submitted_by (your NATIX identity)")
    card["model_name"] = card.get("model_name") or f"roadwork-{run.path.name}"
    return ModelCard(**card, submission_time=now_utc())


def parity_samples(datamodule, n: int, split: str = "calib") -> tuple[torch.Tensor, list[np.ndarray]]:
    """``n`` real validator queries (level 0) from ``split``: (model input tensors, the uint8 query images)."""
    dataset = datamodule.dataset(split, 0)
    queries = [dataset.query(i, 0) for i in range(min(n, len(dataset)))]
    return torch.stack([dataset.transform(q) for q in queries]), queries


def metrics_per_level(report: dict) -> dict[str, dict[str, float]]:
    """The calibrated model's test metrics per level (from the calibrate stage) and their mean."""
    return with_mean({lv: m["after"] for lv, m in report.get("test", {}).items()})


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


METRICS_SOURCE = ("the {name} stage's test predictions (at its training precision) with the calibration applied; "
                  "`task=evaluate` recomputes them from this bundle")


def _calibrated_models(cfg: DictConfig, run: Run) -> dict[str, tuple[nn.Module, dict, Calibration, dict]]:
    """name -> (model, input spec, calibration, metrics per level) for every classifier to export."""
    if cfg.get("ckpt"):
        model, spec = from_checkpoint(cfg.ckpt)
        log.warning("exporting %s uncalibrated (calibration needs a run's calib split)", cfg.ckpt)
        return {cfg.export.hf_model: (model, spec, Calibration(method="none", folded=False), {})}
    out = {}
    for name in cfg.export.models:
        if net_kind(run, name):
            continue
        try:
            model, config, report = load_calibrated(run, name)
        except FileNotFoundError as e:
            raise ExportError(f"export.models has {name!r}: {e}") from None
        calibration = Calibration(**{k: v for k, v in report.items() if k != "test"})
        out[name] = (model, config["input"], calibration, metrics_per_level(report))
    return out


def _fusion_entry(cfg: DictConfig, run: Run, name: str, folder: Path):
    """Export a fusion head, its parity checked on real feature-store rows (calib) under varied presence masks."""
    from train.data.feature_store import FeatureStore, load_split
    from train.models.fusion import conditions

    net, config = load_fusion(run.artifact(name, "model"))
    data = load_split(FeatureStore(config["store"]), "calib", net.modalities)
    n = min(cfg.export.onnx.parity_images, len(data["label"]))
    masks = torch.stack(list(conditions(net.modalities).values()))  # all, each one missing, each one alone
    present = data["present"][:n] & masks[torch.arange(n) % len(masks)]
    calibration = Calibration(**{k: v for k, v in config["calibration"].items() if k != "test"})
    report = json.loads(run.artifact(name, "report").read_text())
    metrics = {level: {"mcc": v} for level, v in report["test_mcc"]["fusion, all"].items()}
    return export_fusion(name, net, config["input"], calibration, folder, [f[:n] for f in data["features"]], present,
                         config.get("producers"), metrics, cfg.export.onnx.opset, cfg.export.onnx.parity_atol)


def _prm_entry(cfg: DictConfig, run: Run, name: str, folder: Path):
    """Export the process reward model with its search settings, parity checked on real calib traces."""
    from safetensors.torch import load_file

    from train.models.search import TraceScorer
    from train.models.traces import margins

    net, config = load_prm(run.artifact(name, "model"))
    views, traces = (load_file(str(run.artifact(name, key))) for key in ("views_calib", "traces_calib"))
    scorer = TraceScorer(net, views["embeddings"], margins(views["logits"]), config["search"]["belief"])
    n = min(cfg.export.onnx.parity_images, len(views["label"]))
    example = scorer.inputs(torch.arange(n), traces["traces"][:n, 0])
    report = json.loads(run.artifact(name, "report").read_text())
    metrics = {**report["held_out"], "early_stop": report["early_stop"]}
    search = {**config["search"], "stop_threshold": _deployed(run, name, config["search"].get("stop_threshold")),
              "views_model": config["views_model"], "views": config["views"]}
    return export_prm(name, net, config["input"], search, folder, example, metrics, cfg.export.onnx.opset,
                      cfg.export.onnx.parity_atol)


def _deployed(run: Run, name: str, default: float | None) -> float | None:
    """Tier ``name``'s threshold as the thresholds stage chose it; ``default`` when the run's cascade lacks it."""
    if not run.is_complete("thresholds"):
        return default
    tiers = json.loads(run.artifact("thresholds", "thresholds").read_text())["tiers"]
    return tiers[name]["threshold"] if name in tiers else default


RULES = {
    "router": "route the sample straight to the first prm tier (the last tier when there is none) when its score "
              "(the router's `draft` column) > threshold; the router reads the draft's logits, so the draft runs first",
    "classifier": "answer (roadwork when P(roadwork) > 0.5) when max(p, 1 - p) >= threshold, else pass the sample on; "
                  "threshold null: accepts nothing",
    "prm": "inspect views as `search` says; stop at the first step whose best beam scores >= threshold (null: never "
           "early); a stop before the last step answers, otherwise the sample passes on",
    "last": "answers every sample that reaches it (a prm: at its stop step)",
}


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


def _router_entry(cfg: DictConfig, run: Run, name: str, folder: Path):
    """Export the difficulty router, its parity checked on real queries with the calibrated draft's logits."""
    router, config = load_router(run.artifact(name, "model"))
    spec = config["input"]
    pixels, _ = parity_samples(build_datamodule(cfg, run, spec), cfg.export.onnx.parity_images)
    draft, _, _ = load_calibrated(run, "draft")
    with torch.no_grad():
        draft_logits = draft.eval()(pixels).float()
    report = json.loads(run.artifact(name, "report").read_text())
    calibration = Calibration(**{k: config["calibration"][k] for k in
                                 ("method", "params", "folded", "split", "levels", "n", "before", "after")})
    metrics = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in report["test"].items()
               if t in router.targets}
    return export_router(name, router, spec, calibration, folder, pixels, draft_logits, metrics,
                         cfg.export.onnx.opset, cfg.export.onnx.parity_atol)


def _apt_tokens(run: Run, model: nn.Module) -> dict[str, dict[str, float]] | None:
    """An APT model's measured tokens per image (from the apt stage's report), for the manifest."""
    if not hasattr(model, "apt_args") or not run.is_complete("apt"):
        return None
    tokens = json.loads(run.artifact("apt", "report").read_text())["tokens"]
    return {name: {k: t[k] for k in ("mean_tokens", "reduction", "n")} for name, t in tokens.items()}


def _needs(cfg: DictConfig) -> list[str]:
    """The models to export (the classifiers calibrated); none when a Lightning checkpoint is exported (``ckpt=``)."""
    return [] if cfg.get("ckpt") else [stage for name in cfg.export.models for stage in calibrated(cfg, name)]


@register_task("export", needs=_needs)
def run_export(cfg: DictConfig, run: Run) -> dict:
    ecfg = cfg.export
    card = model_card(cfg, run)
    models = _calibrated_models(cfg, run)
    kinds = {} if cfg.get("ckpt") else {name: net_kind(run, name) for name in ecfg.models}
    routers, prms, fusions = ([n for n, k in kinds.items() if k == kind] for kind in ("router", "prm", "fusion"))
    ensure_data(cfg, run)

    def classifier(name: str, folder: Path):
        model, spec, calibration, metrics = models[name]
        pixels, queries = parity_samples(build_datamodule(cfg, run, spec), ecfg.onnx.parity_images)
        return export_classifier(name, model, spec, calibration, folder, pixels,
                                 queries if name == ecfg.hf_model else None, metrics,
                                 METRICS_SOURCE.format(name=name) if metrics else None,
                                 ecfg.onnx.opset, ecfg.onnx.parity_atol, _apt_tokens(run, model))

    def build(folder: Path) -> dict:
        # routers lead the tiers, then the classifiers, the PRM (test-time search over views), fusion (the deepest)
        graphs = [(name, partial(_router_entry, cfg, run, name)) for name in routers]
        graphs += [(name, partial(classifier, name)) for name in models]
        graphs += [(name, partial(_prm_entry, cfg, run, name)) for name in prms]
        graphs += [(name, partial(_fusion_entry, cfg, run, name)) for name in fusions]
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
