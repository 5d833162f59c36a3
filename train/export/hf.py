"""The ``stage1_hf/`` folder: what the NATIX miner loads with the two Auto classes and ``pipeline``.

timm backbones are written in transformers' TimmWrapper format (``TimmWrapperConfig`` with the
architecture and its constructor arguments, weights under ``timm_model.``); transformers backbones
are saved as themselves with a plain resize + normalise image processor. No ``trust_remote_code``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from train import LABELS
from train.metrics import roadwork_prob
from train.models.backbones import HFImageClassifier

POSITIVE = LABELS[1]


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
    classify = pipeline("image-classification", model=hf_model, feature_extractor=processor, device="cpu")
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
