"""Post-hoc calibration of the roadwork classifier: calibrators by name, folding into the head, metrics, plots,
and risk-controlled thresholds (:mod:`train.calibration.risk_control`, Learn-then-Test).

matplotlib is imported only inside the plot functions.
"""
from train.calibration.metrics import calibration_report
from train.calibration.plots import confusion_matrices, level_figures, reliability_diagram
from train.calibration.risk_control import ThresholdChoice, aurc, evaluate_threshold, routing_curve, select_threshold
from train.calibration.scaling import (CALIBRATORS, IsotonicCalibration, PlattScaling, TemperatureScaling,
                                       apply_isotonic_table, fit_calibrator, fold_into_head, folded_logits)

__all__ = ["CALIBRATORS", "TemperatureScaling", "PlattScaling", "IsotonicCalibration", "fit_calibrator",
           "fold_into_head", "folded_logits", "apply_isotonic_table", "calibration_report", "reliability_diagram",
           "confusion_matrices", "level_figures", "ThresholdChoice", "select_threshold",
           "evaluate_threshold", "aurc", "routing_curve"]
