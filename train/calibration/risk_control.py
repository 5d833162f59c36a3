"""Risk-controlled thresholds for the cascade tiers (Learn-then-Test, Angelopoulos et al. 2021; as CALM uses it).

A tier ACCEPTS a sample when its confidence is at least the threshold ``t``; otherwise it passes the sample on. The
risk controlled is the conditional (selective) risk R(t) = P(error | confidence >= t), the error rate among accepted
samples. Each candidate ``t`` is a null hypothesis H0_t: R(t) > alpha. Given the number accepted n_t, the accepted
losses are iid with mean R(t), so a binomial (0/1 losses) or Hoeffding-Bentkus ([0, 1] losses) tail bound on
(losses among accepted, n_t) is a valid p-value. The candidates are tested in a fixed sequence from the highest ``t``
down, rejecting while p_t <= delta; the lowest rejected ``t`` is chosen. This controls the family-wise error at delta:
with probability >= 1 - delta over the calibration draw, R(chosen t) <= alpha.

Also here: the risk-coverage curve and its area (AURC) and the routing curve, for scoring uncertainty / router scores.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import xlogy
from scipy.stats import binom

MAX_CANDIDATES = 1000  # default grid: the distinct confidences, thinned to this many quantiles
_FLOAT_SLACK = 1e-9  # n * (k / n) may land a hair above k; the Bentkus bound takes its ceiling


# ---------------------------------------------------------------------------------------------------------- p-values

def _binomial_p(errors: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """P(Binomial(n, alpha) <= errors), elementwise; 1 where n == 0."""
    return np.where(n > 0, binom.cdf(np.rint(errors), n, alpha), 1.0)


def _hoeffding_bentkus_p(errors: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """min(Hoeffding, Bentkus) p-value of H0 "mean > alpha" from the loss total ``errors`` of ``n`` [0, 1] losses."""
    safe_n = np.maximum(n, 1)
    risk = np.minimum(errors / safe_n, alpha)
    kl = xlogy(risk, risk / alpha) + xlogy(1 - risk, (1 - risk) / (1 - alpha))  # h1(risk ^ alpha, alpha) of LTT
    hoeffding = np.exp(-n * kl)
    bentkus = math.e * binom.cdf(np.ceil(errors - _FLOAT_SLACK), n, alpha)
    return np.where(n > 0, np.minimum(np.minimum(hoeffding, bentkus), 1.0), 1.0)


P_VALUES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "binomial": _binomial_p,  # 0/1 losses: exact
    "hoeffding_bentkus": _hoeffding_bentkus_p,  # losses in [0, 1]
}


def binomial_pvalue(errors: int, n: int, alpha: float) -> float:
    """Valid p-value of H0 "risk > alpha" from ``errors`` losses in ``n`` iid Bernoulli trials.

    It is P(Binomial(n, alpha) <= errors); ``n == 0`` gives 1.0 (no evidence).
    """
    _check_level(alpha, "alpha")
    if not (float(errors).is_integer() and float(n).is_integer() and 0 <= errors <= n):
        raise ValueError(f"binomial_pvalue needs integers 0 <= errors <= n, got errors={errors}, n={n}")
    return float(_binomial_p(np.asarray(errors, float), np.asarray(n), alpha))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Valid p-value of H0 "risk > alpha" from the mean ``risk_hat`` of ``n`` iid losses in [0, 1] (LTT's HB bound)."""
    _check_level(alpha, "alpha")
    if not (0 <= risk_hat <= 1 and float(n).is_integer() and n >= 0):
        raise ValueError(f"hoeffding_bentkus_pvalue needs 0 <= risk_hat <= 1 and an integer n >= 0, "
                         f"got risk_hat={risk_hat}, n={n}")
    return float(_hoeffding_bentkus_p(np.asarray(risk_hat * n, float), np.asarray(n), alpha))


# -------------------------------------------------------------------------------------------------- the threshold

@dataclass(frozen=True)
class ThresholdChoice:
    """A tier's chosen threshold with its guarantee. ``threshold`` None: nothing passed, the tier accepts nothing.

    ``p_value`` is the chosen threshold's p-value or, when none was chosen, that of the candidate that stopped the walk
    (None when no candidate accepted enough samples to be tested). ``accepted_risk`` is empirical, on the calibration
    split (None when nothing is accepted).
    """

    threshold: float | None
    alpha: float
    delta: float | None
    method: str
    n_calibration: int
    n_accepted: int
    acceptance_rate: float
    accepted_risk: float | None
    candidates_tested: int
    p_value: float | None = None
    note: str = ""

    def accepts(self, confidence) -> np.ndarray:
        """Boolean mask: confidence >= threshold (all False when there is no threshold)."""
        confidence = _as_1d(confidence, "confidence", allow_empty=True)
        if self.threshold is None:
            return np.zeros(confidence.shape, dtype=bool)
        return confidence >= self.threshold

    def guarantee(self) -> dict:
        """What the threshold promises, JSON-serialisable, for the export manifest."""
        return {"method": self.method, "alpha": self.alpha, "delta": self.delta, "n_calibration": self.n_calibration,
                "threshold": self.threshold, "statement": self._statement()}

    def as_dict(self) -> dict:
        """All fields as plain JSON values."""
        return asdict(self)

    def _statement(self) -> str:
        if self.method == CRC:
            if self.threshold is None:
                return "no threshold keeps the bound: the tier accepts nothing"
            return (f"in expectation over the draw of the {self.n_calibration} calibration samples and a new sample, "
                    f"P(the sample is accepted (confidence >= {self.threshold:g}) and wrong) <= alpha = {self.alpha:g} "
                    "(conformal risk control: a joint, not a conditional, error rate)")
        if self.threshold is None:
            return (f"no threshold passed the test at delta={self.delta:g}: the tier accepts nothing, so the error "
                    f"rate among its accepted samples is vacuously <= alpha={self.alpha:g}")
        return (f"with probability >= 1-delta = {1 - self.delta:g} over the draw of the {self.n_calibration} "
                f"calibration samples, the error rate among accepted samples (confidence >= {self.threshold:g}) "
                f"is <= alpha = {self.alpha:g}")


def select_threshold(confidence, errors, alpha: float, delta: float, candidates=None, method: str = "binomial",
                     min_accepted: int = 1) -> ThresholdChoice:
    """Learn-then-Test: walk the candidates from the highest down, rejecting H0 "R(t) > alpha" while p_t <= delta.

    Returns the lowest rejected ``t`` (the one accepting most samples), or no threshold when the first test fails.

    ``confidence``: a tier's calibrated confidence per calibration sample; ``errors``: the loss of accepting it (0/1 for
    ``method="binomial"``, [0, 1] for ``"hoeffding_bentkus"``). ``candidates`` default to the distinct confidences
    (at most ``MAX_CANDIDATES`` quantiles); for the guarantee to hold exactly, pass a grid fixed before seeing the data.
    The walk starts at the highest candidate that accepts at least ``min_accepted`` samples and enough that zero
    errors could reject (e.g. 22 for binomial, alpha=0.1, delta=0.1); higher ones could never be rejected. As the
    walk stops at its first failure, one error among the first tested samples can leave the tier with nothing; a
    larger ``min_accepted`` (fixed in advance) starts the walk where a single error matters less.
    """
    if method not in P_VALUES:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(P_VALUES)}")
    confidence, errors = _check_samples(confidence, errors, binary=method == "binomial")
    _check_level(alpha, "alpha")
    _check_level(delta, "delta")
    if int(min_accepted) != min_accepted or min_accepted < 1:
        raise ValueError(f"min_accepted must be an integer >= 1, got {min_accepted}")
    grid = default_candidates(confidence) if candidates is None else _candidate_grid(candidates)
    n_t, loss_t = _accepted_totals(confidence, errors, grid)
    return ltt_from_counts(grid, n_t, loss_t, len(confidence), alpha, delta, method, min_accepted)


def ltt_from_counts(grid, n_accepted, loss_total, n_calibration: int, alpha: float, delta: float,
                    method: str = "binomial", min_accepted: int = 1) -> ThresholdChoice:
    """Learn-then-Test from per-candidate counts: ``grid`` highest first, ``n_accepted[i]`` samples accepted at
    ``grid[i]`` (non-decreasing) with loss total ``loss_total[i]``. For acceptance rules that are not one
    confidence per sample (e.g. stop a search at the first step scoring >= t); :func:`select_threshold` calls it.
    """
    if method not in P_VALUES:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(P_VALUES)}")
    grid, n_t, loss_t = _counts(grid, n_accepted, loss_total, "ltt_from_counts")
    p = P_VALUES[method](loss_t, n_t, alpha)
    floor = P_VALUES[method](np.zeros_like(loss_t), n_t, alpha)  # the smallest p-value n_t samples can give
    start, n_rejected = _fixed_sequence(p, (n_t >= min_accepted) & (floor <= delta), delta)
    common = {"alpha": alpha, "delta": delta, "method": f"learn_then_test/{method}", "n_calibration": n_calibration,
              "candidates_tested": min(n_rejected + 1, len(grid) - start)}
    if n_rejected == 0:
        if start == len(grid):
            return ThresholdChoice(None, **common, **_NOTHING, note="no candidate accepts enough samples to be "
                                   "tested: the tier accepts nothing")
        return ThresholdChoice(None, **common, **_NOTHING, p_value=float(p[start]), note=(
            f"the highest testable threshold was not rejected (p={p[start]:.3g} > delta={delta:g}): the tier accepts "
            "nothing"))
    chosen = start + n_rejected - 1
    n_acc = int(n_t[chosen])
    return ThresholdChoice(float(grid[chosen]), **common, n_accepted=n_acc, acceptance_rate=n_acc / n_calibration,
                           accepted_risk=float(loss_t[chosen] / n_acc), p_value=float(p[chosen]))


_NOTHING = {"n_accepted": 0, "acceptance_rate": 0.0, "accepted_risk": None}
CRC = "conformal_risk_control"


def crc_from_counts(grid, n_accepted, loss_total, n_calibration: int, alpha: float) -> ThresholdChoice:
    """Conformal risk control (Angelopoulos et al. 2022) of the loss ``error x accepted``, which only falls as the
    threshold rises: the lowest ``t`` of ``grid`` (highest first) with (n R(t) + 1) / (n + 1) <= alpha, R(t) the
    mean loss over all ``n`` samples. Then E[loss of a new sample] <= alpha: P(accepted and wrong) <= alpha."""
    _check_level(alpha, "alpha")
    grid, n_t, loss_t = _counts(grid, n_accepted, loss_total, "crc_from_counts")
    ok = (loss_t + 1) / (n_calibration + 1) <= alpha
    passed = len(ok) if ok.all() else int(np.argmin(ok))  # the bound only loosens as t falls: a prefix passes
    common = {"alpha": alpha, "delta": None, "method": CRC, "n_calibration": n_calibration,
              "candidates_tested": min(passed + 1, len(grid))}
    if passed == 0:
        return ThresholdChoice(None, **common, **_NOTHING, note="even the strictest threshold breaks the bound")
    chosen = passed - 1
    n_acc = int(n_t[chosen])
    return ThresholdChoice(float(grid[chosen]), **common, n_accepted=n_acc, acceptance_rate=n_acc / n_calibration,
                           accepted_risk=float(loss_t[chosen] / n_acc) if n_acc else None)


def crc_threshold(confidence, errors, alpha: float, candidates=None) -> ThresholdChoice:
    """:func:`crc_from_counts` from per-sample confidences and losses in [0, 1]."""
    confidence, errors = _check_samples(confidence, errors)
    grid = default_candidates(confidence) if candidates is None else _candidate_grid(candidates)
    n_t, loss_t = _accepted_totals(confidence, errors, grid)
    return crc_from_counts(grid, n_t, loss_t, len(confidence), alpha)


def _counts(grid, n_accepted, loss_total, caller: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-candidate counts as float arrays, checked: equal lengths, grid highest first, counts non-decreasing."""
    grid, n_t, loss_t = (np.asarray(a, dtype=float) for a in (grid, n_accepted, loss_total))
    if not (len(grid) == len(n_t) == len(loss_t)) or np.any(np.diff(grid) > 0) or np.any(np.diff(n_t) < 0):
        raise ValueError(f"{caller} needs equal-length grid (highest first) and non-decreasing counts")
    return grid, n_t, loss_t


def _fixed_sequence(p: np.ndarray, testable: np.ndarray, delta: float) -> tuple[int, int]:
    """Where the walk starts (the first testable candidate) and how many it rejects before its first failure.

    ``testable`` is a suffix of the candidates, highest first: the count accepted only grows as ``t`` falls.
    """
    indices = np.flatnonzero(testable)
    start = int(indices[0]) if len(indices) else len(p)
    rejected = p[start:] <= delta
    return start, len(rejected) if rejected.all() else int(np.argmin(rejected))


def default_candidates(confidence, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """The distinct confidence values, highest first; the ``max_candidates`` sample quantiles when there are more."""
    confidence = _as_1d(confidence, "confidence")
    values = np.unique(confidence)
    if len(values) > max_candidates:  # quantiles of the samples: each step accepts about as many more
        values = np.unique(np.quantile(confidence, np.linspace(0, 1, max_candidates), method="inverted_cdf"))
    return values[::-1]


def evaluate_threshold(confidence, errors, threshold: float | None) -> dict:
    """Acceptance rate, number accepted and error rate among accepted (None when nothing is) of ``threshold``."""
    confidence, errors = _check_samples(confidence, errors)
    accepted = np.zeros(len(confidence), bool) if threshold is None else confidence >= threshold
    n_acc = int(accepted.sum())
    return {"threshold": threshold, "n": len(confidence), "n_accepted": n_acc,
            "acceptance_rate": n_acc / len(confidence),
            "accepted_risk": float(errors[accepted].mean()) if n_acc else None}


def _accepted_totals(confidence: np.ndarray, errors: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate t: how many samples have confidence >= t and their loss total."""
    order = np.argsort(-confidence, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(errors[order])])
    n_t = np.searchsorted(-confidence[order], -grid, side="right")
    return n_t, cumulative[n_t]


def _candidate_grid(candidates) -> np.ndarray:
    return np.unique(_as_1d(candidates, "candidates"))[::-1]


# ---------------------------------------------------------------------------------------------- curves and AURC

class RoutingCurve(NamedTuple):
    """For each fraction routed up (highest scores first), what is left among the samples NOT routed.

    ``kept_risk``: their error rate (NaN at fraction 1, nothing kept). ``residual_error``: their errors over ALL
    samples, i.e. the overall error if the deeper tier got every routed sample right.
    """

    fraction_routed: np.ndarray
    kept_risk: np.ndarray
    residual_error: np.ndarray


def risk_coverage_curve(score, errors) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/n and selective risk (mean error of the k lowest-``score`` samples), k = 1..n.

    ``score`` is an uncertainty: low = confident (e.g. 1 - confidence, or a router's P(wrong)). Tied scores count as
    if in random order (their expected risk), so the curve does not depend on the input order.
    """
    cumulative = _cumulative_errors(score, errors)
    k = np.arange(1, len(cumulative))
    return k / k[-1], cumulative[1:] / k


def aurc(score, errors) -> float:
    """Area under the risk-coverage curve: the mean of the selective risks over k = 1..n (lower is better)."""
    return float(risk_coverage_curve(score, errors)[1].mean())


def routing_curve(score, errors) -> RoutingCurve:
    """Routing the k highest-``score`` samples up, k = 0..n: fraction k/n and what is left among the rest."""
    cumulative = _cumulative_errors(score, errors)
    n = len(cumulative) - 1
    kept = np.arange(n, -1, -1)
    kept_errors = cumulative[kept]
    with np.errstate(invalid="ignore", divide="ignore"):
        kept_risk = np.where(kept > 0, kept_errors / kept, np.nan)
    return RoutingCurve(np.arange(n + 1) / n, kept_risk, kept_errors / n)


def _cumulative_errors(score, errors) -> np.ndarray:
    """Errors among the k lowest scores, k = 0..n; within a tie, the group's errors spread evenly (random order)."""
    score, errors = _check_samples(score, errors, names=("score", "errors"))
    order = np.argsort(score, kind="stable")
    _, starts = np.unique(score[order], return_index=True)
    bounds = np.append(starts, len(score))
    at_bounds = np.concatenate([[0.0], np.cumsum(errors[order])])[bounds]
    return np.interp(np.arange(len(score) + 1), bounds, at_bounds)


# ---------------------------------------------------------------------------------------------------- checks

def _as_1d(values, name: str, allow_empty: bool = False) -> np.ndarray:
    """A 1-D float64 numpy copy of an array-like or tensor, checked finite and (unless allowed) non-empty."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not allow_empty and array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def _check_samples(confidence, errors, binary: bool = False,
                   names: tuple[str, str] = ("confidence", "errors")) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 arrays of equal length; errors in [0, 1], and 0/1 when ``binary`` (the binomial method)."""
    confidence, errors = _as_1d(confidence, names[0]), _as_1d(errors, names[1])
    if len(confidence) != len(errors):
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {len(confidence)} vs {len(errors)}")
    if errors.min() < 0 or errors.max() > 1:
        raise ValueError(f"{names[1]} must lie in [0, 1], got values in [{errors.min():g}, {errors.max():g}]")
    if binary and not np.isin(errors, (0.0, 1.0)).all():
        raise ValueError(f"{names[1]} must be 0 or 1 for the binomial method (use 'hoeffding_bentkus' for losses "
                         "in [0, 1])")
    return confidence, errors


def _check_level(value: float, name: str) -> None:
    if not 0 < value < 1:  # also False for NaN
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


# ---------------------------------------------------------------------------------------------- independent samples

def one_per_group(groups, seed: int = 0) -> np.ndarray:
    """Row positions keeping one row drawn at random per group (e.g. one validator level per image).

    Learn-then-Test needs independent samples; the rows of one image at several levels are not. One random
    level per image is an independent draw from the validator's query distribution (a level chosen uniformly).
    """
    groups = _as_1d(groups, "groups")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    _, first = np.unique(groups[order], return_index=True)
    return np.sort(order[first])


def resampled_violations(confidence, errors, groups, n_groups: int, alpha: float, delta: float, resamples: int,
                         seed: int = 0, min_accepted: int = 1) -> dict:
    """Check the guarantee empirically, the pooled outcomes standing in for the population: ``resamples`` times,
    calibrate on ``n_groups`` groups drawn from the pool (one row each) and see whether the pool's risk among the
    samples the chosen threshold accepts exceeds ``alpha``. Learn-then-Test: at most ``delta`` of the time."""
    confidence, errors = _check_samples(confidence, errors)
    groups = _as_1d(groups, "groups")
    names = np.unique(groups)
    if not 0 < n_groups <= len(names):
        raise ValueError(f"n_groups={n_groups}: the pool has {len(names)} groups")
    rng = np.random.default_rng(seed)
    violations, rates, thresholds = 0, [], []
    for r in range(resamples):
        chosen = np.isin(groups, rng.choice(names, n_groups, replace=False))
        rows = np.flatnonzero(chosen)[one_per_group(groups[chosen], seed=seed + r)]
        choice = select_threshold(confidence[rows], errors[rows], alpha, delta, min_accepted=min_accepted)
        pool = evaluate_threshold(confidence, errors, choice.threshold)
        rates.append(pool["acceptance_rate"])
        thresholds.append(np.nan if choice.threshold is None else choice.threshold)
        violations += int(pool["accepted_risk"] is not None and pool["accepted_risk"] > alpha)
    frequency = violations / resamples
    allowed = delta + 3 * float(np.sqrt(delta * (1 - delta) / resamples))
    return {"resamples": resamples, "n_groups": n_groups, "violation_frequency": frequency, "delta": delta,
            "allowed": allowed, "holds": frequency <= allowed, "mean_acceptance_rate": float(np.mean(rates)),
            "none_chosen": int(np.isnan(thresholds).sum())}
