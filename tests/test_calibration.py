"""Calibrators recover known parameters, fold exactly into timm / transformers heads; metrics and plots."""
import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from train.calibration import (CALIBRATORS, PlattScaling, TemperatureScaling, apply_isotonic_table, calibration_report,
                               confusion_matrices, fit_calibrator, fold_into_head, folded_logits, reliability_diagram)
from train.calibration.scaling import TEMPERATURE_RANGE
from train.models.finetune import head_name
from train.utils.loggers import save_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic(n: int = 20000, scale: float = 1.0, seed: int = 0, a: float = 1.0, b: float = 0.0):
    """Logits with margin z ~ N(0, 2^2) (plus a row offset softmax ignores); labels ~ Bernoulli(sigmoid(a z + b)).

    Multiplying the logits by ``scale`` makes the model over- (> 1) or under-confident (< 1) by temperature ``scale``.
    """
    gen = torch.Generator().manual_seed(seed)
    margin = 2 * torch.randn(n, generator=gen, dtype=torch.float64)
    labels = torch.bernoulli(torch.sigmoid(a * margin + b), generator=gen).long()
    offset = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return (torch.stack([-margin / 2, margin / 2], dim=1) * scale + offset).float(), labels


def raw(logits: torch.Tensor) -> torch.Tensor:
    return logits.double().softmax(dim=1)[:, 1]


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_the_temperature(true_temperature):
    logits, labels = synthetic(scale=true_temperature)
    fitted = fit_calibrator("temperature", logits, labels).params()["temperature"]
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_platt_scaling_recovers_slope_and_bias():
    logits, labels = synthetic(a=0.6, b=-0.8)
    params = fit_calibrator("platt", logits, labels).params()
    assert params["a"] == pytest.approx(0.6, rel=0.10)
    assert params["b"] == pytest.approx(-0.8, abs=0.1)


@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_calibration_fixes_an_over_confident_model_on_held_out_data(method):
    logits, labels = synthetic(scale=4.0)
    test_logits, test_labels = synthetic(scale=4.0, seed=1)
    before = calibration_report(raw(test_logits), test_labels)
    after = calibration_report(fit_calibrator(method, logits, labels).probs(test_logits), test_labels)
    assert before["ece"] > 0.1
    assert after["ece"] < 0.5 * before["ece"] and after["ece_adaptive"] < 0.5 * before["ece_adaptive"]
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]


def test_isotonic_is_monotone_and_its_table_is_what_it_applies():
    from sklearn.isotonic import IsotonicRegression
    logits, labels = synthetic(n=3000, scale=4.0)
    calibrator = fit_calibrator("isotonic", logits, labels)
    order = raw(logits).argsort()
    probs = calibrator.probs(logits)
    assert (probs[order].diff() >= 0).all() and probs.min() >= 0 and probs.max() <= 1
    assert probs.std() > 0.3  # fitted on P(roadwork), not a flat map
    table = json.loads(json.dumps(calibrator.params()))
    assert np.array_equal(apply_isotonic_table(raw(logits).numpy(), table), probs.numpy())
    sklearn = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(raw(logits).numpy(), labels.numpy())
    unseen = np.linspace(-0.1, 1.1, 101)
    assert np.allclose(apply_isotonic_table(unseen, table), sklearn.predict(unseen), atol=1e-12)


@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_params_round_trip_through_json(method):
    logits, labels = synthetic(n=2000, scale=3.0, a=0.8, b=0.3)
    calibrator = fit_calibrator(method, logits, labels)
    rebuilt = CALIBRATORS[method].from_params(json.loads(json.dumps(calibrator.params())))
    assert type(rebuilt) is type(calibrator) and rebuilt.method == method
    assert torch.equal(rebuilt.probs(logits), calibrator.probs(logits))


def tiny_timm(num_classes: int = 2) -> torch.nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                             num_classes=num_classes)


def tiny_transformers() -> torch.nn.Module:
    from transformers import ViTConfig

    from train.models.backbones import create_backbone
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    return create_backbone("tiny-hf-vit", library="transformers", hf_config=config.to_dict())


@pytest.mark.parametrize("build", [tiny_timm, tiny_transformers])
@pytest.mark.parametrize("calibrator", [TemperatureScaling(2.7), PlattScaling(a=0.5, b=1.0)],
                         ids=["temperature", "platt"])
def test_folding_into_the_head_reproduces_the_calibrated_probs(build, calibrator):
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        head = model.get_submodule(head_name(model))
        head.weight.mul_(30)  # margins of a few units, not ~0
        head.bias.copy_(torch.tensor([1.5, -1.0]))  # heads start with a zero bias, which would hide a bias bug
        logits = model(images)
        expected = calibrator.probs(logits)
        assert (raw(logits) - expected).abs().max() > 0.05  # the calibration is visible, so the check can fail
        assert fold_into_head(model, calibrator) is model
        folded_model_logits = model(images)
        folded = folded_model_logits.double().softmax(dim=1)[:, 1]
    assert torch.allclose(folded, expected, atol=1e-5, rtol=0)
    # the folded model's logits from the logits before (what the calibrate stage hands on instead of a second pass)
    assert torch.allclose(folded_logits(calibrator, logits), folded_model_logits, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(folded_model_logits, logits, atol=1e-2)


def test_folding_refuses_isotonic_and_heads_without_two_outputs():
    logits, labels = synthetic(n=500)
    isotonic = fit_calibrator("isotonic", logits, labels)
    with pytest.raises(ValueError, match="isotonic cannot be folded; the table travels in the manifest"):
        fold_into_head(tiny_timm(), isotonic)
    assert folded_logits(isotonic, logits) is logits  # the model keeps its head, and so its logits
    with pytest.raises(ValueError, match="nn.Linear with 2 outputs"):
        fold_into_head(tiny_timm(num_classes=3), TemperatureScaling(2.0))


def test_fit_calibrator_rejects_bad_methods_and_inputs():
    logits, labels = synthetic(n=100)
    with pytest.raises(ValueError, match=r"method='histogram'; expected one of \['temperature', 'platt', 'isotonic'"):
        fit_calibrator("histogram", logits, labels)
    with pytest.raises(ValueError, match="labels hold only class 1; calibration needs both"):
        fit_calibrator("platt", logits, torch.ones(100, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N = 100"):
        fit_calibrator("temperature", logits, labels[:99])
    with pytest.raises(ValueError, match=r"logits must be a float tensor \[N, 2\]"):
        fit_calibrator("temperature", torch.randn(100, 3), labels)


def test_calibration_report_matches_a_hand_computed_case():
    # confidence max(p, 1-p) = 0.9, 0.75, 0.7, 0.5, 0.52 -> 15 bins: 13, 11, 10, 7, 7; correct = 1, 0, 1, 1, 1
    # (p == 0.5 predicts None, so with label 0 it is right). Gaps: 0.1, 0.75, 0.3 and, for bin 7, |1 - 0.51| twice.
    probs = torch.tensor([0.9, 0.25, 0.3, 0.5, 0.52])
    labels = torch.tensor([1, 1, 0, 0, 1])
    report = calibration_report(probs, labels)
    assert set(report) == {"ece", "ece_binary", "ece_adaptive", "brier", "nll"}
    assert all(type(v) is float for v in report.values())
    assert report["ece"] == pytest.approx((0.1 + 0.75 + 0.3 + 2 * 0.49) / 5)  # 0.234 if the tie counted as wrong
    assert report["ece_adaptive"] == pytest.approx(report["ece"])  # 15 equal-mass bins of 5 samples: one each
    # P(roadwork) bins: 13 (y 1), 3 (y 1), 4 (y 0), 7 (y 0 and 1, mean p 0.51)
    assert report["ece_binary"] == pytest.approx((0.1 + 0.75 + 0.3 + 2 * 0.01) / 5)
    assert report["brier"] == pytest.approx((0.01 + 0.5625 + 0.09 + 0.25 + 0.2304) / 5)
    assert report["nll"] == pytest.approx(-sum(map(math.log, [0.9, 0.25, 0.7, 0.5, 0.52])) / 5)
    # equal mass with 2 bins: sorted confidences {0.5, 0.52, 0.7} all right, {0.75, 0.9} half right
    two = calibration_report(probs, labels, n_bins=2)["ece_adaptive"]
    assert two == pytest.approx((3 * abs(1 - 1.72 / 3) + 2 * abs(0.5 - 0.825)) / 5)


def test_top_label_ece_agrees_with_torchmetrics_multiclass_away_from_ties():
    logits, labels = synthetic(n=5000, scale=3.0)
    probs = raw(logits)
    multiclass = multiclass_calibration_error(torch.stack([1 - probs, probs], dim=1), labels, num_classes=2)
    assert calibration_report(probs, labels)["ece"] == pytest.approx(float(multiclass), abs=1e-6)


def test_plots_write_png_files(tmp_path):
    logits, labels = synthetic(n=400, scale=4.0)
    after = fit_calibrator("temperature", logits, labels).probs(logits)
    diagram = save_figure(reliability_diagram(labels, {"before": raw(logits), "after": after}, title="val"),
                          tmp_path / "plots" / "reliability.png")
    preds = (after > 0.5).long()
    matrices = save_figure(confusion_matrices({0: (preds, labels), 3: (1 - preds, labels)}), tmp_path / "confusion.png")
    for path in (diagram, matrices):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_level_bars_draw_the_values_given_with_the_mcc_interval():
    from train.calibration.plots import level_metrics

    rows = {"L0": {"mcc": 0.4, "mcc_low": 0.3, "mcc_high": 0.55, "acc": 0.7}, "L1": {"mcc": -0.1, "acc": 0.45},
            "mean": {"mcc": 0.15, "acc": 0.575}}
    ax = level_metrics(rows, metrics=("mcc", "acc", "f1")).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mcc", "acc"]  # f1: in no row
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert heights == [0.4, 0.7, -0.1, 0.45]  # per level, the mean row left out
    from matplotlib.container import BarContainer

    l0, l1 = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert tuple(l0.errorbar.lines[2][0].get_segments()[0][:, 1].round(6)) == (0.3, 0.55)  # L0's MCC interval
    assert l1.errorbar is None  # L1 has no interval
def test_temperature_is_bounded_when_the_logits_carry_no_signal():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 2, generator=g)
    labels = torch.randint(0, 2, (2000,), generator=g)
    cal = TemperatureScaling().fit(logits, labels)
    assert cal.temperature == TEMPERATURE_RANGE[1]  # unbounded, NLL drives T to infinity
    assert ((cal.probs(logits) > 0.5) == (logits[:, 1] > logits[:, 0])).all()  # decisions survive
