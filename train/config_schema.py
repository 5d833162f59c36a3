"""Typed schemas of the config groups that build no object themselves (no ``_target_`` at their top): every key they
may hold, its type and its allowed values (a tier's own group: its tier's ``schema``, in its folder). ``check_config`` validates the composed config against them before any
work, so a mistyped key in an experiment file or a bad value fails naming the key, not minutes into a stage.

A subtree with its own ``_target_`` (a LightningModule's ``module``, an ``optimizer``) is typed ``Built`` here; its keys
are checked against the class it builds (``config_checks.check_targets``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Built = dict[str, Any]  # a subtree with a _target_: its keys are the built class's parameters
Level = Literal[0, 1, 2, 3]
Levels = list[Level]
Split = Literal["train", "meta", "val", "calib", "test"]
Probability = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RiskControl(Group):
    """A threshold chosen by Learn-then-Test: risk level, confidence, the walk's start."""
    alpha: Probability
    delta: Probability
    min_accepted: Positive


class Selection(Group):
    """The metric that picks a small tier's best epoch, and whether higher or lower is better."""
    metric: str
    mode: Literal["max", "min"]



class Calibrate(Group):
    method: Literal["temperature", "platt", "isotonic"]
    tiers: list[str]
    split: Split
    levels: Levels
    n_bins: Positive


class OperatingPoint(Group):
    split: Literal["train", "meta", "val"]  # a split neither the thresholds (calib) nor the report (test) uses
    max_mcc_drop: float


class Cascade(RiskControl):
    tiers: Annotated[list[str], Field(min_length=1)]
    reference: str | None
    baseline: str | None
    method: Literal["ltt", "crc"]
    p_value: Literal["hoeffding_bentkus", "binomial"]
    operating_point: OperatingPoint | None
    tier_alpha: dict[str, Probability]
    levels: Levels
    batch_size: Positive
    sweep: list[Probability]




class Evaluate(Group):
    model: str
    precision: str  # fp32 or a variant that task=quantize made
    split: Split
    levels: Levels
    n_bins: Positive
    threads: Positive | None
    cascade: bool


class Onnx(Group):
    opset: Positive
    parity_atol: Annotated[float, Field(gt=0)]
    parity_images: Positive


class ModelCardText(Group):
    model_name: str | None
    description: str
    version: str
    submitted_by: str


class Export(Group):
    models: list[str]
    hf_model: str | None
    onnx: Onnx
    natix_submission: bool
    model_card: ModelCardText


class Features(Group):
    splits: Annotated[list[Literal["meta", "calib", "test"]], Field(min_length=1)]
    levels: Annotated[Levels, Field(min_length=1)]
    every_level: list[Literal["meta", "calib", "test"]]
    shard_size: Positive
    modalities: dict[str, Built | None] | None
    external: dict[str, str] | None

    @model_validator(mode="after")
    def _consistent(self) -> Features:
        if not set(self.every_level) <= set(self.splits):
            raise ValueError(f"every_level {self.every_level} must be among splits {self.splits}")
        clash = set(self.external or {}) & set(self.modalities or {})
        if clash:
            raise ValueError(f"external names {sorted(clash)} are also modalities names")
        if not [m for m in (self.modalities or {}).values() if m is not None] and not self.external:
            raise ValueError("modalities and external are both empty: nothing to store")
        return self



class Prepare(Group):
    splits: list[Split]
    size: Positive | None
    batch_size: Positive


class FractalSearch(Group):
    n_maps: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=2, max_length=2)]
    max_sigma: Annotated[float, Field(gt=0, lt=1)]
    min_fill: Probability


class FractalRender(Group):
    perturbation: Probability
    points: Positive | None
    canvas_scale: Annotated[float, Field(ge=1)]
    colour: bool
    background: Literal["random", "black"]


class Fdsl(Group):
    classes: Annotated[int, Field(ge=2)]
    search: FractalSearch
    render: FractalRender
    label_smoothing: Probability
    mixup: dict[str, Any] | None


class Mae(Group):
    mask_ratio: Annotated[float, Field(gt=0, lt=1)]
    decoder_dim: Positive
    decoder_depth: Positive
    decoder_heads: Positive
    norm_pix_loss: bool


class Pretrain(Group):
    method: Literal["fdsl", "mae"]
    epochs: Positive
    steps_per_epoch: Positive
    batch_size: Positive
    held_out: Annotated[int, Field(ge=0)]
    seed: int
    compile: bool
    ship_as: str | None
    optimizer: Built
    scheduler: Built | None
    fdsl: Fdsl
    mae: Mae






class Variant(Group):
    mode: Literal["static", "dynamic"]
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    method_options: dict[str, Any] = {}
    per_channel: bool
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"]
    op_types: list[str]
    keep_float: list[str]
    batch_size: Positive = 32


class QuantizeData(Group):
    split: Split
    levels: Levels
    samples: Positive


class QuantizeTest(Group):
    split: Split
    levels: Levels


class Quantize(Group):
    models: list[str]
    variants: dict[str, Variant | None]
    data: QuantizeData
    test: QuantizeTest
    n_bins: Positive
    threads: Positive | None


class Pipeline(Group):
    stages: Annotated[list[str], Field(min_length=1)]
    force: bool

    @model_validator(mode="after")
    def _not_itself(self) -> Pipeline:
        if "pipeline" in self.stages:
            raise ValueError("stages cannot contain 'pipeline'")
        return self


GROUPS: dict[str, type[Group]] = {
    "calibrate": Calibrate, "cascade": Cascade, "evaluate": Evaluate, "export": Export, "features": Features,
    "prepare": Prepare, "pretrain": Pretrain, "quantize": Quantize, "pipeline": Pipeline,
}
