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
    """Base of the config schemas: a key the schema does not declare is an error (``extra="forbid"``)."""
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
    """``calibrate``: how and on what the tiers are calibrated."""
    method: Literal["temperature", "platt", "isotonic"]
    tiers: list[str]
    split: Split
    levels: Levels
    n_bins: Positive


class OperatingPoint(Group):
    """``cascade.operating_point``: the held-out split on which alpha is chosen among ``cascade.sweep``, and the MCC
    drop against the baseline allowed there."""
    split: Literal["train", "meta", "val"]  # a split neither the thresholds (calib) nor the report (test) uses
    max_mcc_drop: float


class Cascade(RiskControl):
    """``cascade``: its tiers in order, the reference and baseline tiers, how each threshold is chosen on calib."""
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
    """``evaluate``: which classifier of the bundle is scored, at which precision, on which split and levels, and
    whether the bundle's cascade is replayed too."""
    model: str
    precision: str  # fp32 or a variant that task=quantize made
    split: Split
    levels: Levels
    n_bins: Positive
    threads: Positive | None
    cascade: bool


class Onnx(Group):
    """``export.onnx``: the opset and the ONNX Runtime parity check on real images."""
    opset: Positive
    parity_atol: Annotated[float, Field(gt=0)]
    parity_images: Positive


class ModelCardText(Group):
    """``export.model_card``: the ``model_card.json`` fields the config sets (export adds the submission time)."""
    model_name: str | None
    description: str
    version: str
    submitted_by: str


class Export(Group):
    """``export``: the bundle's models, the one that also gets the HF folder, the ONNX settings, the model card."""
    models: list[str]
    hf_model: str | None
    onnx: Onnx
    natix_submission: bool
    model_card: ModelCardText


class Features(Group):
    """``features``: the feature store's splits, levels, modalities and external files; ``every_level`` must be among
    ``splits``, names may not clash and something must be stored."""
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
    """``prepare``: which splits are decoded into uint8 shards, at which side, in batches of which size."""
    splits: list[Split]
    size: Positive | None
    batch_size: Positive


class FractalSearch(Group):
    """``pretrain.fdsl.search``: FractalDB's category search (maps per system, contraction, filling filter)."""
    n_maps: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=2, max_length=2)]
    max_sigma: Annotated[float, Field(gt=0, lt=1)]
    min_fill: Probability


class FractalRender(Group):
    """``pretrain.fdsl.render``: how each fractal instance is rendered."""
    perturbation: Probability
    points: Positive | None
    canvas_scale: Annotated[float, Field(ge=1)]
    colour: bool
    background: Literal["random", "black"]


class Fdsl(Group):
    """``pretrain.fdsl``: formula-driven pretraining on rendered fractal categories."""
    classes: Annotated[int, Field(ge=2)]
    search: FractalSearch
    render: FractalRender
    label_smoothing: Probability
    mixup: dict[str, Any] | None


class Mae(Group):
    """``pretrain.mae``: the masked autoencoder's mask ratio, decoder and targets."""
    mask_ratio: Annotated[float, Field(gt=0, lt=1)]
    decoder_dim: Positive
    decoder_depth: Positive
    decoder_heads: Positive
    norm_pix_loss: bool


class Pretrain(Group):
    """``pretrain``: the method, its schedule, optimiser and scheduler, and each method's own settings."""
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
    """``quantize.variants.<name>``: how one INT8 variant is made (static or dynamic, and ONNX Runtime's options)."""
    mode: Literal["static", "dynamic"]
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    method_options: dict[str, Any] | None = None
    per_channel: bool
    quant_format: Literal["QDQ", "QOperator"] = "QDQ"
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"
    weight_type: Literal["QInt8", "QUInt8"]
    op_types: list[str]
    keep_float: list[str]
    batch_size: Positive = 32


class QuantizeData(Group):
    """``quantize.data``: the queries the static variants' activation ranges come from."""
    split: Split
    levels: Levels
    samples: Positive


class QuantizeTest(Group):
    """``quantize.test``: where the variants' metrics and agreement with fp32 are measured."""
    split: Split
    levels: Levels


class Quantize(Group):
    """``quantize``: which bundle classifiers get which INT8 variants; the queries that calibrate and test them."""
    models: list[str]
    variants: dict[str, Variant | None]
    data: QuantizeData
    test: QuantizeTest
    n_bins: Positive
    threads: Positive | None


class Pipeline(Group):
    """``pipeline``: the stages run in order in one run (not ``pipeline`` itself); whether complete ones rerun."""
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
