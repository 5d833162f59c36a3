"""Thresholds for the whole cascade, tier by tier in order, each with a stated guarantee (CALM-style).

Tier k's threshold is chosen on the calibration samples that reach it under the thresholds already chosen for
tiers 0..k-1, by Learn-then-Test (Hoeffding-Bentkus or binomial p-values, fixed-sequence testing from the
strictest candidate) or conformal risk control: the loosest threshold that keeps the guarantee, so the most
samples exit early. What counts as an error:

- tiers before ``reference`` (e.g. the draft before Stage-1): disagreeing with the reference's answer (the cascade
  must not change Stage-1's answer more than ``alpha`` of the time where a cheap tier answers);
- the reference and the tiers after it (e.g. the PRM's early stop): disagreeing with the label;
- a router: the error of the first classifier after it, among the samples it keeps (routing up is always safe).

The last tier answers everything that reaches it: it gets no threshold (a PRM there keeps its early stop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.calibration.risk_control import (ThresholdChoice, crc_from_counts, crc_threshold, ltt_from_counts,
                                            select_threshold)
from train.export.cascade import TierOutput, deep_index

METHODS = ("ltt", "crc")
STOP_GRID = np.round(np.linspace(0.99, 0.01, 99), 4)  # PRM stop candidates, fixed in advance, highest first


@dataclass(frozen=True)
class TierRule:
    """How one tier's threshold is chosen: its risk level and the test."""
    alpha: float
    delta: float = 0.1
    method: str = "ltt"                 # ltt | crc
    p_value: str = "hoeffding_bentkus"  # ltt: hoeffding_bentkus | binomial
    min_accepted: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"threshold method {self.method!r}; allowed: {list(METHODS)}")


@dataclass
class TierChoice:
    """What :func:`select_cascade` chose for one tier: the test's choice, the threshold as the manifest states it, what
    counted as an error and how many calibration samples reached the tier."""
    name: str
    kind: str
    choice: ThresholdChoice | None      # None: the last tier (answers everything)
    threshold: float | None             # as the manifest states it (a router's: score > threshold routes up)
    risk: str                           # what counted as an error
    n_reaching: int                     # calibration samples that reached the tier


def _choose(confidence: np.ndarray, loss: np.ndarray, rule: TierRule) -> ThresholdChoice:
    if rule.method == "crc":
        return crc_threshold(confidence, loss, rule.alpha)
    return select_threshold(confidence, loss, rule.alpha, rule.delta, method=rule.p_value,
                            min_accepted=rule.min_accepted)


def _stop_choice(out: TierOutput, rows: np.ndarray, label: np.ndarray, rule: TierRule) -> ThresholdChoice:
    """A PRM's early stop over :data:`STOP_GRID`: error rate among the samples answered before the last step."""
    wrong = out.answer[rows, :-1] != label[rows, None]
    n, loss = [], []
    for t in STOP_GRID:
        hit = out.score[rows, :-1] >= t
        stopped, first = hit.any(1), hit.argmax(1)
        n.append(int(stopped.sum()))
        loss.append(float(wrong[np.arange(len(rows)), first][stopped].sum()))
    if rule.method == "crc":
        return crc_from_counts(STOP_GRID, n, loss, len(rows), rule.alpha)
    return ltt_from_counts(STOP_GRID, n, loss, len(rows), rule.alpha, rule.delta, rule.p_value, rule.min_accepted)


def select_cascade(order: list[tuple[str, str]], outputs: dict[str, TierOutput], label: np.ndarray,
                   rules: dict[str, TierRule], reference: str | None = None,
                   rows: np.ndarray | None = None) -> list[TierChoice]:
    """Choose every tier's threshold in ``order`` on the calibration samples ``rows`` (independent ones, e.g. one
    query per scene; default all). ``label`` (Q,) 0/1; ``outputs`` as :func:`train.export.cascade.route` takes."""
    names = [n for n, _ in order]
    if reference is not None and reference not in names:
        raise ValueError(f"cascade reference {reference!r} is not a tier; tiers: {names}")
    label = np.asarray(label).astype(np.int64)
    q = len(label)
    use = np.zeros(q, bool)
    use[np.arange(q) if rows is None else rows] = True
    active, skip_to = use.copy(), np.zeros(q, np.int64)
    deep, last, out_list = deep_index(order), len(order) - 1, []
    ref_pos = names.index(reference) if reference is not None else len(order)
    ref_answer = outputs[reference].decision if reference is not None else None

    def target(k: int) -> tuple[np.ndarray, str]:
        return (ref_answer, f"disagreement with {reference}") if k < ref_pos else (label, "error against the label")

    for k, (name, kind) in enumerate(order):
        here = active & (skip_to <= k)
        out = outputs[name]
        if k == last:
            out_list.append(TierChoice(name, kind, None, None, "answers every sample that reaches it", int(here.sum())))
            break
        rule = rules[name]
        if not here.any():
            out_list.append(TierChoice(name, kind, None, None if kind != "router" else -1.0,
                                       "no calibration sample reaches this tier: it accepts nothing", 0))
            continue
        if kind == "router":
            nxt = next((j for j in range(k + 1, len(order)) if order[j][1] == "classifier"), None)
            if nxt is None:
                raise ValueError(f"router {name!r} has no classifier after it to protect")
            truth, what = target(nxt)
            wrong = (outputs[order[nxt][0]].decision != truth).astype(float)
            choice = _choose(-out.score[here], wrong[here], rule)  # kept: -score >= t, i.e. score <= -t
            threshold = -1.0 if choice.threshold is None else -choice.threshold  # none kept: every sample goes up
            up = here & (out.score > threshold)
            skip_to[up] = deep
            out_list.append(TierChoice(name, kind, choice, threshold, f"{what} of {order[nxt][0]} among kept samples",
                                       int(here.sum())))
            continue
        truth, what = target(k)
        if kind == "classifier":
            choice = _choose(out.confidence[here], (out.decision[here] != truth[here]).astype(float), rule)
            take = here & (choice.threshold is not None) & (out.confidence >= (choice.threshold or 2.0))
        else:
            idx = np.flatnonzero(here)
            choice = _stop_choice(out, idx, truth, rule)
            take = here & (out.stop_step(choice.threshold) < out.score.shape[1] - 1)
        out_list.append(TierChoice(name, kind, choice, choice.threshold, what, int(here.sum())))
        active &= ~take
    return out_list
