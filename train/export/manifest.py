"""The export bundle's ``manifest.json``: a versioned schema, validated on write and on load.

Every model of the bundle is an entry in ``models`` (its files with sha256, input spec,
calibration, metrics per validator level, ONNX signature), with its quantised ``variants`` (``task=quantize``);
``tiers`` orders them into the cascade with thresholds (filled by the thresholds stage), and each tier's
``precisions`` the thresholds re-derived for the cascade run at a variant's precision. Unknown fields are rejected, so a
hand-edited or foreign file fails loudly instead of being half-read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.utils.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
MODEL_CARD = "model_card.json"
SCHEMA = "manifest.schema.json"                 # Manifest.model_json_schema(), written into every bundle
SCHEMA_VERSION = 1
FULL_PRECISION = "fp32"                     # a model entry's own graph; ``variants`` hold the others


class BundleError(RuntimeError):
    """An export bundle is missing, malformed or altered."""


class Strict(BaseModel):
    """Base of the manifest's records: unknown fields are rejected."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FileEntry(Strict):
    """A file of the bundle: its path relative to the bundle folder and its sha256."""
    path: str                                   # relative to the bundle folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InputSpec(Strict):
    """What a model's image input must be: size, normalisation, resize, channel order, layout and value range."""
    img_size: int = Field(gt=0)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    interpolation: str                          # how images are resized to img_size
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    value_range: str = "0-255 / 255, then (x - mean) / std"


class TensorSpec(Strict):
    """One ONNX input or output: dtype and shape (a string names a dynamic axis)."""
    dtype: str
    shape: list[int | str]                      # str: a dynamic axis name


class OnnxSpec(Strict):
    """A model's ONNX graph: its file, opset, inputs and outputs, and its parity with PyTorch measured at export."""
    file: str                                   # key in the model's ``files``
    opset: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    parity_max_abs_diff: float                  # |P_torch - P_onnxruntime| on real images at export time
    parity_n: int


class Calibration(Strict):
    """How a model's P(roadwork) is calibrated: method and params, whether it is folded into the graph, what the
    consumer must apply, and the calibration split's figures before and after."""
    method: Literal["none", "temperature", "platt", "isotonic"]
    params: dict[str, Any] = {}
    folded: bool                                # True: the model's own softmax is already calibrated
    consumer_applies: str | None = None         # what the consumer must do to the model's P(roadwork), if anything
    split: str | None = None
    levels: list[int] = []
    n: int = 0
    before: dict[str, float] = {}               # ECE, adaptive ECE, Brier, NLL on the calibration split
    after: dict[str, float] = {}


class AdaptivePatches(Strict):
    """An APT model's token selection, done by the consumer outside the ONNX graph (it is data-dependent)."""

    patch_sizes: list[int]                      # p, 2p, 4p: patch_sizes[k] is used where its entropy < thresholds[k-1]
    thresholds: list[float]                     # bits
    gray_weights: list[float]                   # gray = w . RGB, RGB = (pixel_values * std + mean) * 255 on 0-255
    bins: int                                   # histogram bins over [0, 256): bin = floor(gray * bins / 256)
    base_tokens: int                            # patch tokens of the unmodified model
    procedure: str                              # the steps in words (train.models.apt.selection implements them)
    token_table: str                            # what the graph's token_index points into
    tokens: dict[str, dict[str, float]] = {}    # measured patch tokens per image (mean, reduction) per split/level


class FusionInputs(Strict):
    """A fusion head's inputs: per-modality feature vectors and a presence mask (computed outside its graph)."""

    modalities: list[str]                       # ONNX inputs in this order (named by the modality), then `present`
    dims: dict[str, int]
    presence: str                               # what the `present` input means
    producers: dict[str, dict[str, Any]] = {}   # what computes each modality (model + weights sha256, file, ...)


class PRMSearch(Strict):
    """How the process reward model is used at test time: the views, the belief, the search and its early stop."""

    views_model: str                            # key in ``models``: the classifier whose logits/embeddings views get
    views: dict[str, Any]                       # slots in order, crop boxes, random zooms, cameras (ViewSet.describe)
    belief: Literal["mean", "max"]              # running belief: mean | max of the views' logit margins so far
    method: Literal["beam", "best_of_n", "weighted_best_of_n"]
    aggregation: Literal["min", "prod", "last"]  # one score per trace from its step scores
    n: int                                      # best-of-N traces
    beam: int                                   # beam width
    length: int                                 # steps per trace
    budget: int                                 # views evaluated per query at most
    stop_threshold: float | None                # stop when the best beam's last step scores >= it (None: never)
    pool: Literal["ordered", "random"]          # which views are evaluated: the first available in `order`, or random
    order: list[int]                            # the inspection order (slot indices, global first), learnt on meta
    procedure: str                              # the search in words (train.models.search implements it)


class Flops(Strict):
    """A model's compute, counted on its PyTorch twin at export time."""

    per_call: float                             # FLOPs of one call as `unit` defines it
    unit: str                                   # e.g. "FLOP per image at the input size"
    counted_with: str = "torch.utils.flop_counter.FlopCounterMode"
    detail: dict[str, float] = {}               # e.g. min / max over images, per token budget


class Quantization(Strict):
    """How a variant was made from the full-precision ONNX graph (ONNX Runtime's quantisation tooling)."""

    tool: str                                   # e.g. onnxruntime.quantization 1.32.0
    mode: Literal["static", "dynamic"]          # static: activation ranges from calibration data; dynamic: at run time
    format: str                                 # QDQ | QOperator (static) | dynamic (DynamicQuantizeLinear, int ops)
    weight_type: str                            # QInt8 | QUInt8
    activation_type: str | None = None          # static only
    per_channel: bool
    calibration_method: str | None = None       # static: MinMax | Entropy | Percentile (activation ranges)
    calibration_data: dict[str, Any] = {}       # static: split, levels, n of the queries the ranges came from
    op_types: list[str] = []                    # operator types quantised (empty: the tool's default set)
    kept_float: list[str] = []                  # nodes left in float, and why (``keep_float`` rules)
    options: dict[str, Any] = {}


class ModelVariant(Strict):
    """A lower-precision sibling of a model entry: same inputs and outputs, its own file, calibration and metrics."""

    precision: Literal["int8", "fp8"]
    files: dict[str, FileEntry]
    size_bytes: int                             # the variant's ONNX file on disk
    size_ratio: float                           # the full-precision file's size / this one's
    quantization: Quantization
    calibration: Calibration                    # re-fitted on the variant's own calib outputs (same method as fp32)
    metrics: dict[str, dict[str, float]] = {}   # per validator level ("L0".."L3") and "mean", on test
    agreement: dict[str, float] = {}            # per level: share of test decisions equal to the full-precision model's
    metrics_source: str | None = None


class ModelEntry(Strict):
    """One model of the bundle: its kind, files, input, calibration, ONNX signature, metrics per level, what its kind
    adds (APT, fusion, PRM search), FLOPs and quantised variants."""
    kind: Literal["classifier", "router", "prm"]
    score: str                                  # what the model's score means
    files: dict[str, FileEntry]
    input: InputSpec
    calibration: Calibration
    onnx: OnnxSpec
    metrics: dict[str, dict[str, float]] = {}   # per validator level ("L0".."L3") and "mean"
    metrics_source: str | None = None           # where those figures come from
    checks: dict[str, float] = {}               # export-time checks (HF folder vs PyTorch, ...)
    backbone: dict[str, Any] = {}
    apt: AdaptivePatches | None = None          # set for APT models: the ONNX graph takes token_index too
    fusion: FusionInputs | None = None          # set for fusion heads: the ONNX graph takes features + presence
    search: PRMSearch | None = None             # set for the PRM: how the inference stack searches with it
    flops: Flops | None = None                  # compute per call (train.export.flops)
    variants: dict[str, ModelVariant] = {}      # lower-precision siblings by name (e.g. int8, int8_dynamic)


class Guarantee(Strict):
    """What a tier's threshold promises, and what it did on the calibration split."""

    method: str                                 # learn_then_test/<p-value> | conformal_risk_control
    alpha: float                                # the risk level
    delta: float | None = None                  # LTT: the promise holds with probability >= 1 - delta (CRC: none)
    n_calibration: int                          # calibration samples the tier was tested on (those reaching it)
    risk: str                                   # what counts as an error (against the label or a reference tier)
    n_accepted: int | None = None
    acceptance_rate: float | None = None        # on calib
    empirical_risk: float | None = None         # error rate among the accepted calib samples
    p_value: float | None = None
    statement: str                              # the promise in words
    note: str = ""


class TierPrecision(Strict):
    """A tier's threshold in the cascade run at one precision: the tier's model as ``variant`` (None: full precision)
    and every threshold re-derived on that cascade's own calib outputs with the full-precision tier's guarantee."""

    variant: str | None = None                  # key in ``models[model].variants``
    threshold: float | None = None
    guarantee: Guarantee | None = None


class Tier(Strict):
    """One step of the cascade, in order; the thresholds stage fills kind, threshold, rule and guarantee."""

    name: str
    model: str                                  # key in ``models``
    kind: Literal["router", "classifier", "prm"] | None = None
    threshold: float | None = None
    rule: str | None = None                     # the decision rule in words (also: train/export/cascade.py)
    guarantee: Guarantee | None = None
    precisions: dict[str, TierPrecision] = {}   # the cascade at a variant's precision (task=quantize)


class CodeVersion(Strict):
    """The package and git commit (and whether the tree was dirty) that wrote the bundle."""
    package: str
    git_commit: str | None = None
    git_dirty: bool | None = None


class Manifest(Strict):
    """``manifest.json``: the bundle's models, the cascade's tiers in order, its own files and the config behind it."""
    schema_version: Literal[1] = SCHEMA_VERSION
    created: str
    run: str | None = None
    code_version: CodeVersion
    validator: str | None = None                # the subnet code its validator levels follow (repo@commit); None: older
    models: dict[str, ModelEntry]
    tiers: list[Tier] = []
    files: dict[str, FileEntry] = {}            # bundle-level files (model_card.json, manifest.schema.json)
    config: dict[str, Any] = {}                 # the resolved config that produced the bundle


class ModelCard(Strict):
    """The fields a NATIX submission's ``model_card.json`` holds."""

    model_name: str
    description: str
    version: str
    submitted_by: str
    submission_time: str


def file_entry(bundle: Path, path: Path) -> FileEntry:
    """The :class:`FileEntry` of ``path``, a file inside the folder ``bundle``."""
    return FileEntry(path=str(Path(path).relative_to(bundle)), sha256=sha256_file(path))


def write_manifest(bundle: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``<bundle>/manifest.json`` (atomically); returns its path."""
    path = Path(bundle) / MANIFEST
    atomic_write_json(path, manifest.model_dump(mode="json"))
    return path


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``<bundle>/manifest.json``; with ``verify``, check every listed file's sha256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} is not an export bundle: it has no {MANIFEST}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{path} does not match the manifest schema:\n{e}") from None
    if verify:
        entries = list(manifest.files.values()) + [f for m in manifest.models.values() for f in m.files.values()]
        for entry in entries:
            file = bundle / entry.path
            if not file.is_file():
                raise BundleError(f"bundle file missing: {file} (listed in {MANIFEST})")
            if sha256_file(file) != entry.sha256:
                raise BundleError(f"bundle file changed after export (sha256 mismatch): {file}")
    return manifest
