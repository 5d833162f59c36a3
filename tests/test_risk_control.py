"""Risk control: p-values by hand, Learn-then-Test by hand and under resampling, AURC and the routing curve."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from train.calibration.risk_control import (MAX_CANDIDATES, aurc, binomial_pvalue, default_candidates,
                                            evaluate_threshold, hoeffding_bentkus_pvalue, one_per_group,
                                            resampled_violations, risk_coverage_curve, routing_curve,
                                            select_threshold)


def binom_cdf(k: int, n: int, p: float) -> float:
    """Reference P(Binomial(n, p) <= k) from the definition."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


# ---------------------------------------------------------------------------------------------------- p-values

@pytest.mark.parametrize("errors, n, alpha, expected", [
    (0, 10, 0.1, 0.9 ** 10),
    (1, 6, 0.5, 7 / 64),
    (2, 8, 0.5, 37 / 256),
    (3, 20, 0.05, binom_cdf(3, 20, 0.05)),
    (10, 10, 0.3, 1.0),
    (0, 0, 0.1, 1.0),
])
def test_binomial_pvalue_by_hand(errors, n, alpha, expected):
    assert binomial_pvalue(errors, n, alpha) == pytest.approx(expected, rel=1e-12)


def test_binomial_pvalue_grows_with_errors_and_falls_with_n():
    by_errors = [binomial_pvalue(k, 50, 0.1) for k in range(51)]
    assert np.all(np.diff(by_errors[:20]) > 0) and np.all(np.diff(by_errors) >= 0)  # the cdf flattens near 1
    by_n = [binomial_pvalue(0, n, 0.1) for n in range(1, 40)]
    assert np.all(np.diff(by_n) < 0)


def test_hoeffding_bentkus_by_hand():
    # risk_hat = 0: Hoeffding gives exp(-n log(1 / (1 - alpha))) = (1 - alpha)^n, below Bentkus' e (1 - alpha)^n.
    assert hoeffding_bentkus_pvalue(0.0, 10, 0.1) == pytest.approx(0.9 ** 10, rel=1e-12)
    # risk_hat = alpha: Hoeffding is exp(0) = 1 and Bentkus e * P(Bin <= 1) = 2.0 > 1: clipped to 1.
    assert hoeffding_bentkus_pvalue(0.1, 10, 0.1) == 1.0
    # n = 1000, risk_hat = 0.05, alpha = 0.1: the Bentkus term e * P(Bin(1000, 0.1) <= 50) is the smaller.
    kl = 0.05 * math.log(0.05 / 0.1) + 0.95 * math.log(0.95 / 0.9)
    bentkus = math.e * binom_cdf(50, 1000, 0.1)
    assert bentkus < math.exp(-1000 * kl)
    assert hoeffding_bentkus_pvalue(0.05, 1000, 0.1) == pytest.approx(bentkus, rel=1e-9)
    # a fractional loss total: Bentkus takes the ceiling of n * risk_hat (2.5 -> 3).
    assert hoeffding_bentkus_pvalue(0.025, 100, 0.1) == pytest.approx(
        min(math.exp(-100 * (0.025 * math.log(0.25) + 0.975 * math.log(0.975 / 0.9))), math.e * binom_cdf(3, 100, 0.1)))
    assert hoeffding_bentkus_pvalue(0.0, 0, 0.1) == 1.0


def test_hoeffding_bentkus_is_more_conservative_than_binomial_on_0_1_losses():
    for n in (5, 40, 300):
        for errors in range(0, n + 1, max(1, n // 10)):
            assert hoeffding_bentkus_pvalue(errors / n, n, 0.1) >= binomial_pvalue(errors, n, 0.1) * (1 - 1e-12)


# -------------------------------------------------------------------------------------- Learn-then-Test by hand

# Ten samples, confidence 1.0, 0.9, ..., 0.1; accepting at t = confidence[k] takes the first k + 1. alpha = 0.5 and
# delta = 0.1: zero errors reject only with n >= 4 (0.5^4 = 0.0625), so t = 1.0, 0.9, 0.8 are skipped. Then:
#   t=0.7: n=4, 0 errors, p = 1/16  -> reject;   t=0.6: n=5, 0 errors, p = 1/32 -> reject;
#   t=0.5: n=6, 1 error,  p = 7/64 = 0.109 > 0.1 -> stop.   The choice is 0.6.
# t=0.4 (n=7, 1 error, p = 8/128 = 0.0625) would pass on its own, but the walk has stopped: it is never tested.
HAND_CONFIDENCE = np.round(np.linspace(1.0, 0.1, 10), 10)
HAND_ERRORS = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 1])


def test_select_threshold_by_hand():
    choice = select_threshold(HAND_CONFIDENCE, HAND_ERRORS, alpha=0.5, delta=0.1)
    assert choice.threshold == pytest.approx(0.6)
    assert (choice.n_accepted, choice.acceptance_rate, choice.accepted_risk) == (5, 0.5, 0.0)
    assert choice.p_value == pytest.approx(1 / 32)
    assert choice.candidates_tested == 3  # 0.7, 0.6 rejected; 0.5 not
    assert choice.method == "learn_then_test/binomial" and choice.n_calibration == 10
    np.testing.assert_array_equal(choice.accepts(HAND_CONFIDENCE), HAND_CONFIDENCE >= 0.6)


def test_select_threshold_by_hand_with_min_accepted_and_a_fixed_grid():
    # Starting at n >= 7: t=0.4 (1 error in 7, p = 1/16) rejected; t=0.3 (2 in 8, p = 37/256 = 0.145) stops.
    later = select_threshold(HAND_CONFIDENCE, HAND_ERRORS, 0.5, 0.1, min_accepted=7)
    assert later.threshold == pytest.approx(0.4) and later.candidates_tested == 2
    assert later.accepted_risk == pytest.approx(1 / 7)
    # Grid 0.75 (n=3, untestable), 0.55 (n=5, p = 1/32), 0.35 (n=7, p = 1/16): every testable one rejected.
    grid = select_threshold(HAND_CONFIDENCE, HAND_ERRORS, 0.5, 0.1, candidates=[0.35, 0.75, 0.55])
    assert grid.threshold == 0.35 and grid.n_accepted == 7 and grid.candidates_tested == 2


def test_select_threshold_accepts_tensors_and_reports_a_json_guarantee():
    choice = select_threshold(torch.tensor(HAND_CONFIDENCE, dtype=torch.float64), torch.tensor(HAND_ERRORS).bool(),
                              alpha=0.5, delta=0.1)
    assert choice.threshold == pytest.approx(0.6)
    guarantee = json.loads(json.dumps(choice.guarantee()))
    assert guarantee["method"] == "learn_then_test/binomial"
    assert (guarantee["alpha"], guarantee["delta"], guarantee["n_calibration"]) == (0.5, 0.1, 10)
    assert "1-delta = 0.9" in guarantee["statement"] and "<= alpha = 0.5" in guarantee["statement"]
    json.dumps(choice.as_dict())


def test_nothing_rejected_means_no_threshold():
    choice = select_threshold(HAND_CONFIDENCE, np.ones(10), alpha=0.5, delta=0.1)
    assert choice.threshold is None and choice.n_accepted == 0 and choice.accepted_risk is None
    assert choice.p_value == 1.0 and choice.candidates_tested == 1  # t=0.7: 4 errors in 4, P(Bin(4, 0.5) <= 4) = 1
    assert "accepts nothing" in choice.note and "accepts nothing" in choice.guarantee()["statement"]
    assert not choice.accepts(HAND_CONFIDENCE).any()
    too_few = select_threshold(HAND_CONFIDENCE[:3], np.zeros(3), alpha=0.5, delta=0.1)
    assert too_few.threshold is None and too_few.p_value is None and "enough samples" in too_few.note


def test_hoeffding_bentkus_takes_fractional_losses():
    losses = np.where(HAND_ERRORS == 1, 0.5, 0.0)
    choice = select_threshold(np.tile(HAND_CONFIDENCE, 20), np.tile(losses, 20), alpha=0.5, delta=0.1,
                              method="hoeffding_bentkus")
    assert choice.method == "learn_then_test/hoeffding_bentkus"
    assert choice.threshold is not None and choice.accepted_risk <= 0.5


def test_default_candidates_are_observed_values_highest_first():
    values = np.random.default_rng(0).uniform(size=5000)
    grid = default_candidates(values)
    assert 900 <= len(grid) <= MAX_CANDIDATES and np.all(np.diff(grid) < 0)
    assert np.isin(grid, values).all() and grid[0] == values.max() and grid[-1] == values.min()
    np.testing.assert_array_equal(default_candidates([0.2, 0.9, 0.2, 0.5]), [0.9, 0.5, 0.2])


def test_evaluate_threshold():
    assert evaluate_threshold(HAND_CONFIDENCE, HAND_ERRORS, 0.45) == {
        "threshold": 0.45, "n": 10, "n_accepted": 6, "acceptance_rate": 0.6, "accepted_risk": pytest.approx(1 / 6)}
    assert evaluate_threshold(HAND_CONFIDENCE, HAND_ERRORS, 2.0)["accepted_risk"] is None
    assert evaluate_threshold(HAND_CONFIDENCE, HAND_ERRORS, None)["n_accepted"] == 0


# ------------------------------------------------------------------------------ the guarantee under resampling

# Population: confidence c ~ U(0.5, 1), P(error | c) = 2 (1 - c)^2 (0.5 at c = 0.5, 0 at c = 1), so the risk among
# accepted samples is R(t) = E[2 (1 - c)^2 | c >= t] = 2 (1 - t)^2 / 3; R(t) <= 0.05 iff t >= 1 - sqrt(0.075),
# and the oracle threshold accepts 2 sqrt(0.075) = 54.8% of samples.
ALPHA, DELTA, N_CALIB, TRIALS = 0.05, 0.1, 2000, 300
ORACLE_ACCEPTANCE = 2 * math.sqrt(0.075)


def error_probability(c):
    return 2 * (1 - c) ** 2


def true_risk(t: float) -> float:
    t = min(max(t, 0.5), 1.0)
    return 2 * (1 - t) ** 2 / 3


def test_true_risk_formula_matches_integration():
    for t in (0.5, 0.7, 0.93):
        integral, _ = quad(error_probability, t, 1.0)
        assert true_risk(t) == pytest.approx(integral / (1 - t))


def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    confidence = rng.uniform(0.5, 1.0, N_CALIB)
    return confidence, (rng.uniform(size=N_CALIB) < error_probability(confidence)).astype(float)


def naive_threshold(confidence: np.ndarray, errors: np.ndarray, alpha: float) -> float:
    """The lowest t whose EMPIRICAL risk among accepted samples is <= alpha (no guarantee)."""
    order = np.argsort(-confidence)
    risk = np.cumsum(errors[order]) / np.arange(1, len(order) + 1)
    return float(confidence[order][np.flatnonzero(risk <= alpha)[-1]])


def acceptance(t: float) -> float:
    return min(max(2 * (1 - t), 0.0), 1.0)


@pytest.mark.parametrize("method, min_acceptance", [("binomial", 0.45), ("hoeffding_bentkus", 0.42)])
def test_learn_then_test_holds_its_guarantee_under_resampling(method, min_acceptance):
    rng = np.random.default_rng(2024)
    choices = [select_threshold(*draw(rng), ALPHA, DELTA, method=method).threshold for _ in range(TRIALS)]
    chosen = [t for t in choices if t is not None]
    risks = np.array([true_risk(t) for t in chosen])
    violations = (risks > ALPHA).sum() / TRIALS  # no threshold accepts nothing: no violation
    assert violations <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / TRIALS)
    # ... and not by being trivially conservative: it accepts most of what the oracle does, at a risk near alpha.
    assert len(chosen) >= 0.95 * TRIALS
    rates = np.array([acceptance(t) for t in chosen])
    assert min_acceptance <= rates.mean() <= ORACLE_ACCEPTANCE
    assert 0.03 <= risks.mean() <= ALPHA


def test_naive_empirical_threshold_violates_far_more_often():
    rng = np.random.default_rng(2024)
    violations = np.mean([true_risk(naive_threshold(*draw(rng), ALPHA)) > ALPHA for _ in range(TRIALS)])
    assert violations > 3 * DELTA


# ------------------------------------------------------------------------------------------- AURC and curves

def test_aurc_by_hand():
    # most confident first: errors 0, 1, 0, 1 -> selective risks 0, 1/2, 1/3, 1/2; their mean is 1/3.
    score, errors = [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]
    coverage, risk = risk_coverage_curve(score, errors)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])
    assert aurc(score, errors) == pytest.approx(1 / 3)
    assert aurc(score[::-1], errors[::-1]) == pytest.approx(1 / 3)  # input order is irrelevant


def test_aurc_perfect_ordering_is_the_known_minimum():
    errors = np.random.default_rng(1).uniform(size=400) < 0.2
    n, m = len(errors), int(errors.sum())
    minimum = sum((k - (n - m)) / k for k in range(n - m + 1, n + 1)) / n  # errors all last
    assert aurc(errors.astype(float), errors) == pytest.approx(minimum)
    worst = aurc(-errors.astype(float), errors)
    random = aurc(np.random.default_rng(2).uniform(size=n), errors)
    assert minimum < random < worst


def test_tied_scores_count_as_random_order():
    errors = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    _, risk = risk_coverage_curve(np.zeros(8), errors)
    np.testing.assert_allclose(risk, 0.25)  # one uninformative score: the mean error at every coverage
    assert aurc(np.zeros(8), errors) == pytest.approx(0.25)
    # a tie group [1, 0] after a confident correct sample: expected risks 0, (0 + 1/2) / 2, 1/3
    np.testing.assert_allclose(risk_coverage_curve([0.0, 1.0, 1.0], [0, 1, 0])[1], [0, 0.25, 1 / 3])


def test_routing_curve_endpoints_and_values():
    curve = routing_curve([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    np.testing.assert_allclose(curve.fraction_routed, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.kept_risk[:-1], [1 / 2, 1 / 3, 1 / 2, 0])
    assert np.isnan(curve.kept_risk[-1])
    np.testing.assert_allclose(curve.residual_error, [1 / 2, 1 / 4, 1 / 4, 0, 0])


def test_routing_curve_is_the_risk_coverage_curve_reversed():
    rng = np.random.default_rng(3)
    score, errors = rng.uniform(size=200), rng.uniform(size=200) < 0.3
    _, risk = risk_coverage_curve(score, errors)
    curve = routing_curve(score, errors)
    np.testing.assert_allclose(curve.kept_risk[:-1], risk[::-1])
    # a perfect router sends exactly the errors up: nothing wrong is left once that fraction is routed
    perfect = routing_curve(errors.astype(float), errors)
    assert perfect.residual_error[int(errors.sum())] == 0 and perfect.residual_error[0] == errors.mean()


# ------------------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha must lie strictly between 0 and 1"),
    ({"alpha": 1.0}, "alpha must lie"),
    ({"alpha": float("nan")}, "alpha must lie"),
    ({"delta": 1.5}, "delta must lie"),
    ({"confidence": [0.9, 0.8]}, "differ in length: 2 vs 3"),
    ({"confidence": [], "errors": []}, "confidence is empty"),
    ({"confidence": [0.9, float("nan"), 0.7]}, "confidence has 1 NaN"),
    ({"errors": [0, 2, 1]}, r"errors must lie in \[0, 1\]"),
    ({"errors": [0, -1, 1]}, r"errors must lie in \[0, 1\]"),
    ({"errors": [0, 0.5, 1]}, "must be 0 or 1 for the binomial method"),
    ({"confidence": [[0.9, 0.8, 0.7]]}, "confidence must be 1-D"),
    ({"method": "bonferroni"}, "unknown method 'bonferroni'"),
    ({"min_accepted": 0}, "min_accepted must be an integer >= 1"),
    ({"candidates": [0.5, float("inf")]}, "candidates has 1 NaN or infinite"),
])
def test_select_threshold_rejects_bad_input(kwargs, message):
    args = {"confidence": [0.9, 0.8, 0.7], "errors": [0, 1, 0], "alpha": 0.1, "delta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        select_threshold(**args)


def test_pvalues_and_curves_reject_bad_input():
    with pytest.raises(ValueError, match="0 <= errors <= n"):
        binomial_pvalue(5, 4, 0.1)
    with pytest.raises(ValueError, match="integers"):
        binomial_pvalue(1.5, 4, 0.1)
    with pytest.raises(ValueError, match="alpha must lie"):
        binomial_pvalue(0, 4, 1.2)
    with pytest.raises(ValueError, match="0 <= risk_hat <= 1"):
        hoeffding_bentkus_pvalue(1.5, 10, 0.1)
    with pytest.raises(ValueError, match="differ in length"):
        aurc([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="score is empty"):
        routing_curve([], [])


def test_one_per_group_keeps_one_random_row_of_each_group():
    groups = np.array([5, 5, 5, 2, 2, 9])
    rows = one_per_group(groups, seed=0)
    assert sorted(groups[rows].tolist()) == [2, 5, 9]
    picks = {tuple(one_per_group(groups, seed=s)) for s in range(30)}
    assert len(picks) > 1  # random within a group, not always the first row


def test_resampled_violations_on_correlated_rows():
    """Four rows per image that share the image's error: one row per image keeps the guarantee; the pool's risk
    at the chosen threshold is the reference."""
    rng = np.random.default_rng(0)
    images = 3000
    conf_img = rng.uniform(0.5, 1.0, images)
    err_img = rng.random(images) < 2 * (1 - conf_img) ** 2
    groups = np.repeat(np.arange(images), 4)
    confidence = np.repeat(conf_img, 4) + rng.normal(0, 0.01, 4 * images)
    errors = np.repeat(err_img, 4).astype(float)
    check = resampled_violations(confidence, errors, groups, 1000, alpha=0.05, delta=0.1, resamples=60,
                                 min_accepted=100)  # the walk starts where 100 are accepted: no stop at the top
    assert check["holds"] and check["violation_frequency"] <= check["allowed"]
    assert check["mean_acceptance_rate"] > 0.3 and check["none_chosen"] <= 6
    with pytest.raises(ValueError, match="n_groups"):
        resampled_violations(confidence, errors, groups, images + 1, 0.05, 0.1, 5)
