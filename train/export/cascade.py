"""The cascade's decision rule, as the manifest states it: numpy only, shared by the thresholds stage (on PyTorch
outputs) and the replay evaluator (on ONNX Runtime outputs), so both route a sample the same way.

Tiers run in order. Each sample starts at the first tier:

- a ``router`` (P(the cheap tiers are wrong)) sends the sample straight to the first ``prm`` tier (the last tier
  when there is none) when its score > the threshold; it reads the draft's
  logits, so the draft runs for every sample the router sees (strictly above: the score <= threshold keeps it);
- a ``classifier`` accepts its own answer when its confidence max(p, 1 - p) >= its threshold, else passes the
  sample on (threshold None: it accepts nothing);
- a ``prm`` inspects views step by step and stops at the first step whose best beam scores >= its threshold; a
  stop before the last step is an accepted answer, otherwise the sample passes on;
- the last tier answers every sample that reaches it (a ``prm`` there answers at its stop step).

Cost: every model evaluated for a sample is counted once (:class:`Costs`); a PRM's views are Stage-1 calls on
crops, the global view being the Stage-1 call itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("router", "classifier", "prm")  # what a cascade routes through, in the order a bundle lists its models
# what the manifest says each kind of tier does with a query (``route`` does it); "last": the cascade's last tier
RULES = {
    "router": "route the sample straight to the first prm tier (the last tier when there is none) when its score "
              "(the router's `draft` column) > threshold; the router reads the draft's logits, so the draft runs first",
    "classifier": "answer (roadwork when P(roadwork) > 0.5) when max(p, 1 - p) >= threshold, else pass the sample on; "
                  "threshold null: accepts nothing",
    "prm": "inspect views as `search` says; stop at the first step whose best beam scores >= threshold (null: never "
           "early); a stop before the last step answers, otherwise the sample passes on",
    "last": "answers every sample that reaches it (a prm: at its stop step)",
}


@dataclass
class TierOutput:
    """One tier's outputs on Q queries.

    classifier: ``prob`` (Q,) calibrated P(roadwork). router: ``score`` (Q,) P(cheap tier wrong). prm: per step
    ``score`` (Q, S) the best beam's last-step score, ``answer`` (Q, S), ``views`` (Q, S) views evaluated so far and
    ``prm_flops`` (Q, S) the PRM's own FLOPs so far.
    """
    kind: str
    prob: np.ndarray | None = None
    score: np.ndarray | None = None
    answer: np.ndarray | None = None
    views: np.ndarray | None = None
    prm_flops: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"tier kind {self.kind!r}; allowed: {list(KINDS)}")

    @property
    def confidence(self) -> np.ndarray:
        """Classifier: max(p, 1 - p)."""
        return np.maximum(self.prob, 1 - self.prob)

    @property
    def decision(self) -> np.ndarray:
        """Classifier: its answer (1 = roadwork, strictly above 0.5 as the validator reads it)."""
        return (self.prob > 0.5).astype(np.int64)

    def stop_step(self, threshold: float | None) -> np.ndarray:
        """PRM: the first step whose score >= ``threshold`` (the last step when none does)."""
        hit = np.zeros(self.score.shape, bool) if threshold is None else self.score >= threshold
        hit[:, -1] = True
        return hit.argmax(1)


@dataclass
class Costs:
    """FLOPs per call of each model (the manifest's ``flops.per_call``) and what a tier needs evaluated."""
    per_call: dict[str, float]
    needs: dict[str, list[str]] = field(default_factory=dict)   # tier -> models it needs (router: the draft)
    views_model: str = "stage1"                                  # a PRM's views are this model's calls


@dataclass
class Routed:
    """What :func:`route` did with each query: its answer, the tier that answered, the FLOPs and views spent on it, and
    which models ran for it."""
    answer: np.ndarray      # (Q,) 1 = roadwork
    exit: np.ndarray        # (Q,) index of the tier that answered
    flops: np.ndarray       # (Q,) FLOPs spent on the sample
    views: np.ndarray       # (Q,) views a PRM evaluated (0 when none ran)
    evaluated: dict[str, np.ndarray] = field(default_factory=dict)  # model -> (Q,) whether it ran for the sample


def deep_index(order: list[tuple[str, str]]) -> int:
    """Where a router sends a sample: the first ``prm`` tier, else the last tier."""
    return next((k for k, (_, kind) in enumerate(order) if kind == "prm"), len(order) - 1)


def route(order: list[tuple[str, str]], outputs: dict[str, TierOutput], thresholds: dict[str, float | None],
          costs: Costs | None = None) -> Routed:
    """Send every query through ``order`` ((name, kind) pairs) as the manifest says; see the module docstring."""
    if not order:
        raise ValueError("a cascade needs at least one tier")
    first = outputs[order[0][0]]
    q = len(first.prob if first.prob is not None else first.score)
    answer, exit_ = np.zeros(q, np.int64), np.full(q, -1)
    views, prm_flops = np.zeros(q, np.int64), np.zeros(q)
    evaluated: dict[str, np.ndarray] = {}
    active, skip_to = np.ones(q, bool), np.zeros(q, np.int64)
    deep, last = deep_index(order), len(order) - 1

    def mark(name: str, rows: np.ndarray) -> None:
        evaluated[name] = evaluated.get(name, np.zeros(q, bool)) | rows
        for need in (costs.needs.get(name, []) if costs else []):
            mark(need, rows)

    for k, (name, kind) in enumerate(order):
        here = active & (skip_to <= k)
        out, t = outputs[name], thresholds.get(name)
        if kind == "router":
            mark(name, here)
            up = here & (t is not None) & (out.score > (t if t is not None else np.inf))
            skip_to[up] = deep
            continue
        if kind == "classifier":
            mark(name, here)
            take = here if k == last else here & (t is not None) & (out.confidence >= (t if t is not None else 2.0))
            answer[take], exit_[take] = out.decision[take], k
        else:  # prm
            if costs is not None:
                mark(costs.views_model, here)  # the global view is the views model's own call
            stop = out.stop_step(t)
            rows = np.arange(q)
            take = here if k == last else here & (stop < out.score.shape[1] - 1)
            at = np.where(take, stop, out.score.shape[1] - 1)  # passed on: every step was run
            answer[take], exit_[take] = out.answer[rows, at][take], k
            views[here] = out.views[rows, at][here]
            prm_flops[here] = out.prm_flops[rows, at][here] if out.prm_flops is not None else 0.0
        active &= ~take
    flops = np.zeros(q)
    if costs is not None:
        for name, rows in evaluated.items():
            flops += rows * costs.per_call.get(name, 0.0)
        flops += np.maximum(views - 1, 0) * costs.per_call.get(costs.views_model, 0.0) + prm_flops
    return Routed(answer, exit_, flops, views, evaluated)


def beam_calls(budget: int, beam: int, length: int) -> np.ndarray:
    """Trace steps the PRM scores in a beam search, cumulated per step: step t scores every (beam, evaluated view)
    extension, each a prefix of t + 1 steps (the shapes of :func:`beam_search` in train/models/search.py)."""
    per_step = -(-(budget - 1) // max(length - 1, 1))
    k, steps = 1, [1.0]
    for t in range(1, length):
        candidates = k * min(budget, 1 + t * per_step)
        steps.append(candidates * (t + 1.0))
        k = min(beam, candidates)
    return np.cumsum(steps)
