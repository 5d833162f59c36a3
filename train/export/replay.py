"""The cascade replayed from an export bundle alone: ONNX Runtime sessions, the manifest's tiers and thresholds,
and the shared numpy decision rule (:func:`train.export.cascade.route`); no training code runs.

:class:`BundleCascade` turns validator queries (every view of each: what ``ViewDataset`` serves) into each tier's
outputs, as an inference stack would compute them: calibrated P(roadwork) of the classifiers, the router's score
(fed the draft's logits), and the PRM's beam search over the views of its pool (views model run on each view,
its logits and embeddings scored by the PRM's graph). ``route`` then decides, and counts FLOPs from the manifest.
At a ``precision`` other than fp32 (``task=quantize``), every classifier with that variant runs it, and the tiers'
thresholds are those re-derived for that precision (``tiers[].precisions``).
"""
from __future__ import annotations

import time

import numpy as np

from train.export.bundle import Bundle
from train.export.cascade import Costs, TierOutput, beam_calls, route
from train.export.manifest import FULL_PRECISION, BundleError


def running_mean(margins: np.ndarray) -> np.ndarray:
    """The running mean of ``margins`` along the last axis (the belief after each step)."""
    return np.cumsum(margins, -1) / np.arange(1, margins.shape[-1] + 1)


def running_max(margins: np.ndarray) -> np.ndarray:
    """The running maximum of ``margins`` along the last axis."""
    return np.maximum.accumulate(margins, -1)


BELIEFS = {"mean": running_mean, "max": running_max}
AGGREGATE = {"min": lambda s: s.min(-1), "prod": lambda s: s.prod(-1), "last": lambda s: s[..., -1]}


def ordered_pool(mask: np.ndarray, budget: int, order: list[int]) -> np.ndarray:
    """``(Q, budget)`` slots: the global view, then the first available slots in ``order``."""
    rank = np.empty(len(order))
    rank[np.asarray(order)] = np.arange(len(order))
    keys = np.where(mask, rank[None, :], np.inf)
    keys[:, 0] = -1.0
    return np.argsort(keys, axis=1, kind="stable")[:, :budget]


def beam_search(score_fn, margin: np.ndarray, embeddings: np.ndarray, pool: np.ndarray, beam: int, length: int,
                aggregation: str, belief: str) -> TierOutput:
    """The manifest's beam search (numpy): ``margin`` (Q, V), ``embeddings`` (Q, V, D) of the evaluated views;
    ``score_fn(embeddings, margins, beliefs, slots) -> (N, T)`` step scores. Per step: the best beam's last score,
    its answer (running belief > 0) and the views evaluated so far."""
    q, budget = pool.shape
    per_step = -(-(budget - 1) // max(length - 1, 1))
    rows_q = np.arange(q)
    rule = BELIEFS[belief]

    def score(rows: np.ndarray, traces: np.ndarray) -> np.ndarray:
        m = margin[rows[:, None], traces]
        return score_fn(embeddings[rows[:, None], traces], m, rule(m), traces)

    beams = pool[:, None, :1]                                                     # (Q, 1, 1)
    steps = score(rows_q, beams[:, 0])[:, None]                                   # (Q, 1, 1)
    best, answer, views = [steps[:, 0, -1]], [(margin[:, 0] > 0).astype(np.int64)], [np.ones(q, np.int64)]
    for t in range(1, length):
        evaluated = pool[:, :min(budget, 1 + t * per_step)]
        k, e = beams.shape[1], evaluated.shape[1]
        candidates = np.concatenate([np.broadcast_to(beams[:, :, None, :], (q, k, e, t)),
                                     np.broadcast_to(evaluated[:, None, :, None], (q, k, e, 1))], -1)
        valid = ~(beams[:, :, None, :] == evaluated[:, None, :, None]).any(-1)
        flat = candidates.reshape(q, k * e, t + 1)
        scores = score(np.repeat(rows_q, k * e), flat.reshape(-1, t + 1)).reshape(q, k * e, t + 1)
        total = np.where(valid.reshape(q, k * e), AGGREGATE[aggregation](scores), -1.0)
        top = np.argsort(-total, axis=1, kind="stable")[:, :min(beam, k * e)]
        top = np.where(np.take_along_axis(total, top, 1) < 0, top[:, :1], top)
        beams = np.take_along_axis(flat, top[..., None], 1)
        steps = np.take_along_axis(scores, top[..., None], 1)
        m = margin[rows_q[:, None], beams[:, 0]]
        best.append(steps[:, 0, -1])
        answer.append((rule(m)[:, -1] > 0).astype(np.int64))
        views.append(np.full(q, e))
    return TierOutput("prm", score=np.stack(best, 1), answer=np.stack(answer, 1), views=np.stack(views, 1))


class BundleCascade:
    """The cascade of a bundle's manifest: ``outputs(views, mask)`` per tier, ``route(outputs)``, ``costs``."""

    def __init__(self, bundle: str | Bundle, threads: int | None = None, precision: str = FULL_PRECISION):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.precision = precision
        m = self.bundle.manifest
        if not m.tiers or any(t.kind is None or t.rule is None for t in m.tiers):
            raise BundleError(f"bundle {self.bundle.path} has no cascade tiers with kinds (export after the "
                              "thresholds stage)")
        self.order = [(t.name, t.kind) for t in m.tiers]
        self.thresholds = {t.name: t.precisions[precision].threshold if precision in t.precisions else t.threshold
                           for t in m.tiers}
        self.sessions, self.latency = {}, {}
        for name, kind in self.order:
            if kind == "router":
                self.sessions[name] = self.bundle.router(name, threads)
                self.sessions.setdefault("draft", self._classifier("draft", threads))
            elif kind == "classifier":
                self.sessions[name] = self._classifier(name, threads)
            else:
                self.search = m.models[name].search
                if self.search.method != "beam" or self.search.pool != "ordered":
                    raise BundleError(f"the replay runs beam search over the ordered pool; {name} has "
                                      f"{self.search.method} / {self.search.pool}")
                self.sessions[name] = self.bundle.prm(name, threads)
                self.sessions.setdefault(self.search.views_model, self._classifier(self.search.views_model, threads))
        self.costs = self._costs()

    def _classifier(self, name: str, threads: int | None):
        """``name`` at the cascade's precision where the bundle has that variant, else at full precision."""
        variants = self.bundle.manifest.models[name].variants if name in self.bundle.manifest.models else {}
        return self.bundle.classifier(name, threads, self.precision if self.precision in variants else FULL_PRECISION)

    def _costs(self) -> Costs:
        m = self.bundle.manifest
        per_call, needs = {}, {}
        for name in self.sessions:
            flops = m.models[name].flops
            if flops is None:
                raise BundleError(f"bundle model {name!r} has no FLOPs in the manifest")
            per_call[name] = flops.per_call
        for name, kind in self.order:
            if kind == "router":
                needs[name] = ["draft"]
            if kind == "prm":
                per_call[name] = 0.0  # the PRM's own FLOPs are counted per scored step (prm_flops)
        views_model = self.search.views_model if hasattr(self, "search") else "stage1"
        return Costs(per_call, needs, views_model)

    def _timed(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.latency.setdefault(name, []).append((time.perf_counter() - start, len(args[0])))
        return out

    def outputs(self, views: np.ndarray, mask: np.ndarray) -> dict[str, TierOutput]:
        """Every tier's outputs on a batch of queries: ``views`` (B, V, 3, S, S) as ViewDataset serves them."""
        pixels = np.ascontiguousarray(views[:, 0], np.float32)
        out, logits, whole = {}, {}, None
        for name, kind in self.order:
            if kind == "classifier" and name == self._shares_global:  # its global-view run serves the PRM too
                prob, *whole = self._timed(name, self.sessions[name].probs_and_embeddings, pixels)
                out[name] = TierOutput("classifier", prob=prob)
            elif kind == "classifier":
                out[name] = TierOutput("classifier", prob=self._timed(name, self.sessions[name].probs, pixels))
            elif kind == "router":
                draft_logits, _ = self._timed("draft", self.sessions["draft"].session.logits_and_probs, pixels)
                targets = self.bundle.manifest.models[name].backbone["router"]["targets"]
                scores = self._timed(name, self.sessions[name].scores, pixels, draft_logits)
                out[name] = TierOutput("router", score=scores[:, targets.index("draft")])
                logits["draft"] = draft_logits
            else:
                out[name] = self._prm(name, views, mask, whole)
        return out

    @property
    def _shares_global(self) -> str | None:
        """The classifier tier whose run on the global view also gives the PRM that view's logits and embeddings
        (the PRM's views model, when it is a tier): the pool's first view is always the global one."""
        search = getattr(self, "search", None)
        if search is None or (search.views_model, "classifier") not in self.order:
            return None
        return search.views_model if self.sessions[search.views_model].session.embeds else None

    def _prm(self, name: str, views: np.ndarray, mask: np.ndarray, whole: list | None = None) -> TierOutput:
        """``whole``: the views model's (logits, embeddings) of the global views, when a tier already ran it."""
        s = self.search
        if len(s.order) != views.shape[1]:
            raise BundleError(f"the PRM's view order has {len(s.order)} slots, the queries {views.shape[1]}")
        pool = ordered_pool(mask, s.budget, s.order)
        q, first = len(pool), 0 if whole is None else 1
        crops = views[np.arange(q)[:, None], pool[:, first:]].reshape(-1, *views.shape[2:])
        session = self.sessions[s.views_model].session
        if len(crops):
            logits, embeddings = self._timed(s.views_model, session.logits_and_embeddings, crops)
            logits, embeddings = logits.reshape(q, len(crops) // q, -1), embeddings.reshape(q, len(crops) // q, -1)
        else:  # a budget of one view: the global one
            logits, embeddings = (np.zeros((q, 0, w.shape[-1]), np.float32) for w in whole)
        if whole is not None:
            logits = np.concatenate([whole[0][:, None], logits], 1)
            embeddings = np.concatenate([whole[1][:, None], embeddings], 1)
        margin_pool = logits[..., 1] - logits[..., 0]
        v = views.shape[1]
        margin, emb = np.zeros((q, v), np.float32), np.zeros((q, v, embeddings.shape[-1]), np.float32)
        margin[np.arange(q)[:, None], pool] = margin_pool
        emb[np.arange(q)[:, None], pool] = embeddings
        prm = self.sessions[name]
        out = beam_search(lambda *a: self._timed(name, prm.scores, *a), margin, emb, pool, s.beam, s.length,
                          s.aggregation, s.belief)
        per_step = self.bundle.manifest.models[name].flops.per_call
        out.prm_flops = np.tile(beam_calls(s.budget, s.beam, s.length) * per_step, (q, 1))
        return out

    def route(self, outputs: dict[str, TierOutput], thresholds: dict[str, float | None] | None = None):
        """:func:`train.export.cascade.route` through its tiers, with its thresholds (or ``thresholds``) and costs."""
        return route(self.order, outputs, self.thresholds if thresholds is None else thresholds, self.costs)

    def latency_per_image(self) -> dict[str, float]:
        """Measured seconds per image of each model (over every batch run so far)."""
        return {name: sum(t for t, _ in runs) / max(sum(n for _, n in runs), 1) for name, runs in self.latency.items()}
