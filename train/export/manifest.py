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
    """Base of the manifest's records: unknown fields are rejected; each field's docstring is its description in
    ``manifest.schema.json``."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


class FileEntry(Strict):
    """A file of the bundle: its path relative to the bundle folder and its sha256."""

    path: str
    """The file's path relative to the bundle folder."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex sha256 of the file's bytes; ``Bundle(path)`` checks it on load."""


class InputSpec(Strict):
    """What a model's image input must be: size, normalisation, resize, channel order, layout and value range."""

    img_size: int = Field(gt=0)
    """Side of the square image the model takes, in pixels."""
    mean: list[float] = Field(min_length=3, max_length=3)
    """Per-channel mean (R, G, B) subtracted after scaling to [0, 1]."""
    std: list[float] = Field(min_length=3, max_length=3)
    """Per-channel standard deviation (R, G, B) divided by after the mean."""
    interpolation: str
    """How images are resized to ``img_size``."""
    channel_order: Literal["RGB"] = "RGB"
    """Channel order of the input tensor."""
    layout: Literal["NCHW"] = "NCHW"
    """Tensor layout: batch, channels, height, width."""
    value_range: str = "0-255 / 255, then (x - mean) / std"
    """How 8-bit pixel values become the input's values."""


class TensorSpec(Strict):
    """One ONNX input or output: dtype and shape (a string names a dynamic axis)."""

    dtype: str
    """Element type, e.g. ``float32`` or ``int64``."""
    shape: list[int | str]
    """Size per axis; a string names a dynamic axis (e.g. ``batch``)."""


class OnnxSpec(Strict):
    """A model's ONNX graph: its file, opset, inputs and outputs, and its parity with PyTorch measured at export."""

    file: str
    """Key in the model's ``files`` of the ONNX graph."""
    opset: int
    """ONNX opset the graph was exported with."""
    inputs: dict[str, TensorSpec]
    """The graph's inputs by name, in call order."""
    outputs: dict[str, TensorSpec]
    """The graph's outputs by name (a timm classifier also gives its pooled ``embeddings``)."""
    parity_max_abs_diff: float
    """Largest |P_torch - P_onnxruntime| of P(roadwork) on real images at export time."""
    parity_n: int
    """Images that parity was measured on."""


class Calibration(Strict):
    """How a model's P(roadwork) is calibrated: method and params, whether it is folded into the graph, what the
    consumer must apply, and the calibration split's figures before and after."""

    method: Literal["none", "temperature", "platt", "isotonic"]
    """The calibration map fitted on the calib split."""
    params: dict[str, Any] = {}
    """The map's parameters (temperature; Platt's slope and bias; isotonic's x / y table)."""
    folded: bool
    """True: the graph's own softmax is already calibrated (temperature and Platt are folded into the head)."""
    consumer_applies: str | None = None
    """What the consumer must do to the graph's P(roadwork), if anything (isotonic: ``numpy.interp``)."""
    split: str | None = None
    """The split the map was fitted on."""
    levels: list[int] = []
    """Validator levels of the calibration queries."""
    n: int = 0
    """Calibration queries the map was fitted on."""
    before: dict[str, float] = {}
    """ECE, adaptive ECE, Brier and NLL on the calibration split before the map."""
    after: dict[str, float] = {}
    """The same figures after the map."""


class AdaptivePatches(Strict):
    """An APT model's token selection, done by the consumer outside the ONNX graph (it is data-dependent)."""

    patch_sizes: list[int]
    """p, 2p, 4p: ``patch_sizes[k]`` is used where the region's entropy < ``thresholds[k-1]``."""
    thresholds: list[float]
    """Entropy thresholds in bits, one fewer than ``patch_sizes``."""
    gray_weights: list[float]
    """gray = w . RGB, with RGB = (pixel_values * std + mean) * 255 on 0-255."""
    bins: int
    """Histogram bins over [0, 256): bin = floor(gray * bins / 256)."""
    base_tokens: int
    """Patch tokens of the unmodified model."""
    procedure: str
    """The selection's steps in words (``train.models.apt.selection`` implements them)."""
    token_table: str
    """What the graph's ``token_index`` input points into."""
    tokens: dict[str, dict[str, float]] = {}
    """Measured patch tokens per image (mean, reduction) per split and level."""


class FusionInputs(Strict):
    """A fusion head's inputs: per-modality feature vectors and a presence mask (computed outside its graph)."""

    modalities: list[str]
    """The graph's feature inputs in this order (named by the modality), then ``present``."""
    dims: dict[str, int]
    """Feature width per modality."""
    presence: str
    """What the ``present`` input means."""
    producers: dict[str, dict[str, Any]] = {}
    """What computes each modality's features (model and weights sha256, file, ...)."""


class PRMSearch(Strict):
    """How the process reward model is used at test time: the views, the belief, the search and its early stop."""

    views_model: str
    """Key in ``models`` of the classifier whose logits and embeddings each view gets."""
    views: dict[str, Any]
    """The view slots in order: crop boxes, random zooms, cameras (``ViewSet.describe``)."""
    belief: Literal["mean", "max"]
    """Running belief: the mean or max of the views' logit margins so far."""
    method: Literal["beam", "best_of_n", "weighted_best_of_n"]
    """The search over inspection traces."""
    aggregation: Literal["min", "prod", "last"]
    """How a trace's step scores become one score."""
    n: int
    """Traces for best-of-N."""
    beam: int
    """Beam width."""
    length: int
    """Steps per trace."""
    budget: int
    """Views evaluated per query at most."""
    stop_threshold: float | None
    """Stop when the best beam's last step scores >= it (None: never early); the thresholds stage's choice."""
    pool: Literal["ordered", "random"]
    """Which views are evaluated: the first available in ``order``, or random ones."""
    order: list[int]
    """The inspection order (slot indices, the global view first), learnt on the meta split."""
    procedure: str
    """The search in words (``train.models.search`` implements it)."""


class Flops(Strict):
    """A model's compute, counted on its PyTorch twin at export time."""

    per_call: float
    """FLOPs of one call as ``unit`` defines it (data-dependent models: the mean over real images)."""
    unit: str
    """What one call is, e.g. "FLOP per image at the input size" (the PRM: per trace step scored)."""
    counted_with: str = "torch.utils.flop_counter.FlopCounterMode"
    """The counter used."""
    detail: dict[str, float] = {}
    """More figures, e.g. min / max over images, per token budget."""


class Quantization(Strict):
    """How a variant was made from the full-precision ONNX graph (ONNX Runtime's quantisation tooling)."""

    tool: str
    """Tool and version, e.g. ``onnxruntime.quantization 1.32.0``."""
    mode: Literal["static", "dynamic"]
    """static: activation ranges from calibration data; dynamic: ranges computed at run time."""
    format: str
    """``QDQ`` or ``QOperator`` (static), ``dynamic`` (DynamicQuantizeLinear and integer ops)."""
    weight_type: str
    """``QInt8`` or ``QUInt8``."""
    activation_type: str | None = None
    """Activation type (static only)."""
    per_channel: bool
    """Whether weights have one scale per output channel."""
    calibration_method: str | None = None
    """How static activation ranges were found: ``MinMax``, ``Entropy`` or ``Percentile``."""
    calibration_data: dict[str, Any] = {}
    """Static: the split, levels and number of queries the ranges came from."""
    op_types: list[str] = []
    """Operator types quantised (empty: the tool's default set)."""
    kept_float: list[str] = []
    """Nodes left in float, and the ``keep_float`` rule that kept each."""
    options: dict[str, Any] = {}
    """Further options passed to the tool."""


class ModelVariant(Strict):
    """A lower-precision sibling of a model entry: same inputs and outputs, its own file, calibration and metrics."""

    precision: Literal["int8", "fp8"]
    """The variant's numeric precision."""
    files: dict[str, FileEntry]
    """The variant's files (``<name>.<variant>.onnx``) with sha256."""
    size_bytes: int
    """Size of the variant's ONNX file on disk."""
    size_ratio: float
    """The full-precision file's size / this one's."""
    quantization: Quantization
    """How the variant was made."""
    calibration: Calibration
    """Re-fitted on the variant's own calib outputs (same method, split and levels as full precision)."""
    metrics: dict[str, dict[str, float]] = {}
    """Figures per validator level (``L0`` .. ``L3``) and ``mean``, on test."""
    agreement: dict[str, float] = {}
    """Per level: the share of test decisions equal to the full-precision model's."""
    metrics_source: str | None = None
    """Where ``metrics`` come from."""


class ModelEntry(Strict):
    """One model of the bundle: its kind, files, input, calibration, ONNX signature, metrics per level, what its kind
    adds (APT, fusion, PRM search), FLOPs and quantised variants."""

    kind: Literal["classifier", "router", "prm"]
    """classifier: P(roadwork); router: P(a cheap tier is wrong); prm: a score per inspection step."""
    score: str
    """What the model's score means, in words."""
    files: dict[str, FileEntry]
    """The model's files (ONNX graph, HF folder files, ...) with sha256."""
    input: InputSpec
    """What the image input must be."""
    calibration: Calibration
    """How the model's P(roadwork) is calibrated."""
    onnx: OnnxSpec
    """The ONNX graph's signature and parity with PyTorch."""
    metrics: dict[str, dict[str, float]] = {}
    """Figures per validator level (``L0`` .. ``L3``) and ``mean``."""
    metrics_source: str | None = None
    """Where ``metrics`` come from (split, stage)."""
    checks: dict[str, float] = {}
    """Export-time checks (HF folder vs PyTorch, the miner's preprocessing vs ours, ...)."""
    backbone: dict[str, Any] = {}
    """The settings the network was built from (timm backbone arguments; the router's, fusion head's or PRM's
    config)."""
    apt: AdaptivePatches | None = None
    """Set for APT models: the graph also takes ``token_index``."""
    fusion: FusionInputs | None = None
    """Set for fusion heads: the graph takes features and ``present``."""
    search: PRMSearch | None = None
    """Set for the PRM: how the inference stack searches with it."""
    flops: Flops | None = None
    """Compute per call (``train.export.flops``)."""
    variants: dict[str, ModelVariant] = {}
    """Lower-precision siblings by name (e.g. ``int8``, ``int8_dynamic``; ``task=quantize``)."""


class Guarantee(Strict):
    """What a tier's threshold promises, and what it did on the calibration split."""

    method: str
    """``learn_then_test/<p-value>`` or ``conformal_risk_control``."""
    alpha: float
    """The risk level."""
    delta: float | None = None
    """Learn-then-Test: the promise holds with probability >= 1 - delta (CRC: none)."""
    n_calibration: int
    """Calibration samples the tier was tested on (those that reach it)."""
    risk: str
    """What counts as an error (against the label or a reference tier)."""
    n_accepted: int | None = None
    """Calibration samples the threshold accepts."""
    acceptance_rate: float | None = None
    """Share of ``n_calibration`` accepted."""
    empirical_risk: float | None = None
    """Error rate among the accepted calibration samples."""
    p_value: float | None = None
    """Learn-then-Test's p-value at the chosen threshold."""
    statement: str
    """The promise in words."""
    note: str = ""
    """Anything the promise depends on (e.g. why a tier accepts nothing)."""


class TierPrecision(Strict):
    """A tier's threshold in the cascade run at one precision: the tier's model as ``variant`` (None: full precision)
    and every threshold re-derived on that cascade's own calib outputs with the full-precision tier's guarantee."""

    variant: str | None = None
    """Key in ``models[model].variants`` (None: the full-precision graph)."""
    threshold: float | None = None
    """The threshold re-derived for this precision (None: never accepts)."""
    guarantee: Guarantee | None = None
    """Its guarantee, with the full-precision tier's method, alpha and delta."""


class Tier(Strict):
    """One step of the cascade, in order; the thresholds stage fills kind, threshold, rule and guarantee."""

    name: str
    """The tier's name (``draft``, ``stage1``, ``prm``, ...)."""
    model: str
    """Key in ``models`` of the model this tier runs."""
    kind: Literal["router", "classifier", "prm"] | None = None
    """How the tier decides (the decision procedure of the manifest reference)."""
    threshold: float | None = None
    """Its confidence threshold (None: never answers early)."""
    rule: str | None = None
    """The decision rule in words (``train/export/cascade.py`` implements it)."""
    guarantee: Guarantee | None = None
    """What the threshold promises."""
    precisions: dict[str, TierPrecision] = {}
    """The cascade at a variant's precision (``task=quantize``), by variant name."""


class CodeVersion(Strict):
    """The package and git commit (and whether the tree was dirty) that wrote the bundle."""

    package: str
    """The version of ``roadwork-cascade`` installed (``not installed``: run from a source tree)."""
    git_commit: str | None = None
    """The commit of the source tree (None: not a git checkout)."""
    git_dirty: bool | None = None
    """Whether the tree had uncommitted changes."""


class Manifest(Strict):
    """``manifest.json``: the bundle's models, the cascade's tiers in order, its own files and the config behind it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    """The manifest format's version; a reader refuses other versions."""
    created: str
    """When the bundle was written (ISO 8601, UTC)."""
    run: str | None = None
    """The name of the run folder that wrote the bundle."""
    code_version: CodeVersion
    """The code that wrote the bundle."""
    validator: str | None = None
    """The subnet code its validator levels follow (``repo@commit``; None: written before this was recorded)."""
    models: dict[str, ModelEntry]
    """Every model of the bundle by name."""
    tiers: list[Tier] = []
    """The cascade's tiers in order (empty: no thresholds stage ran)."""
    files: dict[str, FileEntry] = {}
    """Bundle-level files (``model_card.json``, ``manifest.schema.json``)."""
    config: dict[str, Any] = {}
    """The resolved config that produced the bundle."""


class ModelCard(Strict):
    """The fields a NATIX submission's ``model_card.json`` holds."""

    model_name: str
    """The submitted model's name."""
    description: str
    """One line on what the model is."""
    version: str
    """The model's version."""
    submitted_by: str
    """The miner's hotkey."""
    submission_time: str
    """When the card was written (ISO 8601)."""


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
