"""A tier's calibration: fitted on the calib split's logits, folded into its head (temperature, Platt) or kept as a
table for the consumer (isotonic), checked and saved; the calibrated logits handed on to later stages; and the
calibrated tier read back from a run (:func:`load_calibrated`)."""
from __future__ import annotations

import json

import torch
from omegaconf import DictConfig

from train.calibration import calibration_report, fit_calibrator, fold_into_head, folded_logits, reliability_diagram
from train.calibration.metrics import score_probs
from train.metrics import roadwork_prob
from train.models.saving import load_classifier, save_classifier
from train.predictions import cache_outputs, outputs_cache, predict_split, read_predictions
from train.runs import Run
from train.tiers.training import build_datamodule
from train.utils.loggers import save_figure

CONSUMER_ISOTONIC = ("apply the isotonic table to the model's P(Roadwork): p = numpy.interp(p, params['x'], "
                     "params['y']); the model's own softmax (ONNX and the HF folder) is not calibrated")
HANDED_ON = ("finetune", "source_checkpoint")  # model-config fields the calibrated file keeps
FULL_PRECISION = ("32", "32-true")  # trainer precisions whose recorded test logits are the fp32 model's


@torch.no_grad()
def _check_fold(model: torch.nn.Module, images: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    got = roadwork_prob(model(images).float())
    if not torch.allclose(got, expected, atol=atol):
        raise RuntimeError(f"folding the calibration into the head changed P(roadwork) by up to "
                           f"{(got - expected).abs().max():.2e}; expected the calibrator's output")


def calibrate_model(cfg: DictConfig, run: Run, model: torch.nn.Module, config: dict, name: str, out_dir) -> dict:
    """Fit ``calibrate.method`` on ``model``'s calib-split logits, fold it in and save ``out_dir/<name>``.

    Also used by tasks that calibrate their own model before choosing a threshold with it (the draft).
    """
    ccfg = cfg.calibrate
    datamodule = build_datamodule(cfg, run, config["input"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calib = predict_split(model.to(device), datamodule, ccfg.split, ccfg.levels, device=device,
                          description=f"calibrate: {name} on {ccfg.split}")
    model.cpu()
    calibrator, report, (before, after, labels) = fit_on(ccfg.method, calib, ccfg.split, ccfg.n_bins)
    report["consumer_applies"] = None if calibrator.foldable else CONSUMER_ISOTONIC
    if calibrator.foldable:
        dataset = datamodule.dataset(ccfg.split, ccfg.levels[0])
        images = torch.stack([dataset[i]["image"] for i in range(min(16, len(dataset)))])
        with torch.no_grad():
            expected = calibrator.probs(model(images)).float()
        _check_fold(fold_into_head(model, calibrator), images, expected)
    save_classifier(model, out_dir / name, config["input"], calibration=report,
                    **{k: config[k] for k in HANDED_ON if k in config})
    hand_on_outputs(run, model, datamodule, name, calibrator, {ccfg.split: calib})
    title = f"{name}: {ccfg.split} split, levels {list(ccfg.levels)}, {calibrator.method} scaling"
    save_figure(reliability_diagram(labels, {"before": before, "after": after}, ccfg.n_bins, title),
                out_dir / f"{name}_reliability.png")
    report["test"] = _test_figures(run, name, calibrator, ccfg.n_bins)
    return report


def hand_on_outputs(run: Run, model: torch.nn.Module, datamodule, name: str, calibrator, computed: dict) -> None:
    """The calibrated ``model``'s logits into the run's outputs cache, where the draft (its teacher) and the router
    read them instead of running it again: on the splits of ``computed`` (``{split: predict_split's output}``, the
    logits before calibration) and on test from the tier's recorded test predictions when it made them at full
    precision. The fold is affine in the logits (:func:`folded_logits`)."""
    task = run.read()["tasks"].get(name, {})
    if "test_predictions" in task.get("artifacts", {}) and task.get("test_precision") in FULL_PRECISION:
        computed = {**computed, "test": {lv: {k: torch.from_numpy(v) for k, v in cols.items()} for lv, cols in
                                         read_predictions(run.artifact(name, "test_predictions")).items()}}
    for split, per_level in computed.items():
        cache_outputs(outputs_cache(run), model, datamodule, split,
                      {lv: {**c, "logits": folded_logits(calibrator, c["logits"])} for lv, c in per_level.items()})


def fit_on(method: str, calib: dict, split: str, n_bins: int):
    """Fit ``method`` on ``calib`` (:func:`predict_split`'s ``{level: {"logits", "label"}}``): the calibrator, its
    report (method, params, folded, split, levels, n, ECE etc. before / after) and (P before, P after, labels)."""
    logits = torch.cat([c["logits"] for c in calib.values()])
    labels = torch.cat([c["label"] for c in calib.values()])
    calibrator = fit_calibrator(method, logits, labels)
    before, after = roadwork_prob(logits), calibrator.probs(logits).float()
    report = {"method": calibrator.method, "params": calibrator.params(), "folded": calibrator.foldable,
              "split": split, "levels": list(calib), "n": len(labels),
              "before": calibration_report(before, labels, n_bins), "after": calibration_report(after, labels, n_bins)}
    return calibrator, report, (before, after, labels)


def _test_figures(run: Run, tier: str, calibrator, n_bins: int) -> dict:
    """Per-level metrics on the tier's recorded test logits, before and after calibration ({} if none)."""
    if "test_predictions" not in run.read()["tasks"].get(tier, {}).get("artifacts", {}):
        return {}
    out = {}
    for level, cols in read_predictions(run.artifact(tier, "test_predictions")).items():
        logits, labels = torch.from_numpy(cols["logits"]), torch.from_numpy(cols["label"])
        out[f"L{level}"] = {"before": score_probs(roadwork_prob(logits), labels, n_bins),
                            "after": score_probs(calibrator.probs(logits).float(), labels, n_bins)}
    return out


def load_calibrated(run: Run, name: str) -> tuple[torch.nn.Module, dict, dict]:
    """(model, config, calibration report) of tier ``name``, calibrated by the calibrate stage or by its own task
    (a task that needs its calibration before choosing a threshold records ``calibrated_model`` + ``calibration``)."""
    if run.is_complete("calibrate"):
        reports = json.loads(run.artifact("calibrate", "report").read_text())
        if name in reports:
            model, config = load_classifier(run.artifact("calibrate", f"{name}_model"))
            return model, config, reports[name]
    artifacts = run.read()["tasks"].get(name, {}).get("artifacts", {})
    if "calibrated_model" in artifacts:
        model, config = load_classifier(run.artifact(name, "calibrated_model"))
        return model, config, json.loads(run.artifact(name, "calibration").read_text())
    raise FileNotFoundError(f"run {run.path.name} has no calibrated {name!r}: add it to calibrate.tiers (and run "
                            f"the calibrate stage after the {name} stage)")


def calibrated(cfg: DictConfig, tier: str) -> list[str]:
    """The stages a calibrated ``tier`` comes from: its own, and calibrate when ``calibrate.tiers`` holds it (a tier
    that is not there calibrates itself, as the draft does)."""
    return [tier, "calibrate"] if tier in cfg.calibrate.tiers else [tier]
