"""The cascade's rules, shared by the thresholds stage, the replay and the quantised tiers: each tier's risk control
from ``cascade.*``, the one-query-per-scene sample the threshold tests take, and a chosen tier as
``thresholds.json`` and the manifest state it."""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from train.calibration.cascade import TierRule
from train.calibration.risk_control import one_per_group
from train.data.splits import scene_groups
from train.runs import Run
from train.tiers.training import build_datamodule


def tier_rules(cfg: DictConfig, order, alpha: float | None = None) -> dict[str, TierRule]:
    """Each tier's rule: ``cascade.tier_alpha`` or else ``alpha`` (default ``cascade.alpha``)."""
    c = cfg.cascade
    alpha = c.alpha if alpha is None else alpha
    return {name: TierRule(alpha=float(c.tier_alpha.get(name, alpha)), delta=float(c.delta), method=c.method,
                           p_value=c.p_value, min_accepted=int(c.min_accepted)) for name, _ in order}


def one_per_scene(cfg: DictConfig, run: Run, split: str, index: np.ndarray) -> np.ndarray:
    """Row positions of ``split``'s queries (sample positions ``index``) keeping one query per scene: independent
    samples for the threshold tests."""
    return one_per_group(scene_groups(build_datamodule(cfg, run).split(split))[index], cfg.seed)


def tier_record(c) -> dict:
    """A chosen tier as ``thresholds.json`` (and the manifest) states it."""
    if c.choice is None:
        return {"kind": c.kind, "threshold": c.threshold, "risk": c.risk, "n_reaching": c.n_reaching,
                "guarantee": None}
    ch = c.choice
    statement = ch.guarantee()["statement"]
    if c.kind == "router" and ch.threshold is not None:  # its test ran on -score: say it on the score itself
        bound = (f"with probability >= {1 - ch.delta:g} over the draw of the {ch.n_calibration} calibration samples"
                 if ch.delta is not None else "in expectation")
        statement = (f"{bound}, the {c.risk} (kept: router score <= {c.threshold:g}) is <= alpha = {ch.alpha:g}"
                     + ("" if ch.delta is not None else " (joint rate: kept and wrong)"))
    return {"kind": c.kind, "threshold": c.threshold, "risk": c.risk, "n_reaching": c.n_reaching,
            "guarantee": {"method": ch.method, "alpha": ch.alpha, "delta": ch.delta, "n_calibration": ch.n_calibration,
                          "n_accepted": ch.n_accepted, "acceptance_rate": ch.acceptance_rate,
                          "empirical_risk": ch.accepted_risk, "p_value": ch.p_value, "risk": c.risk,
                          "statement": statement, "note": ch.note}}
