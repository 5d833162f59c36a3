"""Views, traces, Monte Carlo step labels, the PRM network and test-time search, on hand-built cases."""
import itertools

import numpy as np
import pytest
import torch

from train.calibration.risk_control import ltt_from_counts, select_threshold
from train.data.views import ViewSet, crop, query_plan
from train.models.prm import ProcessRewardModel
from train.models.search import aggregate, beam_search, best_of_n, greedy_view_order, pool_mean, pool_vote, view_pool
from train.models.traces import final_belief, rollout_labels, running_belief, sample_traces


def test_view_set_slots_and_boxes():
    views = ViewSet(tiles=(2,), zooms=(0.5,), random_zooms=2, cameras=1)
    assert views.names == ["global", "tile2_00", "tile2_01", "tile2_10", "tile2_11", "zoom0.5", "random_zoom0",
                           "random_zoom1", "camera1"]
    boxes = views.boxes(7)
    assert len(boxes) == views.n_crops == 8
    assert boxes[0] == (0.0, 0.0, 1.0, 1.0) and boxes[4] == (0.5, 0.5, 1.0, 1.0)
    assert boxes[5] == (0.25, 0.25, 0.75, 0.75)
    assert boxes[6:] == views.boxes(7)[6:] and boxes[6:] != views.boxes(8)[6:]  # seeded per sample
    for x0, y0, x1, y1 in boxes[6:]:
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.35 <= x1 - x0 <= 0.7
    image = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)
    assert crop(image, boxes[4]).shape == (112, 112, 3)
    assert (crop(image, boxes[4]) == image[112:, 112:]).all()
    with pytest.raises(ValueError, match="tiles"):
        ViewSet(tiles=(1,))
    with pytest.raises(ValueError, match="zooms"):
        ViewSet(zooms=(1.5,))


def test_query_plan_levels():
    samples, levels = query_plan(5, [0, 2], every_level=False)
    assert samples.tolist() == [0, 1, 2, 3, 4] and levels.tolist() == [0, 2, 0, 2, 0]
    samples, levels = query_plan(2, [0, 1, 3], every_level=True)
    assert samples.tolist() == [0, 0, 0, 1, 1, 1] and levels.tolist() == [0, 1, 3, 0, 1, 3]


def test_beliefs():
    m = torch.tensor([[1.0, -3.0, 2.0, 4.0]])
    assert running_belief(m, "mean").tolist() == [[1.0, -1.0, 0.0, 1.0]]
    assert running_belief(m, "max").tolist() == [[1.0, 1.0, 2.0, 4.0]]
    chosen = torch.tensor([[True, True, False, False]])
    assert final_belief(m, chosen, "mean").item() == -1.0 and final_belief(m, chosen, "max").item() == 1.0
    with pytest.raises(ValueError, match="belief rule"):
        running_belief(m, "median")


def test_rollout_labels_on_a_hand_built_query():
    # margins of 4 views; the query is roadwork (label 1). Trace [0, 1], budget 3 (one more view after step 2).
    margin = torch.tensor([[1.0, -3.0, 2.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    label = torch.tensor([1])
    trace = torch.tensor([[[0, 1]]])
    # prefix [0] + 2 of {1, 2, 3}: {0,1,2} and {0,1,3} average to 0 ("no roadwork", wrong), {0,2,3} to 5/3 (right)
    hard, soft = rollout_labels(margin, mask, label, trace, n_rollouts=600, budget=3, rule="mean", seed=0)
    assert hard[0, 0].tolist() == [1.0, 0.0]
    assert soft[0, 0, 0].item() == pytest.approx(1 / 3, abs=0.06)
    assert soft[0, 0, 1].item() == 0.0  # [0, 1] + any third view averages to <= 0
    # with the running max, the global view's +1 already decides: every rollout is right
    hard, soft = rollout_labels(margin, mask, label, trace, n_rollouts=50, budget=3, rule="max")
    assert soft[0, 0].tolist() == [1.0, 1.0] and hard[0, 0].tolist() == [1.0, 1.0]
    # at the budget the label is the prefix's own outcome; masked views are never drawn
    hard, soft = rollout_labels(margin, torch.tensor([[True, True, True, False]]), label, trace, 50, budget=3)
    assert soft[0, 0].tolist() == [0.0, 0.0]  # the only continuation is view 2: {0,1,2} averages to 0
    with pytest.raises(ValueError, match="budget"):
        rollout_labels(margin, mask, label, trace, 4, budget=5)


def test_sample_traces_start_global_and_never_repeat():
    mask = torch.ones(50, 9, dtype=torch.bool)
    mask[:, 8] = torch.arange(50) % 2 == 0  # half the queries lack their camera view
    traces = sample_traces(mask, n_traces=6, length=5, seed=1)
    assert traces.shape == (50, 6, 5) and (traces[..., 0] == 0).all()
    assert all(len(set(t.tolist())) == 5 for t in traces.flatten(0, 1))
    assert not (traces[1::2] == 8).any()  # never the missing camera
    assert (traces[0::2] == 8).any()
    with pytest.raises(ValueError, match="trace length"):
        sample_traces(mask, 2, 9)


def test_aggregations():
    s = torch.tensor([[0.9, 0.5, 0.8]])
    assert aggregate(s, "min").item() == pytest.approx(0.5)
    assert aggregate(s, "prod").item() == pytest.approx(0.36)
    assert aggregate(s, "last").item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(s, "mean")


class SetScorer:
    """A toy PRM: the score of a prefix is a table lookup by its set of views (``default`` otherwise)."""

    def __init__(self, table: dict[frozenset, float], margin: torch.Tensor, default: float = 0.05):
        self.table, self.margin, self.rule, self.default, self.calls = table, margin, "mean", default, 0

    def __call__(self, rows, traces):
        self.calls += 1
        out = torch.full(traces.shape, self.default)
        for i, trace in enumerate(traces.tolist()):
            for t in range(len(trace)):
                out[i, t] = self.table.get(frozenset(trace[:t + 1]), self.default)
        return out


def test_beam_search_finds_the_best_trace_that_greedy_misses():
    # views 0 (global), 1, 2, 3: greedy takes 1 (0.9) and then reaches at most 0.5; {0, 2, 3} scores 0.99
    table = {frozenset({0}): 0.5, frozenset({0, 1}): 0.9, frozenset({0, 2}): 0.8, frozenset({0, 3}): 0.1,
             frozenset({0, 1, 2}): 0.5, frozenset({0, 1, 3}): 0.4, frozenset({0, 2, 3}): 0.99}
    margin = torch.tensor([[0.5, -1.0, 2.0, 3.0]])  # {0,1,*} says... ; {0,2,3} averages to +1.83: roadwork
    pool = torch.tensor([[0, 1, 2, 3]])
    greedy = beam_search(SetScorer(table, margin), pool, beam=1, length=3, aggregation="last")
    beam = beam_search(SetScorer(table, margin), pool, beam=2, length=3, aggregation="last")
    assert greedy.best_score[0, -1].item() == pytest.approx(0.5)
    assert beam.best_score[0, -1].item() == pytest.approx(0.99)
    assert beam.best_score[0].tolist() == pytest.approx([0.5, 0.9, 0.99])
    assert beam.views[0].tolist() == [1, 3, 4]  # the pool is evaluated over the steps: 1, then 2 more, then 1
    # an exhaustive beam equals brute force over all traces on random scores
    gen = torch.Generator().manual_seed(0)
    views = range(1, 6)
    table = {frozenset({0, *c}): float(torch.rand(1, generator=gen)) for r in range(0, 4) for c in
             itertools.combinations(views, r)}
    margin = torch.randn(1, 6, generator=gen)
    found = beam_search(SetScorer(table, margin), torch.arange(6)[None], beam=100, length=4, aggregation="last")
    best = max(table[frozenset({0, *c})] for c in itertools.combinations(views, 3))
    assert found.best_score[0, -1].item() == pytest.approx(best)
    # early stopping: the first step whose best beam reaches the threshold
    stopped = beam.stopped(0.85)
    assert stopped.views.item() == 3 and stopped.score.item() == pytest.approx(0.9)
    assert beam.stopped(None).views.item() == 4


def test_best_of_n_and_weighted_votes():
    margin = torch.tensor([[0.1, -2.0, 1.0, 1.0, -0.5]])
    pool = torch.tensor([[0, 1, 2, 3, 4]])
    # traces of 2 views: {0,1} -> no roadwork (mean -0.95); {0,2}, {0,3} -> roadwork; {0,4} -> no roadwork
    table = {frozenset({0, 1}): 0.95, frozenset({0, 2}): 0.8, frozenset({0, 3}): 0.8, frozenset({0, 4}): 0.05}
    scorer = SetScorer(table, margin, default=0.5)
    best = best_of_n(scorer, pool, n=200, length=2, aggregation="last", seed=0)
    weighted = best_of_n(scorer, pool, n=200, length=2, aggregation="last", weighted=True, seed=0)
    assert best.answer.item() == 0 and best.score.item() == pytest.approx(0.95)   # the single best trace
    assert weighted.answer.item() == 1  # "roadwork" traces score 0.8 each, "none" ones 0.5 on average
    assert best.views.item() == 5
    assert pool_mean(margin, pool).answer.item() == 0  # mean -0.08
    assert pool_vote(margin, pool).answer.item() == 1  # 3 of 5 say roadwork
    assert pool_vote(margin, torch.tensor([[0, 1, 2, 4]])).answer.item() == 0  # 2 of 4: the tie goes to the mean


def test_view_pool():
    mask = torch.ones(20, 7, dtype=torch.bool)
    mask[:, 6] = False
    pool = view_pool(mask, 4, seed=3)
    assert pool.shape == (20, 4) and (pool[:, 0] == 0).all() and not (pool == 6).any()
    assert all(len(set(p.tolist())) == 4 for p in pool)
    assert torch.equal(pool, view_pool(mask, 4, seed=3)) and not torch.equal(pool, view_pool(mask, 4, seed=4))


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_prm_is_causal(arch):
    torch.manual_seed(0)
    net = ProcessRewardModel(embed_dim=8, n_slots=5, width=16, arch=arch, layers=2, heads=2).eval()
    emb, margin, slots = torch.randn(3, 4, 8), torch.randn(3, 4), torch.randint(0, 5, (3, 4))
    slots[:, 0] = 0
    out = net(emb, margin, running_belief(margin), slots)
    emb2, margin2 = emb.clone(), margin.clone()
    emb2[:, 3], margin2[:, 3] = torch.randn(3, 8), torch.randn(3)
    out2 = net(emb2, margin2, running_belief(margin2), slots)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)  # later steps never change earlier scores
    assert not torch.allclose(out[:, 3], out2[:, 3])
    with pytest.raises(ValueError, match="arch"):
        ProcessRewardModel(8, 5, arch="lstm")


def test_ltt_from_counts_matches_select_threshold():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 3000)
    errors = (rng.uniform(size=3000) > confidence).astype(float)
    grid = np.round(np.linspace(1.0, 0.5, 51), 3)
    direct = select_threshold(confidence, errors, 0.1, 0.1, candidates=grid, min_accepted=50)
    n = [(confidence >= t).sum() for t in grid]
    loss = [errors[confidence >= t].sum() for t in grid]
    counted = ltt_from_counts(grid, n, loss, 3000, 0.1, 0.1, min_accepted=50)
    assert counted.threshold == direct.threshold and counted.n_accepted == direct.n_accepted
    assert 0.5 < counted.threshold < 1.0
    with pytest.raises(ValueError, match="non-decreasing"):
        ltt_from_counts(grid, n[::-1], loss, 3000, 0.1, 0.1)


def test_prm_learns_which_views_to_trust(one_thread):
    """A controlled case: two informative view slots among noisy ones. The PRM, trained on Monte Carlo step labels,
    must rank held-out steps far better than the running belief's own confidence."""
    from functools import partial

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    from torchmetrics.functional.classification import binary_auroc

    from train.tiers.prm import PRMModule, TraceDataset, batched

    gen = torch.Generator().manual_seed(0)
    q, v = 1200, 6
    label = torch.randint(0, 2, (q,), generator=gen)
    sign = (2 * label - 1).float().unsqueeze(1)
    noise = torch.randn(q, v, generator=gen)
    margin = torch.cat([0.3 * sign + noise[:, :1], 2.0 * sign + noise[:, 1:3], 3.0 * noise[:, 3:]], 1)
    views = {"logits": torch.stack([torch.zeros_like(margin), margin], -1), "embeddings": torch.randn(q, v, 4),
             "mask": torch.ones(q, v, dtype=torch.bool), "label": label}
    traces = sample_traces(views["mask"], 4, 4, seed=1)
    hard, soft = rollout_labels(margin, views["mask"], label, traces, 8, budget=4, seed=2)

    def dataset(rows):
        return TraceDataset(views, rows.repeat_interleave(4), traces[rows].flatten(0, 1), soft[rows].flatten(0, 1),
                            hard[rows].flatten(0, 1), "mean")

    train, held_out = torch.arange(0, 900), torch.arange(900, q)
    pl.seed_everything(0, verbose=False)
    module = PRMModule({"width": 32, "layers": 1, "heads": 2}, partial(torch.optim.AdamW, lr=3e-3), embed_dim=4,
                       n_slots=v)
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(dataset(train), batch_size=128, shuffle=True, collate_fn=batched))
    batch = dataset(held_out).__getitems__(list(range(len(held_out) * 4)))
    with torch.no_grad():
        scores = module.eval()(batch).sigmoid()
    prm_auroc = float(binary_auroc(scores.flatten(), batch["hard"].long().flatten()))
    belief_auroc = float(binary_auroc(batch["beliefs"].abs().flatten(), batch["hard"].long().flatten()))
    assert prm_auroc >= 0.8 and prm_auroc >= belief_auroc + 0.2, (prm_auroc, belief_auroc)  # measured 0.86 vs 0.49


def test_greedy_view_order_and_ordered_pools():
    # every query is roadwork; the global view is wrong, view 1 fixes it, view 3 keeps it, view 2 breaks it
    margin = torch.tensor([[-0.5, 2.0, -3.0, 0.2]]).repeat(3, 1)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert greedy_view_order(margin, mask, torch.ones(3, dtype=torch.long)) == [0, 1, 3, 2]
    mask[1, 3] = False  # the second query lacks view 3: its pool skips to the next in order
    pool = view_pool(mask, 3, order=[0, 3, 1, 2])
    assert pool.tolist() == [[0, 3, 1], [0, 1, 2], [0, 3, 1]]
    with pytest.raises(ValueError, match="every slot"):
        view_pool(mask, 2, order=[0, 1])


def test_prm_task_rejects_bad_settings():
    """Values the schema knows fail in check_config, before any work: the trace budget too, bounded by the views a
    query has."""
    from conftest import compose_config

    from train.config_checks import check_config
    from train.errors import ConfigError

    for override, message in (("prm.search.pool=best", r"prm\.search\.pool='best': Input should be 'ordered' or "
                                                        "'random'"),
                              ("prm.every_level=[train]", r"prm\.every_level\.0='train'"),
                              ("prm.traces.label=maybe", r"prm\.traces\.label='maybe'"),
                              ("prm.traces.budget=40", r"prm: traces\.budget=40 must be in \[1, \d+\]")):
        with pytest.raises(ConfigError, match=message):
            check_config(compose_config(override))
