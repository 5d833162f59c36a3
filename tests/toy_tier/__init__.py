"""A toy tier, registered from outside the package: what adding a tier takes (this folder plus its config file,
``conf/toy/default.yaml``). A one-block ViT on the run's images, trained by the one training flow, calibrated on the
calib split by the shared calibration code; as a classifier tier it is exported, thresholded and replayed like
Stage-1."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.utils import instantiate
from pydantic import BaseModel, ConfigDict

from train.models import create_backbone
from train.models.saving import load_classifier, save_classifier
from train.tiers.base import Fit, Outcome, register_tier
from train.tiers.calibration import calibrate_model
from train.tiers.classifier import ClassifierModule, ClassifierTier
from train.tiers.training import build_datamodule
from train.utils.files import atomic_write_json

CONF = Path(__file__).parent / "conf"  # hydra.searchpath=[file://CONF] and +toy=default compose its settings


class ToyModule(ClassifierModule):
    def __init__(self, backbone: dict, optimizer: Callable, val_levels: Sequence[int] = (0,),
                 test_levels: Sequence[int] = (0, 1)):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = create_backbone(**backbone)
        self.setup_classifier(optimizer, val_levels=val_levels, test_levels=test_levels, bootstrap=0)


class Selection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str
    mode: str


class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int
    selection: Selection
    module: dict


@register_tier
class ToyTier(ClassifierTier, name="toy", schema=ToySettings):
    def needs(self, cfg) -> list[str]:
        return ["stage1"]  # its input spec: the cascade's classifiers share one

    def inputs(self, cfg, run, task_dir):
        spec = json.loads(run.artifact("stage1", "model_config").read_text())["input"]
        return spec, build_datamodule(cfg, run, spec)

    def module(self, cfg, run, inputs, task_dir) -> ToyModule:
        return instantiate(cfg.toy.module, backbone={"img_size": inputs[0]["img_size"]})

    def loaders(self, cfg, inputs):
        return inputs[1]  # the run's DataModule

    def finish(self, cfg, run, fit: Fit, inputs, task_dir) -> Outcome:
        spec = inputs[0]
        weights, config_path = save_classifier(fit.module.net.cpu().eval(), task_dir / "uncalibrated", spec)
        model, config = load_classifier(weights)
        calibration = calibrate_model(cfg, run, model, config, self.name, task_dir)  # saves task_dir/toy
        atomic_write_json(task_dir / "calibration.json", calibration)
        after = {f"calib/{k}": v for k, v in calibration["after"].items()}
        return Outcome({"model": weights, "model_config": config_path,
                        "calibrated_model": task_dir / "toy.safetensors", "calibrated_model_config": task_dir / "toy.json",
                        "calibration": task_dir / "calibration.json"}, after, report={"calibration": calibration})
