"""ONNX export of a classifier (dynamic batch) and its parity check in ONNX Runtime."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from train.export.manifest import BundleError, TensorSpec

log = logging.getLogger(__name__)
INPUT, OUTPUTS = "pixel_values", ("logits", "probs")
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Export produced a file that does not behave like the model it came from."""


class WithProbabilities(nn.Module):
    """``images -> (logits, softmax probabilities)``: the ONNX file's two outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixel_values).float()
        return logits, logits.softmax(-1)


def export_onnx(model: nn.Module, path: Path, img_size: int, opset: int = DEFAULT_OPSET) -> dict:
    """Write ``path`` with torch.onnx's exporter; returns the inputs/outputs signature for the manifest."""
    model = WithProbabilities(model).eval()
    example = torch.randn(2, 3, img_size, img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, opset_version=opset,
                          input_names=[INPUT], output_names=list(OUTPUTS), external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    classes = 2
    return {"inputs": {INPUT: TensorSpec(dtype="float32", shape=["batch", 3, img_size, img_size])},
            "outputs": {name: TensorSpec(dtype="float32", shape=["batch", classes]) for name in OUTPUTS}}


class OnnxClassifier:
    """An exported classifier in ONNX Runtime: ``probs(pixel_values) -> P(roadwork)`` (numpy in, numpy out)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load {path}: {e}") from None

    def logits_and_probs(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(pixel_values, np.float32)})
        return logits, probs

    def probs(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.logits_and_probs(pixel_values)[1][:, 1]


def check_parity(expected: np.ndarray, path: Path, images: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |P_torch - P_onnxruntime| of roadwork over ``images``, ``expected`` being PyTorch's P(roadwork).

    Raises ExportError above ``atol``.
    """
    got = OnnxClassifier(path).probs(images.numpy())
    diff = float(np.abs(expected - got).max())
    log.info("onnx parity on %d images: max |dP| = %.2e (limit %.0e)", len(images), diff, atol)
    if not diff <= atol:
        raise ExportError(f"{path.name}: ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in P(roadwork) "
                          f"on {len(images)} real images (limit {atol:.0e}); the export is not usable. "
                          f"Try another export.onnx.opset, or report the model and versions.")
    return diff
