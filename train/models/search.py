"""Test-time search over inspection traces, guided by the process reward model (search-and-learn style).

Everything works on cached per-view outputs of a batch of queries (``margin`` (Q, V), ``embeddings``
(Q, V, D)) and counts the **views evaluated** per query: the Stage-1 calls a deployed search would make.

- :func:`best_of_n`: ``n`` traces of ``length`` views drawn from a pool of ``budget`` views (the global view
  plus random others); each trace's step scores are aggregated (``min``, ``prod`` or ``last``); the answer
  is the best trace's, or with ``weighted`` the answer whose traces have the larger score sum.
- :func:`beam_search`: views are evaluated a few at a time (``budget`` in all, spread over ``length`` steps);
  at each step every beam may be extended by any evaluated view it lacks, the ``beam`` best prefixes (by
  aggregated score) are kept, and the best final beam answers. With ``stop_threshold`` a query stops as
  soon as its best beam's last step scores at least that, saving the views not yet evaluated.
- the baselines at the same budget: :func:`pool_mean` (mean margin of the pool) and :func:`pool_vote`.

Which views a budget buys (:func:`view_pool`): random ones, or the first ones of an inspection order learnt from
outcomes (:func:`greedy_view_order`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.models.traces import answers, final_belief, running_belief

AGGREGATIONS = ("min", "prod", "last")


def aggregate(step_scores: torch.Tensor, how: str) -> torch.Tensor:
    """One score per trace from its ``(..., T)`` step scores (probabilities)."""
    if how == "min":
        return step_scores.amin(-1)
    if how == "prod":
        return step_scores.prod(-1)
    if how == "last":
        return step_scores[..., -1]
    raise ValueError(f"aggregation {how!r}; allowed: {list(AGGREGATIONS)}")


class TraceScorer:
    """Scores traces of cached queries with a PRM: ``scorer(rows (N,), traces (N, T)) -> step scores (N, T)``."""

    def __init__(self, prm: torch.nn.Module, embeddings: torch.Tensor, margin: torch.Tensor, rule: str = "mean",
                 batch: int = 8192):
        self.prm, self.embeddings, self.margin, self.rule, self.batch = prm.eval(), embeddings, margin, rule, batch

    def inputs(self, rows: torch.Tensor, traces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The PRM's four inputs for ``traces`` (N, T) of queries ``rows`` (N,)."""
        margins = self.margin[rows.unsqueeze(1), traces]
        return (self.embeddings[rows.unsqueeze(1), traces].float(), margins, running_belief(margins, self.rule),
                traces)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, traces: torch.Tensor) -> torch.Tensor:
        out = [self.prm(*self.inputs(rows[i:i + self.batch], traces[i:i + self.batch])).sigmoid()
               for i in range(0, len(rows), self.batch)]
        return torch.cat(out) if out else torch.zeros(traces.shape, dtype=torch.float32)


@dataclass
class SearchResult:
    """A search's outcome per query: the answer, how many views it evaluated and the chosen trace's score."""
    answer: torch.Tensor        # (Q,) 1 = roadwork
    views: torch.Tensor         # (Q,) views evaluated
    score: torch.Tensor         # (Q,) the chosen trace's aggregated PRM score (1.0 for baselines)


def view_pool(mask: torch.Tensor, budget: int, seed: int = 0, order: list[int] | None = None) -> torch.Tensor:
    """``(Q, budget)`` slots per query: the global view, then others, the views a budget-limited method may evaluate
    (the baselines at this budget see the same pool). ``order``: the first available slots in that priority order
    (:func:`greedy_view_order`); else random available ones (a fixed draw per seed)."""
    available = int(mask.sum(-1).min())
    if not 1 <= budget <= available:
        raise ValueError(f"view budget {budget} must be in [1, {available}]")
    if order is None:
        keys = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed))
    else:
        if sorted(order) != list(range(mask.shape[1])):
            raise ValueError(f"a view order must list every slot once, got {order}")
        keys = torch.empty(mask.shape[1]).index_put_((torch.tensor(order),), torch.arange(len(order)).float())
        keys = keys.expand(mask.shape).clone()
    keys = keys.masked_fill(~mask, float("inf"))
    keys[:, 0] = -1.0
    return keys.argsort(-1)[:, :budget]


def greedy_view_order(margin: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, rule: str = "mean") -> list[int]:
    """An inspection order learnt from outcomes (e.g. on the meta split): after the global view, repeatedly the
    slot whose addition makes the belief over the views so far right for the most queries."""
    chosen = torch.zeros_like(mask)
    chosen[:, 0] = True
    order, left = [0], list(range(1, mask.shape[1]))
    while left:
        def accuracy(v: int) -> float:
            trial = chosen.clone()
            trial[:, v] = mask[:, v]
            return float((answers(final_belief(margin, trial, rule)) == label).float().mean())

        best = max(left, key=accuracy)
        order.append(best)
        left.remove(best)
        chosen[:, best] = mask[:, best]
    return order


def pool_mean(margin: torch.Tensor, pool: torch.Tensor, rule: str = "mean") -> SearchResult:
    """The belief over all pool views (``rule`` mean: the mean of their logit margins)."""
    belief = running_belief(margin.gather(1, pool), rule)[:, -1]
    return SearchResult(answers(belief), torch.full((len(pool),), pool.shape[1]), torch.ones(len(pool)))


def pool_vote(margin: torch.Tensor, pool: torch.Tensor) -> SearchResult:
    """Majority vote of the pool views' answers; a tie goes to the mean margin's answer."""
    m = margin.gather(1, pool)
    votes = (m > 0).float().mean(1)
    answer = torch.where(votes == 0.5, answers(m.mean(1)), (votes > 0.5).long())
    return SearchResult(answer, torch.full((len(pool),), pool.shape[1]), torch.ones(len(pool)))


def best_of_n(scorer: TraceScorer, pool: torch.Tensor, n: int, length: int, aggregation: str = "min",
              weighted: bool = False, seed: int = 0) -> SearchResult:
    """Best-of-N (or weighted best-of-N) over ``n`` random traces of ``length`` views from each query's pool."""
    q, budget = pool.shape
    if not 1 <= length <= budget:
        raise ValueError(f"best-of-N trace length {length} must be in [1, {budget}] (the view budget)")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.rand(q, n, budget - 1, generator=generator).argsort(-1)[..., :length - 1] + 1
    positions = torch.cat([torch.zeros(q, n, 1, dtype=torch.long), picks], -1)
    traces = pool.unsqueeze(1).expand(q, n, budget).gather(2, positions)                     # (Q, n, L)
    rows = torch.arange(q).repeat_interleave(n)
    steps = scorer(rows, traces.reshape(q * n, length)).reshape(q, n, length)
    scores = aggregate(steps, aggregation)
    margins = scorer.margin[rows.unsqueeze(1), traces.reshape(q * n, length)].reshape(q, n, length)
    trace_answers = answers(running_belief(margins, scorer.rule)[..., -1])
    if weighted:
        yes = (scores * trace_answers).sum(1)
        no = (scores * (1 - trace_answers)).sum(1)
        answer = (yes > no).long()
        score = torch.maximum(yes, no) / scores.sum(1).clamp(min=1e-12)
    else:
        best = scores.argmax(1)
        answer, score = trace_answers.gather(1, best[:, None])[:, 0], scores.gather(1, best[:, None])[:, 0]
    seen = torch.zeros(q, scorer.margin.shape[1]).scatter_(1, traces.reshape(q, -1), 1.0)
    return SearchResult(answer, seen.sum(1).long(), score)


@dataclass
class BeamTrace:
    """Per query and step of a beam search: the best beam's last-step score, its answer, views evaluated."""
    best_score: torch.Tensor    # (Q, steps)
    answer: torch.Tensor        # (Q, steps)
    views: torch.Tensor         # (Q, steps)

    def stopped(self, threshold: float | None) -> SearchResult:
        """Stop at the first step whose best beam scores >= ``threshold`` (else at the last step)."""
        steps = self.best_score.shape[1]
        if threshold is None:
            stop = torch.full((len(self.answer),), steps - 1)
        else:
            hit = self.best_score >= threshold
            hit[:, -1] = True
            stop = hit.float().argmax(1)
        pick = stop.unsqueeze(1)
        return SearchResult(self.answer.gather(1, pick)[:, 0], self.views.gather(1, pick)[:, 0],
                            self.best_score.gather(1, pick)[:, 0])


def beam_search(scorer: TraceScorer, pool: torch.Tensor, beam: int, length: int,
                aggregation: str = "min") -> BeamTrace:
    """Beam search over which evaluated view to add next; the pool (global first) is evaluated in order, spread
    evenly over the ``length`` steps, so all ``budget`` views are evaluated by the last step."""
    q, budget = pool.shape
    if not 1 <= length <= budget:
        raise ValueError(f"beam search length {length} must be in [1, {budget}] (the view budget)")
    per_step = math.ceil((budget - 1) / max(length - 1, 1))
    rows_q = torch.arange(q)
    beams = pool[:, :1].unsqueeze(1)                                                           # (Q, 1, 1)
    steps = scorer(rows_q, beams[:, 0]).unsqueeze(1)                                           # (Q, 1, 1)
    record = {"best_score": [steps[:, 0, -1]], "answer": [answers(scorer.margin[rows_q, 0])],
              "views": [torch.ones(q, dtype=torch.long)]}
    for t in range(1, length):
        evaluated = pool[:, :min(budget, 1 + t * per_step)]                                     # (Q, E)
        k, e = beams.shape[1], evaluated.shape[1]
        candidates = torch.cat([beams.unsqueeze(2).expand(q, k, e, t),
                                evaluated[:, None, :, None].expand(q, k, e, 1)], -1)           # (Q, k, E, t+1)
        valid = ~(beams.unsqueeze(2) == evaluated[:, None, :, None]).any(-1)                   # (Q, k, E)
        flat = candidates.reshape(q, k * e, t + 1)
        rows = rows_q.repeat_interleave(k * e)
        scores = scorer(rows, flat.reshape(-1, t + 1)).reshape(q, k * e, t + 1)
        total = aggregate(scores, aggregation).masked_fill(~valid.reshape(q, k * e), -1.0)
        # duplicates (the same view set reached in another order) are kept: they are rare with few beams
        # ties (common with `min`: the first step often bounds every extension) go to the earlier candidate (beam,
        # then view order): a stable sort, so the inference stack's search (train/export/replay.py) picks the same
        top = total.sort(dim=1, descending=True, stable=True).indices[:, :min(beam, k * e)]
        top = torch.where(total.gather(1, top) < 0, top[:, :1], top)  # fewer valid extensions than beams: repeat
        beams = flat.gather(1, top[..., None].expand(-1, -1, t + 1))
        steps = scores.gather(1, top[..., None].expand(-1, -1, t + 1))
        best = beams[:, 0]
        belief = running_belief(scorer.margin[rows_q.unsqueeze(1), best], scorer.rule)[:, -1]
        record["best_score"].append(steps[:, 0, -1])
        record["answer"].append(answers(belief))
        record["views"].append(torch.full((q,), e))
    return BeamTrace(**{k: torch.stack(v, 1) for k, v in record.items()})
