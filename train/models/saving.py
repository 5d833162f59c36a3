"""The plain classifier hand-off between tasks: ``<name>.safetensors`` + ``<name>.json``.

The JSON holds what rebuilds the architecture (``backbone_args``), the label map and the input
spec, so later tasks (APT, draft, calibration, export) load the model without Hydra or Lightning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save, save_file

from train import LABELS
from train.models.backbones import HFImageClassifier, create_backbone
from train.utils.files import atomic_write_bytes, atomic_write_json, sha256_file
from train.utils.provenance import code_version, now_utc

FORMAT_VERSION = 1
BACKBONE_FORMAT = "roadwork-backbone"


def save_classifier(model: nn.Module, path: Path, input_spec: dict, **extra) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json`` for a plain (merged, un-compiled) backbone."""
    if not hasattr(model, "backbone_args"):
        raise ValueError("save_classifier needs a model from create_backbone (it records backbone_args)")
    path = Path(path)
    weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "roadwork-classifier", "version": str(FORMAT_VERSION)})
    tmp.replace(weights)
    if isinstance(model, HFImageClassifier):  # the architecture travels too: no need for the source folder
        extra["hf_config"] = model.model.config.to_dict()
    if hasattr(model, "apt_args"):  # an APT wrapper around the backbone
        extra["apt"] = model.apt_args
    if hasattr(model, "elastic_args"):  # an elastic-token draft around the backbone
        extra["elastic"] = model.elastic_args
    atomic_write_json(config, {"format_version": FORMAT_VERSION, "backbone": model.backbone_args,
                               "id2label": {str(k): v for k, v in LABELS.items()}, "input": input_spec, **extra})
    return weights, config


def save_backbone(model: nn.Module, path: Path, card: dict) -> tuple[Path, Path]:
    """A pretrained backbone (head removed) as ``path.safetensors`` + its card ``path.json``: the architecture it
    needs (:func:`train.models.backbones.architecture`), the code version, the weights' sha256 and ``card`` (method,
    recipe, input, images seen, held-out figures). ``model.backbone.pretrained=path.safetensors`` loads it."""
    from train.models.backbones import architecture

    path = Path(path)
    weights, card_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, save(state, metadata={"format": BACKBONE_FORMAT, "version": str(FORMAT_VERSION)}))
    atomic_write_json(card_path, {"format": BACKBONE_FORMAT, "format_version": FORMAT_VERSION,
                                  "architecture": architecture(model.backbone_args), **card,
                                  "code_version": code_version(), "created": now_utc(),
                                  "sha256": sha256_file(weights)})
    return weights, card_path


def load_classifier(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the backbone from ``path.json`` and load ``path.safetensors`` (strict); returns (model, config)."""
    path = Path(path)
    config_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (config_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"classifier file missing: {p}")
    config = json.loads(config_path.read_text())
    args = dict(config["backbone"])
    args.pop("pos_embed_init", None)  # an initialisation only: the saved weights replace it
    model = create_backbone(**args, hf_config=config.get("hf_config"))
    if "apt" in config:
        from train.models.apt import APTViT

        model = APTViT(model, **config["apt"])
    if "elastic" in config:
        from train.models.draft import ElasticDraft
        from train.models.elastic import ElasticViT

        model = ElasticDraft(ElasticViT(model, **config["elastic"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), config


def save_net(net: nn.Module, path: str | Path, fmt: str, config: dict) -> tuple[Path, Path]:
    """Any small network's ``path.safetensors`` (written atomically, tagged ``fmt``) + ``path.json`` (``config``:
    what rebuilds it); the routers, PRMs and fusion heads are saved this way."""
    path = Path(path)
    weights, config_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"format": fmt})
    tmp.replace(weights)
    atomic_write_json(config_path, config)
    return weights, config_path


def load_net(path: str | Path, build) -> tuple[nn.Module, dict]:
    """Inverse of :func:`save_net`: ``build(config)`` makes the network, the weights load strictly; eval mode."""
    path = Path(path)
    for p in (path.with_suffix(".json"), path.with_suffix(".safetensors")):
        if not p.is_file():
            raise FileNotFoundError(f"model file missing: {p}")
    config = json.loads(path.with_suffix(".json").read_text())
    net = build(config)
    net.load_state_dict(load_file(str(path.with_suffix(".safetensors"))), strict=True)
    return net.eval(), config


def weights_sha256(model: nn.Module) -> str:
    """A fingerprint of a model's weights (what produced a feature column or a cache)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
