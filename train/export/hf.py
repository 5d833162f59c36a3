"""The ``stage1_hf/`` folder: what the NATIX miner loads with the two Auto classes and ``pipeline``.

timm backbones are written in transformers' TimmWrapper format (``TimmWrapperConfig`` with the
architecture and its constructor arguments, weights under ``timm_model.``); transformers backbones
are saved as themselves with a plain resize + normalise image processor. No ``trust_remote_code``.
The folder's ``README.md`` is a Hub model card generated from the bundle's manifest (:func:`hf_model_card`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from train import LABELS
from train.metrics import roadwork_prob
from train.models.backbones import HFImageClassifier

if TYPE_CHECKING:
    from huggingface_hub import ModelCard as HubModelCard

    from train.export.manifest import Manifest, ModelCard

POSITIVE = LABELS[1]
CARD = "README.md"                              # the Hub's model card, in the HF folder
CARD_METRICS = {"mcc": ("matthews_correlation", "MCC"), "acc": ("accuracy", "Accuracy")}  # ours -> the Hub's ids


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-shard progress bars in our log


def _label_maps() -> dict:
    return {"id2label": dict(LABELS), "label2id": {v: k for k, v in LABELS.items()}}


def _timm_processor_cfg(input_spec: dict) -> dict:
    """timm's data config for the image processor: square resize to the model input, then normalise."""
    size = input_spec["img_size"]
    return {"input_size": [3, size, size], "mean": list(input_spec["mean"]), "std": list(input_spec["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": len(LABELS)}


def save_hf_folder(model: nn.Module, input_spec: dict, out_dir: Path) -> list[Path]:
    """Write ``model`` (a plain classifier from ``create_backbone``) as a transformers folder; returns its files."""
    _quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFImageClassifier):
        _save_transformers(model, input_spec, out_dir)
    elif model.backbone_args.get("library") == "timm":
        _save_timm(model, input_spec, out_dir)
    else:
        raise ValueError(f"cannot write an HF folder for {type(model).__name__}")
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def _save_timm(model: nn.Module, input_spec: dict, out_dir: Path) -> None:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    args = {k: v for k, v in model.backbone_args.items() if k not in ("library", "name", "pos_embed_init")}
    args.pop("num_classes", None)
    pretrained_cfg = _timm_processor_cfg(input_spec)
    config = TimmWrapperConfig(architecture=model.backbone_args["name"], model_args=args or None,
                               num_labels=len(LABELS), pretrained_cfg=pretrained_cfg, **_label_maps())
    wrapper = TimmWrapperForImageClassification(config)
    wrapper.timm_model.load_state_dict(model.state_dict(), strict=True)
    wrapper.save_pretrained(out_dir)  # the image processor reads pretrained_cfg from config.json


def _save_transformers(model: HFImageClassifier, input_spec: dict, out_dir: Path) -> None:
    from transformers import ViTImageProcessor

    hf = model.model
    hf.config.update(_label_maps())
    hf.save_pretrained(out_dir)
    size = input_spec["img_size"]
    ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2, do_rescale=True,
                      do_normalize=True, image_mean=list(input_spec["mean"]),
                      image_std=list(input_spec["std"])).save_pretrained(out_dir)


@torch.no_grad()
def check_hf_folder(folder: Path, model: nn.Module, queries: list[np.ndarray],
                    ours: np.ndarray | None = None) -> dict[str, float]:
    """Load ``folder`` as the miner does and compare its "Roadwork" scores with ``model`` on the same pixels.

    ``queries`` are validator queries (HxWx3 uint8). Returns ``hf_max_abs_diff`` (pipeline score vs our
    calibrated model on the processor's own pixel values): it must be ~0, or the folder is wrong. Given
    ``ours`` (P(roadwork) of the same queries through our own input transform), also how far the miner's
    image processor moves the scores: ``miner_preprocessing_max_abs_diff`` and the share of equal decisions.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    _quiet_transformers()
    hf_model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    classify = pipeline("image-classification", model=hf_model, image_processor=processor, device="cpu")
    images = [Image.fromarray(q) for q in queries]
    scores = []
    for out in classify(images, top_k=len(LABELS)):
        labels = {o["label"]: o["score"] for o in out}
        if set(labels) != set(LABELS.values()):
            raise ValueError(f"the HF pipeline returned labels {sorted(labels)}, expected {sorted(LABELS.values())}")
        scores.append(labels[POSITIVE])
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    expected = roadwork_prob(model.eval()(pixels).float()).numpy()
    scores = np.asarray(scores)
    checks = {"hf_max_abs_diff": float(np.abs(scores - expected).max())}
    if ours is not None:
        checks["miner_preprocessing_max_abs_diff"] = float(np.abs(scores - ours).max())
        checks["miner_preprocessing_agreement"] = float(np.mean((scores > 0.5) == (ours > 0.5)))
    return checks


def _dataset(manifest: Manifest) -> tuple[str, str]:
    """(type, name) of the data the test figures were measured on, from the config that made the bundle."""
    source = str(manifest.config.get("data", {}).get("source", {}).get("_target_", "")).rsplit(".", 1)[-1]
    if source == "SyntheticSource":
        return "roadwork-cascade/synthetic", "synthetic street scenes (roadwork-cascade), test split"
    return "roadwork", f"roadwork images ({source or 'unknown source'}), test split"


def _eval_results(manifest: Manifest, name: str) -> list:
    """The Hub's ``model-index`` entries: MCC and accuracy of ``name`` per validator level (not the mean)."""
    from huggingface_hub import EvalResult

    dataset_type, dataset_name = _dataset(manifest)
    metrics = manifest.models[name].metrics
    return [EvalResult(task_type="image-classification", task_name="roadwork classification",
                       dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=level,
                       dataset_split="test", metric_type=hub_id, metric_name=f"{label} ({level})",
                       metric_value=round(float(values[ours]), 6), verified=False)
            for level, values in sorted(metrics.items()) if level != "mean"
            for ours, (hub_id, label) in CARD_METRICS.items() if ours in values]


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _params(params: dict) -> str:
    """A calibrator's parameters, unless they are a table (isotonic): then where to find them."""
    text = json.dumps(params)
    return "" if not params else text if len(text) <= 120 else "(parameters in the bundle's manifest.json)"


def _calibration_section(cal) -> list[str]:
    """The card's calibration lines: method, where it was fitted, ECE etc. before / after."""
    lines = [f"- method: {cal.method} {_params(cal.params)}".rstrip() + ("; folded into the classifier head"
                                                                         if cal.folded else ""),
             f"- fitted on: {cal.split} split, levels {cal.levels}, n={cal.n}" if cal.split else "- not fitted"]
    if cal.consumer_applies:
        lines.append(f"- the consumer applies: {cal.consumer_applies}")
    if cal.before:
        rows = [["before", *map(_fmt, cal.before.values())],
                ["after", *(_fmt(cal.after.get(k, "")) for k in cal.before)]]
        lines += ["", f"On the {cal.split} split:", "", _table(["", *cal.before], rows)]
    return lines


def _figures_section(entry, validator: str | None) -> list[str]:
    """The card's test figures: one row per level and the mean, and where they come from."""
    levels = [lv for lv in entry.metrics if lv != "mean"] + (["mean"] if "mean" in entry.metrics else [])
    if not levels:
        return ["No test figures: this folder was exported without a calibrated run (e.g. `ckpt=PATH`); "
                "`task=evaluate` measures the bundle."]
    shown = [k for k in ("mcc", "acc", "f1", "auroc", "ece") if any(k in entry.metrics[lv] for lv in levels)]
    rows = [[lv, *(_fmt(entry.metrics[lv].get(k, "")) for k in shown)] for lv in levels]
    follows = f"as the subnet's code at {validator} makes them" if validator else "as an older approximation made them"
    return [f"L0, L1, ... are the validator's augmentation levels ({follows}; L0: the image framed and resized); "
            "the header's `model-index` lists MCC and accuracy per level.", "", _table(["level", *shown], rows), "",
            f"Source: {entry.metrics_source or 'not recorded'}."]


def hf_model_card(manifest: Manifest, name: str, card: ModelCard | None = None) -> HubModelCard:
    """The Hub model card of ``manifest.models[name]``'s HF folder: metadata header and body, both from the
    manifest (``card``: the bundle's NATIX card, for the model's name and description)."""
    from huggingface_hub import ModelCard as HubModelCard
    from huggingface_hub import ModelCardData

    entry, code, spec = manifest.models[name], manifest.code_version, manifest.models[name].input
    title = card.model_name if card else f"roadwork-{manifest.run or name}"
    results = _eval_results(manifest, name)
    tags = sorted({"roadwork", "natix", "image-classification", entry.backbone.get("library", "transformers")})
    data = ModelCardData(model_name=title if results else None, pipeline_tag="image-classification",
                         library_name="transformers", tags=tags,
                         metrics=[hub_id for hub_id, _ in CARD_METRICS.values()] if results else None,
                         eval_results=results or None)
    tier = next((t for t in manifest.tiers if t.model == name and t.threshold is not None), None)
    dirty = {None: "", True: " (with uncommitted changes)", False: " (clean)"}[code.git_dirty]
    body = [
        f"# {title}", "", card.description if card else "Roadwork / no-roadwork classifier.", "",
        "## Task", "",
        "Binary image classification of street images: is there roadwork? The model's score for "
        f"`{POSITIVE}` is {entry.score}; the decision is `{POSITIVE}` when that score > 0.5.", "",
        "```python", "from transformers import pipeline", "",
        'classify = pipeline("image-classification", model="path/to/this/folder")',
        'scores = {o["label"]: o["score"] for o in classify("image.jpg", top_k=2)}', "```", "",
        "## Labels", "", _table(["id", "label"], [[str(k), v] for k, v in LABELS.items()]), "",
        "## Input", "",
        f"- size: {spec.img_size} x {spec.img_size} ({spec.interpolation} resize), {spec.channel_order}, "
        f"{spec.layout}",
        f"- normalisation: {spec.value_range}; mean {spec.mean}, std {spec.std}",
        "- the folder's image processor resizes (bilinear) and normalises; the `miner_preprocessing_*` checks below "
        "say how far that moves the scores from the model's own input transform", "",
        "## Calibration", "", *_calibration_section(entry.calibration), "",
        *([f"In the bundle's cascade (tier `{tier.name}`): threshold {tier.threshold}; {tier.rule}", ""]
          if tier is not None else []),
        "## Test figures per validator level", "", *_figures_section(entry, manifest.validator), "",
        "## Provenance", "",
        f"- code: roadwork-cascade {code.package}, git commit {code.git_commit or 'unknown'}{dirty}",
        f"- run: {manifest.run or 'none'}, exported {manifest.created}",
        f"- export checks: ONNX parity max |diff| {entry.onnx.parity_max_abs_diff:.2e} on {entry.onnx.parity_n} "
        "images" + "".join(f"; {k} {v:.3g}" for k, v in entry.checks.items()),
        "- the bundle's `manifest.json` holds all of this, machine-readable", ""]
    return HubModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_hf_card(manifest: Manifest, name: str, folder: Path, card: ModelCard | None = None) -> Path:
    """Write :func:`hf_model_card` as ``folder/README.md``; returns its path."""
    path = Path(folder) / CARD
    hf_model_card(manifest, name, card).save(path)
    return path
