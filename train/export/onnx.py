"""ONNX export of a classifier (dynamic batch) and its parity check in ONNX Runtime."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from train.export.manifest import AdaptivePatches, BundleError, TensorSpec
from train.models.backbones import pooled_features

log = logging.getLogger(__name__)
INPUT, OUTPUTS, EMBEDDINGS = "pixel_values", ("logits", "probs"), "embeddings"
TOKEN_INDEX = "token_index"
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export produced a file that does not behave like the model it came from."""


def to_onnx(module: nn.Module, example: tuple, path: Path, opset: int, inputs, outputs, dynamic_shapes) -> None:
    """torch.onnx's exporter (``dynamo=True``), one graph in one file, warnings silenced. ``optimize=False``: ONNX
    Runtime optimises a graph as it loads it (and ``task=quantize`` runs ``quant_pre_process``), so the exporter's
    own pass would repeat that work (docs/getting-started.md)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=True, optimize=False, verbose=False,
                          opset_version=opset, input_names=list(inputs), output_names=list(outputs),
                          external_data=False, dynamic_shapes=dynamic_shapes)


class WithProbabilities(nn.Module):
    """``images -> (logits, softmax probabilities)``, and for a timm model also its pooled pre-logits ``embeddings``
    (what the PRM reads of every view it inspects)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embeds = hasattr(model, "forward_head") and hasattr(model, "get_classifier")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.embeds:
            logits, pooled = pooled_features(self.model, pixel_values)
            return logits.float(), logits.float().softmax(-1), pooled.float()
        logits = self.model(pixel_values).float()
        return logits, logits.softmax(-1)


def export_onnx(model: nn.Module, path: Path, img_size: int, opset: int = DEFAULT_OPSET, batch: int | None = None) -> dict:
    """Write ``path`` with torch.onnx's exporter; returns the inputs/outputs signature for the manifest.

    ``batch=None``: a dynamic batch axis; ``batch=1``: one image per call (graphs whose work depends on the
    image, e.g. the elastic draft's token budget).
    """
    model = WithProbabilities(model).eval()
    example = torch.randn(batch or 2, 3, img_size, img_size)
    dynamic = ({0: torch.export.Dim("batch")},) if batch is None else None
    names = list(OUTPUTS) + ([EMBEDDINGS] if model.embeds else [])
    with torch.no_grad():
        dims = [o.shape[-1] for o in model(example)]
    to_onnx(model, (example,), path, opset, [INPUT], names, dynamic)
    axis = "batch" if batch is None else batch
    return {"inputs": {INPUT: TensorSpec(dtype="float32", shape=[axis, 3, img_size, img_size])},
            "outputs": {name: TensorSpec(dtype="float32", shape=[axis, d]) for name, d in zip(names, dims)}}


ROUTER_INPUTS, ROUTER_OUTPUTS = ("pixel_values", "draft_logits"), ("logits", "scores")


class RouterWithScores(nn.Module):
    """The difficulty router's graph: ``(images, draft logits) -> (logits, sigmoid scores)``."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, pixel_values: torch.Tensor, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.router(pixel_values, draft_logits).float()
        return logits, logits.sigmoid()


def export_router_onnx(router: nn.Module, path: Path, img_size: int, opset: int = DEFAULT_OPSET) -> dict:
    """The router with a dynamic batch; its second input is the draft's logits (ignored when it reads none)."""
    model = RouterWithScores(router).eval()
    example = (torch.randn(2, 3, img_size, img_size), torch.randn(2, 2))
    batch = torch.export.Dim("batch")
    to_onnx(model, example, path, opset, ROUTER_INPUTS, ROUTER_OUTPUTS, ({0: batch}, {0: batch}))
    n = len(router.targets)
    return {"inputs": {ROUTER_INPUTS[0]: TensorSpec(dtype="float32", shape=["batch", 3, img_size, img_size]),
                       ROUTER_INPUTS[1]: TensorSpec(dtype="float32", shape=["batch", 2])},
            "outputs": {name: TensorSpec(dtype="float32", shape=["batch", n]) for name in ROUTER_OUTPUTS}}


class OnnxRouter:
    """An exported router in ONNX Runtime: ``scores(pixel_values, draft_logits)`` -> ``(B, targets)`` P(wrong)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = _session(path, threads)
        self.input_names = {i.name for i in self.session.get_inputs()}

    def scores(self, pixel_values: np.ndarray, draft_logits: np.ndarray) -> np.ndarray:
        """P(wrong) ``(B, targets)``; ``draft_logits`` is fed only to a graph that takes it."""
        feeds = {ROUTER_INPUTS[0]: np.ascontiguousarray(pixel_values, np.float32),
                 ROUTER_INPUTS[1]: np.ascontiguousarray(draft_logits, np.float32)}
        return self.session.run([ROUTER_OUTPUTS[1]], {k: v for k, v in feeds.items() if k in self.input_names})[0]


PRESENT, FUSION_OUTPUTS = "present", ("logits", "probs")


class FusionWithProbabilities(nn.Module):
    """The fusion head's graph: ``(one feature tensor per modality..., present) -> (logits, probabilities)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(list(inputs[:-1]), inputs[-1]).float()
        return logits, logits.softmax(-1)


def export_fusion_onnx(net: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> dict:
    """The fusion head with a dynamic batch; inputs: each modality's features ``(batch, dim)`` float32 (named by
    the modality, in ``net.modalities`` order), then ``present`` ``(batch, modalities)`` bool."""
    dims = net.fusion_args["dims"]
    if PRESENT in dims:
        raise ExportError(f"a modality may not be named {PRESENT!r} (the presence mask's input)")
    example = tuple(torch.randn(2, d) for d in dims.values()) + (torch.ones(2, len(dims), dtype=torch.bool),)
    batch = torch.export.Dim("batch")
    to_onnx(FusionWithProbabilities(net.eval()).eval(), example, path, opset, [*dims, PRESENT], FUSION_OUTPUTS,
            {"inputs": tuple({0: batch} for _ in example)})
    inputs = {m: TensorSpec(dtype="float32", shape=["batch", d]) for m, d in dims.items()}
    inputs[PRESENT] = TensorSpec(dtype="bool", shape=["batch", len(dims)])
    return {"inputs": inputs, "outputs": {n: TensorSpec(dtype="float32", shape=["batch", 2]) for n in FUSION_OUTPUTS}}


class OnnxFusion:
    """An exported fusion head in ONNX Runtime: ``probs(features, present)`` -> calibrated P(roadwork).

    ``features`` maps each modality to ``(B, dim)``; a modality left out is absent for every row."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = _session(path, threads)
        inputs = self.session.get_inputs()
        self.modalities = [i.name for i in inputs if i.name != PRESENT]
        self.dims = {i.name: i.shape[1] for i in inputs if i.name != PRESENT}

    def probs(self, features: dict[str, np.ndarray], present: np.ndarray | None = None) -> np.ndarray:
        """P(roadwork) ``(B,)`` from ``features`` (modality -> ``(B, dim)``); ``present`` ``(B, modalities)`` masks
        rows, and a modality left out of ``features`` is absent for every row."""
        n = len(next(iter(features.values())))
        given = np.array([m in features for m in self.modalities])
        present = np.broadcast_to(given, (n, len(given))) if present is None else np.asarray(present, bool) & given
        feeds = {m: np.ascontiguousarray(features.get(m, np.zeros((n, self.dims[m]))), np.float32)
                 for m in self.modalities}
        feeds[PRESENT] = np.ascontiguousarray(present, bool)
        return self.session.run([FUSION_OUTPUTS[1]], feeds)[0][:, 1]


class TokensWithProbabilities(nn.Module):
    """An APT model's graph: ``(one image, token_index) -> (logits, probabilities)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward_tokens(pixel_values, token_index).float()
        return logits, logits.softmax(-1)


def export_apt_onnx(model: nn.Module, path: Path, img_size: int, opset: int = DEFAULT_OPSET) -> dict:
    """An APT model at batch 1 with a dynamic token axis: the selection happens outside the graph.

    Inputs: ``pixel_values`` ``(1, 3, H, W)`` and ``token_index`` ``(tokens,)`` int64, the rows of the
    multi-scale token table the image uses (:func:`train.models.apt.selection.token_indices`).
    """
    from train.models.apt.selection import flat_selection

    model = TokensWithProbabilities(model.eval()).eval()
    example = torch.randn(1, 3, img_size, img_size)
    n_table = flat_selection(model.model.select(example)).shape[1]
    index = torch.arange(0, n_table, 2)[: model.model.base_tokens // 2 + 1]  # any length: the axis is dynamic
    tokens = torch.export.Dim("tokens", min=1, max=n_table)
    to_onnx(model, (example, index), path, opset, [INPUT, TOKEN_INDEX], OUTPUTS, ({}, {0: tokens}))
    return {"inputs": {INPUT: TensorSpec(dtype="float32", shape=[1, 3, img_size, img_size]),
                       TOKEN_INDEX: TensorSpec(dtype="int64", shape=["tokens"])},
            "outputs": {name: TensorSpec(dtype="float32", shape=[1, 2]) for name in OUTPUTS}}


def _session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` (a BundleError if it cannot load)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"ONNX Runtime cannot load {path}: {e}") from None


class OnnxClassifier:
    """An exported classifier in ONNX Runtime: ``probs(pixel_values) -> P(roadwork)`` (numpy in, numpy out)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = _session(path, threads)

    def logits_and_probs(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's logits and softmax probabilities, each ``(B, 2)``."""
        logits, probs = self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(pixel_values, np.float32)})
        return logits, probs

    def probs(self, pixel_values: np.ndarray) -> np.ndarray:
        """P(roadwork) ``(B,)``: class 1 of the graph's softmax (only a calibration folded into the graph applies)."""
        return self.logits_and_probs(pixel_values)[1][:, 1]

    @property
    def embeds(self) -> bool:
        """Whether the graph has the ``embeddings`` output (graphs of timm models do) and takes whole batches."""
        return EMBEDDINGS in {o.name for o in self.session.get_outputs()}

    def logits_and_embeddings(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled embeddings."""
        logits, _, embeddings = self.all_outputs(pixel_values)
        return logits, embeddings

    def all_outputs(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, probabilities and pooled embeddings in one run of the graph."""
        if not self.embeds:
            raise BundleError("this classifier's ONNX graph has no `embeddings` output (only timm models export one)")
        logits, probs, embeddings = self.session.run([*OUTPUTS, EMBEDDINGS],
                                                     {INPUT: np.ascontiguousarray(pixel_values, np.float32)})
        return logits, probs, embeddings


class OnnxOneByOne(OnnxClassifier):
    """A classifier exported at batch 1: runs the graph once per image."""
    embeds = False

    def logits_and_probs(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`OnnxClassifier.logits_and_probs`, one run of the graph per image."""
        pixel_values = np.ascontiguousarray(pixel_values, np.float32)
        outs = [self.session.run(list(OUTPUTS), {INPUT: pixel_values[i:i + 1]}) for i in range(len(pixel_values))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


class OnnxAPTClassifier(OnnxClassifier):
    """An exported APT model: picks each image's patches as the manifest says, then runs the graph per image."""
    embeds = False

    def __init__(self, path: str | Path, apt: AdaptivePatches, mean, std, threads: int | None = None):
        super().__init__(path, threads)
        self.apt, self.mean, self.std = apt, list(mean), list(std)

    def token_index(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """Each image's ``token_index`` (rows of the multi-scale token table), its patches chosen by entropy as the
        manifest's ``apt`` says."""
        from train.models.apt.selection import grayscale_255, select_patches, token_indices

        gray = grayscale_255(torch.from_numpy(np.asarray(pixel_values, np.float32)), self.mean, self.std)
        masks = select_patches(gray, self.apt.patch_sizes[0], self.apt.thresholds)
        return [i.numpy() for i in token_indices(masks)]

    def logits_and_probs(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`OnnxClassifier.logits_and_probs`, one run per image with its own ``token_index``."""
        pixel_values = np.ascontiguousarray(pixel_values, np.float32)
        outs = [self.session.run(list(OUTPUTS), {INPUT: pixel_values[i:i + 1], TOKEN_INDEX: index})
                for i, index in enumerate(self.token_index(pixel_values))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def check_parity(expected: np.ndarray, path: Path, images: torch.Tensor, atol: float = 1e-4,
                 session: OnnxClassifier | None = None) -> float:
    """Max |P_torch - P_onnxruntime| of roadwork over ``images``, ``expected`` being PyTorch's P(roadwork).

    ``session`` reads ``path`` (default: a plain :class:`OnnxClassifier`). Raises ExportError above ``atol``.
    """
    got = (session or OnnxClassifier(path)).probs(images.numpy())
    diff = float(np.abs(expected - got).max())
    log.info("onnx parity on %d images: max |dP| = %.2e (limit %.0e)", len(images), diff, atol)
    if not diff <= atol:
        raise ExportError(f"{path.name}: ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in P(roadwork) "
                          f"on {len(images)} real images (limit {atol:.0e}); the export is not usable. "
                          f"Try another export.onnx.opset, or report the model and versions.")
    return diff


PRM_INPUTS, PRM_OUTPUTS = ("embeddings", "margins", "beliefs", "slots"), ("logits", "scores")


class PRMWithScores(nn.Module):
    """The process reward model's graph: ``(embeddings, margins, beliefs, slots) -> (step logits, sigmoid scores)``."""

    def __init__(self, prm: nn.Module):
        super().__init__()
        self.prm = prm

    def forward(self, embeddings, margins, beliefs, slots) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.prm(embeddings, margins, beliefs, slots).float()
        return logits, logits.sigmoid()


def export_prm_onnx(prm: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> dict:
    """The PRM with dynamic batch and step axes: one score per step of each trace (causal: a prefix's scores do not
    depend on what follows, so a growing trace can be re-scored as it grows)."""
    dim, slots = prm.config["embed_dim"], prm.config["n_slots"]
    example = (torch.randn(2, 3, dim), torch.randn(2, 3), torch.randn(2, 3), torch.randint(0, slots, (2, 3)))
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("steps", max=prm.config["max_steps"])
    to_onnx(PRMWithScores(prm.eval()).eval(), example, path, opset, PRM_INPUTS, PRM_OUTPUTS,
            tuple({0: batch, 1: steps} for _ in PRM_INPUTS))
    axes = ["batch", "steps"]
    return {"inputs": {"embeddings": TensorSpec(dtype="float32", shape=[*axes, dim]),
                       **{name: TensorSpec(dtype="float32", shape=axes) for name in ("margins", "beliefs")},
                       "slots": TensorSpec(dtype="int64", shape=axes)},
            "outputs": {name: TensorSpec(dtype="float32", shape=axes) for name in PRM_OUTPUTS}}


class OnnxPRM:
    """An exported PRM in ONNX Runtime: ``scores(embeddings, margins, beliefs, slots)`` -> ``(B, T)`` step scores."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = _session(path, threads)

    def scores(self, embeddings: np.ndarray, margins: np.ndarray, beliefs: np.ndarray,
               slots: np.ndarray) -> np.ndarray:
        """Sigmoid step scores ``(B, T)`` of ``B`` traces of ``T`` steps."""
        feeds = {"embeddings": np.ascontiguousarray(embeddings, np.float32),
                 "margins": np.ascontiguousarray(margins, np.float32),
                 "beliefs": np.ascontiguousarray(beliefs, np.float32), "slots": np.ascontiguousarray(slots, np.int64)}
        return self.session.run([PRM_OUTPUTS[1]], feeds)[0]
