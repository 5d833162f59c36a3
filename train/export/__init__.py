"""The export bundle: ONNX + HF folder per model, model card, and the manifest that ties them together."""
from train.export.bundle import Bundle, BundleClassifier, export_classifier, write_bundle
from train.export.manifest import BundleError, Calibration, Manifest, ModelCard, load_manifest
from train.export.onnx import ExportError

__all__ = ["Bundle", "BundleClassifier", "BundleError", "Calibration", "ExportError", "Manifest", "ModelCard",
           "export_classifier", "load_manifest", "write_bundle"]
