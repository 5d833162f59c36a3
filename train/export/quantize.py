"""INT8 variants of a bundle's ONNX classifiers with ONNX Runtime's quantisation tooling (no hand-written kernels).

``static``: weights (per channel) and activations in int8, QDQ format, activation ranges from calibration queries
fed through a :class:`onnxruntime.quantization.CalibrationDataReader` (MinMax, Entropy or Percentile). ``dynamic``:
weights in int8, activations quantised at run time (the simple baseline, no calibration data). Both run
``quant_pre_process`` (shape inference, graph optimisation) first. :data:`MODES` picks one by name; each returns
the manifest's :class:`~train.export.manifest.Quantization` record.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from train.export.manifest import Quantization
from train.export.onnx import INPUT

# Nodes that stay in float, by rule (measured on the default Stage-1: docs/guides/cascade.md).
KEEP_FLOAT = {
    # the layer that reads the normalised pixels (a ViT's patch embedding): quantising its output costs most agreement
    "input_layer": lambda node, graph_inputs, weights: any(i in graph_inputs for i in node.input),
    # attention's activation x activation products (Q K^T, A V): no weights to shrink, and their ranges vary by image
    "activation_matmul": lambda node, graph_inputs, weights: node.op_type == "MatMul"
    and not any(i in weights for i in node.input),
}


def kept_float(model: onnx.ModelProto, rules, op_types) -> dict[str, str]:
    """Node name -> the ``KEEP_FLOAT`` rule that keeps it in float, among nodes of ``op_types``."""
    unknown = set(rules) - set(KEEP_FLOAT)
    if unknown:
        raise ValueError(f"quantize keep_float has {sorted(unknown)}; allowed: {sorted(KEEP_FLOAT)}")
    inputs = {i.name for i in model.graph.input}
    weights = {i.name for i in model.graph.initializer}
    return {node.name: rule for node in model.graph.node if not op_types or node.op_type in op_types
            for rule in rules if KEEP_FLOAT[rule](node, inputs, weights)}


class PixelReader:
    """Calibration queries for ``quantize_static``: ``{pixel_values: batch}`` until the array is used up."""

    def __init__(self, pixels: np.ndarray, batch_size: int):
        self.batches = iter([np.ascontiguousarray(pixels[i:i + batch_size], np.float32)
                             for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict | None:
        """The next batch as ``{pixel_values: batch}``; None once every batch was given (the reader protocol's end)."""
        batch = next(self.batches, None)
        return None if batch is None else {INPUT: batch}


def _tool() -> str:
    import onnxruntime

    return f"onnxruntime.quantization {onnxruntime.__version__}"


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantiser logs every tensor it skips on the root logger and prints its calibrator's settings."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _pre_processed(src: Path, folder: Path) -> tuple[Path, str]:
    """``quant_pre_process`` of ``src`` (symbolic shape inference, or ONNX's own where the symbolic one fails on the
    exported graph, as on the draft's); returns the file and which inference ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out))
        return out, "quant_pre_process (symbolic shape inference)"
    except Exception as e:  # onnxruntime raises plain TypeErrors / KeyErrors from its symbolic inference
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
        return out, f"quant_pre_process (ONNX shape inference; the symbolic one failed: {e})"


def quantize_static_int8(src: Path, dst: Path, pixels: np.ndarray, method: str = "minmax", per_channel: bool = True,
                         activation_type: str = "QUInt8", weight_type: str = "QInt8", quant_format: str = "QDQ",
                         op_types=("MatMul", "Gemm", "Conv"), keep_float=(), method_options: dict | None = None,
                         batch_size: int = 32, calibration_data: dict | None = None) -> Quantization:
    """Static INT8 of ``src`` into ``dst``; activation ranges from ``pixels`` (model inputs, N x 3 x S x S).

    The ranges are computed by ONNX Runtime's calibrator for ``method`` with ``method_options`` (its bin counts,
    percentile) and handed to ``quantize_static`` as a calibration cache: ``quantize_static`` alone builds the
    Entropy calibrator with 128 bins for 128 quantised bins, which leaves it a single candidate range (MinMax's).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}
    if method not in calibrate:
        raise ValueError(f"quantize calibration method {method!r}; allowed: {sorted(calibrate)}")
    op_types = list(op_types or [])
    with tempfile.TemporaryDirectory(prefix="quantize.") as tmp, _quiet():
        pre, pre_process = _pre_processed(src, Path(tmp))
        floats = kept_float(onnx.load(str(pre)), keep_float, op_types)
        calibrator = create_calibrator(pre, op_types or None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calibrate[method], extra_options=dict(method_options or {}))
        calibrator.collect_data(PixelReader(pixels, batch_size))
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        quantize_static(str(pre), str(dst), None, quant_format=QuantFormat[quant_format], per_channel=per_channel,
                        activation_type=QuantType[activation_type], weight_type=QuantType[weight_type],
                        op_types_to_quantize=op_types or None, nodes_to_exclude=list(floats),
                        calibrate_method=calibrate[method], calibration_cache_path=str(cache))
    return Quantization(tool=_tool(), mode="static", format=quant_format, weight_type=weight_type,
                        activation_type=activation_type, per_channel=per_channel,
                        calibration_method=calibrate[method].name, calibration_data=calibration_data or {},
                        op_types=op_types, kept_float=[f"{n} ({rule})" for n, rule in floats.items()],
                        options={"method_options": dict(method_options or {}), "pre_process": pre_process})


def quantize_dynamic_int8(src: Path, dst: Path, per_channel: bool = True, weight_type: str = "QInt8",
                          op_types=(), keep_float=(), **_) -> Quantization:
    """Dynamic INT8 of ``src`` into ``dst``: int8 weights, activations quantised per call (no calibration data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = list(op_types or [])
    with tempfile.TemporaryDirectory(prefix="quantize.") as tmp, _quiet():
        pre, pre_process = _pre_processed(src, Path(tmp))
        floats = kept_float(onnx.load(str(pre)), keep_float, op_types)
        quantize_dynamic(str(pre), str(dst), per_channel=per_channel, weight_type=QuantType[weight_type],
                         op_types_to_quantize=op_types or None, nodes_to_exclude=list(floats))
    return Quantization(tool=_tool(), mode="dynamic", format="dynamic", weight_type=weight_type,
                        per_channel=per_channel, op_types=op_types,
                        kept_float=[f"{n} ({rule})" for n, rule in floats.items()],
                        options={"pre_process": pre_process})


MODES = {"static": quantize_static_int8, "dynamic": quantize_dynamic_int8}
