"""Inspection traces over a query's views, and their step labels by Monte Carlo rollouts (Math-Shepherd).

A trace is an ordered list of view slots, always starting with the global view (slot 0): what the cascade
has already looked at. After each step the belief is the running aggregate of the views' logit margins
(``logit_roadwork - logit_none``) so far: ``mean`` or ``max``; the answer is roadwork when the belief is
above 0 (a P(roadwork) of exactly 0.5 counts as "no roadwork", as in the validator).

Step labels: from every prefix of a trace, ``n_rollouts`` random continuations (views not yet seen) run to
the fixed ``budget``; the hard label says whether at least one ends with the right answer, the soft label
the fraction that do. Everything here works on cached per-view margins, so labels cost no model calls.
"""
from __future__ import annotations

import torch

BELIEFS = ("mean", "max")


def margins(logits: torch.Tensor) -> torch.Tensor:
    """``logit_roadwork - logit_none`` of ``(..., 2)`` logits: > 0 means the view says roadwork."""
    return logits[..., 1] - logits[..., 0]


def running_belief(margin: torch.Tensor, rule: str = "mean") -> torch.Tensor:
    """The belief after each step of ``(..., T)`` margins in trace order: running mean or running max."""
    if rule == "mean":
        steps = torch.arange(1, margin.shape[-1] + 1, dtype=margin.dtype, device=margin.device)
        return margin.cumsum(-1) / steps
    if rule == "max":
        return margin.cummax(-1).values
    raise ValueError(f"belief rule {rule!r}; allowed: {list(BELIEFS)}")


def final_belief(margin: torch.Tensor, chosen: torch.Tensor, rule: str = "mean") -> torch.Tensor:
    """The belief over the views where ``chosen`` (bool, same shape as ``margin``) is set, along the last axis."""
    if rule == "mean":
        return (margin * chosen).sum(-1) / chosen.sum(-1).clamp(min=1)
    if rule == "max":
        return margin.masked_fill(~chosen, float("-inf")).amax(-1)
    raise ValueError(f"belief rule {rule!r}; allowed: {list(BELIEFS)}")


def answers(belief: torch.Tensor) -> torch.Tensor:
    """1 (roadwork) where the belief is above 0."""
    return (belief > 0).long()


def _random_order(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of each row's available slots (masked slots last), by sorting random keys."""
    keys = torch.rand(mask.shape, generator=generator).masked_fill(~mask, 2.0)
    return keys.argsort(-1)


def sample_traces(mask: torch.Tensor, n_traces: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(Q, n_traces, length)`` slots: the global view, then ``length - 1`` distinct random available views."""
    available = int(mask.sum(-1).min())
    if not 1 <= length <= available:
        raise ValueError(f"trace length {length} must be in [1, {available}] (the fewest views a query has)")
    generator = torch.Generator().manual_seed(seed)
    rest = mask.clone()
    rest[:, 0] = False
    q = mask.shape[0]
    orders = _random_order(rest.unsqueeze(1).expand(q, n_traces, -1), generator)[..., :length - 1]
    return torch.cat([torch.zeros(q, n_traces, 1, dtype=torch.long), orders], -1)


def rollout_labels(margin: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, traces: torch.Tensor,
                   n_rollouts: int, budget: int | None = None, rule: str = "mean",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard and soft step labels ``(Q, K, T)`` for ``(Q, K, T)`` traces over ``(Q, V)`` view margins.

    From the prefix ending at step ``t``, each rollout adds ``budget - t - 1`` random views the prefix has not
    used (``budget`` defaults to the trace length); the answer of the resulting view set is compared with the
    query's ``label``. A prefix already at the budget has one deterministic outcome.
    """
    q, k, t_len = traces.shape
    budget = t_len if budget is None else budget
    if budget < t_len or budget > int(mask.sum(-1).min()):
        raise ValueError(f"rollout budget {budget} must be in [{t_len}, {int(mask.sum(-1).min())}]")
    generator = torch.Generator().manual_seed(seed)
    hard = torch.zeros(q, k, t_len)
    soft = torch.zeros(q, k, t_len)
    slots = torch.arange(mask.shape[1])
    for t in range(t_len):
        used = (traces[..., :t + 1].unsqueeze(-1) == slots).any(-2)                    # (Q, K, V)
        extra = budget - t - 1
        free = mask.unsqueeze(1) & ~used
        rollouts = n_rollouts if extra > 0 else 1
        order = _random_order(free.unsqueeze(2).expand(q, k, rollouts, -1), generator)[..., :extra]
        chosen = used.unsqueeze(2).expand(q, k, rollouts, -1).clone()
        chosen.scatter_(-1, order, True)
        belief = final_belief(margin[:, None, None, :].expand_as(chosen), chosen, rule)
        correct = (answers(belief) == label[:, None, None]).float()                      # (Q, K, R)
        hard[..., t], soft[..., t] = correct.amax(-1), correct.mean(-1)
    return hard, soft
